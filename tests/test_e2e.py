"""End-to-end: a short local run through the CLI's library path, and kill-and-resume.

Tiny budgets (a 1-layer model, a few steps) so the whole file runs in well under a minute;
`make run` is the full-size version of the same path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_history, write_tiny_config

from npo.config import load_config
from npo.experiment import run_experiment
from npo.report import load_history
from npo.store.artifacts import open_store
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB

pytestmark = pytest.mark.slow


def _comparable(rows: list[dict]) -> list[dict]:
    # Timings differ between runs by nature; every other number must match exactly.
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_short_run_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", root, "e2e", steps=6))
    summary = run_experiment(cfg)

    run_dir = root / "e2e"
    rows = load_history(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 3, 6]
    assert summary["final accuracy"] == evals[6]
    # 10 warm-up steps cannot reach the default 40% target: the run says so
    assert evals[0] < 0.4
    assert "stopped at its cap (10 steps)" in summary["warning"]
    assert "warmup.target_accuracy 40%" in (run_dir / "report.md").read_text()
    for r in rows[1:]:
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["actor/entropy"] > 0
        assert r["response/length_mean"] >= 1
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "final accuracy" in (run_dir / "report.md").read_text()

    store = open_store((root / "artifacts").as_uri())
    assert list_checkpoints(store, "e2e") == [0, 3, 6]
    with MetadataDB(f"sqlite:///{root}/npo.db") as db:
        assert [c.step for c in db.checkpoints("e2e")] == [0, 3, 6]
        assert db.get_run("e2e").status == "completed"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    history = client.get_metric_history(summary["mlflow run"], "reward/mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    artifacts = [a.path for a in client.list_artifacts(summary["mlflow run"], "report")]
    assert "report/report.png" in artifacts

    # A second call finds the run complete and recomputes nothing.
    again = run_experiment(cfg)
    assert again["final accuracy"] == summary["final accuracy"]
    assert len(load_history(run_dir / "metrics.jsonl")) == len(rows)


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    steps = 12
    off = {"tracking": {"enabled": False}}
    ref_cfg = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", "run", steps, **off)
    run_experiment(load_config(ref_cfg))
    reference = load_history(tmp_path / "ref" / "run" / "metrics.jsonl")

    cfg_path = write_tiny_config(tmp_path / "kill.yaml", tmp_path / "kill", "run", steps, **off)
    run_dir = tmp_path / "kill" / "run"
    manifest = tmp_path / "kill" / "artifacts" / "runs" / "run" / "ckpt" / "000003"
    manifest = manifest / "manifest.json"
    cmd = [sys.executable, "-m", "npo.cli", "run", str(cfg_path), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not manifest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint at step 3 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "report.md").exists(), "the run finished before it was killed"
    assert not (run_dir / "metrics.jsonl").exists()  # exported by the report only
    killed_at = max(r["step"] for r in run_history(run_dir))
    assert killed_at < steps

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_history(run_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(steps + 1))
    assert _comparable(resumed) == _comparable(reference)
