"""bench/gpu_check.py runs end to end (on CPU, --smoke sizes): the script a GPU machine runs
must not first fail there, where device time is scarce."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert report["toy"]["rl_steps"] == 3 and 0.0 <= report["toy"]["final_accuracy"] <= 1.0
    tp = report["throughput"]
    assert tp["rollout_tokens_per_s"] > 0 and tp["train_tokens_per_s"] > 0
    assert tp["batch"] * tp["new_tokens"] == 32


def test_gpu_check_refuses_to_run_full_size_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the full run would start")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
