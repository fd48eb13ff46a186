"""Metadata DB under faults, on a real PostgreSQL server (and SQLite where it applies).

The plain behaviour (migrations, upserts, ordering, statuses, timestamps) runs on both
backends in test_metadata.py; here: two writer processes at once, a server restart under an
open MetadataDB, an unreachable server, and passwords kept out of every message.

    .venv/bin/python -m pytest tests/test_metadata_pg.py -q
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from npo.store.metadata import MetadataDB, MetadataDBUnavailable


def _full_text(exc: BaseException) -> str:
    """The exception as a user would see it: message, cause chain and traceback."""
    return "".join(traceback.format_exception(exc))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# One writer process: waits for the go-file so both processes write at the same time.
# Per step: refresh the shared run, record the shared (overlapping) checkpoint and its own.
_WRITER = """
import sys, time
from pathlib import Path
from npo.store.metadata import MetadataDB

url, wid, go, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
db = MetadataDB(url)
db.get_run("shared")  # connect before the start line
Path(f"{go}.ready-{wid}").touch()
while not go.exists():
    time.sleep(0.005)
db.upsert_run(f"own-{wid}", "own", "grpo", int(wid), {})
for step in range(steps):
    db.upsert_run("shared", "shared", "npo", 0, {"last_writer": wid, "step": step})
    db.record_checkpoint("shared", step, f"file:///w{wid}/{step}", wid * 64, {"w": int(wid)})
    db.record_checkpoint(f"own-{wid}", step, f"file:///own/{step}", "f" * 64)
    if step % 10 == 0:
        db.set_run_status("shared", "running")  # a read-then-write transaction
db.close()
"""


@pytest.mark.slow  # several processes race
def test_two_processes_write_the_same_and_different_keys(db_url: str, tmp_path: Path) -> None:
    steps = 100  # 2 processes x (2 x 100 checkpoints + 100 run upserts + 10 status updates)
    with MetadataDB(db_url) as db:
        db.migrate()
        db.upsert_run("shared", "shared", "npo", 0, {})
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db_url, wid, str(go), str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for wid in ("1", "2")
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.ready-{w}").exists() for w in ("1", "2")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate() for p in procs if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "Traceback" not in err, err

    with MetadataDB(db_url) as db:
        shared = db.checkpoints("shared")
        assert [r.step for r in shared] == list(range(steps))  # each (run, step) exactly once
        for r in shared:  # one writer's whole row, never a mix of two
            wid = r.metrics["w"]
            assert (r.uri, r.manifest_sha256) == (f"file:///w{wid}/{r.step}", str(wid) * 64)
        for wid in ("1", "2"):
            assert [r.step for r in db.checkpoints(f"own-{wid}")] == list(range(steps))
        assert db.get_run("shared").status == "running"
        assert db.get_run("shared").config["step"] == steps - 1
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 3
            assert conn.execute(sa.text("SELECT count(*) FROM checkpoints")).scalar() == 3 * steps


def test_timestamps_are_utc_whatever_the_session_timezone(pg_url: str) -> None:
    name = sa.make_url(pg_url).database
    with MetadataDB(pg_url) as db:
        db.migrate()
        with db.engine.begin() as conn:  # new connections of this DB now talk +05:30
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'Asia/Kolkata'")
    with MetadataDB(pg_url) as db:
        cols = {c["name"]: c["type"] for c in sa.inspect(db.engine).get_columns("checkpoints")}
        assert cols["created_at"].timezone is True  # timestamptz, not a naive timestamp
        db.upsert_run("r1", "toy", "grpo", 0, {})
        db.record_checkpoint("r1", 1, "u", "a" * 64)
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Kolkata"
            raw = conn.exec_driver_sql("SELECT created_at::text FROM checkpoints").scalar()
        assert raw.endswith("+05:30")
        created = db.checkpoints("r1")[0].created_at
        assert created.tzinfo is UTC
        assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)


def test_restart_between_writes_reconnects(pg_server, pg_url: str) -> None:
    """pool_pre_ping replaces the pooled connection that the restart killed; no retry needed."""
    db = MetadataDB(pg_url, retries=0)
    db.migrate()
    db.upsert_run("r1", "toy", "grpo", 0, {})
    db.record_checkpoint("r1", 1, "u1", "a" * 64)
    pg_server.stop()
    pg_server.start()
    db.record_checkpoint("r1", 2, "u2", "a" * 64)
    assert [r.step for r in db.checkpoints("r1")] == [1, 2]
    db.close()


def test_write_while_down_fails_clearly_then_a_rerun_completes(pg_server, pg_url: str) -> None:
    db = MetadataDB(pg_url, retries=2, backoff_s=0.05)
    db.migrate()
    db.upsert_run("r1", "toy", "grpo", 0, {})
    db.record_checkpoint("r1", 1, "u1", "a" * 64)
    pg_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(MetadataDBUnavailable) as err:
            db.record_checkpoint("r1", 2, "u2", "a" * 64)
        assert time.monotonic() - t0 < 10
    finally:
        pg_server.start()
    message = str(err.value)
    assert f"127.0.0.1:{pg_server.port}" in message
    assert "record_checkpoint('r1', 2) failed after 3 tries" in message
    for text in (_full_text(err.value), repr(db), str(db.engine)):
        assert pg_server.secret not in text
    db.record_checkpoint("r1", 2, "u2", "a" * 64)  # the same object recovers...
    db.close()
    with MetadataDB(pg_url) as rerun:  # ...and so does a re-run of the step
        rerun.record_checkpoint("r1", 2, "u2", "a" * 64)
        assert [r.step for r in rerun.checkpoints("r1")] == [1, 2]


def test_retries_ride_out_a_restart(pg_server, pg_url: str) -> None:
    db = MetadataDB(pg_url, retries=8, backoff_s=0.1)
    db.migrate()
    db.upsert_run("r1", "toy", "grpo", 0, {})
    pg_server.stop()
    restarter = threading.Timer(0.5, pg_server.start)
    restarter.start()
    try:
        db.record_checkpoint("r1", 1, "u1", "a" * 64)  # fails, backs off, succeeds after start
    finally:
        restarter.join()
    assert [r.step for r in db.checkpoints("r1")] == [1]
    db.close()


def test_wrong_password_is_named_but_not_shown(pg_server, pg_url: str) -> None:
    name = sa.make_url(pg_url).database
    wrong = f"wrong-{pg_server.secret[::-1]}"
    db = MetadataDB(pg_server.url(name, password=wrong), retries=0)
    with pytest.raises(MetadataDBUnavailable, match="password authentication failed") as err:
        db.migrate()
    assert f"127.0.0.1:{pg_server.port}/{name}" in str(err.value)
    for text in (_full_text(err.value), repr(db)):
        assert wrong not in text and pg_server.secret[::-1] not in text


def test_unreachable_server_fails_fast_and_masks_password() -> None:
    port, secret = _closed_port(), "s3cret-d0-not-print"
    url = f"postgresql://npo:{secret}@127.0.0.1:{port}/npo"  # no driver: psycopg is chosen
    db = MetadataDB(url, connect_timeout_s=2, retries=1, backoff_s=0.05)
    assert db.engine.dialect.driver == "psycopg"
    t0 = time.monotonic()
    with pytest.raises(MetadataDBUnavailable, match=f"127.0.0.1:{port}") as err:
        db.upsert_run("r1", "toy", "grpo", 0, {})
    assert time.monotonic() - t0 < 5
    assert "failed after 2 tries" in str(err.value)
    for text in (_full_text(err.value), repr(db)):
        assert secret not in text
    with pytest.raises(ValueError, match="backend 'mysql'") as bad:
        MetadataDB(f"mysql://npo:{secret}@127.0.0.1/npo")
    assert secret not in str(bad.value)
