"""Training state <-> checkpoint: weights, tokenizer, optimizer, RNG and loop state.

A checkpoint folder holds `policy/` (safetensors + config + tokenizer, loadable on its own
with `npo eval` or `from_pretrained`), `optimizer.pt`, `rng.pt` and `state.json` (step,
data cursor, anything the loop needs to resume). The store writes the manifest last.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.policy import load_policy, save_policy
from npo.store.artifacts import ArtifactStore
from npo.store.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from npo.training.seeding import rng_state


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
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    extra: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write a complete checkpoint for `step`; returns its manifest. `extra` files (e.g. an
    experience pool) go under extra/ and are covered by the manifest like the weights."""
    with tempfile.TemporaryDirectory(prefix="npo-ckpt-") as tmp:
        root = Path(tmp)
        save_policy(model, tokenizer, root / "policy")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), root / "optimizer.pt")
        torch.save(rng_state(), root / "rng.pt")
        (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        for name, data in (extra or {}).items():
            (root / "extra").mkdir(exist_ok=True)
            (root / "extra" / name).write_bytes(data)
        return save_checkpoint(store, run_id, step, root, meta=state)


def load_train_state(
    store: ArtifactStore, run_id: str, step: int, dtype: str = "float32"
) -> TrainState:
    """Download and verify checkpoint `step`, and load everything in it."""
    with tempfile.TemporaryDirectory(prefix="npo-ckpt-") as tmp:
        root = Path(tmp)
        manifest = load_checkpoint(store, run_id, step, root)
        model, tokenizer = load_policy(root / "policy", dtype)
        # Our own files (optimizer/RNG pickles): trusted, hence weights_only=False.
        opt = root / "optimizer.pt"
        optimizer_state = torch.load(opt, weights_only=False) if opt.exists() else None
        rng = torch.load(root / "rng.pt", weights_only=False)
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
) -> None:
    """Copy checkpoint `step` of `src_run` to `dst_run` (a branch or a new lineage starts
    there), with `state_update` merged into its loop state; idempotent."""
    if step in list_checkpoints(store, dst_run):
        return
    with tempfile.TemporaryDirectory(prefix="npo-fork-") as tmp:
        root = Path(tmp)
        load_checkpoint(store, src_run, step, root)
        state = {**json.loads((root / "state.json").read_text()), **(state_update or {})}
        state["forked_from"] = src_run
        (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        save_checkpoint(store, dst_run, step, root, meta=state)
