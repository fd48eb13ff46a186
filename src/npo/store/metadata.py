"""Metadata DB: which runs exist and which checkpoints they committed (SQLAlchemy 2 + Alembic).

The object store holds the bytes (``runs/<run_id>/ckpt/<step:06d>/...``, manifest written
last, see ``npo.store.checkpoint``); this DB indexes them so a step can find "the checkpoint
to resume from" or roll back to an earlier row without listing the store. SQLite by default
(``default_metadata_url``), PostgreSQL in clusters: the same models, portable column types
(JSON via ``sqlalchemy.JSON``, timestamps stored and returned as aware UTC datetimes).

Writes are idempotent so a retried pipeline step never duplicates rows: every ``upsert_*`` /
``record_*`` is INSERT ... ON CONFLICT DO UPDATE on a unique key (SQLite and PostgreSQL share
it), and a call that writes many rows writes them all in ONE transaction (all or none).

NPO's tables (migration 0002):
- ``guidance_caches`` (id like ``"<run>.g000050"``) and ``guidance_entries`` (one per cached
  prompt, unique per (cache_id, prompt_id)): which guide produced which cache, its Q̂ and cost;
- ``mistake_pool``: prompts the policy failed, unique per (run_id, step, prompt_id);
- ``interventions``: early/late/rolling/auto interventions, unique per (run_id, kind, at_step),
  with the trigger signals and the S(Δ) table as JSON.

Run state (migration 0003), so that a run's tasks need no shared disk:
- ``metric_rows``: the run's history, one row per logged global step, unique per
  (run_id, step); ``runs.mlflow_run_id`` and ``runs.started_at``.

The schema is owned by Alembic migrations (``npo/store/migrations``); ``MetadataDB.migrate()``
runs ``alembic upgrade head`` programmatically, so it works from an installed package. Many
processes may migrate the same fresh DB at once (parallel pipeline steps): on PostgreSQL the
upgrade holds a transaction-scoped advisory lock (``MIGRATION_LOCK_ID``), on SQLite it runs in
one ``BEGIN IMMEDIATE`` transaction; either way the others wait, then find it current.

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
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a SQLite writer waits for another process's lock
MAX_BACKOFF_S = 4.0
# pg_advisory_xact_lock key that serialises migrations of one PostgreSQL database
# (the bytes of "npo-migr" as a signed 64-bit integer).
MIGRATION_LOCK_ID = int.from_bytes(b"npo-migr", "big", signed=True)
# The newest migration (tests check it is Alembic's head): a DB already there needs no
# Alembic at all, which every pipeline task opening the run would otherwise pay for.
HEAD_REVISION = "0004"
# Rows per INSERT statement in multi-row writes: far below both backends' bind-parameter
# limits (SQLite 32766, PostgreSQL 65535); all chunks of one call share one transaction.
UPSERT_CHUNK_ROWS = 500

log = logging.getLogger(__name__)
T = TypeVar("T")


class MetadataDBUnavailable(ConnectionError):
    """The metadata DB failed transiently on every try; the message masks the password."""


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # migration 0004: stopped by Ctrl-C or SIGTERM; resumable


class InterventionKind(enum.StrEnum):
    EARLY = "early"  # scout checkpoint guides the first window
    LATE = "late"  # later checkpoint replays a plateaued segment
    ROLLING = "rolling"  # scheduled NPO segments
    AUTO = "auto"  # AutoNPO's trigger and Δ* choice


def _in_list(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v.value}'" for v in values) + ")"


def _unit_interval(column: str) -> str:
    return f"{column} >= 0 AND {column} <= 1"


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
    __table_args__ = (sa.CheckConstraint(_in_list("status", RunStatus), name="status"),)

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    method: Mapped[str] = mapped_column(sa.String(64))
    seed: Mapped[int]
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default=RunStatus.CREATED.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # migration 0003: the MLflow run every task of the run logs to, and when the experiment
    # started (the report's wall time)
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    started_at: Mapped[datetime | None]


class MetricsRow(Base):
    """One logged global step of a run's history: `metrics` maps metric keys to values.

    step: the global step (every optimizer update, replays included); policy_step: where the
    policy was (it goes back after a rollback). Unique per (run_id, step): a replayed step
    after a crash overwrites its row.
    """

    __tablename__ = "metric_rows"
    __table_args__ = (sa.UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("runs.id", ondelete="CASCADE")
    )
    step: Mapped[int]
    policy_step: Mapped[int]
    metrics: Mapped[dict[str, Any]]


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


class GuidanceCacheRow(Base):
    """One guidance cache: a guide checkpoint's verified trajectories for a segment's prompts.

    policy_step: the step whose segment it guides; q_hat: share of the prompts the current
    policy fails that the guide solves; sampled_tokens: the guide's sampling cost;
    payload_uri: the parquet payload in the artifact store (``npo.guidance.cache``).
    """

    __tablename__ = "guidance_caches"
    __table_args__ = (
        sa.CheckConstraint(_unit_interval("q_hat"), name="q_hat"),
        sa.CheckConstraint(_unit_interval("guide_accuracy"), name="guide_accuracy"),
        sa.CheckConstraint(_unit_interval("current_accuracy"), name="current_accuracy"),
    )

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    guide_run_id: Mapped[str] = mapped_column(sa.String(128))  # this run, or e.g. a scout run
    guide_step: Mapped[int]
    policy_step: Mapped[int]
    prompts_total: Mapped[int]
    prompts_attempted: Mapped[int]
    prompts_solved: Mapped[int]
    tries_per_prompt: Mapped[int]
    q_hat: Mapped[float]
    guide_accuracy: Mapped[float | None]
    current_accuracy: Mapped[float | None]
    sampled_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    payload_uri: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GuidanceEntryRow(Base):
    """One cached guide trajectory (its bytes are in the cache's payload); unique per prompt."""

    __tablename__ = "guidance_entries"
    __table_args__ = (sa.UniqueConstraint("cache_id", "prompt_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    cache_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("guidance_caches.id", ondelete="CASCADE")
    )
    prompt_id: Mapped[str] = mapped_column(sa.String(256))
    reward: Mapped[float]
    response_tokens: Mapped[int]
    guide_logprob_sum: Mapped[float]


class MistakeRow(Base):
    """A prompt the policy failed at a policy step (AutoNPO's mistake pool M).

    Unique per (run_id, step, prompt_id); the key's column order serves "the slice of M
    recorded at step t - Δ" and step-range reads.
    """

    __tablename__ = "mistake_pool"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "step", "prompt_id"),
        sa.CheckConstraint(_unit_interval("pass_rate"), name="pass_rate"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("runs.id", ondelete="CASCADE")
    )
    prompt_id: Mapped[str] = mapped_column(sa.String(256))
    step: Mapped[int]
    pass_rate: Mapped[float]


class InterventionRow(Base):
    """An NPO intervention triggered at policy step at_step: roll back to rollback_to
    (= at_step - delta for AutoNPO) and replay with guidance from guide_step.

    signals: the trigger signals (reward EMA, entropy, ...); s_table: the S(Δ) = Q̂/V̂ table,
    one dict per candidate Δ. Unique per (run_id, kind, at_step).
    """

    __tablename__ = "interventions"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "kind", "at_step"),
        sa.CheckConstraint(_in_list("kind", InterventionKind), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("runs.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(sa.String(16))
    at_step: Mapped[int]
    delta: Mapped[int]
    rollback_to: Mapped[int]
    guide_step: Mapped[int]
    signals: Mapped[dict[str, Any]]
    s_table: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


_CACHE_REQUIRED = (
    "id",
    "run_id",
    "guide_run_id",
    "guide_step",
    "policy_step",
    "prompts_total",
    "prompts_attempted",
    "prompts_solved",
    "tries_per_prompt",
    "q_hat",
    "sampled_tokens",
    "payload_uri",
)
_CACHE_OPTIONAL = ("guide_accuracy", "current_accuracy")
_ENTRY_FIELDS = ("prompt_id", "reward", "response_tokens", "guide_logprob_sum")


def _fields(
    what: str, given: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """`given` restricted to the known fields; a missing or unknown key is a ValueError."""
    missing = [k for k in required if k not in given]
    unknown = sorted(set(given) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return {k: given.get(k) for k in (*required, *optional)}


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


def _finite(obj: Any) -> Any:
    """`obj` with every NaN/±inf float replaced by None (recursively through dicts/lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_dumps(obj: Any) -> str:
    """JSON for both backends: PostgreSQL's json type rejects NaN/Infinity, so a non-finite
    float (a metric's NaN, an S(Δ) of inf) is stored as null on every backend alike."""
    return json.dumps(_finite(obj), allow_nan=False)


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
        kwargs: dict[str, Any] = {"json_serializer": _json_dumps}
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
        """``alembic upgrade head`` on this DB; a no-op when already current.

        Safe when several processes migrate the same (even empty) DB at once: the upgrade
        runs in one transaction that first takes the migration lock (PostgreSQL: advisory
        lock MIGRATION_LOCK_ID; SQLite: BEGIN IMMEDIATE), so the others wait for it and then
        find the schema current.
        """
        if self.revision() == HEAD_REVISION:
            return
        self._retry("migrate", lambda: self.alembic("upgrade", "head"))

    def alembic(self, command_name: str, revision: str) -> None:
        """`alembic <command_name> <revision>` (upgrade, downgrade) on this DB, in one
        transaction under the migration lock.

        On SQLite with foreign keys off for its duration: batch mode rebuilds a table by
        dropping it, which with them on cascade-deletes every row referencing it, and SQLite
        ignores the pragma inside a transaction. The keys are checked before the commit."""
        from alembic import command

        cfg = alembic_config()
        with self.engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()  # ends SQLAlchemy's autobegun (empty) transaction
            try:
                with conn.begin():
                    self._lock_for_migration(conn)
                    cfg.attributes["connection"] = conn  # env.py migrates on it
                    getattr(command, command_name)(cfg, revision)
                    if sqlite:
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if broken:
                            raise RuntimeError(f"migration broke foreign keys: {broken}")
            finally:
                if sqlite:  # the pooled connection goes back as every other one is
                    conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                    conn.commit()

    def revision(self) -> str | None:
        """The DB's Alembic revision (None: never migrated)."""

        def read() -> str | None:
            try:
                with self.engine.connect() as conn:
                    q = sa.text("SELECT version_num FROM alembic_version")
                    return conn.execute(q).scalar_one_or_none()
            except sa.exc.ProgrammingError:  # PostgreSQL: no such table yet
                return None
            except sa.exc.OperationalError as e:  # SQLite: no such table yet
                if "no such table" in str(e):
                    return None
                raise

        return self._retry("revision", read)

    @staticmethod
    def _lock_for_migration(conn: sa.Connection) -> None:
        """Serialise migrations of this DB until `conn`'s transaction ends."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        elif conn.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction: take the write lock (waiting up to
            # the busy timeout) so the whole upgrade is one transaction, as on PostgreSQL.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

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

    def delete_run(self, run_id: str) -> None:
        """Delete run `run_id`, its look-ahead branches and lineages (``<run_id>.<...>``) and,
        through ON DELETE CASCADE, every row that belongs to them (a --fresh restart: AutoNPO
        reads its past decisions back from these rows, so stale ones would be replayed)."""
        family = sa.or_(RunRow.id == run_id, RunRow.id.startswith(f"{run_id}.", autoescape=True))
        self._retry(
            f"delete_run({run_id!r})", lambda: self._execute(sa.delete(RunRow).where(family))
        )

    def set_run_info(
        self,
        run_id: str,
        *,
        mlflow_run_id: str | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """Record the run's MLflow run id and/or start time (None leaves a field as is)."""
        values: dict[str, Any] = {}
        if mlflow_run_id is not None:
            values["mlflow_run_id"] = mlflow_run_id
        if started_at is not None:
            values["started_at"] = started_at
        if not values:
            return
        stmt = sa.update(RunRow).where(RunRow.id == run_id).values(**values)
        self._retry(f"set_run_info({run_id!r})", lambda: self._execute(stmt))

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

    def family_checkpoints(self, run_id: str) -> list[CheckpointRow]:
        """Checkpoint rows of a run and of its branches and lineages (``<run_id>.<...>``),
        oldest commit first."""
        family = sa.or_(
            CheckpointRow.run_id == run_id,
            CheckpointRow.run_id.startswith(f"{run_id}.", autoescape=True),
        )
        q = sa.select(CheckpointRow).where(family).order_by(CheckpointRow.id)
        return self._read(f"family_checkpoints({run_id!r})", q)

    # --- the run's metric history ---

    def record_metrics(
        self, run_id: str, step: int, policy_step: int, metrics: Mapping[str, float]
    ) -> None:
        """Store the metrics of global step `step` (upsert: a replayed step replaces its row).
        Non-finite values are stored as null, as everywhere in this DB."""
        row = {"run_id": run_id, "step": step, "policy_step": policy_step, "metrics": metrics}
        self._write(
            f"record_metrics({run_id!r}, {step})",
            lambda s: self._upsert(
                s, MetricsRow, [row], ["run_id", "step"], ["policy_step", "metrics"]
            ),
            (RunRow, run_id),
        )

    def history(self, run_id: str, until_step: int | None = None) -> list[dict[str, Any]]:
        """The run's history rows ({"step", "policy_step", **metrics}) by ascending step, up
        to `until_step` (inclusive; None: all). A metric stored as null is left out."""
        M = MetricsRow
        q = sa.select(M.step, M.policy_step, M.metrics).where(M.run_id == run_id)
        if until_step is not None:
            q = q.where(M.step <= until_step)

        def read() -> list[dict[str, Any]]:
            with self._session() as s:
                rows = s.execute(q.order_by(M.step)).all()
            return [
                {
                    "step": step,
                    "policy_step": policy_step,
                    **{k: v for k, v in metrics.items() if v is not None},
                }
                for step, policy_step, metrics in rows
            ]

        return self._retry(f"history({run_id!r})", read)

    def truncate_history(self, run_id: str, after_step: int) -> None:
        """Delete the run's history rows past global step `after_step` (work a crash lost)."""
        M = MetricsRow
        stmt = sa.delete(M).where(M.run_id == run_id, M.step > after_step)
        self._retry(f"truncate_history({run_id!r})", lambda: self._execute(stmt))

    # --- NPO: guidance caches, mistake pool, interventions ---

    def _upsert(
        self,
        s: Session,
        model: type[Base],
        rows: Sequence[dict[str, Any]],
        keys: Sequence[str],
        update: Sequence[str],
    ) -> None:
        """Multi-row INSERT ... ON CONFLICT (keys) DO UPDATE SET update, in session `s`.

        Rows with the same key collapse to the last one (one statement may not update a row
        twice on PostgreSQL); rows go out sorted by key, so concurrent writers of overlapping
        rows lock them in the same order and cannot deadlock; UPSERT_CHUNK_ROWS per statement.
        """
        unique = {tuple(r[k] for k in keys): r for r in rows}
        ordered = [unique[k] for k in sorted(unique)]
        index = [getattr(model, k) for k in keys]
        for i in range(0, len(ordered), UPSERT_CHUNK_ROWS):
            stmt = self._insert(model).values(ordered[i : i + UPSERT_CHUNK_ROWS])
            stmt = stmt.on_conflict_do_update(
                index_elements=index, set_={c: stmt.excluded[c] for c in update}
            )
            s.execute(stmt)

    def _write(
        self, what: str, fn: Callable[[Session], None], parent: tuple[type[Base], str]
    ) -> None:
        """fn(session) as one retried transaction; an integrity error because the parent row
        (model, key) does not exist is a KeyError, any other one propagates."""

        def attempt() -> None:
            try:
                with self._session.begin() as s:
                    fn(s)
            except sa.exc.IntegrityError as e:
                model, key = parent
                with self._session() as s:
                    exists = s.get(model, key) is not None
                if not exists:
                    raise KeyError(
                        f"no {model.__tablename__} row {key!r} in the metadata DB (record it first)"
                    ) from e
                raise

        self._retry(what, attempt)

    def _read(self, what: str, q: sa.Select[Any]) -> list[Any]:
        def read() -> list[Any]:
            with self._session() as s:
                return list(s.scalars(q))

        return self._retry(what, read)

    def record_guidance_cache(
        self,
        cache: Mapping[str, Any],
        entries: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        """Index a guidance cache (upsert by ``cache["id"]``; created_at is kept).

        Cache ids are unique across runs (e.g. ``"<run>.g000050"``): re-recording an id that
        another run recorded is a ValueError, never a silent takeover of its row.

        `cache` has exactly the GuidanceCacheRow fields except created_at (guide_accuracy and
        current_accuracy may be left out: NULL). With `entries`, they are recorded as by
        ``record_guidance_entries(cache["id"], entries)`` in the SAME transaction, so the
        DB never shows the cache without its entries.
        """
        row = _fields("guidance cache", cache, _CACHE_REQUIRED, _CACHE_OPTIONAL)
        entry_rows = None if entries is None else self._entry_rows(row["id"], entries)
        C = GuidanceCacheRow
        stmt = self._insert(C).values(**row, created_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=[C.id],
            set_={k: stmt.excluded[k] for k in row if k not in ("id", "run_id")},
            where=C.run_id == stmt.excluded.run_id,  # never take over another run's cache
        ).returning(C.id)  # no row back: the WHERE refused (rowcount is -1 on psycopg)

        def write(s: Session) -> None:
            if s.execute(stmt).first() is None:
                owner = s.scalar(sa.select(C.run_id).where(C.id == row["id"]))
                raise ValueError(
                    f"guidance cache id {row['id']!r} belongs to run {owner!r}, not "
                    f"{row['run_id']!r}: cache ids are global, prefix them with the run id"
                )
            if entry_rows is not None:
                self._replace_entries(s, row["id"], entry_rows, replace=True)

        self._write(f"record_guidance_cache({row['id']!r})", write, (RunRow, row["run_id"]))

    @staticmethod
    def _entry_rows(cache_id: str, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"cache_id": cache_id, **_fields(f"guidance entry of {cache_id!r}", e, _ENTRY_FIELDS)}
            for e in entries
        ]

    def _replace_entries(
        self, s: Session, cache_id: str, rows: list[dict[str, Any]], *, replace: bool
    ) -> None:
        self._upsert(
            s,
            GuidanceEntryRow,
            rows,
            ["cache_id", "prompt_id"],
            ["reward", "response_tokens", "guide_logprob_sum"],
        )
        if not replace:
            return
        E = GuidanceEntryRow
        if not rows:
            s.execute(sa.delete(E).where(E.cache_id == cache_id))
            return
        keep = {r["prompt_id"] for r in rows}
        have = s.execute(sa.select(E.id, E.prompt_id).where(E.cache_id == cache_id))
        stale = sorted(i for i, prompt_id in have if prompt_id not in keep)
        for i in range(0, len(stale), UPSERT_CHUNK_ROWS):
            s.execute(sa.delete(E).where(E.id.in_(stale[i : i + UPSERT_CHUNK_ROWS])))

    def record_guidance_entries(
        self, cache_id: str, entries: Iterable[Mapping[str, Any]], *, replace: bool = True
    ) -> None:
        """Record a cache's entries (dicts of prompt_id, reward, response_tokens,
        guide_logprob_sum), all in one transaction: all are written or none.

        Upsert by (cache_id, prompt_id): re-recording updates rows, never duplicates them.
        replace=True (default): `entries` is the cache's whole content, so entries of
        prompts not in it are deleted (a regenerated cache solved other prompts);
        replace=False merges (e.g. a cache written in parts).
        """
        rows = self._entry_rows(cache_id, entries)
        self._write(
            f"record_guidance_entries({cache_id!r})",
            lambda s: self._replace_entries(s, cache_id, rows, replace=replace),
            (GuidanceCacheRow, cache_id),
        )

    def guidance_cache(self, cache_id: str) -> GuidanceCacheRow | None:
        def get() -> GuidanceCacheRow | None:
            with self._session() as s:
                return s.get(GuidanceCacheRow, cache_id)

        return self._retry(f"guidance_cache({cache_id!r})", get)

    def guidance_caches(self, run_id: str) -> list[GuidanceCacheRow]:
        """A run's guidance caches, by policy_step, then guide_step."""
        C = GuidanceCacheRow
        q = sa.select(C).where(C.run_id == run_id).order_by(C.policy_step, C.guide_step, C.id)
        return self._read(f"guidance_caches({run_id!r})", q)

    def guidance_entries(self, cache_id: str) -> list[GuidanceEntryRow]:
        """A cache's entries, by prompt_id."""
        E = GuidanceEntryRow
        q = sa.select(E).where(E.cache_id == cache_id).order_by(E.prompt_id)
        return self._read(f"guidance_entries({cache_id!r})", q)

    def record_mistakes(self, run_id: str, step: int, items: Iterable[tuple[str, float]]) -> None:
        """Add (prompt_id, pass_rate) pairs the policy failed at `step` to the mistake pool.

        One transaction for all items; upsert by (run_id, step, prompt_id), so a re-record
        updates pass_rate and concurrent writers of overlapping items leave each once.
        """
        rows = [
            {"run_id": run_id, "step": step, "prompt_id": prompt_id, "pass_rate": pass_rate}
            for prompt_id, pass_rate in items
        ]
        self._write(
            f"record_mistakes({run_id!r}, {step})",
            lambda s: self._upsert(
                s, MistakeRow, rows, ["run_id", "step", "prompt_id"], ["pass_rate"]
            ),
            (RunRow, run_id),
        )

    def _mistakes_query(
        self, q: sa.Select[Any], run_id: str, since_step: int | None, until_step: int | None
    ) -> sa.Select[Any]:
        q = q.where(MistakeRow.run_id == run_id)
        if since_step is not None:
            q = q.where(MistakeRow.step >= since_step)
        if until_step is not None:
            q = q.where(MistakeRow.step <= until_step)
        return q.order_by(MistakeRow.step, MistakeRow.prompt_id)

    def mistakes(
        self, run_id: str, since_step: int | None = None, until_step: int | None = None
    ) -> list[MistakeRow]:
        """Mistake-pool rows of a run with since_step <= step <= until_step (both inclusive,
        None = unbounded), by step, then prompt_id."""
        q = self._mistakes_query(sa.select(MistakeRow), run_id, since_step, until_step)
        return self._read(f"mistakes({run_id!r})", q)

    def mistakes_by_step(
        self, run_id: str, since_step: int | None = None, until_step: int | None = None
    ) -> dict[int, list[str]]:
        """{step: sorted prompt ids failed at that step}, steps ascending (bounds as in
        `mistakes`)."""
        q = self._mistakes_query(
            sa.select(MistakeRow.step, MistakeRow.prompt_id), run_id, since_step, until_step
        )

        def read() -> dict[int, list[str]]:
            out: dict[int, list[str]] = {}
            with self._session() as s:
                for step, prompt_id in s.execute(q):
                    out.setdefault(step, []).append(prompt_id)
            return out

        return self._retry(f"mistakes_by_step({run_id!r})", read)

    def record_intervention(
        self,
        run_id: str,
        kind: InterventionKind | str,
        at_step: int,
        delta: int,
        rollback_to: int,
        guide_step: int,
        signals: dict[str, Any],
        s_table: list[dict[str, Any]],
    ) -> None:
        """Record an intervention; re-recording (run_id, kind, at_step) updates delta,
        rollback_to, guide_step, signals and s_table (created_at is kept). Non-finite floats
        in signals/s_table are stored as null."""
        try:
            kind = InterventionKind(kind)
        except ValueError:
            allowed = ", ".join(k.value for k in InterventionKind)
            raise ValueError(f"intervention kind {kind!r} is not one of: {allowed}") from None
        row = {
            "run_id": run_id,
            "kind": kind.value,
            "at_step": at_step,
            "delta": delta,
            "rollback_to": rollback_to,
            "guide_step": guide_step,
            "signals": signals,
            "s_table": s_table,
            "created_at": utcnow(),
        }
        self._write(
            f"record_intervention({run_id!r}, {kind.value!r}, {at_step})",
            lambda s: self._upsert(
                s,
                InterventionRow,
                [row],
                ["run_id", "kind", "at_step"],
                ["delta", "rollback_to", "guide_step", "signals", "s_table"],
            ),
            (RunRow, run_id),
        )

    def interventions(self, run_id: str) -> list[InterventionRow]:
        """A run's interventions, by at_step (then kind)."""
        I = InterventionRow  # noqa: E741
        q = sa.select(I).where(I.run_id == run_id).order_by(I.at_step, I.kind)
        return self._read(f"interventions({run_id!r})", q)

    def close(self) -> None:
        self.engine.dispose()
