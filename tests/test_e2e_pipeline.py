"""End-to-end through the Kubeflow pipeline, run locally by kfp.local (SubprocessRunner) with
the warm step server: the DAG a cluster runs, on the tiny toy.

The pipeline must train exactly what the in-process engine trains (same stages, same order),
so each test also runs the direct engine under another name and compares every metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FORCED_AUTONPO, write_tiny_config
from typer.testing import CliRunner

from npo.cli import app
from npo.config import load_config
from npo.experiment import run_experiment
from npo.pipelines.local import PipelineFailed
from npo.report import load_history
from npo.store.artifacts import open_store
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB

pytestmark = pytest.mark.slow

AUTO = FORCED_AUTONPO


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _tasks(run_dir: Path) -> list[str]:
    """Names of the tasks that ran in the newest local pipeline run (the If-branch's tasks
    exist only when it was taken)."""
    (latest,) = sorted((run_dir / "kfp").iterdir())[-1:]
    return sorted(p.name for p in latest.iterdir() if (p / "executor_output.json").exists())


def test_grpo_pipeline_matches_the_direct_engine(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    path = write_tiny_config(tmp_path / "g.yaml", root, "pipe", steps=6)
    summary = run_experiment(load_config(path), engine="pipeline")
    direct = run_experiment(load_config(path, ["name=direct"]), engine="direct")

    rows = load_history(root / "pipe" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(7))
    assert _comparable(rows) == _comparable(load_history(root / "direct" / "metrics.jsonl"))
    assert summary["final accuracy"] == direct["final accuracy"]
    assert list(summary) == list(direct)  # in the order summarize wrote it: headline first
    # one train task for the whole budget: a retried task resumes from its checkpoint
    assert _tasks(root / "pipe") == ["configure", "evaluate", "prepare", "report", "train"]
    # a train task's KFP UI outputs: a Metrics artifact and the curves so far
    out = json.loads(next((root / "pipe" / "kfp").glob("*/train/executor_output.json")).read_text())
    assert out["parameterValues"] == {
        "run_id": "pipe",
        "policy_step": 6,
        "global_step": 6,
        "triggered": False,
        "signals": "{}",
    }
    metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert metrics["eval/accuracy"] == rows[-1]["eval/accuracy"]
    curves = next((root / "pipe" / "kfp").glob("*/train/markdown")).read_text()
    assert "| 6 | 6 |" in curves

    store = open_store((root / "artifacts").as_uri())
    assert list_checkpoints(store, "pipe") == [0, 3, 6]
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        assert [c.step for c in db.checkpoints("pipe")] == [0, 3, 6]
        assert db.get_run("pipe").status == "completed"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(summary["mlflow run"])
    assert run.info.status == "FINISHED"  # stages kept it open; the report task ended it
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # one point per step
    assert client.get_metric_history(run.info.run_id, "final/accuracy")

    # Re-running the finished pipeline recomputes nothing and duplicates nothing.
    again = run_experiment(load_config(path), engine="pipeline")
    assert again["final accuracy"] == summary["final accuracy"]
    assert len(load_history(root / "pipe" / "metrics.jsonl")) == len(rows)
    assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 6


def test_autonpo_pipeline_takes_the_intervention_branch(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    path = write_tiny_config(tmp_path / "a.yaml", root, "auto", 12, **AUTO)
    summary = run_experiment(load_config(path), engine="pipeline")
    run_experiment(load_config(path, ["name=adirect"]), engine="direct")

    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        (iv,) = db.interventions("auto")
        assert (iv.kind, iv.at_step, iv.guide_step) == ("auto", 6, 6)
        (direct_iv,) = db.interventions("adirect")
        assert (iv.delta, iv.rollback_to) == (direct_iv.delta, direct_iv.rollback_to)
        assert [c.guide_step for c in db.guidance_caches("auto")] == [6]
    delta = iv.delta
    store = open_store((root / "artifacts").as_uri())
    assert list_checkpoints(store, "auto") == [0, 3, 6]
    assert list_checkpoints(store, "auto.r1")[-1] == 12

    # round 1's train watched the trigger at 3 (no) and 6 (forced): it stopped at 6 and took
    # the If branch (rollback -> guidance -> verify -> replay on lineage r1); round 2 trained
    # r1 from 6 to the end (nothing fired: the Else branch's keep); round 3 and the last
    # train had nothing left and returned at once
    round_1 = ["configure", "prepare", "train", "rollback", "guidance", "verify", "train-2"]
    later = ["train-3", "keep-2", "train-5", "keep-3", "train-7", "evaluate", "report"]
    assert _tasks(root / "auto") == sorted(round_1 + later)
    outputs = {
        name: json.loads(
            next((root / "auto" / "kfp").glob(f"*/{name}/executor_output.json")).read_text()
        )["parameterValues"]
        for name in ("train", "train-2", "train-3", "train-7")
    }
    assert [(o["run_id"], o["policy_step"], o["triggered"]) for o in outputs.values()] == [
        ("auto", 6, True),  # stopped by the trigger; its signals went to the rollback
        ("auto.r1", 6, False),  # the replay
        ("auto.r1", 12, False),
        ("auto.r1", 12, False),
    ]
    assert json.loads(outputs["train"]["signals"])["forced"] is True
    assert iv.signals["forced"] is True
    rows = load_history(root / "auto" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(12 + delta + 1))
    assert _comparable(rows) == _comparable(load_history(root / "adirect" / "metrics.jsonl"))
    assert summary["replayed policy steps"] == delta


def test_a_failing_task_fails_the_run_with_its_log(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    # RLEP replays a finished run that does not exist: the guidance task fails
    path = write_tiny_config(
        tmp_path / "r.yaml", root, "rlep", 3, method="rlep", baselines={"rlep_run": "ghost"}
    )
    with pytest.raises(PipelineFailed, match=r"pipeline\.log") as info:
        run_experiment(load_config(path), engine="pipeline")
    log = (root / "rlep" / "pipeline.log").read_text()
    assert "guide run 'ghost': no checkpoint in the store" in log
    assert str(info.value).startswith(
        "task 'guidance' failed: stage 'guidance' failed: RunConflict: guide run "
        "'ghost': no checkpoint in the store (task logs: "
    )
    assert info.value.__notes__ == [
        "run 'rlep' marked failed; its last checkpoint is the end of its warm-up (policy step "
        "0): the same command resumes it"
    ]
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        assert db.get_run("rlep").status == "failed"
        mlflow_run = db.get_run("rlep").mlflow_run_id
    from mlflow import MlflowClient

    tracked = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").get_run(mlflow_run)
    assert tracked.info.status == "FAILED"  # not left RUNNING

    # `npo run` refuses a run the metadata DB does not have before any task (preflight);
    # one it lists with a checkpoint that the store lacks still fails in its task
    refused = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert refused.exit_code == 2 and "no run 'ghost'" in refused.stderr
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        db.upsert_run("ghost", "ghost", "grpo", 0, {})
        db.record_checkpoint("ghost", 3, "file:///nowhere/000003", "0" * 64)
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 1
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "run failed: task 'guidance' failed: stage 'guidance' failed" in flat


def test_a_natural_trigger_fires_from_the_online_signals(tmp_path: Path) -> None:
    """No force_at: round 1's train task stops where its own check finds the reward EMA
    stagnant (any gain under 1.0) while entropy declines, confirmed on the mistake pool,
    and the pipeline takes the If branch there."""
    root = tmp_path / "runs"
    natural = {
        **AUTO,
        "autonpo": {
            **{k: v for k, v in AUTO["autonpo"].items() if k != "force_at"},
            "min_reward_gain": 1.0,
            "min_entropy_drop": 0.0,
            "confirm_below": 1.0,
        },
    }
    # seed 3 at lr 3e-3: the entropy dips across the window at step 9 (the rule itself is
    # tested in test_autonpo.py; here, that the pipeline acts on it)
    natural["algo"] = {"lr": 3e-3}
    path = write_tiny_config(tmp_path / "n.yaml", root, "nat", 12, seed=3, **natural)
    summary = run_experiment(load_config(path), engine="pipeline")
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        (iv,) = db.interventions("nat")
    assert iv.signals["forced"] is False and iv.signals["triggered"] is True
    assert iv.signals["entropy_change"] <= 0 < iv.signals["pool_prompts"]
    assert iv.at_step % 3 == 0 and 4 <= iv.at_step < 12  # at a check, with 2 windows of history
    out = json.loads(next((root / "nat" / "kfp").glob("*/train/executor_output.json")).read_text())
    assert out["parameterValues"]["triggered"] is True
    assert out["parameterValues"]["policy_step"] == iv.at_step
    assert {"rollback", "guidance", "verify", "train-2"} <= set(_tasks(root / "nat"))
    assert summary["replayed policy steps"] == iv.delta
