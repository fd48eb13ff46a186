"""`open_run`: a run folder that does not fit its config or its stored state is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import write_tiny_config

from npo.config import load_config
from npo.steps.context import RunConflict, open_run
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB


def _open(cfg, **kw):
    ctx = open_run(cfg, **kw)
    ctx.db.close()
    return ctx


def test_a_different_config_is_refused(tmp_path: Path) -> None:
    path = write_tiny_config(
        tmp_path / "c.yaml", tmp_path / "runs", "r", 3, tracking={"enabled": False}
    )
    _open(load_config(path))
    with pytest.raises(RunConflict, match=r"different config.*--fresh"):
        _open(load_config(path, ["algo.lr=1e-4"]))


def test_a_run_started_before_a_field_existed_resumes(tmp_path: Path) -> None:
    """An older version stored the config without fields added since (here model.stop_tokens
    and algo.micro_batch_size): with their defaults it is the same config."""
    path = write_tiny_config(
        tmp_path / "c.yaml", tmp_path / "runs", "r", 3, tracking={"enabled": False}
    )
    ctx = _open(load_config(path))
    old = ctx.db.get_run("r").config
    del old["model"]["stop_tokens"], old["algo"]["micro_batch_size"]

    def store(config: dict) -> None:
        with MetadataDB(ctx.db.url) as db:
            db.upsert_run("r", "r", "grpo", 0, config)

    store(old)
    _open(load_config(path))  # resumes
    store(old)
    with pytest.raises(RunConflict, match="different config"):
        _open(load_config(path, ["model.stop_tokens=['1']"]))  # a real difference still counts
    old["algo"]["gone_field"] = 1  # a field this version no longer has: not the same config
    store(old)
    with pytest.raises(RunConflict, match="different config"):
        _open(load_config(path))


def test_the_run_folder_holds_no_state(tmp_path: Path) -> None:
    """Deleting the output folder loses nothing: the run's state is in the DB and store."""
    root = tmp_path / "runs"
    cfg = load_config(
        write_tiny_config(tmp_path / "c.yaml", root, "r", 3, tracking={"enabled": False})
    )
    ctx = _open(cfg)
    ctx.store.put_bytes("runs/r/ckpt/000000/manifest.json", b"{}")
    shutil.rmtree(root / "r")
    ctx = _open(cfg)
    assert list_checkpoints(ctx.store, "r") == [0]
    assert yaml.safe_load((root / "r" / "config.yaml").read_text())["name"] == "r"


def test_checkpoints_without_their_run_in_the_db_are_refused_until_fresh(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cfg = load_config(
        write_tiny_config(tmp_path / "c.yaml", root, "r", 3, tracking={"enabled": False})
    )
    ctx = _open(cfg)
    ctx.store.put_bytes("runs/r/ckpt/000000/manifest.json", b"{}")
    assert list_checkpoints(ctx.store, "r") == [0]
    (root / "npo.db").unlink()  # a metadata DB deleted or swapped: the checkpoints stay
    shutil.rmtree(root / "r")

    gone = r"holds checkpoints of run 'r' but the metadata DB .* has no such run.*--fresh"
    with pytest.raises(RunConflict, match=gone):
        _open(cfg)
    assert not (root / "r").exists()  # nothing half-created

    ctx = _open(cfg, fresh=True)
    assert list_checkpoints(ctx.store, "r") == []
    assert (root / "r" / "config.yaml").exists()


def test_fresh_deletes_the_runs_rows(tmp_path: Path) -> None:
    cfg = load_config(
        write_tiny_config(
            tmp_path / "c.yaml", tmp_path / "runs", "r", 3, tracking={"enabled": False}
        )
    )
    ctx = open_run(cfg)
    # AutoNPO reads its past decisions back from here: a stale row would be replayed
    ctx.db.record_intervention("r", "auto", 60, 10, 50, 60, {"triggered": True}, [])
    ctx.db.close()
    ctx = open_run(cfg, fresh=True)
    assert ctx.db.interventions("r") == []
    assert ctx.db.get_run("r") is not None  # re-created by the fresh open
    ctx.db.close()


def test_fresh_leaves_one_mlflow_run_of_the_name(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "runs"
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", root, "r", 3))
    first = open_run(cfg)
    first.close("KILLED")
    second = open_run(cfg, fresh=True)
    second.close()
    assert second.tracker.run_id != first.tracker.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("npo")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'r'")
    assert [r.info.run_id for r in runs] == [second.tracker.run_id]
    # the old one is in MLflow's trash, not lost: `mlflow gc` purges it
    assert client.get_run(first.tracker.run_id).info.lifecycle_stage == "deleted"
    third = open_run(cfg, fresh=True)  # a fresh start of a fresh start: the same again
    third.close()
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'r'")
    assert [r.info.run_id for r in runs] == [third.tracker.run_id]
