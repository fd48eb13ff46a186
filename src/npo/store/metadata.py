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

PostgreSQL in a cluster restarts and drops connections: the engine pings pooled connections
before use (``pool_pre_ping``), connects with a timeout, and every method retries a bounded
number of times with exponential backoff on transient errors (connection lost or refused,
SQLite "database is locked"). Retrying is safe because each call is one transaction and the
writes are idempotent. When the retries run out, ``MetadataDBUnavailable`` names the URL with
its password masked; no message, log line or ``repr`` of this module shows the password.

A new migration: ``alembic.command.revision(alembic_config(url), "what", autogenerate=True)``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a SQLite writer waits for another process's lock
MAX_BACKOFF_S = 4.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class MetadataDBUnavailable(ConnectionError):
    """The metadata DB failed transiently on every try; the message masks the password."""


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

    def __init__(
        self, url: str, *, connect_timeout_s: int = 10, retries: int = 4, backoff_s: float = 0.25
    ) -> None:
        """Open (lazily) the DB at `url`.

        connect_timeout_s: PostgreSQL only; libpq's ``connect_timeout`` (it rounds up to 2 s)
            unless the URL sets one. retries/backoff_s: transient failures are retried
            `retries` times, sleeping backoff_s, 2*backoff_s, ... (capped at MAX_BACKOFF_S).
        """
        self.url = sa.make_url(url)
        if self.url.drivername == "postgresql":  # SQLAlchemy would pick psycopg2; we ship psycopg 3
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.safe_url = self.url.render_as_string(hide_password=True)
        self.retries, self.backoff_s = retries, backoff_s
        backend = self.url.get_backend_name()
        if backend not in _INSERTS:
            raise ValueError(
                f"metadata URL {self.safe_url!r}: backend {backend!r} not in {sorted(_INSERTS)}"
            )
        kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            if self.url.database not in (None, "", ":memory:"):
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        else:
            kwargs["pool_pre_ping"] = True  # a restarted server leaves dead pooled connections
            if "connect_timeout" not in self.url.query:
                kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"metadata URL {self.safe_url!r} needs the {e.name!r} driver: "
                "pip install 'npo[cluster]'"
            ) from None
        if backend == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
        self._insert = _INSERTS[backend]
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"MetadataDB({self.safe_url!r})"

    def _transient(self, e: sa.exc.OperationalError) -> bool:
        if self.engine.dialect.name == "sqlite":  # other SQLite OperationalErrors are bugs
            return "locked" in str(e.orig) or "busy" in str(e.orig)
        # psycopg's OperationalError: connection refused/lost, admin shutdown, serialization
        # failure, deadlock: all are worth another try of the whole transaction.
        return True

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """fn() (one whole transaction), retried on transient errors with backoff."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 2):
            try:
                return fn()
            except sa.exc.OperationalError as e:
                if not self._transient(e):
                    raise
                reason = " ".join(str(e.orig).split())  # libpq never echoes the password
                if attempt > self.retries:
                    msg = f"metadata DB {self.safe_url}: {what} failed after {attempt} tries"
                    raise MetadataDBUnavailable(f"{msg}: {reason}") from e
                log.warning("metadata DB %s: %s failed (%s); retrying", self.safe_url, what, reason)
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def __enter__(self) -> MetadataDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def migrate(self) -> None:
        """``alembic upgrade head`` on this DB; a no-op when already current."""
        from alembic import command

        def upgrade() -> None:
            cfg = alembic_config()
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn  # env.py migrates on this connection
                command.upgrade(cfg, "head")

        self._retry("migrate", upgrade)

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
        self._retry(f"upsert_run({run_id!r})", lambda: self._execute(stmt))

    def _execute(self, stmt: sa.Executable) -> None:
        with self._session.begin() as s:
            s.execute(stmt)

    def set_run_status(self, run_id: str, status: RunStatus | str) -> None:
        try:
            status = RunStatus(status)
        except ValueError:
            allowed = ", ".join(s.value for s in RunStatus)
            raise ValueError(f"run status {status!r} is not one of: {allowed}") from None

        def update() -> None:
            with self._session.begin() as s:
                run = s.get(RunRow, run_id)
                if run is None:
                    raise KeyError(f"no run {run_id!r} in the metadata DB")
                run.status = status.value

        self._retry(f"set_run_status({run_id!r})", update)

    def get_run(self, run_id: str) -> RunRow | None:
        def get() -> RunRow | None:
            with self._session() as s:
                return s.get(RunRow, run_id)

        return self._retry(f"get_run({run_id!r})", get)

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

        def write() -> None:
            try:
                self._execute(stmt)
            except sa.exc.IntegrityError as e:  # the only constraint left is the run FK
                raise KeyError(f"no run {run_id!r} in the metadata DB (record it first)") from e

        self._retry(f"record_checkpoint({run_id!r}, {step})", write)

    def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        """Checkpoint rows of a run, by ascending step."""
        q = sa.select(CheckpointRow).where(CheckpointRow.run_id == run_id)

        def read() -> list[CheckpointRow]:
            with self._session() as s:
                return list(s.scalars(q.order_by(CheckpointRow.step)))

        return self._retry(f"checkpoints({run_id!r})", read)

    def close(self) -> None:
        self.engine.dispose()
