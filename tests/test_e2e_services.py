"""The experiment against the cluster-like backends: S3 checkpoints, PostgreSQL metadata.

Both servers are real and started by the harness (tests/services). Faults: the training
process is SIGKILLed between a checkpoint's objects and its manifest; the re-run resumes
from the last complete checkpoint and nothing is lost or duplicated.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_config

from npo.config import load_config
from npo.experiment import run_experiment
from npo.report import load_history
from npo.store.checkpoint import list_checkpoints
from npo.store.metadata import MetadataDB

pytestmark = pytest.mark.slow

# Runs in a child process: dies (SIGKILL) right before the manifest of step 4 is written,
# after every other object of that checkpoint is already in the bucket.
KILL_BEFORE_MANIFEST = """
import os, signal, sys
from npo.store.s3 import S3Store
put_bytes = S3Store.put_bytes
def dying_put_bytes(self, key, data):
    if key.endswith("ckpt/000004/manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return put_bytes(self, key, data)
S3Store.put_bytes = dying_put_bytes
from npo.config import load_config
from npo.experiment import run_experiment
run_experiment(load_config(sys.argv[1]))
"""


def _config(tmp_path: Path, bucket: str, pg_url: str, steps: int) -> Path:
    store = {"artifacts_uri": f"s3://{bucket}/npo", "metadata_url": pg_url}
    return write_tiny_config(
        tmp_path / "c.yaml",
        tmp_path / "runs",
        "svc",
        steps,
        store=store,
        train={"eval_every": 2, "checkpoint_every": 2, "threads": 1},
        tracking={"enabled": False},
    )


def test_run_on_s3_and_postgresql(tmp_path, s3_env, s3_bucket, pg_url, pg_server) -> None:
    cfg = load_config(_config(tmp_path, s3_bucket, pg_url, steps=4))
    summary = run_experiment(cfg)
    assert summary["policy steps"] == 4

    from npo.store.artifacts import open_store

    store = open_store(f"s3://{s3_bucket}/npo")
    assert list_checkpoints(store, "svc") == [0, 2, 4]
    with MetadataDB(pg_url) as db:
        rows = db.checkpoints("svc")
        assert [r.step for r in rows] == [0, 2, 4]
        assert rows[-1].uri == f"s3://{s3_bucket}/npo/runs/svc/ckpt/000004"
        assert db.get_run("svc").status == "completed"
        assert s3_env["AWS_SECRET_ACCESS_KEY"] not in repr(db.get_run("svc").config)

    # Credentials come from the environment only: nothing the run wrote may contain them.
    secrets = (s3_env["AWS_SECRET_ACCESS_KEY"], pg_server.secret)
    for path in (tmp_path / "runs" / "svc").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secrets), path


def test_sigkill_between_objects_and_manifest_resumes(tmp_path, s3_env, s3_bucket, pg_url) -> None:
    cfg_path = _config(tmp_path, s3_bucket, pg_url, steps=6)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_MANIFEST, str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]

    from npo.store.artifacts import open_store

    store = open_store(f"s3://{s3_bucket}/npo")
    assert store.exists("runs/svc/ckpt/000004/policy/model.safetensors")  # objects landed
    assert list_checkpoints(store, "svc") == [0, 2]  # ...but step 4 is not committed
    with MetadataDB(pg_url) as db:
        assert [r.step for r in db.checkpoints("svc")] == [0, 2]

    summary = run_experiment(load_config(cfg_path))  # the re-run (a KFP retry)
    assert summary["policy steps"] == 6
    assert list_checkpoints(store, "svc") == [0, 2, 4, 6]
    rows = load_history(tmp_path / "runs" / "svc" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(7))  # nothing lost, nothing twice
    with MetadataDB(pg_url) as db:
        assert [r.step for r in db.checkpoints("svc")] == [0, 2, 4, 6]
