"""A real MLflow tracking server on 127.0.0.1 for tests, backed by PostgreSQL.

Runs the venv's ``mlflow server`` (one worker) with ``--backend-store-uri`` a PostgreSQL URL
(see pgserver.py) and artifacts served by the server itself (``--serve-artifacts``) from a
local directory: MLflow's S3 artifact repository needs boto3, which the venv lacks.

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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def mlflow_binary() -> str | None:
    """The ``mlflow`` console script beside this Python (the venv), if present."""
    path = Path(sys.executable).with_name("mlflow")
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` process group; its log is ``root/mlflow.log``."""

    def __init__(self, backend_uri: str, root: Path) -> None:
        self.backend_uri = backend_uri
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.port = free_port()
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
            "--serve-artifacts", "--artifacts-destination", self.artifacts.as_uri(),
        ]  # fmt: skip

    def start(self, timeout: float = 90.0) -> None:
        if self.running:
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "mlflow.log", "ab")  # noqa: SIM115 - the child owns it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            env=env,
            start_new_session=True,  # its own process group: stop() reaches the workers
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
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
