"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY = {
    "task": {"kind": "arithmetic", "digits": 2, "n_train": 512, "n_eval": 32},
    "model": {
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    },
    "warmup": {"steps": 10, "batch_size": 16, "lr": 3e-3},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 5},
    "train": {"eval_every": 3, "checkpoint_every": 3, "threads": 1},
}


def write_tiny_config(path: Path, root: Path, name: str, steps: int, **extra: object) -> Path:
    """Write a seconds-long experiment YAML (1-layer model, 2-digit sums) and return its path.

    `extra` sections are merged into the defaults (e.g. store={...}, tracking={...}).
    """
    data = json.loads(json.dumps(TINY))
    data |= {"name": name, "store": {"root": str(root)}}
    data["train"] = {**data["train"], "steps": steps}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path
