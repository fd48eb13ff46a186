"""Training state <-> checkpoint: weights, tokenizer, optimizer, RNG and loop state.

A checkpoint folder holds `policy/` (safetensors + config + tokenizer, loadable on its own
with `npo eval` or `from_pretrained`), `optimizer.pt`, `rng.pt` and `state.json` (step,
data cursor, anything the loop needs to resume). The store writes the manifest last.

Nothing in a checkpoint may carry code: the weights are safetensors, and optimizer.pt and
rng.pt hold only tensors and plain containers, read with `torch.load(weights_only=True)`;
a file that needs more is refused (UnsafeCheckpointFile), never unpickled. Given the
metadata DB, loading and forking also refuse a manifest other than the one it recorded at
commit (`npo.store.checkpoint.verify_recorded`): the bucket alone cannot vouch for itself.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.policy.model import load_policy, save_policy
from npo.store.artifacts import ArtifactStore
from npo.store.checkpoint import (
    CheckpointError,
    checkpoint_uri,
    list_checkpoints,
    load_checkpoint,
    manifest_digest,
    read_manifest,
    recorded_steps,
    save_checkpoint,
    verify_recorded,
)
from npo.training.seeding import rng_state

if TYPE_CHECKING:
    from npo.store.metadata import MetadataDB


class UnsafeCheckpointFile(CheckpointError):
    """A checkpoint file holds more than tensors and plain containers (a pickled object, that
    is code to run) or cannot be read: refused without unpickling it."""


@dataclass
class TrainState:
    """What `load_train_state` gives back."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    optimizer_state: dict[str, Any] | None
    rng: dict[str, Any] | None
    state: dict[str, Any]
    manifest: dict[str, Any]
    extra: dict[str, bytes] = field(default_factory=dict)


def save_train_state(
    store: ArtifactStore,
    run_id: str,
    step: int,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    extra: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write a complete checkpoint for `step`; returns its manifest. `optimizer`: the
    optimizer or its state_dict() (sharded training gathers one: npo.training.distributed).
    `extra` files (e.g. an experience pool) go under extra/ and are covered by the manifest
    like the weights."""
    with tempfile.TemporaryDirectory(prefix="npo-ckpt-") as tmp:
        root = Path(tmp)
        save_policy(model, tokenizer, root / "policy")
        if optimizer is not None:
            moments = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            torch.save(moments, root / "optimizer.pt")
        torch.save(rng_state(), root / "rng.pt")
        (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        for name, data in (extra or {}).items():
            (root / "extra").mkdir(exist_ok=True)
            (root / "extra" / name).write_bytes(data)
        return save_checkpoint(store, run_id, step, root, meta=state)


def _load_plain(path: Path, run_id: str, step: int) -> Any:
    """`path` loaded as tensors and plain containers only (weights_only=True): whatever else
    its pickle asks for is refused by torch's restricted unpickler before anything runs."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError for a forbidden object; a damaged file, others
        raise UnsafeCheckpointFile(
            f"run {run_id!r} step {step}: {path.name} does not load as plain tensors and "
            f"containers, refused without running anything in it ({_unpickler_reason(e)})"
        ) from None


def _unpickler_reason(e: Exception) -> str:
    """What torch objected to, without its advice to retry with weights_only=False."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    text = text.removeprefix("Weights only load failed.").strip()
    first = text.split(". ", 1)[0].strip().splitlines()
    return first[0] if first else type(e).__name__


def load_train_state(
    store: ArtifactStore,
    run_id: str,
    step: int,
    dtype: str = "float32",
    db: MetadataDB | None = None,
) -> TrainState:
    """Download and verify checkpoint `step`, and load everything in it.

    With `db` (every pipeline step has one) the manifest must also be the one the metadata
    DB recorded at commit; without it (store-only tools, tests) only the files are checked
    against their manifest. optimizer.pt and rng.pt are read as plain data either way."""
    with tempfile.TemporaryDirectory(prefix="npo-ckpt-") as tmp:
        root = Path(tmp)
        manifest = load_checkpoint(store, run_id, step, root, db)
        # the pickled files first: refuse a bad one before spending time on the weights
        opt = root / "optimizer.pt"
        optimizer_state = _load_plain(opt, run_id, step) if opt.exists() else None
        rng = _load_plain(root / "rng.pt", run_id, step)
        model, tokenizer = load_policy(root / "policy", dtype)
        state = json.loads((root / "state.json").read_text())
        extra_dir = root / "extra"
        extra = {p.name: p.read_bytes() for p in extra_dir.iterdir()} if extra_dir.is_dir() else {}
    return TrainState(model, tokenizer, optimizer_state, rng, state, manifest, extra)


def fork_checkpoint(
    store: ArtifactStore,
    src_run: str,
    dst_run: str,
    step: int,
    state_update: dict[str, Any] | None = None,
    db: MetadataDB | None = None,
) -> dict[str, Any]:
    """Copy checkpoint `step` of `src_run` to `dst_run` (a branch or a new lineage starts
    there), with `state_update` merged into its loop state; return the copy's manifest.

    With `db` the source must be the checkpoint the DB recorded, and the copy is recorded
    there as `dst_run`'s (with the source's metrics; `dst_run` must be a run in the DB), so
    it is loaded and forked on like any committed one. Idempotent: done once the copy is in
    the store (and, with `db`, recorded)."""
    copied = step in list_checkpoints(store, dst_run)
    if copied and (db is None or step in recorded_steps(db, dst_run)):
        return read_manifest(store, dst_run, step, db)
    with tempfile.TemporaryDirectory(prefix="npo-fork-") as tmp:
        root = Path(tmp)
        source = load_checkpoint(store, src_run, step, root, db)
        state = {**json.loads((root / "state.json").read_text()), **(state_update or {})}
        state["forked_from"] = src_run
        (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        manifest = save_checkpoint(store, dst_run, step, root, meta=state)
    if db is not None:
        row = verify_recorded(db, source)
        uri = checkpoint_uri(store, dst_run, step)
        db.record_checkpoint(
            dst_run, step, uri, manifest_digest(manifest), row.metrics if row else None
        )
    return manifest
