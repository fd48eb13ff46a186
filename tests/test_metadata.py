"""Metadata DB: Alembic migrations match the models; writes are idempotent.

Tests taking `db` or `db_url` run on SQLite and on a real PostgreSQL (conftest's db_url);
PostgreSQL-only faults (restart, unreachable server, concurrency) are in test_metadata_pg.py.
"""

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from npo.store.metadata import Base, MetadataDB, RunStatus, default_metadata_url


@pytest.fixture
def db(db_url: str):
    db = MetadataDB(db_url)
    db.migrate()
    yield db
    db.close()


def test_default_url_and_parent_dirs(tmp_path: Path) -> None:
    url = default_metadata_url(tmp_path / "a" / "b")
    assert url == f"sqlite:///{tmp_path}/a/b/npo.db"
    with MetadataDB(url) as db:
        db.migrate()
    assert (tmp_path / "a" / "b" / "npo.db").is_file()
    with pytest.raises(ValueError, match="backend 'mysql'"):
        MetadataDB("mysql://x/y")


def test_migrations_match_models_and_are_idempotent(db: MetadataDB) -> None:
    db.migrate()  # second run is a no-op
    inspector = sa.inspect(db.engine)
    tables = {"runs", "checkpoints", "guidance_caches", "guidance_entries", "mistake_pool"}
    tables |= {"metric_rows"}
    assert set(inspector.get_table_names()) == {"alembic_version", "interventions", *tables}
    assert set(Base.metadata.tables) == {"interventions", *tables}
    for table in Base.metadata.sorted_tables:
        migrated = {c["name"] for c in inspector.get_columns(table.name)}
        assert migrated == set(table.columns.keys()), table.name
    uniques = inspector.get_unique_constraints("checkpoints")
    assert [u["column_names"] for u in uniques] == [["run_id", "step"]]
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0004"
        # Alembic's own autogenerate diff: types, nullability, keys, FKs, indexes.
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_sqlite_pragmas(tmp_path: Path) -> None:
    with MetadataDB(default_metadata_url(tmp_path)) as db, db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_upsert_run_twice_keeps_one_row(db: MetadataDB) -> None:
    db.upsert_run("r1", "toy", "grpo", 0, {"lr": 1e-5})
    first = db.get_run("r1")
    db.set_run_status("r1", "running")
    db.upsert_run("r1", "toy-renamed", "npo", 1, {"lr": 2e-5, "nested": {"k": [1, 2]}})
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 1
    run = db.get_run("r1")
    assert (run.name, run.method, run.seed) == ("toy-renamed", "npo", 1)
    assert run.config == {"lr": 2e-5, "nested": {"k": [1, 2]}}
    assert run.status == "running"  # re-upserting a resumed run does not reset its status
    assert run.created_at == first.created_at
    assert run.updated_at > first.updated_at
    assert run.created_at.tzinfo is UTC
    assert db.get_run("missing") is None


def test_status_changes(db: MetadataDB) -> None:
    db.upsert_run("r1", "toy", "grpo", 0, {})
    assert db.get_run("r1").status == RunStatus.CREATED
    for status in ["running", RunStatus.FAILED, "completed"]:
        db.set_run_status("r1", status)
        assert db.get_run("r1").status == status
    with pytest.raises(ValueError, match="'paused' is not one of"):
        db.set_run_status("r1", "paused")
    with pytest.raises(KeyError, match="nope"):
        db.set_run_status("nope", "running")
    with db.engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):  # DB enforces too
        conn.execute(sa.text("UPDATE runs SET status = 'paused'"))


def test_record_checkpoint_idempotent_and_ordered(db: MetadataDB) -> None:
    db.upsert_run("r1", "toy", "grpo", 0, {})
    db.upsert_run("r2", "toy", "grpo", 1, {})
    for step in [30, 10, 20]:
        db.record_checkpoint("r1", step, f"file:///s/r1/{step}", "a" * 64)
    db.record_checkpoint("r2", 10, "file:///s/r2/10", "c" * 64)
    db.record_checkpoint("r1", 20, "file:///s/r1/20-retry", "b" * 64, {"reward/mean": 0.75})

    rows = db.checkpoints("r1")
    assert [r.step for r in rows] == [10, 20, 30]
    assert rows[1].uri == "file:///s/r1/20-retry"
    assert rows[1].manifest_sha256 == "b" * 64
    assert rows[1].metrics == {"reward/mean": 0.75}
    assert rows[0].metrics is None
    assert rows[0].created_at.tzinfo is UTC
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM checkpoints")).scalar() == 4
    assert [r.uri for r in db.checkpoints("r2")] == ["file:///s/r2/10"]
    assert db.checkpoints("none") == []
    with pytest.raises(KeyError, match="no run 'ghost'"):
        db.record_checkpoint("ghost", 1, "u", "d" * 64)


def test_data_survives_reopen(db_url: str) -> None:
    with MetadataDB(db_url) as db:
        db.migrate()
        db.upsert_run("r1", "toy", "grpo", 0, {"a": 1})
        db.record_checkpoint("r1", 5, "u", "e" * 64)
    with MetadataDB(db_url) as db:
        db.migrate()
        assert db.get_run("r1").config == {"a": 1}
        assert [r.step for r in db.checkpoints("r1")] == [5]


def test_head_revision_is_alembics_head() -> None:
    """MetadataDB.migrate skips Alembic when the DB is at HEAD_REVISION: it must be the head."""
    from alembic.script import ScriptDirectory

    from npo.store.metadata import HEAD_REVISION, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def test_migrate_fast_path_reads_the_revision(tmp_path: Path) -> None:
    with MetadataDB(default_metadata_url(tmp_path)) as db:
        assert db.revision() is None
        db.migrate()
        assert db.revision() == "0004"
        db.migrate()  # at head: returns without Alembic
        assert db.revision() == "0004"


def test_delete_run_takes_its_lineages_and_their_rows(db: MetadataDB) -> None:
    # a lineage of a_b, and runs that LIKE 'a_b.%' without escaping would also take
    others = ("axb.r1", "a_bc")
    for run in ("a_b", "a_b.r1", *others):
        db.upsert_run(run, run, "autonpo", 0, {})
        db.record_checkpoint(run, 5, f"mem://{run}/5", "0" * 64)
    db.record_intervention("a_b.r1", "auto", 60, 10, 50, 60, {"triggered": True}, [])
    db.record_mistakes("a_b", 3, [("p1", 0.0)])

    db.delete_run("a_b")
    for run in ("a_b", "a_b.r1"):
        assert db.get_run(run) is None
        assert db.checkpoints(run) == [] and db.interventions(run) == []
    assert db.mistakes_by_step("a_b") == {}
    for run in others:
        assert [c.step for c in db.checkpoints(run)] == [5]


# --- the run's history and info (migration 0003): what pods read instead of a run folder ---


def test_history_rows_upsert_truncate_and_go_with_their_run(db: MetadataDB) -> None:
    db.upsert_run("h", "h", "grpo", 0, {})
    db.record_metrics("h", 0, 0, {"eval/accuracy": 0.25})
    db.record_metrics("h", 2, 2, {"reward/mean": 0.5, "actor/entropy": float("nan")})
    db.record_metrics("h", 1, 1, {"reward/mean": 0.4})
    db.record_metrics("h", 2, 2, {"reward/mean": 0.6})  # a replayed step replaces its row
    assert db.history("h") == [
        {"step": 0, "policy_step": 0, "eval/accuracy": 0.25},
        {"step": 1, "policy_step": 1, "reward/mean": 0.4},
        {"step": 2, "policy_step": 2, "reward/mean": 0.6},
    ]
    db.record_metrics("h", 3, 1, {"reward/mean": 0.7, "actor/entropy": float("nan")})
    assert db.history("h", until_step=3)[-1] == {"step": 3, "policy_step": 1, "reward/mean": 0.7}
    assert [r["step"] for r in db.history("h", until_step=1)] == [0, 1]
    db.truncate_history("h", 1)  # rows a crash lost
    assert [r["step"] for r in db.history("h")] == [0, 1]
    with pytest.raises(KeyError, match="no runs row 'ghost'"):
        db.record_metrics("ghost", 1, 1, {"reward/mean": 0.1})
    db.delete_run("h")
    assert db.history("h") == []


def test_run_info_is_set_once_per_field(db: MetadataDB) -> None:
    db.upsert_run("i", "i", "grpo", 0, {})
    assert (db.get_run("i").mlflow_run_id, db.get_run("i").started_at) == (None, None)
    started = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    db.set_run_info("i", started_at=started)
    db.set_run_info("i", mlflow_run_id="abc123")
    run = db.get_run("i")
    assert (run.mlflow_run_id, run.started_at) == ("abc123", started)
    db.upsert_run("i", "i", "grpo", 0, {"x": 1})  # a resume keeps them
    assert db.get_run("i").mlflow_run_id == "abc123"


# --- migration 0004: the `interrupted` status, on a DB that already holds runs ---


def test_upgrade_to_interrupted_keeps_every_row(db_url: str) -> None:
    db = MetadataDB(db_url)
    db.alembic("upgrade", "0003")
    with db.engine.begin() as conn:  # rows as a 0003 DB holds them (its models: raw SQL)
        conn.execute(
            sa.text(
                "INSERT INTO runs (id, name, method, seed, config, status, created_at, "
                "updated_at) VALUES ('old', 'old', 'grpo', 0, '{}', 'running', :t, :t)"
            ),
            {"t": datetime(2026, 12, 1, tzinfo=UTC)},
        )
    db.record_checkpoint("old", 5, "file:///x/000005", "0" * 64)
    db.record_metrics("old", 5, 5, {"reward/mean": 0.5})
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:  # 0003 refuses it
        conn.execute(sa.text("UPDATE runs SET status = 'interrupted' WHERE id = 'old'"))
    db.migrate()
    # the rebuild of `runs` cascaded nothing away, and foreign keys are on again after it
    assert [c.step for c in db.checkpoints("old")] == [5]
    assert [r["step"] for r in db.history("old")] == [5]
    db.set_run_status("old", RunStatus.INTERRUPTED)
    assert db.get_run("old").status == "interrupted"
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET status = 'lost' WHERE id = 'old'"))
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:  # keys on again
        conn.execute(
            sa.text(
                "INSERT INTO checkpoints (run_id, step, uri, manifest_sha256, created_at) "
                "VALUES ('ghost', 1, 'u', 'x', :t)"
            ),
            {"t": datetime(2026, 12, 1, tzinfo=UTC)},
        )
    db.close()
