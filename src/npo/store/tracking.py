"""Experiment tracking: metrics, params and artifacts to MLflow, cheap per step.

One MLflow run per experiment run. `make_tracker` picks the backend from `TrackingConfig`:

    tracker = make_tracker(cfg.tracking, cfg.store.root, run_name=cfg.name)
    tracker.log_params(cfg.model_dump(mode="json"))        # nested -> "algo.lr", ...
    tracker.log_metrics({"reward/mean": 0.4}, step=global_step)
    tracker.finish()                                        # or finish("FAILED")

Choices worth knowing:
- The tracking URI is, in order: `MLFLOW_TRACKING_URI` (KFP injects it), the config's
  `tracking_uri`, else a local SQLite store `sqlite:///<root>/mlflow.db` with artifacts
  under `<root>/mlartifacts` (MLflow 3 deprecates the plain `./mlruns` file store).
- The run is, in order: `resume_run_id`, `MLFLOW_RUN_ID` (KFP 2.17 injects it), else a new
  run. A reused run is set back to RUNNING.
- Metrics are buffered and sent with `log_batch` every `flush_every` steps, so a step
  costs a dict append, not a database write. Non-finite values (NaN, ±inf) are skipped
  with one warning per key: MLflow stores inf as 1.8e308, which wrecks chart scales; the
  raw value stays in the run's metrics.jsonl.
- On a reused run, points at a step <= the last step already stored for that key are
  dropped, so replaying steps after a restart does not duplicate points.
- Params already on a reused run are not sent again (MLflow params are immutable); a
  changed value is reported in a warning.
- An http(s) tracking URI is probed first (`GET <uri>/health`, 5 s timeouts): a server that
  is down, refuses, does not resolve or does not answer gives ONE `TrackingUnavailable`
  naming the URI (userinfo redacted) within seconds, rather than minutes of MLflow's HTTP
  retries. Any HTTP answer but 502/503/504 counts as reachable (a proxy in front of the
  server may not route /health). The probe honours MLflow's TLS variables
  (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH,
  MLFLOW_TRACKING_CLIENT_CERT_PATH) and, like MLflow, requests' proxy and CA variables.
- `mlflow` is imported inside `MlflowTracker` only: it costs ~1 s, which a disabled run
  should not pay.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from npo.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); copied so the module imports without mlflow.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_KEY_LENGTH = 250
_STATUSES = ("FINISHED", "FAILED", "KILLED")
PROBE_TIMEOUT = 5.0  # seconds, for each of connect and read of the /health probe
_TRUE = {"1", "true", "yes", "on"}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; the message names the URI (redacted)."""


def redact_uri(uri: str) -> str:
    """`uri` with any userinfo (user, password or token) replaced by ***.

    >>> redact_uri("https://alice:s3cret@mlflow.example:5000/x")
    'https://***@mlflow.example:5000/x'
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def check_tracking_server(
    uri: str, timeout: float = PROBE_TIMEOUT, source: str | None = None
) -> None:
    """Raise `TrackingUnavailable` unless the http(s) tracking server at `uri` answers.

    Other schemes (sqlite, file, databricks, ...) are not probed. `source` (e.g. the variable
    the URI came from) is named in the message.
    """
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        return
    import requests

    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower() in _TRUE:
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    reason: str | None = None
    try:
        resp = requests.get(
            uri.rstrip("/") + "/health", timeout=(timeout, timeout), verify=verify, cert=cert
        )
    except requests.exceptions.SSLError:
        reason = (
            "TLS error; set MLFLOW_TRACKING_SERVER_CERT_PATH to the server's CA file, or "
            "MLFLOW_TRACKING_INSECURE_TLS=true for a test server"
        )
    except requests.exceptions.ConnectTimeout:
        reason = f"connect timed out after {timeout:g} s"
    except requests.exceptions.ReadTimeout:
        reason = f"no answer within {timeout:g} s"
    except requests.exceptions.ConnectionError as e:
        reason = _connection_reason(e)
    except requests.exceptions.RequestException as e:
        reason = f"invalid request ({type(e).__name__})"
    else:
        resp.close()
        if resp.status_code in (502, 503, 504):
            reason = f"HTTP {resp.status_code} on /health: a proxy with no server behind it?"
    if reason is None:
        return
    origin = f" (from {source})" if source else ""
    # Raised here, outside the handlers: no chained exception repeats the URI unredacted.
    raise TrackingUnavailable(
        f"MLflow tracking server {redact_uri(uri)}{origin} is unreachable: {reason}. "
        "Start it or fix the URI (MLFLOW_TRACKING_URI wins over tracking.tracking_uri), "
        "or run with tracking.enabled=false"
    )


def _connection_reason(exc: BaseException) -> str:
    """A short cause for a failed connection, from the exception chain requests builds."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 20:
        cur = todo.pop()
        if cur is None or any(cur is s for s in seen):
            continue
        seen.append(cur)
        todo += [getattr(cur, "reason", None), cur.__cause__, cur.__context__]
        todo += [a for a in cur.args if isinstance(a, BaseException)]
    if any(isinstance(e, ConnectionRefusedError) for e in seen):
        return "connection refused"
    if any(isinstance(e, socket.gaierror) or "NameResolution" in type(e).__name__ for e in seen):
        return "host name does not resolve"
    if any(isinstance(e, ConnectionResetError | ConnectionAbortedError) for e in seen):
        return "connection reset"
    if any(isinstance(e, TimeoutError) for e in seen):
        return "connect timed out"
    for e in seen:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
    return "connection failed"


class Tracker(Protocol):
    """What the trainer logs to; `NullTracker` and `MlflowTracker` implement it."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking disabled: every call is a no-op."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys with string values, truncated to MLflow's limit.

    >>> flatten_params({"algo": {"lr": 0.001, "clip": [0.2, 0.28]}, "seed": 0})
    {'algo.lr': '0.001', 'algo.clip': '[0.2, 0.28]', 'seed': '0'}
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name[:_MAX_KEY_LENGTH]] = str(value)[:_MAX_PARAM_VAL_LENGTH]
    return out


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's set-up chatter: table creation INFO lines, alembic's per-migration
    lines and SQLAlchemy deprecation warnings raised inside MLflow's store."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class MlflowTracker:
    """Logs to one MLflow run through `MlflowClient` (no global fluent state)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        resume_run_id: str | None = None,
        flush_every: int = 50,
        artifact_location: str | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        """`artifact_location` applies only when the experiment is created here; for a
        `sqlite:///` URI it defaults to `mlartifacts/` beside the database file, so
        artifacts land under the run root rather than the working directory.

        Raises `TrackingUnavailable` when an http(s) server does not answer within
        `probe_timeout` seconds (see `check_tracking_server`)."""
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        # Import before quieting: importing mlflow (re)configures its loggers.
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        from_env = os.environ.get("MLFLOW_TRACKING_URI")
        self.tracking_uri = from_env or tracking_uri
        check_tracking_server(
            self.tracking_uri,
            probe_timeout,
            source="MLFLOW_TRACKING_URI" if from_env else "tracking.tracking_uri",
        )
        self.flush_every = flush_every
        self._buffer: list[Any] = []  # mlflow.entities.Metric
        self._buffered_steps = 0
        self._floor: dict[str, int] = {}  # key -> last step stored before this session
        self._params: dict[str, str] = {}
        self._warned_nonfinite: set[str] = set()
        self._finished = False
        self.run_id: str | None = None
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)

        with _quiet_mlflow():
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            run_id = resume_run_id or os.environ.get("MLFLOW_RUN_ID") or None
            if run_id:
                run = self._client.get_run(run_id)  # raises if the id is unknown
                self.run_id = run.info.run_id
                self._params = dict(run.data.params)
                if run.info.status != "RUNNING":
                    self._client.update_run(run_id, status="RUNNING")
                self._floor = _latest_steps(run, self.last_logged_step)
            else:
                exp_id = self._experiment_id(experiment, artifact_location)
                self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        log.info("MLflow run %s at %s", self.run_id, self.tracking_uri)

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        if artifact_location is None and self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another process created it first
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        new: list[Any] = []
        for key, value in flatten_params(params).items():
            old = self._params.get(key)
            if old is None:
                new.append(self._Param(key, value))
                self._params[key] = value
            elif old != value:
                log.warning("param %s already logged as %r; keeping it (new %r)", key, old, value)
        for chunk in _chunks(new, _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for key, raw in metrics.items():
            value = float(raw)
            if not math.isfinite(value):
                if key not in self._warned_nonfinite:
                    self._warned_nonfinite.add(key)
                    log.warning("metric %s is %s at step %d; not logged", key, value, step)
                continue
            floor = self._floor.get(key)
            if floor is not None and step <= floor:
                continue  # already stored before a restart
            self._buffer.append(self._Metric(key, value, ts, step))
        self._buffered_steps += 1
        if self._buffered_steps >= self.flush_every or len(self._buffer) >= _MAX_METRICS_PER_BATCH:
            self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, to the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [
            self._RunTag(k[:_MAX_KEY_LENGTH], str(v)[:_MAX_TAG_VAL_LENGTH]) for k, v in tags.items()
        ]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def flush(self) -> None:
        """Send buffered metric points (in batches of <= 1000)."""
        buffer, self._buffer, self._buffered_steps = self._buffer, [], 0
        for chunk in _chunks(buffer, _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and end the run; a second call does nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self._finished:
            return
        self.flush()
        self._client.set_terminated(self.run_id, status=status)
        self._finished = True

    def last_logged_step(self, key: str) -> int | None:
        """The highest step stored for `key` (pending points are flushed first)."""
        if self._buffer:
            self.flush()
        history = self._client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)


def _latest_steps(run: Any, history_step: Callable[[str], int | None]) -> dict[str, int]:
    """The last step stored for each metric of `run`. The run's own record carries each
    metric's latest point with its step (one query, where asking every key's history costs
    a query per metric on every resume, i.e. every pipeline task); `history_step` is the
    fallback should that record lack steps."""
    latest = getattr(run.data, "_metric_objs", None)
    if latest is not None:
        return {m.key: int(m.step) for m in latest}
    steps = {key: history_step(key) for key in run.data.metrics}
    return {key: step for key, step in steps.items() if step is not None}


class LazyTracker:
    """A resumed run's tracker that connects on first use: a pipeline task that logs
    nothing (a plateau check, a verification) then never pays for opening the MLflow store
    (~0.1 s per task). `run_id` is known without connecting."""

    def __init__(self, run_id: str, connect: Callable[[], Tracker]) -> None:
        self.run_id = run_id
        self._connect = connect
        self._tracker: Tracker | None = None

    def _get(self) -> Tracker:
        if self._tracker is None:
            self._tracker = self._connect()
        return self._tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._get().log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._get().log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._get().log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._get().set_tags(tags)

    def flush(self) -> None:
        if self._tracker is not None:
            self._tracker.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self._get().finish(status)


def default_tracking_uri(root: Path) -> str:
    """The local store used when no URI is configured: SQLite under the runs root."""
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db').as_posix()}"


@contextlib.contextmanager
def _client_of(cfg: TrackingConfig, root: Path) -> Iterator[Any]:
    """An MlflowClient for the run's tracking URI (MLFLOW_TRACKING_URI first, as trackers)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or default_tracking_uri(root)
    check_tracking_server(uri, PROBE_TIMEOUT)
    from mlflow import MlflowClient

    with _quiet_mlflow():
        yield MlflowClient(tracking_uri=uri)


def delete_tracked_run(cfg: TrackingConfig, root: Path, run_id: str) -> None:
    """Delete MLflow run `run_id` (the old run of a --fresh restart), so that one run name
    never shows two runs. MLflow moves it to its trash (`mlflow gc` purges it); a run
    already gone is fine."""
    if not cfg.enabled:
        return
    from mlflow.exceptions import MlflowException

    with _client_of(cfg, root) as client:
        try:
            if client.get_run(run_id).info.lifecycle_stage != "deleted":
                client.delete_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


def end_tracked_run(cfg: TrackingConfig, root: Path, run_id: str, status: str) -> None:
    """End MLflow run `run_id` with `status` (KILLED: interrupted; FAILED) from outside the
    process that logged to it: what stopped that process may have left it RUNNING."""
    if status not in _STATUSES:
        raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
    if cfg.enabled:
        with _client_of(cfg, root) as client:
            client.set_terminated(run_id, status=status)


def make_tracker(
    cfg: TrackingConfig,
    root: Path,
    run_name: str,
    resume_run_id: str | None = None,
    lazy: bool = False,
) -> Tracker:
    """The tracker for a run: `NullTracker` when disabled, else an `MlflowTracker`;
    lazy (with a run to resume): a `LazyTracker` that connects on first use."""
    if not cfg.enabled:
        return NullTracker()
    uri = cfg.tracking_uri or default_tracking_uri(root)
    if lazy and resume_run_id:
        return LazyTracker(
            resume_run_id,
            lambda: MlflowTracker(uri, cfg.experiment, run_name, resume_run_id=resume_run_id),
        )
    return MlflowTracker(uri, cfg.experiment, run_name, resume_run_id=resume_run_id)
