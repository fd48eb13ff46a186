"""The `npo` command: exit codes, error messages, and that bad input leaves nothing on disk.

No training here (tests/test_e2e.py runs the experiment): `run` is only fed configs that must
be refused before anything starts, and `eval` scores an untrained 1-layer model on 8 problems.
Exit codes: 0 ok, 1 the run failed, 2 bad input (config, paths).

Run: .venv/bin/python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from npo.cli import app
from npo.config import ExperimentConfig, load_config

_SCRIPT = Path(sys.executable).with_name("npo")
# The installed console script; the module itself where the venv has none (same app).
NPO = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "npo.cli"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current directory: a run that wrongly starts would write here, not the repo."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_config(folder: Path, text: str) -> Path:
    """exp.yaml in `folder`: store.root at folder/runs, MLflow off, and a zero-step budget so a
    config wrongly accepted would finish at once instead of training for minutes."""
    path = folder / "exp.yaml"
    header = (
        f"store: {{root: {folder / 'runs'}}}\ntracking: {{enabled: false}}\n"
        "warmup: {steps: 0}\ntrain: {steps: 0, threads: 1}\n"
    )
    path.write_text(header + text)
    return path


def says(text: str, words: str) -> bool:
    """`words` occurs in `text`, ignoring whitespace: rich wraps long lines at the console
    width (80 when not a terminal), at a space or inside a path."""
    return re.sub(r"\s+", "", words) in re.sub(r"\s+", "", text)


def assert_refused(result, workdir: Path, *words: str) -> None:
    """Exit 2, each of `words` in stderr, nothing on stdout, and no file but the config."""
    assert result.exit_code == 2, result.output
    for word in words:
        assert says(result.stderr, word), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["exp.yaml"]


# --------------------------------------------------------------------------- npo run
@pytest.mark.parametrize(
    ("yaml_text", "overrides", "words"),
    [
        ("rollout: {group_size: 1}\n", [], ["rollout.group_size", "greater than or equal to 2"]),
        ("algo: {lrr: 0.1}\n", [], ["algo.lrr", "unknown key"]),
        ("rollout: {group_size: abc}\n", [], ["rollout.group_size", "integer"]),
        ("algo: {minibatches: 3}\n", [], ["algo.minibatches (3) must divide"]),
        ("", ["--set", "algo.lrr=1e-3"], ["algo.lrr", "unknown key"]),
        ("", ["--set", "model.tiny.num_heads=3"], ["model.tiny", "divisible by num_heads"]),
        ("", ["--set", "algo.lr"], ["'algo.lr'", "expected key.path=value"]),
        ("task: {kind: math}\n", [], ["task.math.train_path", "Field required"]),
    ],
)
def test_run_with_bad_config_exits_2_and_creates_nothing(
    runner, workdir, yaml_text, overrides, words
):
    path = write_config(workdir, yaml_text)
    result = runner.invoke(app, ["run", str(path), "--quiet", *overrides])
    assert_refused(result, workdir, "error:", *words)


def test_run_with_bad_yaml_names_the_file(runner, workdir):
    path = write_config(workdir, "algo: {lr: 0.1\n")
    result = runner.invoke(app, ["run", str(path)])
    assert_refused(result, workdir, str(path), "not valid YAML")


def test_run_with_missing_config_file(runner, workdir):
    result = runner.invoke(app, ["run", str(workdir / "nope.yaml")])
    assert result.exit_code == 2
    assert says(result.stderr, f"config file not found: {workdir / 'nope.yaml'}")
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        # Valid configs whose task cannot be built: bad input too, refused before any folder.
        ("task: {kind: arithmetic, digits: 1}\n", ["task.n_train + task.n_eval", "100 distinct"]),
        (
            "task: {kind: math, train_path: /nope/train.jsonl, eval_path: /nope/eval.jsonl}\n",
            ["/nope/train.jsonl: file not found"],
        ),
    ],
)
def test_run_with_impossible_task_exits_2_and_creates_nothing(runner, workdir, yaml_text, words):
    path = write_config(workdir, yaml_text)
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    for word in words:
        assert says(result.stderr, word), result.stderr
    assert "Traceback" not in result.output
    assert not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["exp.yaml"]


def test_installed_command_exit_code_and_stderr(workdir):
    """The real console script, in a child process: exit status 2 and the field on stderr."""
    path = write_config(workdir, "")
    proc = subprocess.run(
        [*NPO, "run", str(path), "--set", "algo.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "algo.lrr: unknown key" in proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in workdir.iterdir()) == ["exp.yaml"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["the file sets nothing", "give no config file to run the defaults"]),
        ("# a comment\n", ["the file sets nothing"]),
        ("name: x\nseed: 1\nseed: 2\n", ["duplicate key 'seed' at line 3 (first at line 2)"]),
        ("train: {steps: true}\n", ["train.steps", "expected an integer, got True"]),
        ("algo: {lr: .inf}\n", ["algo.lr", "finite number"]),
    ],
)
def test_run_refuses_a_file_that_sets_nothing_or_is_loose(runner, workdir, text, words):
    path = workdir / "exp.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert_refused(result, workdir, "error:", *words)


def test_run_refuses_a_config_that_is_not_utf8(runner, workdir):
    path = workdir / "exp.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert_refused(result, workdir, f"{path}: not UTF-8 text (byte 0xe9 on line 1)")


def test_run_refuses_an_empty_key_segment(runner, workdir):
    path = write_config(workdir, "")
    result = runner.invoke(app, ["run", str(path), "--quiet", "--set", "train..steps=5"])
    assert_refused(result, workdir, "'train..steps=5': empty segment in the key")


# A run of seconds: no warm-up, no RL steps, a 1-layer model and 8 eval prompts.
FAST = (
    "name: r\ntask: {kind: arithmetic, digits: 2, n_train: 64, n_eval: 8}\n"
    "model: {tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}\n"
    "rollout: {prompts_per_step: 2, group_size: 2, max_new_tokens: 4}\n"
)


def test_a_rerun_names_what_changed_and_lets_speed_settings_and_more_steps_through(
    runner, workdir, one_thread
):
    path = write_config(workdir, FAST)
    direct = ["run", str(path), "--quiet", "--engine", "direct"]
    assert runner.invoke(app, direct).exit_code == 0
    # train.threads only changes speed (one_thread puts torch back on one afterwards).
    faster = runner.invoke(app, [*direct, "--set", "train.threads=2"])
    assert faster.exit_code == 0, faster.output
    assert "run 'r' is complete: its tasks return their committed results" in faster.stdout
    refused = runner.invoke(app, [*direct, "--set", "algo.lr=1e-4", "--set", "seed=2"])
    assert refused.exit_code == 2, refused.output
    assert says(refused.stderr, "was started with a different config")
    assert says(refused.stderr, "algo.lr: 5e-05 -> 0.0001; seed: 0 -> 2")
    longer = runner.invoke(app, [*direct, "--set", "train.steps=1"])
    assert longer.exit_code == 0, longer.output
    assert table_value(longer.stdout, "policy steps") == "1"
    assert (
        "resuming run 'r' (completed): its last checkpoint is the end of its warm-up (policy "
        "step 0); on to policy step 1"
    ) in longer.stdout


def test_compare_needs_two_configs(runner, workdir):
    path = write_config(workdir, "")
    result = runner.invoke(app, ["compare", str(path), "--quiet"])
    assert_refused(result, workdir, "compare needs at least two configs", "got 1")


# --------------------------------------------------------------------------- help, version
def test_version_prints_the_package_version(runner):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"npo {version('npo')}"


def test_dash_h_is_help_on_every_command(runner):
    import typer.main

    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"run", "compare", "stage", "submit"} <= set(commands)
    for args in [[], *([c] for c in commands)]:
        short = runner.invoke(app, [*args, "-h"], env={"COLUMNS": "200"})
        long = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert short.exit_code == 0, (args, short.output)
        assert short.stdout == long.stdout
        assert "Exit codes: 0 ok; 1 the run failed" in short.stdout, args


@pytest.mark.parametrize("command", ["run", "compare"])
def test_help_lists_the_engines(runner, command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert "<pipeline|direct>" in result.stdout


def test_an_unknown_engine_is_refused_with_the_choices(runner, workdir):
    path = write_config(workdir, "")
    result = runner.invoke(app, ["run", str(path), "--engine", "fast"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert says(result.stderr, "'fast' is not one of 'pipeline', 'direct'")
    assert sorted(p.name for p in workdir.iterdir()) == ["exp.yaml"]


# --------------------------------------------------------------------------- show-config
def test_show_config_applies_overrides(runner):
    result = runner.invoke(app, ["show-config", "--set", "algo.lr=0.5", "-s", "train.steps=7"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["algo"]["lr"] == 0.5
    assert shown["train"]["steps"] == 7
    assert re.search(r"^  lr: 0\.5$", result.stdout, re.MULTILINE)


def test_show_config_prints_a_loadable_config(runner, tmp_path):
    result = runner.invoke(app, ["show-config", "--set", "rollout.temperature=0.7"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "shown.yaml"
    path.write_text(result.stdout)
    cfg = load_config(path)
    assert cfg.rollout.temperature == 0.7
    assert cfg.model_copy(update={"rollout": ExperimentConfig().rollout}) == ExperimentConfig()


def test_show_config_reads_the_yaml_file(runner, tmp_path):
    path = write_config(tmp_path, "name: from-file\nseed: 9\n")
    result = runner.invoke(app, ["show-config", str(path)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert (shown["name"], shown["seed"]) == ("from-file", 9)
    assert shown["store"]["root"] == str(tmp_path / "runs")


def test_show_config_with_unknown_key_exits_2(runner):
    result = runner.invoke(app, ["show-config", "--set", "algo.lrr=1"])
    assert result.exit_code == 2
    assert "algo.lrr: unknown key" in result.stderr
    assert result.stdout == ""


def test_piped_show_config_round_trips_long_values(tmp_path):
    root = tmp_path / ("a_long_folder_name_" * 8) / "runs"  # > 150 characters
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [*NPO, "show-config", "--set", f"store.root={root}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["store"]["root"] == str(root)


def test_show_config_prints_brackets_verbatim(runner):
    # Values are data, not rich markup: "[bold]" must survive.
    result = runner.invoke(app, ["show-config", "--set", "tracking.experiment=a[bold]b"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["tracking"]["experiment"] == "a[bold]b"


# --------------------------------------------------------------------------- npo eval
@pytest.fixture
def saved_policy(tiny_policy, tmp_path) -> Path:
    """An untrained tiny model saved with save_policy, as a bare HF model folder."""
    from npo.policy.model import save_policy

    model, tok = tiny_policy
    folder = tmp_path / "model"
    save_policy(model, tok, folder)
    return folder


def table_value(output: str, key: str) -> str:
    """The value in the row `key` of a summary: a rich table (`npo eval`), or the plain
    lines `npo run` prints when its output is not a terminal."""
    key = re.escape(key)
    match = re.search(rf"│ {key}\s*│ (\S+)\s*│", output) or re.search(
        rf"^  {key}\s\s+(\S+)$", output, re.MULTILINE
    )
    assert match, f"no row {key!r} in:\n{output}"
    return match.group(1)


def test_eval_missing_folder_exits_2(runner, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = runner.invoke(app, ["eval", str(missing)])
    assert result.exit_code == 2
    assert says(result.stderr, f"no such checkpoint folder: {missing}")
    assert "Traceback" not in result.output


def test_eval_folder_without_model_exits_2(runner, tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert says(result.stderr, "is neither a checkpoint (policy/) nor a model folder")


def test_eval_saved_model_prints_accuracy(runner, saved_policy, one_thread):
    result = runner.invoke(app, ["eval", str(saved_policy), "--limit", "8"])
    assert result.exit_code == 0, result.output
    accuracy = float(table_value(result.stdout, "eval/accuracy"))
    assert 0.0 <= accuracy <= 1.0
    assert float(table_value(result.stdout, "eval/n")) == 8
    assert 1 <= float(table_value(result.stdout, "eval/response_length")) <= 8


def test_eval_finds_the_run_config_and_checkpoint_policy(runner, tiny_policy, tmp_path, one_thread):
    """A run folder's config.yaml names the task; a checkpoint folder holds policy/."""
    from npo.policy.model import save_policy

    run_dir = tmp_path / "runs" / "r1"
    ckpt = run_dir / "checkpoints" / "step_000003"
    save_policy(*tiny_policy, ckpt / "policy")
    (run_dir / "config.yaml").write_text(
        "task: {kind: arithmetic, digits: 2, n_train: 20, n_eval: 5}\n"
        "rollout: {max_new_tokens: 3}\n"
    )
    result = runner.invoke(app, ["eval", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert float(table_value(result.stdout, "eval/n")) == 5  # n_eval from the run's config
    assert 1 <= float(table_value(result.stdout, "eval/response_length")) <= 3


def test_eval_with_impossible_task_exits_2(runner, saved_policy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {kind: arithmetic, digits: 1}\n")
    result = runner.invoke(app, ["eval", str(saved_policy), "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert says(result.stderr, "task.n_train + task.n_eval")
    assert "Traceback" not in result.output


def test_eval_with_bad_config_option_exits_2(runner, saved_policy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: {max_new_tokens: 0}\n")
    result = runner.invoke(app, ["eval", str(saved_policy), "--config", str(bad)])
    assert result.exit_code == 2
    assert says(result.stderr, "rollout.max_new_tokens")


def test_eval_finds_the_run_config_of_a_shared_store_checkpoint(tmp_path: Path) -> None:
    from npo.steps.checkpoint_eval import find_run_config

    root = tmp_path / "runs"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "config.yaml").write_text("name: exp\n")
    for run_id in ("exp", "exp.late000100", "exp.r2"):
        ckpt = root / "artifacts" / "runs" / run_id / "ckpt" / "000150"
        ckpt.mkdir(parents=True)
        assert find_run_config(ckpt) == root / "exp" / "config.yaml"
    other = root / "artifacts" / "runs" / "nobody" / "ckpt" / "000001"
    other.mkdir(parents=True)
    assert find_run_config(other) is None
