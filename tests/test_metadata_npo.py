"""Metadata DB, NPO tables (migration 0002): guidance caches and entries, the mistake pool,
interventions; and migrations racing on a fresh DB.

Every test runs on SQLite and on a real PostgreSQL (conftest's db_url); the lock-wait test
also on both. Checks: round trips, idempotent re-records (updated, never duplicated), all
rows of a multi-row write in one transaction, the migrated schema equals the models, a
downgrade to 0001 and back, and concurrent writer / migrator processes.

    .venv/bin/python -m pytest tests/test_metadata_npo.py -q
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import npo.store.metadata as md
from npo.store.metadata import MIGRATION_LOCK_ID, Base, MetadataDB

NPO_TABLES = {"guidance_caches", "guidance_entries", "mistake_pool", "interventions"}
HEAD = "0004"


@pytest.fixture
def db(db_url: str):
    db = MetadataDB(db_url)
    db.migrate()
    db.upsert_run("r1", "toy", "npo", 0, {})
    yield db
    db.close()


def _count(db: MetadataDB, table: str) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()


def _alembic(db: MetadataDB, cmd: str, revision: str) -> None:
    """`alembic <cmd> <revision>` on db's engine, as MetadataDB.migrate() runs it."""
    db.alembic(cmd, revision)


def _version(db: MetadataDB) -> str:
    with db.engine.connect() as conn:
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def _cache(cache_id: str = "r1.g000050", **overrides: object) -> dict:
    return {
        "id": cache_id,
        "run_id": "r1",
        "guide_run_id": "r1",
        "guide_step": 50,
        "policy_step": 40,
        "prompts_total": 64,
        "prompts_attempted": 60,
        "prompts_solved": 30,
        "tries_per_prompt": 8,
        "q_hat": 0.25,
        "guide_accuracy": 0.5,
        "current_accuracy": 0.375,
        "sampled_tokens": 3_000_000_000,  # > 2**31: a BIGINT
        "payload_uri": f"s3://b/runs/r1/guidance/{cache_id}.parquet",
    } | overrides


def _entry(prompt_id: str, reward: float | None = 1.0, tokens: int = 12) -> dict:
    return {
        "prompt_id": prompt_id,
        "reward": reward,
        "response_tokens": tokens,
        "guide_logprob_sum": -0.5 * tokens,
    }


# --- processes that start at the same moment (a go-file start line) ---

_PRELUDE = """
import sys, time
from pathlib import Path
go, wid = Path(sys.argv[1]), sys.argv[2]
from npo.store.metadata import MetadataDB
Path(f"{go}.ready-{wid}").touch()
while not go.exists():
    time.sleep(0.002)
"""


def run_together(script: str, args: list[list[str]], go: Path, timeout: float = 60) -> list[str]:
    """Start one `python -c _PRELUDE+script go wid *a` per entry of args, wait until all have
    imported, release them at once; assert each exits 0 without a traceback; their stdouts."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + script, str(go), str(wid), *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for wid, a in enumerate(args)
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(Path(f"{go}.ready-{w}").exists() for w in range(len(args))):
            dead = [p.communicate() for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, dead
            time.sleep(0.01)
        go.touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0 and "Traceback" not in err, err
            outs.append(out)
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- schema ---


def test_head_schema_matches_the_models(db: MetadataDB) -> None:
    db.migrate()  # a no-op when current
    assert _version(db) == HEAD
    inspector = sa.inspect(db.engine)
    assert set(inspector.get_table_names()) == {"alembic_version"} | set(Base.metadata.tables)
    assert set(Base.metadata.tables) >= NPO_TABLES
    for table in Base.metadata.sorted_tables:
        name = table.name
        assert {c["name"] for c in inspector.get_columns(name)} == set(table.columns.keys())
        model_uniques = {
            tuple(c.columns.keys()) for c in table.constraints if isinstance(c, sa.UniqueConstraint)
        }
        migrated = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)}
        assert migrated == model_uniques, name
        # autogenerate does not compare CHECK constraints: compare their names here
        model_checks = {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
        assert {c["name"] for c in inspector.get_check_constraints(name)} == model_checks, name
    assert {
        u["name"]: u["column_names"] for u in inspector.get_unique_constraints("mistake_pool")
    } == {"uq_mistake_pool_run_id_step_prompt_id": ["run_id", "step", "prompt_id"]}
    with db.engine.connect() as conn:
        # Alembic's own autogenerate diff: types, nullability, keys, FKs, indexes.
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_downgrade_to_0001_and_upgrade_again(db: MetadataDB) -> None:
    db.record_checkpoint("r1", 10, "u", "a" * 64)
    db.record_mistakes("r1", 10, [("p1", 0.0)])
    db.record_guidance_cache(_cache(), [_entry("p1")])
    db.record_intervention("r1", "auto", 60, 20, 40, 60, {"ema": 0.5}, [])

    _alembic(db, "downgrade", "0001")
    assert _version(db) == "0001"
    assert set(sa.inspect(db.engine).get_table_names()) == {
        "alembic_version",
        "runs",
        "checkpoints",
    }
    assert [r.step for r in db.checkpoints("r1")] == [10]  # 0001's data survive

    db.migrate()
    assert _version(db) == HEAD
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    assert db.mistakes("r1") == [] and db.interventions("r1") == []  # empty, usable again
    db.record_mistakes("r1", 10, [("p1", 0.0)])
    assert db.mistakes_by_step("r1") == {10: ["p1"]}


# --- guidance caches and entries ---


def test_guidance_cache_round_trip_and_re_record(db: MetadataDB) -> None:
    db.record_guidance_cache(_cache())
    db.record_guidance_cache(
        _cache("r1.g000020", guide_step=20, policy_step=10, guide_run_id="scout")
    )
    first = db.guidance_cache("r1.g000050")
    assert (first.run_id, first.guide_run_id, first.guide_step, first.policy_step) == (
        "r1",
        "r1",
        50,
        40,
    )
    assert (first.prompts_total, first.prompts_attempted, first.prompts_solved) == (64, 60, 30)
    assert (first.tries_per_prompt, first.sampled_tokens) == (8, 3_000_000_000)
    assert (first.q_hat, first.guide_accuracy, first.current_accuracy) == (0.25, 0.5, 0.375)
    assert first.payload_uri == "s3://b/runs/r1/guidance/r1.g000050.parquet"
    assert first.created_at.tzinfo is UTC

    # a retried step re-records: updated in place, created_at kept
    db.record_guidance_cache(_cache(q_hat=0.5, prompts_solved=31, payload_uri="s3://b/x"))
    again = db.guidance_cache("r1.g000050")
    assert (again.q_hat, again.prompts_solved, again.payload_uri) == (0.5, 31, "s3://b/x")
    assert again.created_at == first.created_at
    assert _count(db, "guidance_caches") == 2
    assert [c.id for c in db.guidance_caches("r1")] == ["r1.g000020", "r1.g000050"]
    assert db.guidance_caches("other") == [] and db.guidance_cache("missing") is None

    # the accuracies may be left out (NULL); other fields may not, nor unknown ones
    partial = {k: v for k, v in _cache("r1.g000070").items() if not k.endswith("accuracy")}
    db.record_guidance_cache(partial)
    row = db.guidance_cache("r1.g000070")
    assert row.guide_accuracy is None and row.current_accuracy is None
    with pytest.raises(ValueError, match=r"missing fields \['q_hat'\]"):
        db.record_guidance_cache({k: v for k, v in _cache().items() if k != "q_hat"})
    with pytest.raises(ValueError, match=r"unknown fields \['qhat'\]"):
        db.record_guidance_cache(_cache(qhat=0.1))
    with pytest.raises(KeyError, match="no runs row 'ghost'"):
        db.record_guidance_cache(_cache("ghost.g1", run_id="ghost"))
    db.upsert_run("r2", "other", "npo", 1, {})
    with pytest.raises(ValueError, match=r"'r1\.g000050' belongs to run 'r1', not 'r2'"):
        db.record_guidance_cache(_cache(run_id="r2"), [_entry("x")])
    assert db.guidance_cache("r1.g000050").run_id == "r1" and db.guidance_caches("r2") == []
    with pytest.raises(sa.exc.IntegrityError):  # q_hat is a share: CHECK 0 <= q_hat <= 1
        db.record_guidance_cache(_cache(q_hat=1.5))
    assert db.guidance_cache("r1.g000050").q_hat == 0.5


def test_guidance_entries_round_trip_replace_and_merge(db: MetadataDB) -> None:
    db.record_guidance_cache(_cache())
    cid = "r1.g000050"
    db.record_guidance_entries(cid, [_entry("p2", tokens=5), _entry("p1"), _entry("p3")])
    rows = db.guidance_entries(cid)
    assert [(e.prompt_id, e.reward, e.response_tokens, e.guide_logprob_sum) for e in rows] == [
        ("p1", 1.0, 12, -6.0),
        ("p2", 1.0, 5, -2.5),
        ("p3", 1.0, 12, -6.0),
    ]
    ids = {e.prompt_id: e.id for e in rows}

    db.record_guidance_entries(cid, [_entry("p1"), _entry("p2"), _entry("p3")])  # a retry
    assert _count(db, "guidance_entries") == 3

    # re-recording the cache replaces its content: p2 updated in place, p3 gone, p4 new
    db.record_guidance_entries(cid, [_entry("p1"), _entry("p2", 0.5, 7), _entry("p4")])
    rows = {e.prompt_id: e for e in db.guidance_entries(cid)}
    assert sorted(rows) == ["p1", "p2", "p4"]
    assert (rows["p2"].reward, rows["p2"].response_tokens) == (0.5, 7)
    assert rows["p2"].id == ids["p2"] and rows["p1"].id == ids["p1"]

    # replace=False merges; the same prompt twice in one call: the last one wins
    db.record_guidance_entries(cid, [_entry("p5", 0.1), _entry("p5", 0.2)], replace=False)
    rows = {e.prompt_id: e.reward for e in db.guidance_entries(cid)}
    assert rows == {"p1": 1.0, "p2": 0.5, "p4": 1.0, "p5": 0.2}

    # the cache row and its entries in one call (one transaction)
    db.record_guidance_cache(_cache("r1.g000060"), [_entry("q1"), _entry("q2")])
    assert [e.prompt_id for e in db.guidance_entries("r1.g000060")] == ["q1", "q2"]
    assert len(db.guidance_entries(cid)) == 4  # other caches untouched

    db.record_guidance_entries(cid, [])  # the regenerated cache solved nothing
    assert db.guidance_entries(cid) == []
    with pytest.raises(KeyError, match="no guidance_caches row 'nope'"):
        db.record_guidance_entries("nope", [_entry("p1")])
    with pytest.raises(ValueError, match=r"unknown fields \['text'\]"):
        db.record_guidance_entries(cid, [_entry("p1") | {"text": "x"}])

    with db.engine.begin() as conn:  # entries go with their cache, caches with their run
        conn.execute(sa.text("DELETE FROM runs WHERE id = 'r1'"))
    assert _count(db, "guidance_caches") == 0 and _count(db, "guidance_entries") == 0


def test_multi_row_guidance_writes_are_one_transaction(
    db: MetadataDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(md, "UPSERT_CHUNK_ROWS", 10)  # 25 rows = 3 INSERT statements
    cid = "r1.g000050"
    db.record_guidance_cache(_cache(), [_entry("old-1"), _entry("old-2")])
    before = [(e.id, e.prompt_id, e.reward) for e in db.guidance_entries(cid)]
    entries = [_entry(f"p{i:02d}", 0.5) for i in range(24)] + [_entry("p99", reward=None)]
    with pytest.raises(sa.exc.IntegrityError):  # the last row violates NOT NULL
        db.record_guidance_entries(cid, entries)
    assert [(e.id, e.prompt_id, e.reward) for e in db.guidance_entries(cid)] == before
    with pytest.raises(sa.exc.IntegrityError):
        db.record_guidance_cache(_cache("r1.g000090"), entries)
    assert db.guidance_cache("r1.g000090") is None  # the cache row rolled back with them
    assert _count(db, "guidance_entries") == 2

    db.record_guidance_entries(cid, entries[:-1])  # the valid rows, chunked, do go in
    assert len(db.guidance_entries(cid)) == 24


# --- mistake pool ---


def test_mistake_pool_round_trip_and_re_record(db: MetadataDB) -> None:
    db.upsert_run("r2", "other", "npo", 1, {})
    db.record_mistakes("r1", 20, [("b", 0.25), ("a", 0.0)])
    db.record_mistakes("r1", 10, [("a", 0.125)])
    db.record_mistakes("r1", 30, [("c", 0.5), ("a", 0.0)])
    db.record_mistakes("r2", 10, [("z", 0.0)])
    rows = db.mistakes("r1")
    assert [(m.step, m.prompt_id, m.pass_rate) for m in rows] == [
        (10, "a", 0.125),
        (20, "a", 0.0),
        (20, "b", 0.25),
        (30, "a", 0.0),
        (30, "c", 0.5),
    ]
    assert all(m.run_id == "r1" for m in rows)
    assert [(m.step, m.prompt_id) for m in db.mistakes("r1", since_step=20, until_step=20)] == [
        (20, "a"),
        (20, "b"),
    ]
    assert [m.step for m in db.mistakes("r1", since_step=15)] == [20, 20, 30, 30]
    assert [m.step for m in db.mistakes("r1", until_step=20)] == [10, 20, 20]
    assert db.mistakes_by_step("r1") == {10: ["a"], 20: ["a", "b"], 30: ["a", "c"]}
    assert db.mistakes_by_step("r1", since_step=30) == {30: ["a", "c"]}
    assert db.mistakes_by_step("r2") == {10: ["z"]} and db.mistakes_by_step("none") == {}

    # a retried step: updated, never duplicated; repeated in one call: the last one wins
    db.record_mistakes("r1", 20, [("b", 0.375), ("a", 0.0), ("b", 0.5)])
    assert [(m.prompt_id, m.pass_rate) for m in db.mistakes("r1", 20, 20)] == [
        ("a", 0.0),
        ("b", 0.5),
    ]
    assert _count(db, "mistake_pool") == 6
    db.record_mistakes("r1", 40, [])  # nothing to write
    with pytest.raises(KeyError, match="no runs row 'ghost'"):
        db.record_mistakes("ghost", 1, [("a", 0.0)])


def test_mistakes_are_one_transaction(db: MetadataDB, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(md, "UPSERT_CHUNK_ROWS", 10)
    db.record_mistakes("r1", 5, [("keep", 0.0)])
    items = [(f"p{i:02d}", 0.25) for i in range(24)] + [("p99", 1.5)]  # CHECK pass_rate <= 1
    with pytest.raises(sa.exc.IntegrityError):
        db.record_mistakes("r1", 5, items)
    assert db.mistakes_by_step("r1") == {5: ["keep"]}
    db.record_mistakes("r1", 5, items[:-1])
    assert len(db.mistakes("r1")) == 25


@pytest.mark.slow  # several processes race
def test_two_processes_record_overlapping_mistakes(db_url: str, tmp_path: Path) -> None:
    """2 writers x 300 entries, half of them the same (run, step, prompt): each entry once.

    Per writer: 20 calls of 10 prompts (steps 0..19; writer 0 prompts 0-9, writer 1 5-14)
    and one call of 100 (step 100; prompts 0-99 vs 50-149), writer 1 in reverse order.
    """
    with MetadataDB(db_url) as db:
        db.migrate()
        db.upsert_run("r1", "toy", "npo", 0, {})
    script = """
url, offset = sys.argv[3], int(sys.argv[4])
db = MetadataDB(url)
db.mistakes_by_step("r1")  # connect before the start line
order = sorted if wid == "0" else (lambda xs: sorted(xs, reverse=True))
rate = 0.25 * (int(wid) + 1)
for step in range(20):
    db.record_mistakes("r1", step, order((f"p{i:03d}", rate) for i in range(offset, offset + 10)))
big = range(10 * offset, 10 * offset + 100)
db.record_mistakes("r1", 100, order((f"p{i:03d}", rate) for i in big))
db.close()
"""
    run_together(script, [[db_url, "0"], [db_url, "5"]], tmp_path / "go")

    with MetadataDB(db_url) as db:
        pool = db.mistakes_by_step("r1")
        expected = {step: [f"p{i:03d}" for i in range(15)] for step in range(20)}
        assert pool == expected | {100: [f"p{i:03d}" for i in range(150)]}
        assert _count(db, "mistake_pool") == 20 * 15 + 150  # 2 x 300 - 150 shared
        rates = {(m.step, m.prompt_id): m.pass_rate for m in db.mistakes("r1")}
        for (step, prompt_id), rate in rates.items():
            i, lo = int(prompt_id[1:]), 50 if step == 100 else 5
            hi = 100 if step == 100 else 10
            only = {0.25} if i < lo else {0.5} if i >= hi else {0.25, 0.5}
            assert rate in only, (step, prompt_id, rate)


# --- interventions ---


def test_interventions_round_trip_and_re_record(db: MetadataDB) -> None:
    table = [{"delta": 10, "q": 0.4, "v": 0.02, "s": 20.0}, {"delta": 20, "q": 0.6, "v": 0.05}]
    db.record_intervention("r1", "late", 300, 100, 200, 300, {"ema": 0.61}, [])
    db.record_intervention("r1", "auto", 120, 20, 100, 120, {"ema": 0.5, "entropy": 0.3}, table)
    db.record_intervention("r1", "early", 0, 50, 0, 50, {}, [])
    rows = db.interventions("r1")
    assert [(i.kind, i.at_step) for i in rows] == [("early", 0), ("auto", 120), ("late", 300)]
    auto = rows[1]
    assert (auto.run_id, auto.delta, auto.rollback_to, auto.guide_step) == ("r1", 20, 100, 120)
    assert auto.signals == {"ema": 0.5, "entropy": 0.3} and auto.s_table == table
    assert auto.created_at.tzinfo is UTC

    # re-recording (run, kind, at_step) updates; NaN/inf are stored as null on both backends
    db.record_intervention(
        "r1", "auto", 120, 10, 110, 120, {"ema": math.nan}, [{"delta": 10, "s": math.inf}]
    )
    again = db.interventions("r1")[1]
    assert (again.id, again.delta, again.rollback_to) == (auto.id, 10, 110)
    assert again.signals == {"ema": None} and again.s_table == [{"delta": 10, "s": None}]
    assert again.created_at == auto.created_at
    db.record_intervention("r1", "rolling", 120, 5, 115, 120, {}, [])  # another kind, same t
    assert _count(db, "interventions") == 4
    assert db.interventions("none") == []

    with pytest.raises(ValueError, match="'manual' is not one of: early, late, rolling, auto"):
        db.record_intervention("r1", "manual", 1, 1, 0, 1, {}, [])
    with pytest.raises(KeyError, match="no runs row 'ghost'"):
        db.record_intervention("ghost", "auto", 1, 1, 0, 1, {}, [])
    with db.engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):  # DB enforces too
        conn.execute(sa.text("UPDATE interventions SET kind = 'manual'"))


# --- migrations racing on a fresh database ---

_MIGRATOR = """
db = MetadataDB(sys.argv[3])
db.migrate()
db.upsert_run(f"run-{wid}", "toy", "npo", 0, {})
db.close()
"""


@pytest.mark.slow  # several processes race
def test_concurrent_migrations_of_a_fresh_db(db_url: str, tmp_path: Path) -> None:
    """Four processes migrate the same empty DB at once: one upgrades, the others wait for
    its lock and find the schema current (no 'relation/table already exists')."""
    run_together(_MIGRATOR, [[db_url]] * 4, tmp_path / "go")
    with MetadataDB(db_url) as db:
        assert _version(db) == HEAD
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        assert _count(db, "runs") == 4


@pytest.mark.slow  # several processes race
def test_migration_waits_for_the_migration_lock(db_url: str, tmp_path: Path) -> None:
    """While another transaction holds the lock, migrate() blocks, and finishes after."""
    holder = MetadataDB(db_url)
    pg = holder.engine.dialect.name == "postgresql"
    conn = holder.engine.connect()
    if pg:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    go = tmp_path / "go"
    go.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + _MIGRATOR, str(go), "0", db_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        if pg:  # wait until the migrator is queued on the advisory lock
            waiting = sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            with holder.engine.connect() as probe:
                while not probe.execute(waiting).scalar():
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                    time.sleep(0.05)
        else:  # SQLite: it waits on the write lock (busy timeout 30 s)
            while not Path(f"{go}.ready-0").exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(1.0)
        assert proc.poll() is None  # still blocked
        assert "alembic_version" not in sa.inspect(conn).get_table_names()
    finally:
        if pg:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
        conn.rollback()  # SQLite: ends BEGIN IMMEDIATE
        conn.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _version(holder) == HEAD
    holder.close()
