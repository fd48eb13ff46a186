"""Pipeline YAML: the committed files are current, compiling is deterministic, and each
method's task graph is its flow (npo.methods), small whatever the budget.

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


_COMPILED: dict[str, str] = {}


def compiled_yaml(cfg: ExperimentConfig) -> str:
    """The pipeline YAML of `cfg`, compiled once per distinct config in this session."""
    key = cfg.model_dump_json()
    if key not in _COMPILED:
        _COMPILED[key] = pipeline_yaml(cfg, "test")
    return _COMPILED[key]


def compiled(cfg: ExperimentConfig) -> dict[str, Any]:
    return load_spec(compiled_yaml(cfg))[0]


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
    """The constant a task passes as input `name` (None: not passed, the default holds)."""
    given = task["inputs"]["parameters"].get(name)
    return None if given is None else given["runtimeValue"]["constant"]


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
def test_the_compiled_folder_has_one_yaml_per_shipped_config():
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


# one test per config, so that the workers of `make test` share the compiling
@pytest.mark.parametrize("config", shipped_configs(CONFIGS), ids=lambda p: p.stem)
def test_every_shipped_config_has_current_compiled_yaml(config, tmp_path):
    fresh = compile_config(config, tmp_path).read_bytes()
    assert fresh == (COMPILED / f"{config.stem}.yaml").read_bytes(), (
        f"pipelines/compiled/{config.stem}.yaml is stale: run `make compile`"
    )


def test_compiling_twice_gives_identical_bytes(tmp_path):
    # the staleness test compares a fresh compile with one made in another process, through
    # the files `make compile` writes; this one, within a process (no state left behind)
    cfg = toy("toy_autonpo", "train.steps=40")
    assert pipeline_yaml(cfg, "x") == pipeline_yaml(cfg, "x")


@pytest.mark.parametrize("path", sorted(COMPILED.glob("*.yaml")), ids=lambda p: p.stem)
def test_compiled_yaml_loads_back_with_typed_ui_parameters_defaulting_to_the_config(path):
    from npo.pipelines.parameters import pipeline_parameters

    component = kfp_components.load_component_from_file(str(path))
    cfg = load_config(CONFIGS / path.name)
    assert component.name == cfg.name.lower().replace("_", "-")
    offered = pipeline_parameters(cfg)
    assert list(component.component_spec.inputs) == sorted(p.name for p, _, _ in offered)
    spec, _ = load_spec(path.read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    kfp_type = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}
    for parameter, kind, value in offered:
        assert inputs[parameter.name]["parameterType"] == kfp_type[kind]
        assert inputs[parameter.name]["defaultValue"] == value
    # the shape is compiled in: not offered, so the UI cannot contradict it
    names = {p.name for p, _, _ in offered}
    assert not names & {"train_steps", "method", "autonpo_max_interventions", "name"}
    (configure,) = [
        t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "config"
    ]
    base = configure["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]
    assert ExperimentConfig.model_validate(json.loads(base)) == cfg
    # The image has kfp and npo: nothing is installed when a task starts.
    text = path.read_text()
    assert "pip install" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        # the stages that never load the model may run cluster.light's image
        assert executor["container"]["image"] in {cfg.cluster.image, cfg.cluster.light.image}
        source = executor["container"]["command"][-1]
        assert "return run_task(" in source  # the stage's generated wrapper, nothing else


def test_pipeline_parameters_are_written_into_the_config_and_refused_by_name():
    from npo.config import ConfigError
    from npo.pipelines.parameters import apply_parameters

    cfg = toy("toy_autonpo")
    base = json.dumps(public_dump(cfg))
    # as KFP may hand them over: text
    merged = json.loads(
        apply_parameters(
            base,
            {
                "algo.lr": "0.001",
                "autonpo.window": "5.0",
                "npo.guidance.importance_sampling": "false",
            },
        )
    )
    assert merged["algo"]["lr"] == 0.001 and merged["autonpo"]["window"] == 5
    assert merged["npo"]["guidance"]["importance_sampling"] is False
    assert json.loads(apply_parameters(base, {})) == public_dump(cfg)
    with pytest.raises(
        ConfigError,
        match=r"pipeline parameter algo_lr \(algo\.lr\): Input should be greater than 0",
    ):
        apply_parameters(base, {"algo.lr": -1.0})
    with pytest.raises(
        ConfigError, match=r"pipeline parameter autonpo_window: '2\.5' is not an integer"
    ):
        apply_parameters(base, {"autonpo.window": "2.5"})
    with pytest.raises(ConfigError, match=r"train\.steps is not a pipeline parameter"):
        apply_parameters(base, {"train.steps": 10})


# --------------------------------------------------------------------------- DAG size
def count_tasks(spec: dict[str, Any]) -> int:
    """Container and DAG tasks (condition branches, sub-DAGs) of a compiled pipeline."""
    return len(list(walk(spec, spec["root"]["dag"])))


BUDGET_CONFIGS = [(p.stem, ()) for p in sorted(CONFIGS.glob("*.yaml"))] + [
    ("toy_autonpo", ("train.steps=2000", "autonpo.max_interventions=4")),
    ("math_autonpo", ("train.steps=2000", "autonpo.max_interventions=4")),
    ("toy_grpo", ("train.steps=5000",)),
    ("toy_rlep", ("train.steps=2000",)),
    ("toy_npo", ("train.steps=2000", "npo.late.at_step=1900")),
    ("toy_npo", ("train.steps=2000", "npo.early.enabled=false", "npo.late.enabled=false",
                 "npo.rolling.enabled=true")),
]  # fmt: skip
MAX_TASKS, MAX_KIB = 50, 200


def argo_size() -> Any:
    """bench/argo_size.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("argo_size", REPO / "bench" / "argo_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "overrides"), BUDGET_CONFIGS, ids=[f"{n}{list(o)}" for n, o in BUDGET_CONFIGS]
)
def test_the_dag_does_not_grow_with_the_budget(name, overrides):
    """KFP's backend stores the run as one Argo Workflow, which etcd refuses past ~1.5 MiB:
    every shipped config (its committed YAML, which the staleness test keeps current), and
    long budgets, stay small."""
    committed = COMPILED / f"{name}.yaml"
    text = committed.read_text() if not overrides else compiled_yaml(toy(name, *overrides))
    spec, _ = load_spec(text)
    assert count_tasks(spec) <= MAX_TASKS
    assert len(text.encode()) <= MAX_KIB * 1024
    # the Workflow the KFP backend makes of it (bench/argo_size.py), well under etcd's limit
    assert argo_size().estimate(text)["total"] <= 512 * 1024


def test_train_steps_does_not_change_the_dag():
    """The budget is a number in the config, not a shape: 150 and 2000 steps compile to the
    same tasks (AutoNPO's rounds unroll over interventions)."""
    short, long = (compiled(toy("toy_autonpo", f"train.steps={n}")) for n in (150, 2000))
    names = [
        sorted(t["taskInfo"]["name"] for t in walk(s, s["root"]["dag"])) for s in (short, long)
    ]
    assert names[0] == names[1]
    more = compiled(toy("toy_autonpo", "autonpo.max_interventions=4"))
    assert count_tasks(more) > count_tasks(short)  # the decisions do


# --------------------------------------------------------------------------- grpo & co
@pytest.mark.parametrize("method", ["grpo", "luffy", "exgrpo"])
def test_unguided_methods_train_in_one_task_then_evaluate_and_report(method):
    cfg = toy(f"toy_{method}")
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    assert set(tasks) == {"config", "warm-up", "train", "evaluate", "report"}
    train = tasks["train"]
    assert (constant(train, "start"), constant(train, "end")) == (0, cfg.train.steps)
    assert constant(train, "phase") == method
    for name in ("guidance", "fork_from", "watch"):  # the defaults: no cache, no fork, no watch
        assert constant(train, name) is None
    assert producer(train, "run_id") == ("prepare", "run_id")
    evaluate = tasks["evaluate"]
    assert constant(evaluate, "step") == cfg.train.steps
    assert display(spec, producer(evaluate, "run_id")[0]) == "train"
    # the configured config, and the evaluation it must follow
    assert sorted(display(spec, t) for t in tasks["report"]["dependentTasks"]) == [
        "config",
        "evaluate",
    ]


def test_grpo_with_zero_steps_evaluates_the_warm_up():
    spec = compiled(toy("toy_grpo", "train.steps=0"))
    assert set(root_tasks(spec)) == {"config", "warm-up", "evaluate", "report"}


# --------------------------------------------------------------------------- npo
def test_npo_guided_segments_look_ahead_then_guide_verify_and_train():
    cfg = toy("toy_npo")  # early (scout 25, window 25) + late (at 100, lookahead 25)
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    assert set(tasks) == {
        "config",
        "warm-up",
        "early · look-ahead",
        "early · guidance",
        "early · verify",
        "early · train",
        "segment 2 · train",
        "late · look-ahead",
        "late · guidance",
        "late · verify",
        "late · train",
        "segment 4 · train",
        "evaluate",
        "report",
    }
    assert (
        constant(tasks["segment 2 · train"], "start"),
        constant(tasks["segment 2 · train"], "end"),
    ) == (25, 100)
    for kind, start, main_before in (("early", 0, "warm-up"), ("late", 100, "segment 2 · train")):
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
        assert constant(guide, "kind") == kind

        verify = tasks[f"{kind} · verify"]
        assert display(spec, producer(verify, "cache_id")[0]) == f"{kind} · guidance"

        train = tasks[f"{kind} · train"]
        assert producer(train, "guidance")[1] == "cache_id"
        assert display(spec, producer(train, "guidance")[0]) == f"{kind} · verify"
        assert display(spec, producer(train, "run_id")[0]) == main_before
        assert constant(train, "phase") == f"npo·{kind}"
    assert display(spec, producer(tasks["segment 2 · train"], "run_id")[0]) == "early · train"
    assert display(spec, producer(tasks["segment 4 · train"], "run_id")[0]) == "late · train"


def test_npo_delta0_control_guides_from_the_fork_point_without_look_ahead():
    spec = compiled(toy("toy_npo", "npo.delta0_control=true"))
    tasks = root_tasks(spec)
    assert not [name for name in tasks if "look-ahead" in name]
    guide = tasks["late · guidance"]
    assert display(spec, producer(guide, "guide_run")[0]) == "segment 2 · train"
    assert constant(guide, "guide_step") == 100


def test_npo_rolling_windows_run_in_one_schedule_task():
    cfg = toy(
        "toy_npo", "npo.early.enabled=false", "npo.late.enabled=false", "npo.rolling.enabled=true"
    )
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    assert set(tasks) == {"config", "warm-up", "rolling", "evaluate", "report"}
    rolling = tasks["rolling"]
    assert rolling["componentRef"]["name"] == "comp-schedule"
    assert (constant(rolling, "start"), constant(rolling, "end")) == (0, cfg.train.steps)


# --------------------------------------------------------------------------- rlep
def test_rlep_caches_the_finished_runs_latest_checkpoint_for_the_whole_budget():
    spec = compiled(toy("toy_rlep"))
    tasks = root_tasks(spec)
    assert set(tasks) == {
        "config", "warm-up", "replay · guidance", "replay · verify", "train", "evaluate", "report"
    }  # fmt: skip
    guide = tasks["replay · guidance"]
    assert constant(guide, "cache_id") == "toy-rlep.rlep000000"
    assert constant(guide, "guide_run") == "toy-grpo"
    assert constant(guide, "guide_step") == -1  # the stage resolves "latest"
    assert (constant(guide, "start"), constant(guide, "end")) == (0, 150)
    train = tasks["train"]
    assert display(spec, producer(train, "guidance")[0]) == "replay · verify"
    assert constant(train, "phase") == "rlep"


# --------------------------------------------------------------------------- autonpo
def test_autonpo_unrolls_rounds_of_train_then_if_triggered_with_oneof():
    cfg = toy("toy_autonpo")  # max_interventions 2: two watching rounds + a last train
    spec = compiled(cfg)
    tasks = root_tasks(spec)
    rounds = cfg.autonpo.max_interventions
    assert {f"round {k} · train" for k in range(1, rounds + 2)} <= set(tasks)
    previous = None
    for k in range(1, rounds + 1):
        train = tasks[f"round {k} · train"]
        round_train = next(n for n, t in spec["root"]["dag"]["tasks"].items() if t is train)
        assert constant(train, "watch") is True
        assert constant(train, "end") == cfg.train.steps
        if previous is None:
            assert constant(train, "start") == 0
            assert producer(train, "run_id") == ("prepare", "run_id")
        else:  # where the previous round left the run: the OneOf of its two branches
            assert "taskOutputParameter" in train["inputs"]["parameters"]["run_id"]
            assert producer(train, "run_id")[0] == previous
            assert producer(train, "start")[0] == previous
        branches = [
            t
            for name, t in tasks.items()
            if t["componentRef"]["name"].startswith("comp-condition-branches")
        ]
        previous = None
        for group in branches:
            inner = list(walk(spec, spec["components"][group["componentRef"]["name"]]["dag"]))
            names = {t["taskInfo"]["name"] for t in inner}
            if f"round {k} · rollback" in names:
                previous = next(n for n, t in spec["root"]["dag"]["tasks"].items() if t is group)
                assert {
                    f"round {k} · guidance",
                    f"round {k} · verify",
                    f"round {k} · replay",
                    f"round {k} · keep",
                } <= names
                conditions = [
                    t["triggerPolicy"]["condition"] for t in inner if "triggerPolicy" in t
                ]
                assert any(c.endswith("triggered'] == true") for c in conditions)
                assert any(c.startswith("!(") for c in conditions)
                outputs = spec["components"][group["componentRef"]["name"]]["dag"]["outputs"]
                assert len(outputs["parameters"]) == 2  # run_id and policy_step, each a OneOf
                by_name = {t["taskInfo"]["name"]: t for t in inner}
                guide = by_name[f"round {k} · guidance"]
                assert constant(guide, "pool_only") is True
                # the stopped train's policy step, passed into the branch
                ref = guide["inputs"]["parameters"]["guide_step"]["componentInputParameter"]
                assert ref == f"pipelinechannel--{round_train}-policy_step"
                replay = by_name[f"round {k} · replay"]
                assert constant(replay, "phase") == "autonpo·replay"
                assert producer(replay, "run_id")[1] == "lineage_run_id"
        assert previous is not None, f"round {k} has no If/Else group"
    last = tasks[f"round {rounds + 1} · train"]
    assert constant(last, "watch") is None  # the default: it trains to the end
    assert display(spec, producer(tasks["evaluate"], "run_id")[0]) == f"round {rounds + 1} · train"


def test_autonpo_without_interventions_is_one_train():
    spec = compiled(toy("toy_autonpo", "autonpo.max_interventions=0"))
    assert set(root_tasks(spec)) == {"config", "warm-up", "round 1 · train", "evaluate", "report"}


# --------------------------------------------------------------------------- kfp.local
FAKE_STAGES = '''
"""Fake stages for a kfp.local run: log each call, answer like the real ones."""
import json
import os

FIRES = (10, 20)  # where a watching train's trigger fires


def run_stage(name, config, progress=None, **params):
    with open(os.environ["FAKE_STAGE_LOG"], "a") as f:
        f.write(json.dumps({"stage": name, "config": json.loads(config), **params}) + "\\n")
    run, t = json.loads(config)["name"], params.get("t")
    if name == "prepare":
        return {"run_id": run, "eval_accuracy": 0.4}
    if name == "train":
        start, end = params["start"], params["end"]
        fired = [s for s in FIRES if start < s < end] if params["watch"] else []
        stop = fired[0] if fired else end
        ui = {"metrics": {"reward/mean": 0.5}, "markdown": "# curves", "html": "<p>c</p>"}
        return {"run_id": params["run_id"], "policy_step": stop, "global_step": stop,
                "triggered": bool(fired), "signals": json.dumps({"t": stop}), **ui}
    if name == "guidance":
        if params["end"] <= params["start"]:
            return {"cache_id": "", "entries": 0, "q_hat": 0.0, "gap": 0.0,
                    "guide_accuracy": 0.0, "current_accuracy": 0.0}
        return {"cache_id": params["cache_id"], "entries": 2, "q_hat": 0.1, "gap": 0.2,
                "guide_accuracy": 0.5, "current_accuracy": 0.4}
    if name == "verify":
        return {"cache_id": params["cache_id"], "entries": 2, "verified": 2}
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


def test_autonpo_pipeline_runs_under_kfp_local_in_the_flows_order(tmp_path, monkeypatch):
    """Round 1's trigger fires at 10 but the rollback is skipped (empty replay, same
    lineage); round 2's fires at 20, rolls back to 10 and replays (10, 20] on lineage r1,
    from which the last round trains to the end."""
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
    pipeline = build_pipeline(toy("toy_autonpo", "train.steps=30"), local=True)
    summary = pipeline(algo_lr=0.002, run_seed=7).output  # two UI parameters set
    assert summary == {"accuracy": 0.6}  # the pipeline's output: the report's summary
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    configs = {json.dumps(c.pop("config"), sort_keys=True) for c in calls}
    (config,) = [json.loads(c) for c in configs]  # one config for every task...
    assert (config["algo"]["lr"], config["seed"]) == (0.002, 7)  # ...with the UI's values
    brief = [(c["stage"], c.get("run_id"), c.get("start"), c.get("end")) for c in calls]
    assert brief == [
        ("prepare", None, None, None),
        ("train", "toy-autonpo", 0, 30),
        ("rollback", "toy-autonpo", None, None),
        ("guidance", None, 10, 10),
        ("verify", None, None, None),
        ("train", "toy-autonpo", 10, 10),
        ("train", "toy-autonpo", 10, 30),
        ("rollback", "toy-autonpo", None, None),
        ("guidance", None, 10, 20),
        ("verify", None, None, None),
        ("train", "toy-autonpo.r1", 10, 20),
        ("train", "toy-autonpo.r1", 20, 30),
        ("evaluate", "toy-autonpo.r1", None, None),
        ("report", None, None, None),
    ]
    assert [c.get("watch") for c in calls if c["stage"] == "train"] == [
        True,
        False,
        True,
        False,
        False,
    ]
    rollback, guide, replay = calls[7], calls[8], calls[10]
    assert rollback["signals"] == json.dumps({"t": 20})  # the trigger's signals are recorded
    assert (rollback["t"], rollback["global_step"]) == (20, 20)
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


# --------------------------------------------------------------------------- task start
def _modules_after(code: str) -> set[str]:
    import subprocess

    probe = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(done.stdout.split())


def test_a_task_imports_nothing_heavy_before_its_stage_runs():
    """A component's body needs only the step-server client: under `npo run` the warm
    worker runs the stage, so the task process must not import torch or even pydantic."""
    loaded = _modules_after("import npo.pipelines.task, npo.stepserver")
    assert not {"torch", "transformers", "pydantic", "sqlalchemy"} & loaded


@pytest.mark.slow  # imports torch and transformers in a fresh process
def test_the_step_servers_preload_covers_what_the_stages_compute_with():
    """npo.stages imports its implementations lazily: the step server's worker must import
    them itself, or every local task pays torch's and transformers' import."""
    loaded = _modules_after(
        "from npo.pipelines.local import PRELOAD\nimport importlib\n"
        "for m in PRELOAD: importlib.import_module(m)"
    )
    assert {"torch", "transformers.modeling_utils", "npo.steps.train_segment"} <= loaded


# --------------------------------------------------------------------------- components/
COMPONENTS = REPO / "components"


def test_the_committed_components_are_current(tmp_path):
    from npo.pipelines.compile import write_components
    from npo.stages import STAGES

    fresh = write_components(tmp_path)
    assert {p.name for p in COMPONENTS.iterdir() if p.is_dir()} == set(STAGES)
    for path in fresh:
        committed = COMPONENTS / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(REPO)} is stale: run `make compile`"
        )


THEIRS = """
from kfp import compiler, components, dsl

evaluate = components.load_component_from_file("{root}/evaluate/component.yaml")
keep = components.load_component_from_file("{root}/keep/component.yaml")
assert set(evaluate.component_spec.inputs) == {{"config", "run_id", "step"}}
assert set(evaluate.component_spec.outputs) == {{"accuracy", "metrics"}}


@dsl.pipeline(name="theirs")
def theirs(config: str, run: str) -> float:
    kept = keep(run_id=run, policy_step=100)
    return evaluate(config=config, run_id=kept.outputs["run_id"], step=100).outputs["accuracy"]


compiler.Compiler().compile(theirs, "{out}")
"""


def test_a_component_loads_into_someone_elses_pipeline(tmp_path):
    """Other KFP users take a stage from components/ by file: it loads with its typed
    inputs and outputs, and their pipeline (their own file) compiles with it."""
    import subprocess

    out = tmp_path / "theirs.yaml"
    script = tmp_path / "theirs.py"
    script.write_text(THEIRS.format(root=COMPONENTS, out=out))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    spec = yaml.safe_load(out.read_text())
    assert set(spec["root"]["dag"]["tasks"]) == {"keep", "evaluate"}
    readme = (COMPONENTS / "train" / "README.md").read_text()
    assert "| `watch` | bool | `False` |" in readme and "| `triggered` | bool |" in readme


def test_the_pipelines_entry_point_compiles_what_is_committed(tmp_path):
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "pipelines/experiment.py",
            "configs/toy_grpo.yaml",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "toy_grpo.yaml").read_bytes() == (COMPILED / "toy_grpo.yaml").read_bytes()


def test_the_cheap_caller_lookup_names_the_same_frames_as_inspect():
    """build_pipeline swaps kfp's `inspect.stack()` for a frame walk (a compile in a test
    worker took twice as long with it); what kfp reads of it, entry [1]'s function name,
    is what the real one gives, and the swap is undone afterwards."""
    import inspect

    from kfp.dsl import pipeline_task

    from npo.pipelines.build import _cheap_caller_lookup

    def setter() -> tuple[list, list]:  # stands for kfp's _ensure_container_spec_exists
        real, cheap = inspect.stack(), pipeline_task.inspect.stack()
        return [f[3] for f in real[:2]], [f[3] for f in cheap[:2]]

    def caller() -> tuple[list, list]:
        return setter()

    with _cheap_caller_lookup():
        real, cheap = caller()
        assert pipeline_task.inspect.signature is inspect.signature
    assert real == cheap == ["setter", "caller"]
    assert pipeline_task.inspect is inspect
