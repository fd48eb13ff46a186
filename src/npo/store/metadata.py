"""Metadata DB: which runs exist and which checkpoints they committed (SQLAlchemy 2 + Alembic).

The object store holds the bytes (``runs/<run_id>/ckpt/<step:06d>/...``, manifest written
last, see ``npo.store.checkpoint``); this DB indexes them so a step can find "the checkpoint
to resume from" or roll back to an earlier row without listing the store. SQLite by default
(``default_metadata_url``), PostgreSQL in clusters: the same models, portable column types
(JSON via ``sqlalchemy.JSON``, timestamps stored and returned as aware UTC datetimes).

Writes are idempotent so a retried pipeline step never duplicates rows: ``upsert_run`` and
``record_checkpoint`` are INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL share it).

The schema is owned by Alembic migrations (``npo/store/migrations``); ``MetadataDB.migrate()``
runs ``alembic upgrade head`` programmatically, so it works from an installed package:

    db = MetadataDB(default_metadata_url(Path("runs")))
    db.migrate()
    db.upsert_run("run-1", "toy-grpo", "grpo", 0, {"lr": 1e-5})
    db.record_checkpoint("run-1", 25, "file:///.../runs/run-1/ckpt/000025", sha)

A new migration: ``alembic.command.revision(alembic_config(url), "what", autogenerate=True)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the zone; we put it back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} stored; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Deterministic constraint names, so later migrations can alter them on PostgreSQL.
_NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=_NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(none_as_null=True)}  # noqa: RUF012


class RunRow(Base):
    """One experiment run."""

    __tablename__ = "runs"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s.value}'" for s in RunStatus) + ")", name="status"
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    method: Mapped[str] = mapped_column(sa.String(64))
    seed: Mapped[int]
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default=RunStatus.CREATED.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CheckpointRow(Base):
    """A committed checkpoint of a run at an optimizer step; unique per (run_id, step)."""

    __tablename__ = "checkpoints"
    __table_args__ = (sa.UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("runs.id", ondelete="CASCADE")
    )
    step: Mapped[int]
    uri: Mapped[str] = mapped_column(sa.Text)
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    metrics: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# INSERT ... ON CONFLICT DO UPDATE has the same API on both backends we support.
_INSERTS: dict[str, Callable[..., Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def default_metadata_url(root: Path) -> str:
    """The embedded default: a SQLite file under the runs root."""
    return f"sqlite:///{root}/npo.db"


def alembic_config(url: str | None = None) -> Config:
    """Alembic config pointing at the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser escaping
    return cfg


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
    cur.execute("PRAGMA journal_mode=WAL")  # readers (reports, UI) don't block the trainer
    cur.close()


class MetadataDB:
    """Runs and checkpoints in a SQL database; every write is idempotent."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        backend = self.url.get_backend_name()
        if backend not in _INSERTS:
            raise ValueError(f"metadata URL {url!r}: backend {backend!r} not in {sorted(_INSERTS)}")
        if backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(self.url)
        if backend == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
        self._insert = _INSERTS[backend]
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def __enter__(self) -> MetadataDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def migrate(self) -> None:
        """``alembic upgrade head`` on this DB; a no-op when already current."""
        from alembic import command

        cfg = alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn  # env.py migrates on this connection
            command.upgrade(cfg, "head")

    def upsert_run(
        self, run_id: str, name: str, method: str, seed: int, config: dict[str, Any]
    ) -> None:
        """Create the run, or refresh its name/method/seed/config (status is kept)."""
        now = utcnow()
        stmt = self._insert(RunRow).values(
            id=run_id,
            name=name,
            method=method,
            seed=seed,
            config=config,
            status=RunStatus.CREATED.value,
            created_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[RunRow.id],
            set_={
                "name": name,
                "method": method,
                "seed": seed,
                "config": config,
                "updated_at": now,
            },
        )
        with self._session.begin() as s:
            s.execute(stmt)

    def set_run_status(self, run_id: str, status: RunStatus | str) -> None:
        try:
            status = RunStatus(status)
        except ValueError:
            allowed = ", ".join(s.value for s in RunStatus)
            raise ValueError(f"run status {status!r} is not one of: {allowed}") from None
        with self._session.begin() as s:
            run = s.get(RunRow, run_id)
            if run is None:
                raise KeyError(f"no run {run_id!r} in the metadata DB")
            run.status = status.value

    def get_run(self, run_id: str) -> RunRow | None:
        with self._session() as s:
            return s.get(RunRow, run_id)

    def record_checkpoint(
        self,
        run_id: str,
        step: int,
        uri: str,
        manifest_sha256: str,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Index a committed checkpoint; re-recording (run_id, step) updates that row."""
        stmt = self._insert(CheckpointRow).values(
            run_id=run_id,
            step=step,
            uri=uri,
            manifest_sha256=manifest_sha256,
            metrics=metrics,
            created_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[CheckpointRow.run_id, CheckpointRow.step],
            set_={"uri": uri, "manifest_sha256": manifest_sha256, "metrics": metrics},
        )
        try:
            with self._session.begin() as s:
                s.execute(stmt)
        except sa.exc.IntegrityError as e:  # the only constraint left is the run FK
            raise KeyError(f"no run {run_id!r} in the metadata DB (record it first)") from e

    def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        """Checkpoint rows of a run, by ascending step."""
        with self._session() as s:
            q = sa.select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            return list(s.scalars(q.order_by(CheckpointRow.step)))

    def close(self) -> None:
        self.engine.dispose()
