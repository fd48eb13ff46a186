"""The local cluster-like stack: S3 (SeaweedFS), PostgreSQL and an MLflow server, together.

``DevStack`` starts the three servers of this package on 127.0.0.1 under one state
directory, wired as in a cluster: the MLflow server keeps its runs in PostgreSQL and its
artifacts in the S3 bucket, and ``env()`` gives the variables that point ``npo run`` at
all three. ``python -m npo.devservices`` (``make services``) is its command line.

State directory layout (default ``.services/``)::

    lock            held while a stack runs from this directory (one at a time)
    state.json      ports and generated credentials, so a restart reuses data and keys (0600)
    env.sh          the export lines to source (0600)
    s3/             SeaweedFS data, weed.log, s3.json (its identity, 0600)
    postgres/       PostgreSQL data dir and server.log (under the temp dir instead when
                    PostgreSQL's system user cannot reach the state dir; see pgserver.py)
    mlflow/         mlflow.log

Credentials live only in the three 0600 files above and in the servers' environment or
config; the logs never see them (the MLflow server gets the database password as
PGPASSWORD, not in its command line).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import shlex
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from npo.devservices._proc import HOST, pick_port, port_is_free

BUCKET = "npo"
DATABASE = "npo"
MLFLOW_DATABASE = "mlflow"
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow"
DEFAULT_STATE_DIR = Path(".services")
# Preferred ports (the usual ones of each server); a busy one is replaced by a free port.
DEFAULT_PORTS = {"s3": 8333, "postgres": 5432, "mlflow": 5000}
SERVICES = ("s3", "postgres", "mlflow")
ENV_NAMES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "NPO_METADATA_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
_STATE_VERSION = 1


class StackError(RuntimeError):
    """The stack cannot start (or a service of it failed); the message says why."""


@dataclass
class Status:
    """One line of ``DevStack.check``."""

    service: str
    ok: bool
    endpoint: str
    detail: str

    def line(self) -> str:
        return (
            f"{'ok' if self.ok else 'FAIL':<4}  {self.service:<8}  {self.endpoint}  {self.detail}"
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 0600, never wider)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)


def _quiet(*_: object) -> None:
    pass


class DevStack:
    """S3 + PostgreSQL + MLflow on 127.0.0.1, under ``state_dir``.

        stack = DevStack(Path(".services"))
        stack.start()           # ~10-20 s; a second start of the same dir reuses its data
        stack.env()             # {"AWS_ENDPOINT_URL": ..., "NPO_METADATA_URL": ..., ...}
        stack.check()           # [Status(...)] per service, from the outside
        stack.stop()            # MLflow, then PostgreSQL, then S3

    ``ports`` per service (keys of DEFAULT_PORTS): a number > 0 must be free; 0 takes any free
    port; missing or None prefers the port of the last start, then the default, and takes a
    free one when that is busy. ``fresh`` deletes the state (data and credentials) first.
    """

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        *,
        ports: Mapping[str, int | None] | None = None,
        fresh: bool = False,
        say: Callable[[str], None] = _quiet,
    ) -> None:
        unknown = set(ports or {}) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services in ports: {sorted(unknown)}")
        self.state_dir = Path(state_dir).absolute()
        self.requested = dict(ports or {})
        self.fresh = fresh
        self.say = say
        self.s3 = None  # S3Server
        self.pg = None  # PgServer
        self.mlflow = None  # MlflowServer
        self._state: dict = {}
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start all three (stopping any that started when a later one fails)."""
        self._acquire_lock()
        try:
            if self.fresh:
                self._wipe()
            self._state = self._load_state()
            self._start_s3()
            self._start_postgres()
            self._start_mlflow()
            self._save_state()
            _write_private(self.state_dir / "env.sh", self.env_script())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop whatever runs, MLflow first (it uses the other two); idempotent."""
        errors: list[str] = []
        for name in ("mlflow", "pg", "s3"):
            server = getattr(self, name)
            if server is None:
                continue
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"{name}: {e}")
            setattr(self, name, None)
        self._release_lock()
        if errors:
            raise StackError("; ".join(errors))

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dead(self) -> list[str]:
        """Services that were started and are no longer running."""
        out = []
        if self.s3 is not None and not self.s3.running:
            out.append("s3")
        if self.pg is not None and not (self.pg.data / "postmaster.pid").exists():
            out.append("postgres")
        if self.mlflow is not None and not self.mlflow.running:
            out.append("mlflow")
        return out

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """The variables that point `npo run` (and mlflow/aws clients) at this stack."""
        if self.s3 is None or self.pg is None or self.mlflow is None:
            raise StackError("the stack is not running")
        return {
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "NPO_METADATA_URL": self.pg.url(DATABASE),
            "MLFLOW_TRACKING_URI": self.mlflow.url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
        }

    def export_lines(self) -> list[str]:
        return [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]

    def env_script(self) -> str:
        return (
            "# npo dev services (python -m npo.devservices); valid while they run.\n"
            f"# Artifacts: npo run ... --set store.artifacts_uri=s3://{BUCKET}/experiments\n"
            + "\n".join(self.export_lines())
            + "\n"
        )

    # ------------------------------------------------------------------ checks
    def check(self) -> list[Status]:
        """Verify each service from the outside with the credentials of ``env()``."""
        env = self.env()
        return [self._check_s3(env), self._check_postgres(env), self._check_mlflow(env)]

    def _check_s3(self, env: Mapping[str, str]) -> Status:
        from minio import Minio
        from minio.error import S3Error

        endpoint = env["AWS_ENDPOINT_URL"]
        netloc = endpoint.removeprefix("http://")
        try:
            client = Minio(
                netloc, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=False
            )
            if not client.bucket_exists(BUCKET):
                return Status("s3", False, endpoint, f"bucket {BUCKET!r} is missing")
            key = f"_npo_check/{uuid.uuid4().hex}"
            client.put_object(BUCKET, key, io.BytesIO(b"ok"), 2)
            with contextlib.closing(client.get_object(BUCKET, key)) as resp:
                body = resp.read()
            client.remove_object(BUCKET, key)
            if body != b"ok":
                return Status("s3", False, endpoint, "read back a different object")
            try:
                Minio(netloc, env["AWS_ACCESS_KEY_ID"], "wrong-secret", secure=False).list_buckets()
                return Status("s3", False, endpoint, "a wrong secret key was accepted")
            except S3Error:
                pass
        except Exception as e:
            return Status("s3", False, endpoint, f"{type(e).__name__}: {_scrub(str(e), env)}")
        return Status("s3", True, endpoint, f"bucket {BUCKET}: write/read/delete ok, auth on")

    def _check_postgres(self, env: Mapping[str, str]) -> Status:
        import sqlalchemy as sa

        from npo.config import redact_url

        url = env["NPO_METADATA_URL"]
        shown = redact_url(url) or url
        try:
            engine = sa.create_engine(url, connect_args={"connect_timeout": 10})
            try:
                with engine.connect() as conn:
                    user, db, version = conn.execute(
                        sa.text("SELECT current_user, current_database(), version()")
                    ).one()
            finally:
                engine.dispose()
        except Exception as e:
            return Status("postgres", False, shown, f"{type(e).__name__}: {_scrub(str(e), env)}")
        if (user, db) != ("npo", DATABASE):
            return Status("postgres", False, shown, f"connected as {user} to {db}")
        return Status("postgres", True, shown, f"user {user}, db {db}: {version.split(',')[0]}")

    def _check_mlflow(self, env: Mapping[str, str]) -> Status:
        base = env["MLFLOW_TRACKING_URI"]
        try:
            _http("GET", f"{base}/health")
            _http("GET", f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
            # Artifact round trip through the server's proxy into the bucket.
            path = f"_npo_check/{uuid.uuid4().hex}.txt"
            _http("PUT", f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", b"ok")
            landed = self._object_exists(env, f"{MLFLOW_ARTIFACTS.split('/', 3)[3]}/{path}")
            _http("DELETE", f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}")
        except Exception as e:
            return Status("mlflow", False, base, f"{type(e).__name__}: {_scrub(str(e), env)}")
        if not landed:
            return Status("mlflow", False, base, f"an artifact did not land in {MLFLOW_ARTIFACTS}")
        return Status("mlflow", True, base, f"backend postgres, artifacts {MLFLOW_ARTIFACTS}: ok")

    @staticmethod
    def _object_exists(env: Mapping[str, str], key: str) -> bool:
        from minio import Minio
        from minio.error import S3Error

        client = Minio(
            env["AWS_ENDPOINT_URL"].removeprefix("http://"),
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            secure=False,
        )
        try:
            client.stat_object(BUCKET, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise
        return True

    # ------------------------------------------------------------------ services
    def _port(self, service: str) -> int:
        want = self.requested.get(service)
        if want:  # explicit: that one or an error
            if not port_is_free(want):
                raise StackError(f"{service}: port {want} on {HOST} is in use")
            return want
        if want == 0:
            return pick_port(None)
        last = self._state.get(service, {}).get("port")
        for preferred in (last, DEFAULT_PORTS[service]):
            if preferred and port_is_free(preferred):
                return preferred
        port = pick_port(None)
        self.say(f"{service}: port {last or DEFAULT_PORTS[service]} is busy, using {port}")
        return port

    def _start_s3(self) -> None:
        from minio import Minio

        from npo.devservices.s3server import S3Server

        st = self._state.setdefault("s3", {})
        st.setdefault("access_key", "npo-" + secrets.token_hex(6))
        st.setdefault("secret_key", secrets.token_urlsafe(24))
        st["port"] = self._port("s3")
        root = self.state_dir / "s3"
        root.mkdir(mode=0o700, exist_ok=True)
        t0 = time.monotonic()
        self.s3 = S3Server(root, st["access_key"], st["secret_key"], s3_port=st["port"])
        self.s3.start(timeout=60)
        client = Minio(self.s3.netloc, self.s3.access_key, self.s3.secret_key, secure=False)
        if not client.bucket_exists(BUCKET):
            client.make_bucket(BUCKET)
        self.say(f"s3: SeaweedFS on {self.s3.endpoint}, bucket {BUCKET} ({_since(t0)})")

    def _postgres_root(self) -> Path:
        """``state_dir/postgres``, unless PostgreSQL's system user (under root) cannot reach
        it: then a directory under the temp dir, named after the state dir."""
        from npo.devservices.pgserver import server_user_can_reach

        root = self.state_dir / "postgres"
        if server_user_can_reach(self.state_dir):
            return root
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        other = Path(tempfile.gettempdir()) / f"npo-services-pg-{digest}"
        self.say(
            f"postgres: {self.state_dir} is not reachable by the user PostgreSQL runs as "
            f"(root may not run it), so its data lives in {other}"
        )
        return other

    def _start_postgres(self) -> None:
        from npo.devservices.pgserver import PgServer

        st = self._state.setdefault("postgres", {})
        st.setdefault("password", secrets.token_urlsafe(18))
        root = self._postgres_root()
        if (root / "data" / "postmaster.pid").exists():  # its launcher was killed: free the port
            PgServer.stop_leftover_in(root)
        st["port"] = self._port("postgres")
        t0 = time.monotonic()
        if st.get("superuser_password") and (root / "data" / "PG_VERSION").is_file():
            self.pg = PgServer.reopen(
                root,
                st["port"],
                app_password=st["password"],
                superuser_password=st["superuser_password"],
            )
        else:
            if root.exists():  # a half-made cluster, or credentials that were lost
                shutil.rmtree(root)
            self.pg = PgServer.start_new(root, port=st["port"], app_password=st["password"])
            st["superuser_password"] = self.pg.superuser_password
        st["root"] = str(root)
        self._save_state()
        for db in (DATABASE, MLFLOW_DATABASE):
            self.pg.create_database(db, exist_ok=True)
        self.say(f"postgres: PostgreSQL on {HOST}:{self.pg.port}, db {DATABASE} ({_since(t0)})")

    def _start_mlflow(self) -> None:
        from npo.devservices.mlflowserver import MlflowServer, mlflow_binary

        if mlflow_binary() is None:
            raise StackError("no `mlflow` script beside this Python: install npo's dependencies")
        st = self._state.setdefault("mlflow", {})
        st["port"] = self._port("mlflow")
        assert self.s3 is not None and self.pg is not None
        env = {
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        t0 = time.monotonic()
        self.mlflow = MlflowServer(
            self.pg.url(MLFLOW_DATABASE),
            self.state_dir / "mlflow",
            artifacts_destination=MLFLOW_ARTIFACTS,
            env=env,
            port=st["port"],
        )
        self.mlflow.start(timeout=120)
        self.say(f"mlflow: MLflow server on {self.mlflow.url}, artifacts {MLFLOW_ARTIFACTS}"
                 f" ({_since(t0)})")  # fmt: skip

    # ------------------------------------------------------------------ state
    def _acquire_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Traversable by others: PostgreSQL may run as another user (see pgserver.py).
        self.state_dir.chmod(0o755)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StackError(
                f"services already run from {self.state_dir} (pid {holder}): source "
                f"{self.state_dir / 'env.sh'}, or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def _wipe(self) -> None:
        pg_root = None
        with contextlib.suppress(StackError):
            pg_root = self._load_state().get("postgres", {}).get("root")
        if pg_root and Path(pg_root).is_dir():  # outside the state dir (see _postgres_root)
            shutil.rmtree(pg_root)
        for child in self.state_dir.iterdir():
            if child.name == "lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _load_state(self) -> dict:
        path = self.state_dir / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {"version": _STATE_VERSION}
        except (OSError, ValueError) as e:
            raise StackError(f"cannot read {path} ({e}): fix it, or start with --fresh") from None
        if state.get("version") != _STATE_VERSION:
            raise StackError(f"{path} is from another version: start with --fresh")
        return state

    def _save_state(self) -> None:
        _write_private(self.state_dir / "state.json", json.dumps(self._state, indent=2) + "\n")


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read()[:300]!r}") from None


def _scrub(text: str, env: Mapping[str, str]) -> str:
    from urllib.parse import unquote, urlsplit

    from npo.config import redact_url

    url = env.get("NPO_METADATA_URL")
    if url:
        text = text.replace(url, redact_url(url) or "")
    secrets_ = [env.get("AWS_SECRET_ACCESS_KEY")]
    if url and urlsplit(url).password:
        secrets_ += [urlsplit(url).password, unquote(urlsplit(url).password or "")]
    for secret in filter(None, secrets_):
        text = text.replace(secret, "***")
    return text


def _since(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f} s"
