"""MlflowTracker against a real `mlflow server` over HTTP, wired as in a cluster: PostgreSQL
backend store, artifacts proxied by the server into an S3 bucket (SeaweedFS).

The server (npo.devservices.mlflowserver, fixture in conftest.py) is started once per
session; each test uses its own experiment, and reads back through a separate MlflowClient
on the server URL, and through minio for the bucket. The fail-fast tests need no server.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from npo.config import TrackingConfig
from npo.devservices.mlflowserver import free_port
from npo.store.tracking import MlflowTracker, TrackingUnavailable, make_tracker

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow  # a real MLflow server


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow variables from the caller's shell: not the run/URI, and not the HTTP retry
    settings (the fail-fast tests must hold with MLflow's defaults)."""
    for name in list(os.environ):
        if name.startswith("MLFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cfg(mlflow_server, s3_server) -> TrackingConfig:
    if not s3_server.running:  # a test that stopped it failed before restarting it
        s3_server.start()
    return TrackingConfig(tracking_uri=mlflow_server.url, experiment=f"e-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def bucket(mlflow_server, s3_server):
    """(minio client, bucket, key prefix) where the server keeps artifacts."""
    from minio import Minio

    bucket, _, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").partition("/")
    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    return client, bucket, prefix


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


def test_artifacts_land_in_the_s3_bucket(
    cfg, client, bucket, mlflow_server, s3_server, tmp_path: Path
) -> None:
    minio, name, prefix = bucket
    tracker = _tracker(cfg, tmp_path)
    (tmp_path / "report.md").write_text("# report\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "reward.png").write_bytes(b"\x89PNG fake")
    tracker.log_artifact(tmp_path / "report.md")
    tracker.log_artifact(plots, "plots")
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: no S3 keys needed
    exp_id = run.info.experiment_id
    base = f"{prefix}/{exp_id}/{tracker.run_id}/artifacts"
    keys = {o.object_name for o in minio.list_objects(name, f"{base}/", recursive=True)}
    assert keys == {f"{base}/report.md", f"{base}/plots/reward.png"}
    obj = minio.get_object(name, f"{base}/report.md")
    try:
        assert obj.read() == b"# report\n"
    finally:
        obj.close()
        obj.release_conn()
    # The S3 secret stays in the server's environment: not in its log, not in the run.
    assert s3_server.secret_key not in (mlflow_server.root / "mlflow.log").read_text()
    assert s3_server.secret_key not in json.dumps([run.info.artifact_uri, run.data.params])


# ------------------------------------------------------------------ fail fast, no server
@pytest.mark.timeout(10)
def test_closed_port_fails_fast_with_one_clear_error(tmp_path: Path) -> None:
    """Nothing listens: ONE TrackingUnavailable naming the URI (userinfo redacted), well
    before MLflow's default retries (minutes) would give up; the timeout mark is the bound."""
    port = free_port()
    uri = f"http://alice:hunter2-{port}@127.0.0.1:{port}"
    with pytest.raises(TrackingUnavailable) as err:
        make_tracker(TrackingConfig(tracking_uri=uri), tmp_path, run_name="x")
    msg = str(err.value)
    assert f"http://***@127.0.0.1:{port}" in msg
    assert "connection refused" in msg and "tracking.tracking_uri" in msg
    assert "hunter2" not in msg and "alice" not in msg
    assert err.value.__cause__ is None and err.value.__context__ is None  # nothing chained
    assert isinstance(err.value, RuntimeError)


@pytest.mark.timeout(10)
def test_unreachable_uri_from_env_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnavailable, match=r"from MLFLOW_TRACKING_URI") as err:
        make_tracker(TrackingConfig(tracking_uri="sqlite:///unused.db"), tmp_path, run_name="x")
    assert uri in str(err.value)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts TCP connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.timeout(15)
def test_server_that_never_answers_fails_within_the_probe_timeout(
    silent_server: str, tmp_path: Path
) -> None:
    with pytest.raises(TrackingUnavailable, match=r"no answer within 2 s") as err:
        MlflowTracker(silent_server, "e", "x", probe_timeout=2)
    assert silent_server in str(err.value)


@pytest.fixture
def gateway_503() -> Iterator[str]:
    """An HTTP server answering 503 to everything, like an ingress with no pod behind it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(10)
def test_gateway_without_server_fails_fast(gateway_503: str, tmp_path: Path) -> None:
    with pytest.raises(TrackingUnavailable, match=r"HTTP 503 on /health"):
        make_tracker(TrackingConfig(tracking_uri=gateway_503), tmp_path, run_name="x")
