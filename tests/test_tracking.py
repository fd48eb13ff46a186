"""MlflowTracker against a real local SQLite store, read back through MlflowClient.

One store per module: creating an MLflow SQLite database runs its migrations (~1 s).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import pytest

from npo.config import TrackingConfig
from npo.store.tracking import MlflowTracker, NullTracker, default_tracking_uri, make_tracker

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("runs")
    return root, default_tracking_uri(root)


@pytest.fixture(scope="module")
def client(store: tuple[Path, str]) -> mlflow.MlflowClient:
    with warnings.catch_warnings():  # SQLAlchemy deprecations inside MLflow's store set-up
        warnings.simplefilter("ignore", DeprecationWarning)
        return mlflow.MlflowClient(tracking_uri=store[1])


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_params_metrics_and_finish(store, client, caplog) -> None:
    _, uri = store
    tr = MlflowTracker(uri, "exp", "run-a", flush_every=50)
    tr.log_params({"algo": {"lr": 0.001, "clip": {"low": 0.2}}, "seed": 7, "long": "x" * 7000})
    with caplog.at_level(logging.WARNING, logger="npo.store.tracking"):
        for step in range(7):
            entropy = float("nan") if step == 3 else 2.0 - step / 10
            tr.log_metrics({"reward/mean": step / 10, "actor/entropy": entropy}, step=step)
    assert sum("actor/entropy" in r.message for r in caplog.records) == 1  # warned once
    # Buffered: fewer than flush_every steps, so nothing is stored yet.
    assert client.get_metric_history(tr.run_id, "reward/mean") == []
    tr.finish()

    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run-a"
    assert run.data.params["algo.lr"] == "0.001"
    assert run.data.params["algo.clip.low"] == "0.2"
    assert run.data.params["seed"] == "7"
    assert len(run.data.params["long"]) == 6000  # truncated to MLflow's limit
    assert _history(client, tr.run_id, "reward/mean") == [(s, s / 10) for s in range(7)]
    # The NaN point is skipped, the others kept.
    entropy = _history(client, tr.run_id, "actor/entropy")
    assert [s for s, _ in entropy] == [0, 1, 2, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in entropy)


def test_flush_every_and_large_batches(store, client, monkeypatch) -> None:
    _, uri = store
    tr = MlflowTracker(uri, "exp", "run-b", flush_every=2)
    tr.log_metrics({"a": 1.0}, step=0)
    assert client.get_metric_history(tr.run_id, "a") == []
    tr.log_metrics({"a": 2.0}, step=1)  # second step reaches flush_every
    assert _history(client, tr.run_id, "a") == [(0, 1.0), (1, 2.0)]
    # More than MLflow's 1000 metrics per batch in one call: sent in chunks. (The SQLite
    # store accepts bigger batches; a tracking server rejects them, so spy on the sizes.)
    sizes: list[int] = []
    log_batch = tr._client.log_batch

    def spy(run_id, metrics=(), **kw):
        sizes.append(len(metrics))
        return log_batch(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(tr._client, "log_batch", spy)
    tr.log_metrics({f"k/{i}": float(i) for i in range(1200)}, step=5)
    assert sizes == [1000, 200]
    tr.finish()
    assert len(client.get_run(tr.run_id).data.metrics) == 1201
    assert _history(client, tr.run_id, "k/1199") == [(5, 1199.0)]


def test_resume_drops_already_logged_steps(store, client, caplog) -> None:
    _, uri = store
    first = MlflowTracker(uri, "exp", "run-c")
    first.log_params({"train": {"steps": 10}})
    for step in range(5):
        first.log_metrics({"reward/mean": float(step)}, step=step)
    first.finish("FAILED")
    assert client.get_run(first.run_id).info.status == "FAILED"

    second = MlflowTracker(uri, "exp", "ignored", resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert second.last_logged_step("reward/mean") == 4
    assert second.last_logged_step("never/logged") is None
    with caplog.at_level(logging.WARNING, logger="npo.store.tracking"):
        second.log_params({"train": {"steps": 20}, "seed": 1})  # changed value: warn, keep
    assert any("train.steps" in r.message for r in caplog.records)
    for step in range(3, 8):  # steps 3, 4 replayed after the restart
        second.log_metrics({"reward/mean": 100.0 + step, "new/key": float(step)}, step=step)
    second.finish()

    assert _history(client, first.run_id, "reward/mean") == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 105.0),
        (6, 106.0),
        (7, 107.0),
    ]
    assert [s for s, _ in _history(client, first.run_id, "new/key")] == [3, 4, 5, 6, 7]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "10", "seed": "1"}


def test_mlflow_run_id_env_is_used(store, client, monkeypatch) -> None:
    _, uri = store
    exp_id = client.get_experiment_by_name("exp").experiment_id
    injected = client.create_run(exp_id, run_name="kfp-injected").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)
    tr = MlflowTracker(uri, "exp", "ours")
    assert tr.run_id == injected
    tr.log_metrics({"reward/mean": 0.5}, step=1)
    tr.finish()
    assert _history(client, injected, "reward/mean") == [(1, 0.5)]
    assert client.get_run(injected).info.status == "FINISHED"


def test_tracking_uri_env_wins(store, client, tmp_path, monkeypatch) -> None:
    _, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    other = tmp_path / "other.db"
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{other}", experiment="env-exp")
    tr = make_tracker(cfg, tmp_path, run_name="env-run")
    tr.finish()
    assert isinstance(tr, MlflowTracker) and tr.tracking_uri == uri
    assert client.get_run(tr.run_id).info.run_name == "env-run"
    assert not other.exists()


def test_default_store_and_artifacts(store, client, tmp_path) -> None:
    root, uri = store
    tr = make_tracker(TrackingConfig(experiment="art"), root, run_name="art-run")
    assert isinstance(tr, MlflowTracker) and tr.tracking_uri == uri
    assert (root / "mlflow.db").is_file()
    report = tmp_path / "report.md"
    report.write_text("# hello\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.txt").write_text("a")
    tr.log_artifact(report)
    tr.log_artifact(plots, artifact_path="plots")
    tr.set_tags({"npo.method": "grpo"})
    tr.finish()

    assert {a.path for a in client.list_artifacts(tr.run_id)} == {"report.md", "plots"}
    assert [a.path for a in client.list_artifacts(tr.run_id, "plots")] == ["plots/a.txt"]
    stored = list((root / "mlartifacts").rglob("report.md"))
    assert len(stored) == 1 and stored[0].read_text() == "# hello\n"
    assert client.get_run(tr.run_id).data.tags["npo.method"] == "grpo"


def test_finish_validates_status_and_is_idempotent(store, client) -> None:
    _, uri = store
    tr = MlflowTracker(uri, "exp", "run-d")
    with pytest.raises(ValueError, match="status"):
        tr.finish("DONE")
    tr.finish("KILLED")
    tr.finish()  # second call does nothing
    assert client.get_run(tr.run_id).info.status == "KILLED"


def test_null_tracker_when_disabled(tmp_path) -> None:
    tr = make_tracker(TrackingConfig(enabled=False), tmp_path / "runs", run_name="x")
    assert isinstance(tr, NullTracker) and tr.run_id is None
    tr.log_params({"a": {"b": 1}})
    tr.log_metrics({"reward/mean": 1.0}, step=0)
    tr.log_artifact(tmp_path / "missing.png")
    tr.set_tags({"k": "v"})
    tr.flush()
    tr.finish("FAILED")
    assert not (tmp_path / "runs").exists()


def test_lazy_tracker_connects_on_first_log_only() -> None:
    from npo.store.tracking import LazyTracker, NullTracker

    made: list[NullTracker] = []

    def connect() -> NullTracker:
        made.append(NullTracker())
        return made[-1]

    lazy = LazyTracker("run-123", connect)
    assert lazy.run_id == "run-123"
    lazy.flush()  # nothing logged: nothing to connect for
    assert made == []
    lazy.log_metrics({"loss": 1.0}, step=1)
    lazy.set_tags({"a": "b"})
    lazy.flush()
    assert len(made) == 1
