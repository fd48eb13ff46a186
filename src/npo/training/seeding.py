"""Deterministic seeds and data order, derived from (run seed, step).

Every policy step re-seeds from (seed, step), and the prompts of a step are a pure function
of (seed, step): a run resumed from a checkpoint therefore replays exactly the numbers of
the uninterrupted run, whatever happened (evals, checkpoint writes) in between.
"""

from __future__ import annotations

import random
from typing import Any

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


def segment_indices(n: int, per_step: int, start: int, end: int, seed: int) -> list[int]:
    """The distinct prompt indices of policy steps (start, end], in order of first use
    (policy step s draws `batch_indices(n, per_step, s - 1, seed)`).

    >>> segment_indices(4, 2, 0, 2, seed=1) == list(dict.fromkeys(
    ...     batch_indices(4, 2, 0, seed=1) + batch_indices(4, 2, 1, seed=1)))
    True
    """
    seen: dict[int, None] = {}
    for step in range(start, end):
        seen.update(dict.fromkeys(batch_indices(n, per_step, step, seed)))
    return list(seen)


def rng_state() -> dict[str, Any]:
    """Snapshot of python / numpy / torch RNG states (saved with each checkpoint).

    Only ints, floats, strings, None and tensors, so that `torch.load(weights_only=True)`
    reads it back: a checkpoint's rng.pt then never needs unpickling arbitrary objects
    (numpy's state array would). `set_rng_state` turns it back into the libraries' forms.
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),  # 624 words + index
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),  # uint32 words, exact in int64
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }


def _field(state: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"RNG state: {where} has no field {key!r} (not made by rng_state())")
    return state[key]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the python / numpy / torch RNGs to what `rng_state()` took."""
    py, npy = _field(state, "python", "state"), _field(state, "numpy", "state")
    internal = _field(py, "internal", "python")
    random.setstate(
        (
            int(_field(py, "version", "python")),
            tuple(int(x) for x in internal.tolist()),
            _field(py, "gauss_next", "python"),
        )
    )
    np.random.set_state(
        (
            str(_field(npy, "bit_generator", "numpy")),
            _field(npy, "key", "numpy").numpy().astype(np.uint32),
            int(_field(npy, "pos", "numpy")),
            int(_field(npy, "has_gauss", "numpy")),
            float(_field(npy, "cached_gaussian", "numpy")),
        )
    )
    torch.set_rng_state(_field(state, "torch", "state"))
