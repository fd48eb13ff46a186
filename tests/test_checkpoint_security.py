"""Checkpoints cannot carry code, and the bucket cannot vouch for itself.

The attacker here can write the bucket (files and manifest.json) but not the metadata DB:
a planted pickle in optimizer.pt / rng.pt is refused without running, and a checkpoint whose
manifest was rewritten to match changed files is refused because the DB recorded another
digest at commit. An honest checkpoint still resumes bit-exactly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from npo.steps.train_segment import _resume_point
from npo.store.artifacts import LocalStore
from npo.store.checkpoint import (
    MANIFEST,
    CheckpointNotRecorded,
    checkpoint_prefix,
    checkpoint_uri,
    load_checkpoint,
    manifest_digest,
    read_manifest,
    verify_recorded,
)
from npo.store.metadata import MetadataDB, default_metadata_url
from npo.training.seeding import rng_state, set_rng_state
from npo.training.state import (
    UnsafeCheckpointFile,
    fork_checkpoint,
    load_train_state,
    save_train_state,
)


class RunsCode:
    """Unpickling this runs Python code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def db(tmp_path: Path):
    with MetadataDB(default_metadata_url(tmp_path / "meta")) as db:
        db.migrate()
        for run in ("r", "fork"):
            db.upsert_run(run, run, "grpo", 0, {})
        yield db


def _grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW after two steps: its state holds step counts and both moments."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in (1, 2):
        _grads(model, seed)
        opt.step()
    return opt


def _save(
    store: LocalStore,
    policy: tuple[Any, Any],
    step: int,
    db: MetadataDB | None = None,
    opt: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Checkpoint `step` of run 'r' (with `opt` or a freshly trained optimizer), recorded in
    `db` as a training step records it."""
    model, tokenizer = policy
    opt = _trained_optimizer(model) if opt is None else opt
    state = {"policy_step": step, "global_step": step}
    manifest = save_train_state(store, "r", step, model, tokenizer, opt, state)
    if db is not None:
        uri = checkpoint_uri(store, "r", step)
        db.record_checkpoint("r", step, uri, manifest_digest(manifest))
    return manifest


def _tamper(store: LocalStore, run_id: str, step: int, rel: str, data: bytes) -> dict:
    """An attacker with bucket write access: replace file `rel` and rewrite the manifest so
    its size and sha256 match; returns the rewritten manifest."""
    prefix = checkpoint_prefix(run_id, step)
    store.put_bytes(f"{prefix}/{rel}", data)
    manifest = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def _pickled(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("rel", ["optimizer.pt", "rng.pt"])
@pytest.mark.parametrize("with_db", [False, True])
def test_a_planted_pickle_is_refused_without_running(
    store, db, tiny_policy, tmp_path: Path, rel: str, with_db: bool
) -> None:
    # a run the DB holds no checkpoint of: its check passes, the safe load must stop it
    _save(store, tiny_policy, 3)
    marker = tmp_path / "pwned"
    payload = _pickled({"state": {}, "param_groups": [], "python": RunsCode(marker)})
    _tamper(store, "r", 3, rel, payload)
    load_checkpoint(store, "r", 3, tmp_path / "check")  # the manifest matches: files pass

    with pytest.raises(UnsafeCheckpointFile, match=rf"run 'r' step 3: {rel} does not load") as e:
        load_train_state(store, "r", 3, db=db if with_db else None)
    assert not marker.exists()
    # the error says what was refused, without torch's advice to load it unsafely
    assert re.search(r"GLOBAL (builtins\.)?exec\b", str(e.value))
    assert "weights_only=False" not in str(e.value)

    # the payload is live: an unrestricted load would have run it
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def test_an_unreadable_pickle_file_is_refused(store, tiny_policy) -> None:
    _save(store, tiny_policy, 3)
    _tamper(store, "r", 3, "rng.pt", b"not a torch archive")
    with pytest.raises(UnsafeCheckpointFile, match=r"run 'r' step 3: rng.pt does not load"):
        load_train_state(store, "r", 3)


def test_a_rewritten_manifest_is_refused_by_the_recorded_digest(
    store, db, tiny_policy, tmp_path: Path
) -> None:
    recorded = manifest_digest(_save(store, tiny_policy, 3, db))
    state = {"policy_step": 3, "global_step": 999}
    forged = _tamper(store, "r", 3, "state.json", json.dumps(state).encode())
    forged_digest = manifest_digest(forged)
    assert forged_digest != recorded
    # the store alone cannot tell: files and manifest agree
    assert load_checkpoint(store, "r", 3, tmp_path / "check")["files"] == forged["files"]

    message = rf"run 'r' step 3: manifest sha256 {forged_digest} differs from the sha256 {recorded}"
    with pytest.raises(CheckpointNotRecorded, match=message):
        load_train_state(store, "r", 3, db=db)
    with pytest.raises(CheckpointNotRecorded, match=message):
        read_manifest(store, "r", 3, db)
    with pytest.raises(CheckpointNotRecorded, match=message):
        fork_checkpoint(store, "r", "fork", 3, db=db)
    assert not (tmp_path / "store" / "runs" / "fork").exists()  # nothing copied


def test_a_step_the_db_never_recorded_is_refused_once_the_run_has_records(
    store, db, tiny_policy
) -> None:
    _save(store, tiny_policy, 3)
    assert verify_recorded(db, read_manifest(store, "r", 3)) is None  # no rows: passes
    load_train_state(store, "r", 3, db=db)
    _save(store, tiny_policy, 6, db)
    with pytest.raises(CheckpointNotRecorded, match=r"run 'r' step 3: .* recorded no checkpoint"):
        load_train_state(store, "r", 3, db=db)
    # resuming skips it (a save whose recording died with the task) instead of trusting it
    ctx = SimpleNamespace(store=store, db=db, run_id="r")
    _save(store, tiny_policy, 9)
    assert _resume_point(ctx, 0, 9) == 6


def _draws() -> list[Any]:
    """The next numbers of every stream rng_state() covers, cached Gaussians included."""
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.random(3).tolist(),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(3).tolist(),
    ]


def test_an_honest_checkpoint_resumes_exactly(store, db, tiny_policy) -> None:
    model, _ = tiny_policy
    opt = _trained_optimizer(model)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    _draws()  # leaves a cached Gaussian in python's and numpy's state
    assert rng_state()["numpy"]["has_gauss"] == 1
    _save(store, tiny_policy, 3, db, opt)
    saved = copy.deepcopy(opt.state_dict())
    expected = _draws()  # the uninterrupted run's next numbers...
    _grads(model, 7)
    opt.step()  # ...and its next optimizer step

    loaded = load_train_state(store, "r", 3, db=db)
    _draws()  # move every stream on before restoring
    set_rng_state(loaded.rng)
    assert _draws() == expected

    state = loaded.optimizer_state
    assert state["param_groups"] == saved["param_groups"]
    assert state["state"].keys() == saved["state"].keys()
    for i, moments in saved["state"].items():
        assert moments.keys() == state["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state["state"][i][k], v) for k, v in moments.items())
    resumed = torch.optim.AdamW(loaded.model.parameters(), lr=1e-2)
    resumed.load_state_dict(state)
    _grads(loaded.model, 7)
    resumed.step()
    after = list(zip(loaded.model.parameters(), model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in after)


def test_forks_are_verified_and_recorded(store, db, tiny_policy) -> None:
    _save(store, tiny_policy, 3, db)
    manifest = fork_checkpoint(store, "r", "fork", 3, {"global_step": 10}, db=db)
    (row,) = db.checkpoints("fork")
    assert (row.step, row.manifest_sha256) == (3, manifest_digest(manifest))
    assert load_train_state(store, "fork", 3, db=db).state["forked_from"] == "r"
    assert fork_checkpoint(store, "r", "fork", 3, db=db) == manifest  # idempotent
