"""bench/s_delta.py on a seconds-long run: the rows it measures are what its docstring says
(a tiny-budget smoke test: the figures themselves are in docs/npo-implementation.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from helpers import write_tiny_config

REPO = Path(__file__).resolve().parents[1]


def s_delta():
    spec = importlib.util.spec_from_file_location("s_delta", REPO / "bench" / "s_delta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_s_delta_measures_q_v_and_s_per_point_and_delta(tmp_path):
    from npo.config import load_config
    from npo.experiment import run_experiment

    config = write_tiny_config(
        tmp_path / "c.yaml", tmp_path / "runs", "sd", steps=6,
        train={"eval_every": 3, "checkpoint_every": 1, "threads": 1},
        tracking={"enabled": False}, warmup={"steps": 40, "target_accuracy": None},
    )  # fmt: skip
    run_experiment(load_config(config))
    out = tmp_path / "out"
    result = s_delta().main([
        "--config", str(config), "--run", "sd", "--store", str(tmp_path / "runs"),
        "--at", "1", "3", "--deltas", "0", "1", "3", "--window", "2", "--tries", "4",
        "--out", str(out),
    ])  # fmt: skip
    assert sorted(result["points"]) == ["1", "3"]
    for rows in result["points"].values():
        assert [r["delta"] for r in rows] == [0, 1, 3]
        failures = {r["failures"] for r in rows}
        assert len(failures) == 1  # the same failing prompts for every guide of a point
        for r in rows:
            if r["failures"] == 0:
                continue
            assert 0.0 <= r["q"] <= 1.0 and r["v"] >= 0.0
            if r["delta"] == 0:
                # π_t against itself: no divergence, no S
                assert r["v"] == pytest.approx(0.0, abs=1e-6) and math.isnan(r["s"])
            elif r["v"] > 0:
                assert r["s"] == pytest.approx(r["q"] / r["v"])
    saved = json.loads((out / "s_delta.json").read_text())
    assert saved["choices"].keys() == {"1", "3"}
    assert (out / "s_delta.png").stat().st_size > 0
    assert "Ŝ = Q̂/V̂" in (out / "s_delta.md").read_text()
