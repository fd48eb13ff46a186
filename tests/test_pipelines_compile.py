"""Pipeline YAML: the committed files are current, compiling is deterministic, and each
method's task graph mirrors the local engine (npo/engine.py).

The structure tests read the compiled YAML back (yaml.safe_load and kfp's own loader); one
test runs a pipeline under kfp.local with fake stages (NPO_STAGE_RUNNER) and checks the
order and parameters of the stage calls. No torch, no cluster.

Run: .venv/bin/python -m pytest tests/test_pipelines_compile.py -q
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kfp")

from kfp import components as kfp_components

from npo.config import ExperimentConfig, load_config, public_dump
from npo.pipelines.build import chunks
from npo.pipelines.compile import compile_config, pipeline_yaml, shipped_configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COMPILED = REPO / "pipelines" / "compiled"


# --------------------------------------------------------------------------- helpers
def load_spec(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) of a compiled pipeline YAML."""
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 2, "expected the pipeline spec and the kubernetes platform spec"
    return docs[0], docs[1]


def compiled(cfg: ExperimentConfig) -> dict[str, Any]:
    return load_spec(pipeline_yaml(cfg, "test"))[0]


def walk(spec: dict[str, Any], dag: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every task of `dag` and of the sub-DAGs (sub-pipelines, condition branches) below."""
    for task in dag.get("tasks", {}).values():
        yield task
        inner = spec["components"][task["componentRef"]["name"]]
        if "dag" in inner:
            yield from walk(spec, inner["dag"])


def root_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The top-level tasks by display name."""
    return {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}


def constant(task: dict[str, Any], name: str) -> Any:
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


def producer(task: dict[str, Any], name: str) -> tuple[str, str]:
    """(producer task name, output key) feeding input `name`."""
    ref = task["inputs"]["parameters"][name]["taskOutputParameter"]
    return ref["producerTask"], ref["outputParameterKey"]


def display(spec: dict[str, Any], task_name: str, dag: dict[str, Any] | None = None) -> str:
    dag = dag or spec["root"]["dag"]
    return dag["tasks"][task_name]["taskInfo"]["name"]


def toy(name: str, *overrides: str) -> ExperimentConfig:
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


# --------------------------------------------------------------------------- committed YAML
def test_every_shipped_config_has_current_compiled_yaml(tmp_path):
    configs = shipped_configs(CONFIGS)
    assert {p.stem for p in configs} >= {
        "toy_grpo",
        "toy_npo",
        "toy_autonpo",
        "toy_luffy",
        "toy_exgrpo",
        "toy_rlep",
    }
    committed = {p.stem for p in COMPILED.glob("*.yaml")}
    assert committed == {p.stem for p in configs}, (
        "pipelines/compiled/ does not match configs/: run `make compile`"
    )
    for config in configs:
        fresh = compile_config(config, tmp_path).read_bytes()
        assert fresh == (COMPILED / f"{config.stem}.yaml").read_bytes(), (
            f"pipelines/compiled/{config.stem}.yaml is stale: run `make compile`"
        )


def test_compiling_twice_gives_identical_bytes(tmp_path):
    cfg = toy("toy_autonpo", "train.steps=40")
    assert pipeline_yaml(cfg, "x") == pipeline_yaml(cfg, "x")
    first = compile_config(CONFIGS / "toy_npo.yaml", tmp_path / "a").read_bytes()
    second = compile_config(CONFIGS / "toy_npo.yaml", tmp_path / "b").read_bytes()
    assert first == second


@pytest.mark.parametrize("path", sorted(COMPILED.glob("*.yaml")), ids=lambda p: p.stem)
def test_compiled_yaml_loads_back_with_the_config_as_its_only_parameter(path):
    component = kfp_components.load_component_from_file(str(path))
    cfg = load_config(CONFIGS / path.name)
    assert component.name == cfg.name.lower().replace("_", "-")
    assert list(component.component_spec.inputs) == ["config"]
    spec, _ = load_spec(path.read_text())
    default = spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert json.loads(default) == public_dump(cfg)
    assert ExperimentConfig.model_validate(json.loads(default)) == cfg
    # The image has kfp and npo: nothing is installed when a task starts.
    text = path.read_text()
    assert "pip install" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == cfg.cluster.image
        source = executor["container"]["command"][-1]
        assert "from npo.stepserver import call_stage" in source or "return run_id" in source


# --------------------------------------------------------------------------- grpo & co
def test_chunks_cut_like_the_engine():
    """engine.chunks' cuts (not imported: npo.engine loads torch)."""
    assert chunks(0, 150, 25) == [(0, 25), (25, 50), (50, 75), (75, 100), (100, 125), (125, 150)]
    assert chunks(110, 200, 25) == [(110, 135), (135, 160), (160, 185), (185, 200)]
    assert chunks(0, 10, 25) == [(0, 10)]
    assert chunks(5, 5, 25) == []


@pytest.mark.parametrize("method", ["grpo", "luffy", "exgrpo"])
def test_unguided_methods_train_in_checkpoint_segments_then_evaluate_and_report(method):
    cfg = toy(f"toy_{method}")
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    trains = [f"segment {i} · train" for i in range(1, 7)]
    assert set(tasks) == {"warm-up", *trains, "evaluate", "report"}
    previous = "warm-up"
    for number, label in enumerate(trains):
        task = tasks[label]
        start, end = number * 25, (number + 1) * 25
        assert (constant(task, "start"), constant(task, "end")) == (start, end)
        assert constant(task, "guidance") == ""
        assert constant(task, "phase") == method
        assert constant(task, "fork_from") == ""
        source, key = producer(task, "run_id")  # the run id flows task to task
        assert (display(spec, source), key) == (previous, "run_id")
        previous = label
    evaluate = tasks["evaluate"]
    assert constant(evaluate, "step") == cfg.train.steps
    assert display(spec, producer(evaluate, "run_id")[0]) == trains[-1]
    assert [display(spec, t) for t in tasks["report"]["dependentTasks"]] == ["evaluate"]


def test_grpo_with_zero_steps_evaluates_the_warm_up():
    spec = compiled(toy("toy_grpo", "train.steps=0"))
    assert set(root_tasks(spec)) == {"warm-up", "evaluate", "report"}


# --------------------------------------------------------------------------- npo
def test_npo_guided_segments_look_ahead_then_guide_verify_and_train():
    cfg = toy("toy_npo")  # early (scout 25, window 25) + late (at 100, lookahead 25)
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    assert set(tasks) == {
        "warm-up",
        "early · look-ahead",
        "early · guidance",
        "early · verify",
        "early · train",
        "segment 2 · train",
        "segment 3 · train",
        "segment 4 · train",
        "late · look-ahead",
        "late · guidance",
        "late · verify",
        "late · train",
        "segment 6 · train",
        "evaluate",
        "report",
    }
    for kind, start, main_before in (("early", 0, "warm-up"), ("late", 100, "segment 4 · train")):
        ahead = tasks[f"{kind} · look-ahead"]
        branch = f"toy-npo.{kind}{start:06d}"
        assert constant(ahead, "run_id") == branch
        assert (constant(ahead, "start"), constant(ahead, "end")) == (start, start + 25)
        assert constant(ahead, "phase") == f"{kind}·ahead"
        # Forks the main run once it reached the fork point (a data dependency).
        assert display(spec, producer(ahead, "fork_from")[0]) == main_before

        guide = tasks[f"{kind} · guidance"]
        assert constant(guide, "cache_id") == f"toy-npo.{kind}{start:06d}"
        assert display(spec, producer(guide, "guide_run")[0]) == f"{kind} · look-ahead"
        assert constant(guide, "guide_step") == start + 25
        assert display(spec, producer(guide, "current_run")[0]) == main_before
        assert constant(guide, "current_step") == start
        assert (constant(guide, "start"), constant(guide, "end")) == (start, start + 25)
        assert constant(guide, "pool_only") is False
        assert constant(guide, "kind") == kind

        verify = tasks[f"{kind} · verify"]
        assert display(spec, producer(verify, "cache_id")[0]) == f"{kind} · guidance"

        train = tasks[f"{kind} · train"]
        assert producer(train, "guidance")[1] == "cache_id"
        assert display(spec, producer(train, "guidance")[0]) == f"{kind} · verify"
        assert display(spec, producer(train, "run_id")[0]) == main_before
        assert constant(train, "phase") == f"npo·{kind}"
    assert display(spec, producer(tasks["segment 2 · train"], "run_id")[0]) == "early · train"
    assert display(spec, producer(tasks["segment 6 · train"], "run_id")[0]) == "late · train"


def test_npo_delta0_control_guides_from_the_fork_point_without_look_ahead():
    spec = compiled(toy("toy_npo", "npo.delta0_control=true"))
    tasks = root_tasks(spec)
    assert not [name for name in tasks if "look-ahead" in name]
    guide = tasks["late · guidance"]
    assert display(spec, producer(guide, "guide_run")[0]) == "segment 4 · train"
    assert constant(guide, "guide_step") == 100


def test_npo_rolling_windows_each_get_a_look_ahead():
    cfg = toy(
        "toy_npo", "npo.early.enabled=false", "npo.late.enabled=false", "npo.rolling.enabled=true"
    )
    names = set(root_tasks(compiled(cfg)))
    assert {f"rolling {i} · look-ahead" for i in range(1, 7)} <= names
    assert {f"rolling {i} · train" for i in range(1, 7)} <= names


# --------------------------------------------------------------------------- rlep
def test_rlep_replays_the_finished_runs_latest_checkpoint_per_window():
    spec = compiled(toy("toy_rlep"))
    tasks = root_tasks(spec)
    for number in range(1, 7):
        t = (number - 1) * 25
        guide = tasks[f"segment {number} · guidance"]
        assert constant(guide, "cache_id") == f"toy-rlep.rlep{t:06d}"
        assert constant(guide, "guide_run") == "toy-grpo"
        assert constant(guide, "guide_step") == -1  # the stage resolves "latest"
        assert constant(guide, "current_step") == t
        assert constant(guide, "kind") == "rlep"
        train = tasks[f"segment {number} · train"]
        assert display(spec, producer(train, "guidance")[0]) == f"segment {number} · verify"
        assert constant(train, "phase") == "rlep"


# --------------------------------------------------------------------------- autonpo
def test_autonpo_windows_are_sub_pipelines_with_if_else_and_oneof():
    cfg = toy("toy_autonpo")  # 150 steps, a check every 10: 14 checked windows + the last
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    windows = [f"segment {i}" for i in range(1, 15)]
    assert set(tasks) == {"warm-up", *windows, "segment 15 · train", "evaluate", "report"}
    previous = "warm-up"
    for number, label in enumerate(windows, 1):
        task = tasks[label]
        assert display(spec, producer(task, "run_id")[0]) == previous
        previous = label
        component = spec["components"][task["componentRef"]["name"]]
        inner = list(walk(spec, component["dag"]))
        names = {t["taskInfo"]["name"] for t in inner}
        assert {
            f"{label} · train",
            f"{label} · detect",
            f"{label} · rollback",
            f"{label} · guidance",
            f"{label} · verify",
            f"{label} · replay",
            f"{label} · keep",
        } <= names
        conditions = [t["triggerPolicy"]["condition"] for t in inner if "triggerPolicy" in t]
        assert len(conditions) == 2  # If(intervene) and its Else
        assert any(c.endswith("intervene'] == true") for c in conditions)
        assert any(c.startswith("!(") for c in conditions)
        # The window's output is the OneOf of the replay's and the keep's run id.
        branches = [t for t in inner if t["taskInfo"]["name"] == "condition-branches-1"]
        assert len(branches) == 1
        oneof = spec["components"][branches[0]["componentRef"]["name"]]["dag"]["outputs"]
        (selector,) = oneof["parameters"].values()
        keys = [s["outputParameterKey"] for s in selector["valueFromOneof"]["parameterSelectors"]]
        assert len(keys) == 2 and keys[0].endswith("-run_id") and "keep" in keys[1]
        by_name = {t["taskInfo"]["name"]: t for t in inner}
        train = by_name[f"{label} · train"]
        start, t = (number - 1) * 10, number * 10
        assert (constant(train, "start"), constant(train, "end")) == (start, t)
        assert constant(by_name[f"{label} · detect"], "t") == t
        guide = by_name[f"{label} · guidance"]
        assert constant(guide, "pool_only") is True
        assert constant(guide, "guide_step") == t
        assert constant(guide, "kind") == ""
        replay = by_name[f"{label} · replay"]
        assert constant(replay, "phase") == "autonpo·replay"
        assert constant(replay, "end") == t
    last = tasks["segment 15 · train"]
    assert (constant(last, "start"), constant(last, "end")) == (140, 150)
    assert display(spec, producer(last, "run_id")[0]) == "segment 14"
    assert display(spec, producer(tasks["evaluate"], "run_id")[0]) == "segment 15 · train"


def test_autonpo_last_window_has_no_check():
    spec = compiled(toy("toy_autonpo", "train.steps=10"))
    assert set(root_tasks(spec)) == {"warm-up", "segment 1 · train", "evaluate", "report"}


# --------------------------------------------------------------------------- kfp.local
FAKE_STAGES = '''
"""Fake stages for a kfp.local run: log each call, answer like the real ones."""
import json
import os


def run_stage(name, config, progress=None, **params):
    with open(os.environ["FAKE_STAGE_LOG"], "a") as f:
        f.write(json.dumps({"stage": name, **params}) + "\\n")
    run, t = json.loads(config)["name"], params.get("t")
    if name == "prepare":
        return {"run_id": run, "eval_accuracy": 0.4}
    if name == "train":
        metrics = {"reward/mean": 0.5}
        return {"run_id": params["run_id"], "policy_step": params["end"],
                "global_step": params["end"], "metrics": metrics, "markdown": "# curves",
                "html": "<p>curves</p>"}
    if name == "guidance":
        if params["end"] <= params["start"]:
            return {"cache_id": "", "entries": 0, "q_hat": 0.0, "gap": 0.0}
        return {"cache_id": params["cache_id"], "entries": 2, "q_hat": 0.1, "gap": 0.2,
                "guide_accuracy": 0.5, "current_accuracy": 0.4}
    if name == "verify":
        return {"cache_id": params["cache_id"], "entries": 2, "verified": 2}
    if name == "detect":
        return {"intervene": t in (10, 20), "triggered": True, "confirmed": True,
                "signals": json.dumps({"t": t})}
    if name == "rollback":
        if t == 10:  # nothing to score yet: same lineage, empty replay
            return {"lineage_run_id": params["run_id"], "guide_run": params["run_id"],
                    "back_run": params["run_id"], "rollback_to": t, "delta": 0,
                    "cache_id": "", "skipped": True}
        return {"lineage_run_id": f"{run}.r1", "guide_run": params["run_id"],
                "back_run": params["run_id"], "rollback_to": t - 10, "delta": 10,
                "cache_id": f"{run}.auto{params['global_step']:06d}", "skipped": False}
    if name == "evaluate":
        return {"accuracy": 0.6, "metrics": {"final/accuracy": 0.6}}
    if name == "report":
        return {"summary": {"accuracy": 0.6}, "markdown": "# report"}
    raise KeyError(name)
'''


def test_autonpo_pipeline_runs_under_kfp_local_in_the_engines_order(tmp_path, monkeypatch):
    """Window 1 intervenes but the rollback is skipped (empty replay, same lineage); window
    2 rolls back to 10 and replays (10, 20] on lineage r1, from which window 3 continues."""
    from kfp import local

    from npo.pipelines.build import build_pipeline

    (tmp_path / "fake_pipeline_stages.py").write_text(textwrap.dedent(FAKE_STAGES))
    log = tmp_path / "calls.jsonl"
    # The tasks run `sys.executable -m kfp.dsl.executor_main`: npo is installed there.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    monkeypatch.setenv("NPO_STAGE_RUNNER", "fake_pipeline_stages:run_stage")
    monkeypatch.setenv("FAKE_STAGE_LOG", str(log))
    monkeypatch.delenv("NPO_STEP_SERVER", raising=False)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    build_pipeline(toy("toy_autonpo", "train.steps=30"), local=True)()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    brief = [(c["stage"], c.get("run_id"), c.get("start"), c.get("end")) for c in calls]
    assert brief == [
        ("prepare", None, None, None),
        ("train", "toy-autonpo", 0, 10),
        ("detect", "toy-autonpo", None, None),
        ("rollback", "toy-autonpo", None, None),
        ("guidance", None, 10, 10),
        ("verify", None, None, None),
        ("train", "toy-autonpo", 10, 10),
        ("train", "toy-autonpo", 10, 20),
        ("detect", "toy-autonpo", None, None),
        ("rollback", "toy-autonpo", None, None),
        ("guidance", None, 10, 20),
        ("verify", None, None, None),
        ("train", "toy-autonpo.r1", 10, 20),
        ("train", "toy-autonpo.r1", 20, 30),
        ("evaluate", "toy-autonpo.r1", None, None),
        ("report", None, None, None),
    ]
    rollback, guide, replay = calls[9], calls[10], calls[12]
    assert rollback["signals"] == json.dumps({"t": 20})  # detect's signals are recorded
    assert guide == {
        "stage": "guidance",
        "cache_id": "toy-autonpo.auto000020",
        "guide_run": "toy-autonpo",
        "guide_step": 20,
        "current_run": "toy-autonpo",
        "current_step": 10,
        "start": 10,
        "end": 20,
        "pool_only": True,
        "kind": "",
        "log_step": 20,
    }
    assert replay["guidance"] == "toy-autonpo.auto000020"
    assert replay["phase"] == "autonpo·replay"


# --------------------------------------------------------------------------- npo compile
def test_compile_command_writes_one_yaml_per_config(tmp_path):
    from typer.testing import CliRunner

    from npo.cli import app

    out = tmp_path / "out"
    config = CONFIGS / "toy_luffy.yaml"
    result = CliRunner().invoke(app, ["compile", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["toy_luffy.yaml"]
    assert (out / "toy_luffy.yaml").read_bytes() == (COMPILED / "toy_luffy.yaml").read_bytes()
    bad = CliRunner().invoke(app, ["compile", str(tmp_path / "nope.yaml"), "--out", str(out)])
    assert bad.exit_code == 2
    assert "config file not found" in bad.stderr
