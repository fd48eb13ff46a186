"""MlflowTracker against a real `mlflow server` (PostgreSQL backend store) over HTTP.

The server (tests/services/mlflowserver.py) is started once per session; each test uses its
own experiment, and reads back through a separate MlflowClient on the server URL.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from npo.config import TrackingConfig
from npo.store.tracking import MlflowTracker, make_tracker

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def cfg(mlflow_server) -> TrackingConfig:
    return TrackingConfig(tracking_uri=mlflow_server.url, experiment=f"e-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(mlflow_server) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=mlflow_server.url)


def _tracker(cfg: TrackingConfig, tmp_path: Path, **kw) -> MlflowTracker:
    tracker = make_tracker(cfg, tmp_path, run_name="srv", **kw)
    assert isinstance(tracker, MlflowTracker)
    return tracker


def test_log_and_read_back(cfg, client, tmp_path: Path) -> None:
    tracker = _tracker(cfg, tmp_path)
    assert tracker.tracking_uri == cfg.tracking_uri
    tracker.log_params({"algo": {"lr": 0.001, "clip": [0.2, 0.28]}, "seed": 3})
    for step in range(5):
        tracker.log_metrics({"reward/mean": step / 10, "loss": 1.0 - step / 10}, step=step)
    (tmp_path / "report.json").write_text(json.dumps({"ok": True}))
    tracker.log_artifact(tmp_path / "report.json", "reports")
    tracker.set_tags({"npo.phase": "test"})
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "srv"
    assert client.get_experiment(run.info.experiment_id).name == cfg.experiment
    assert run.data.params == {"algo.lr": "0.001", "algo.clip": "[0.2, 0.28]", "seed": "3"}
    assert run.data.tags["npo.phase"] == "test"
    history = client.get_metric_history(tracker.run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(5)]
    assert run.data.metrics["loss"] == pytest.approx(0.6)

    assert [f.path for f in client.list_artifacts(tracker.run_id, "reports")] == [
        "reports/report.json"
    ]
    local = client.download_artifacts(tracker.run_id, "reports/report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"ok": True}


def test_resume_drops_replayed_steps(cfg, client, tmp_path: Path) -> None:
    first = _tracker(cfg, tmp_path)
    first.log_params({"seed": 0})
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finish("KILLED")  # a pod that was preempted

    resumed = _tracker(cfg, tmp_path, resume_run_id=first.run_id)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"seed": 0})  # already there: not sent again (params are immutable)
    for step in range(2, 6):  # replays steps 2 and 3
        resumed.log_metrics({"loss": 100.0 + step}, step=step)
    resumed.finish()

    history = client.get_metric_history(first.run_id, "loss")
    assert len(history) == 6
    assert sorted((m.step, m.value) for m in history) == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)
    ]  # fmt: skip
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"seed": "0"}


def test_kfp_env_attaches_to_existing_run(
    mlflow_server, cfg, client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp_id = client.create_experiment(cfg.experiment)
    run_id = client.create_run(exp_id, run_name="kfp-task").info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    other = TrackingConfig(tracking_uri="sqlite:///nowhere/should-not-be-used.db")

    tracker = _tracker(other, tmp_path)
    assert tracker.tracking_uri == mlflow_server.url
    assert tracker.run_id == run_id
    tracker.log_metrics({"reward/mean": 0.5}, step=7)
    tracker.finish()

    assert not (tmp_path / "nowhere").exists()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "kfp-task"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean")] == [
        (7, 0.5)
    ]
    assert len(client.search_runs([exp_id])) == 1  # no second run was created


def test_pg_password_not_in_run(pg_server, cfg, client, tmp_path: Path) -> None:
    tracker = _tracker(cfg, tmp_path)
    tracker.log_params({"tracking": cfg.model_dump(mode="json"), "seed": 1})
    tracker.finish()

    run = client.get_run(tracker.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    seen = json.dumps(
        [run.data.params, run.data.tags, run.info.artifact_uri, exp.artifact_location, exp.tags]
    )
    assert pg_server.secret not in seen
    assert "postgresql" not in seen


def test_unreachable_server_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.mlflowserver import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException) as err:
        make_tracker(TrackingConfig(tracking_uri=uri), tmp_path, run_name="x")
    assert time.monotonic() - start < 10
    assert uri in str(err.value)
