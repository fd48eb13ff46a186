"""npo.preflight: what a config is known to fail at, refused before anything is written.

One test per check (each fails without it: the config would be accepted), the shipped
configs passing, and `npo run` / `compare` / `submit` refusing at once with exit code 2
and nothing on disk.

Run: .venv/bin/python -m pytest tests/test_preflight.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from npo.cli import app
from npo.config import ExperimentConfig, load_config
from npo.preflight import PreflightError, check_before_start
from npo.store.metadata import MetadataDB, default_metadata_url

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
_SCRIPT = Path(sys.executable).with_name("npo")
NPO = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "npo.cli"]


def config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """The default config with its store under tmp_path, MLflow off, and `overrides`."""
    return load_config(
        None, [f"store.root={tmp_path / 'runs'}", "tracking.enabled=false", *overrides]
    )


def problems(cfg: ExperimentConfig, **scope) -> list[str]:
    """What check_before_start refuses `cfg` for ([] when it passes)."""
    try:
        check_before_start(cfg, **scope)
    except PreflightError as e:
        assert str(e).count("\n  - ") == len(e.problems)  # every one listed
        return e.problems
    return []


def one(cfg: ExperimentConfig, *words: str, **scope) -> str:
    """The only problem of `cfg`, which says each of `words`."""
    found = problems(cfg, **scope)
    assert len(found) == 1, found
    for word in words:
        assert word in found[0], found[0]
    return found[0]


def make_run(tmp_path: Path, name: str, steps: tuple[int, ...] = ()) -> None:
    """A run `name` in the default metadata DB under tmp_path/runs, with checkpoints."""
    with MetadataDB(default_metadata_url((tmp_path / "runs").resolve())) as db:
        db.migrate()
        db.upsert_run(name, name, "grpo", 0, {})
        for step in steps:
            db.record_checkpoint(name, step, f"file:///nowhere/{step}", "0" * 64)


def test_the_defaults_pass(tmp_path):
    assert check_before_start(config(tmp_path)) == []
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- machine
def test_cuda_without_a_cuda_device(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config(tmp_path, "model.device=cuda")
    one(cfg, "model.device=cuda", "no CUDA device", "set model.device=cpu")
    assert problems(cfg, where="cluster") == []  # the cluster's nodes have their own GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert problems(cfg) == []


def test_vllm_missing(tmp_path, monkeypatch):
    from npo.rollout import vllm

    monkeypatch.setattr(vllm, "importlib_available", lambda: False)
    cfg = config(tmp_path, "rollout.backend=vllm")
    one(cfg, "rollout.backend=vllm needs the vllm extra", "rollout.backend=hf")
    assert problems(cfg, where="cluster") == []


# --------------------------------------------------------------------------- references
def test_init_from_a_run_that_does_not_exist(tmp_path):
    cfg = config(tmp_path, "warmup.init_from=doesnotexist")
    one(cfg, "warmup.init_from=doesnotexist", "no run 'doesnotexist'", "warmup.init_from=null")
    assert not (tmp_path / "runs").exists()  # no DB file was created to look
    make_run(tmp_path, "other", (0,))  # a DB with other runs: still missing
    one(cfg, "no run 'doesnotexist' in the metadata DB")
    with MetadataDB(default_metadata_url((tmp_path / "runs").resolve())) as db:
        assert db.get_run("toy-grpo") is None  # read, not written
    assert problems(cfg, planned={"doesnotexist"}) == []  # an earlier run of npo compare
    assert problems(cfg, where="cluster") == []


def test_init_from_needs_its_warmup_checkpoint(tmp_path):
    cfg = config(tmp_path, "warmup.init_from=base")
    make_run(tmp_path, "base")
    one(cfg, "warmup.init_from=base", "no warm-up checkpoint (step 0)")
    make_run(tmp_path, "base", (0,))
    assert problems(cfg) == []


def test_init_from_is_not_needed_once_the_run_has_its_own_warmup(tmp_path):
    cfg = config(tmp_path, "warmup.init_from=gone")
    make_run(tmp_path, cfg.name, (0,))  # resuming: the warm-up is done, init_from unread
    assert problems(cfg) == []
    one(cfg, "no run 'gone'", fresh=True)  # --fresh redoes the warm-up


def test_rlep_run_must_exist_with_a_checkpoint(tmp_path):
    cfg = config(tmp_path, "method=rlep", "baselines.rlep_run=doesnotexist")
    one(cfg, "baselines.rlep_run=doesnotexist", "no run 'doesnotexist'")
    make_run(tmp_path, "doesnotexist")
    one(cfg, "has no checkpoint to replay")
    make_run(tmp_path, "doesnotexist", (0, 5))
    assert problems(cfg) == []
    one(config(tmp_path, "method=rlep", "baselines.rlep_run=toy-grpo"), "is this run itself")


def test_rlep_without_a_run_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"method rlep needs baselines\.rlep_run"):
        config(tmp_path, "method=rlep")


# --------------------------------------------------------------------------- files
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def math(tmp_path: Path, train: object, eval_: object, *overrides: str) -> ExperimentConfig:
    return config(
        tmp_path, f"task={{kind: math, train_path: '{train}', eval_path: '{eval_}'}}", *overrides
    )


GOOD = '{"prompt": "1+1", "answer": "2"}\n'


def test_math_files_exist_and_parse(tmp_path):
    good = write(tmp_path / "good.jsonl", GOOD)
    assert problems(math(tmp_path, good, good)) == []
    one(
        math(tmp_path, tmp_path / "nope.jsonl", good),
        "task.train_path",
        "nope.jsonl: file not found",
    )
    one(math(tmp_path, good, tmp_path), "task.eval_path", "not a file")
    bad = write(tmp_path / "bad.jsonl", "\n" + GOOD.replace('"answer"', '"answr"'))
    one(math(tmp_path, bad, good), "task.train_path", "bad.jsonl:2: missing key 'answer'")
    late = write(tmp_path / "late.jsonl", GOOD + "not json\n")  # not only the first line
    one(math(tmp_path, good, late), "late.jsonl:2: not valid JSON")
    blank = write(tmp_path / "blank.jsonl", "\n\n")
    one(math(tmp_path, good, blank), "no problems in file")
    found = problems(math(tmp_path, bad, tmp_path / "nope.jsonl"))
    assert len(found) == 2  # every problem, not the first only


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_dataset(tmp_path):
    good = write(tmp_path / "good.jsonl", GOOD)
    locked = write(tmp_path / "locked.jsonl", GOOD)
    locked.chmod(0)
    one(math(tmp_path, locked, good), "task.train_path", "not readable")


def test_store_uris_are_not_fetched(tmp_path):
    cfg = math(tmp_path, "s3://bucket/train.jsonl", "s3://bucket/eval.jsonl")
    assert problems(cfg) == []  # no network: the steps fetch them


def test_a_local_model_folder_must_exist(tmp_path):
    one(config(tmp_path, f"model.source={tmp_path / 'no-model'}"), "model.source", "no folder")
    assert problems(config(tmp_path, f"model.source={tmp_path}")) == []
    assert problems(config(tmp_path, f"model.source={tmp_path / 'x'}"), where="cluster") == []


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("setting", "method"),
    [
        ("npo.early.enabled=true", "npo"),
        ("npo.late.enabled=true", "npo"),
        ("npo.rolling.enabled=true", "npo"),
        ("npo.delta0_control=true", "npo"),
        ("autonpo.force_at=[10]", "autonpo"),
        ("baselines.rlep_run=other", "rlep"),
    ],
)
def test_a_setting_the_method_ignores(tmp_path, setting, method):
    field = setting.partition("=")[0]
    cfg = config(tmp_path, "method=grpo", setting)
    one(cfg, field, "method grpo ignores it", f"set method={method}")
    assert problems(cfg, where="cluster")  # a contradiction wherever it runs


def test_autonpo_that_can_never_trigger(tmp_path):
    cfg = config(tmp_path, "method=autonpo", "train.steps=10")
    one(cfg, "train.steps=10 can never intervene", "first check that can fire is at step 40")
    one(cfg, "set train.steps >= 41", where="cluster")
    assert problems(config(tmp_path, "method=autonpo", "train.steps=41")) == []
    assert problems(config(tmp_path, "method=autonpo", "train.steps=40")) != []  # 40 = last
    # force_at fires at a check even without the history: the e2e tests' short runs
    forced = ["autonpo.check_every=3", "autonpo.window=2", "train.steps=6"]
    assert problems(config(tmp_path, "method=autonpo", *forced, "autonpo.force_at=[3]")) == []


def test_autonpo_force_at_off_the_checks(tmp_path):
    cfg = config(tmp_path, "method=autonpo", "autonpo.force_at=[45, 50]", "train.steps=50")
    one(cfg, "autonpo.force_at [45, 50]", "multiples of autonpo.check_every=10")


def test_autonpo_without_interventions(tmp_path):
    one(config(tmp_path, "method=autonpo", "autonpo.max_interventions=0"), "never intervenes")


def test_checkpoint_every_beyond_the_steps_is_a_warning(tmp_path):
    (warning,) = check_before_start(config(tmp_path, "train.steps=5"))
    assert "train.checkpoint_every=25 > train.steps=5" in warning
    assert "set train.checkpoint_every <= 5" in warning
    assert check_before_start(config(tmp_path, "train.steps=0")) == []  # no RL phase


# --------------------------------------------------------------------------- budgets
def test_answers_that_cannot_fit_max_new_tokens(tmp_path):
    cfg = config(tmp_path, "task.digits=9", "task.operation=mul")
    one(cfg, "rollout.max_new_tokens=8", "18 characters", "rollout.max_new_tokens >= 19")
    one(cfg, "rollout.max_new_tokens >= 19", where="cluster")
    one(config(tmp_path, "task.digits=7"), "8 characters")  # a sum: 8 digits + stop = 9
    assert problems(config(tmp_path, "task.digits=6")) == []


def test_prompt_and_response_beyond_max_position(tmp_path):
    cfg = config(tmp_path, "rollout.max_new_tokens=100")
    one(cfg, "model.tiny.max_position=64", "(9 tokens) + rollout.max_new_tokens (100) = 109")
    one(cfg, "rollout.max_new_tokens <= 55")
    assert problems(config(tmp_path, "rollout.max_new_tokens=55")) == []


def test_math_answers_under_the_tiny_tokenizer(tmp_path):
    long = write(tmp_path / "long.jsonl", '{"prompt": "p", "answer": "123456789"}\n')
    cfg = math(tmp_path, long, long)
    one(cfg, "longest gold answer", "9 characters", "rollout.max_new_tokens >= 10")
    assert problems(math(tmp_path, long, long, "rollout.max_new_tokens=10")) == []
    # a Hugging Face tokenizer is not loaded: no budget check
    assert problems(math(tmp_path, long, long, f"model.source={tmp_path}")) == []
    # nor for files in a store
    assert problems(math(tmp_path, "s3://b/t.jsonl", "s3://b/e.jsonl")) == []


# --------------------------------------------------------------------------- shipped
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_shipped_configs_pass(path, tmp_path):
    cfg = load_config(path, [f"store.root={tmp_path / 'runs'}"])
    # an AutoNPO config runs after its GRPO baseline (npo compare, the bench), whose warm-up
    # it reuses; the cluster config runs on a cluster
    where = "cluster" if cfg.model.device == "cuda" else "local"
    planned = {"toy-grpo", "countdown-grpo"}
    assert check_before_start(cfg, where=where, planned=planned) == []


# --------------------------------------------------------------------------- the CLI
def test_a_refused_run_exits_2_at_once_and_writes_nothing(tmp_path):
    """The real console script: exit 2 within seconds (it used to warm up first), every
    problem named, no run folder, no DB, no MLflow files."""
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    proc = subprocess.run(
        [
            *NPO,
            "run",
            "--set",
            f"store.root={work / 'runs'}",
            "--set",
            "warmup.init_from=doesnotexist",
            "--set",
            "npo.early.enabled=true",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=os.environ | {"COLUMNS": "300"},
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert "warmup.init_from=doesnotexist" in proc.stderr
    assert "npo.early.enabled is set but method grpo ignores it" in proc.stderr
    assert "2 problems" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(work.iterdir()) == []  # no runs/, no npo.db, no mlflow.db
    assert elapsed < 15, elapsed  # interpreter start and imports; the checks take ms


def test_compare_refuses_before_the_first_run(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    store = f"store: {{root: {tmp_path / 'runs'}}}\ntracking: {{enabled: false}}\n"
    first.write_text(f"name: a\n{store}")
    # b names a (run first by the comparison): fine; its ignored setting is not
    second.write_text(
        f"name: b\n{store}warmup: {{init_from: a}}\nnpo: {{late: {{enabled: true}}}}\n"
    )
    result = CliRunner().invoke(app, ["compare", str(first), str(second), "--quiet"])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.stderr.split())
    assert f"{second}: the run cannot start (1 problem" in flat
    assert "npo.late.enabled is set but method grpo ignores it" in flat
    assert not (tmp_path / "runs").exists()


def test_submit_refuses_a_contradiction_before_connecting(tmp_path):
    pytest.importorskip("kfp")
    result = CliRunner().invoke(
        app,
        [
            "submit",
            str(ROOT / "configs" / "toy_grpo.yaml"),
            "--host",
            "http://127.0.0.1:9",  # nothing listens: a connection would fail differently
            "--set",
            "method=autonpo",
            "--set",
            "train.steps=10",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "can never intervene" in " ".join(result.stderr.split())
