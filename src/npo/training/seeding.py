"""Deterministic seeds and data order, derived from (run seed, step).

Every policy step re-seeds from (seed, step), and the prompts of a step are a pure function
of (seed, step): a run resumed from a checkpoint therefore replays exactly the numbers of
the uninterrupted run, whatever happened (evals, checkpoint writes) in between.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(seed: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, step, stream)."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, step, stream]).generate_state(2)
    return int((int(mixed[0]) << 31) ^ int(mixed[1])) & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def batch_indices(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the `per_step` prompts for 0-based `step`, walking seeded epochs over n.

    Epoch e is a permutation of range(n) seeded by (seed, e); step s takes positions
    s*per_step .. s*per_step+per_step-1 of the concatenated epochs.

    >>> sorted(batch_indices(4, 2, 0, seed=1) + batch_indices(4, 2, 1, seed=1))
    [0, 1, 2, 3]
    """
    out: list[int] = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, stream=1))
        perm = torch.randperm(n, generator=g).tolist()
        take = min(per_step - len(out), n - offset)
        out.extend(perm[offset : offset + take])
        pos += take
    return out


def rng_state() -> dict:
    """Snapshot of python / numpy / torch RNG states (saved with each checkpoint)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
