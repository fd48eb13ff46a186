"""A real MLflow tracking server on 127.0.0.1, backed by PostgreSQL.

Runs the venv's ``mlflow server`` (one worker) with ``--backend-store-uri`` a PostgreSQL URL
(see pgserver.py) and artifacts served by the server itself (``--serve-artifacts``, so
clients need no storage credentials) from ``artifacts_destination``: a local directory by
default, or an ``s3://bucket/prefix`` whose endpoint and keys come in ``env``
(MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; MLflow's S3 store uses
boto3).

The database password is passed in the server's environment (PGPASSWORD), not in its
command line, so it shows neither in ``ps`` nor in the server's log.

    server = MlflowServer(backend_uri, tmp_dir)
    server.start()          # waits for GET /health; ~5-10 s (DB migrations on first start)
    server.url              # http://127.0.0.1:PORT
    server.stop()           # SIGTERM to its process group, SIGKILL after a grace period
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from npo.devservices._proc import HOST, die_with_parent, free_port, stop_group

__all__ = ["HOST", "MlflowServer", "free_port", "mlflow_binary"]


def mlflow_binary() -> str | None:
    """The ``mlflow`` console script beside this Python (the venv), if present."""
    path = Path(sys.executable).with_name("mlflow")
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _split_password(uri: str) -> tuple[str, str | None]:
    """(``uri`` without its password, the password) for a PostgreSQL URL; else (uri, None)."""
    if not uri.startswith("postgresql"):
        return uri, None
    import sqlalchemy as sa

    url = sa.make_url(uri)
    if url.password is None:
        return uri, None
    return url.set(password=None).render_as_string(hide_password=False), str(url.password)


class MlflowServer:
    """One ``mlflow server`` process group; its log is ``root/mlflow.log``."""

    def __init__(
        self,
        backend_uri: str,
        root: Path,
        *,
        artifacts_destination: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        """``artifacts_destination`` defaults to ``root/artifacts``; ``env`` is added to the
        server's environment (which drops the caller's MLFLOW_* variables)."""
        self.backend_uri, self._db_password = _split_password(backend_uri)
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.artifacts_destination = artifacts_destination or self.artifacts.absolute().as_uri()
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        binary = mlflow_binary()
        if binary is None:
            raise FileNotFoundError(f"no mlflow script beside {sys.executable}")
        return [
            binary, "server",
            "--host", HOST, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_uri,
            "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
        ]  # fmt: skip

    def start(self, timeout: float = 90.0) -> None:
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.artifacts_destination.startswith("file:"):
            self.artifacts.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "mlflow.log", "ab")  # noqa: SIM115 - the child owns it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(self.extra_env)
        if self._db_password is not None:
            env["PGPASSWORD"] = self._db_password
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            env=env,
            start_new_session=True,  # its own process group: stop() reaches the workers
            preexec_fn=die_with_parent(),
        )
        log.close()
        atexit.register(self.stop)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception as e:  # not listening yet
                last = e
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout}s ({last!r}):\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        stop_group(proc, grace)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by the master
            os.killpg(proc.pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.root / "mlflow.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-n:])
        return ""
