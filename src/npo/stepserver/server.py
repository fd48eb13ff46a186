"""The parent side: `StepServer` starts and stops the warm worker and relays its progress.

Used by the local pipeline runner (`npo run`): tasks started with `server.env()` in their
environment hand their stage to the worker (npo.stepserver.worker) instead of importing
torch, transformers and the stages again.

    with StepServer(on_progress=bars) as server:
        os.environ.update(server.env())   # the tasks inherit it
        run_the_pipeline()
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from types import TracebackType

from npo.stepserver.client import DEFAULT_RUNNER, ENV_SERVER, ENV_SERVER_KEY
from npo.stepserver.worker import WorkerConfig

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]

_log = logging.getLogger(__name__)
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class StepServer:
    """A warm stage server: one worker process that imported the stages once and runs each
    `call_stage` in turn, with the calling task's environment, working directory, stdout and
    stderr (calls that arrive together wait their turn).

    runner: "module:function" the worker calls as `runner(name, progress=..., **params)`.
    preload: modules the worker imports before it serves.
    on_progress: receives the worker's progress events, in order, on a listener thread;
        None: the worker prints compact progress lines to the task's stdout instead.
    env: environment overrides for the worker, applied before the preload imports (its
        PYTHONPATH entries are also added to sys.path); each call runs with the calling
        task's full environment instead, as a subprocess would.

    A worker that dies (a stage crashed the interpreter) fails its call; `wait_ready`
    starts a new one. Exiting stops the worker and removes the socket directory.
    """

    def __init__(
        self,
        runner: str = DEFAULT_RUNNER,
        preload: Iterable[str] = ("npo.stages",),
        on_progress: ProgressCallback | None = None,
        env: dict[str, str] | None = None,
        *,
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        self.runner = runner
        self.preload = tuple(preload)
        self.on_progress = on_progress
        self.extra_env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.worker_pid: int | None = None
        self._dir: str | None = None
        self._address: str | None = None
        self._key = b""
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: str | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The unix socket path tasks connect to."""
        if self._address is None or self.worker_pid is None:
            raise RuntimeError("the step server is not running")
        return self._address

    def env(self) -> dict[str, str]:
        """The environment a task needs to use this server."""
        return {ENV_SERVER: self.address, ENV_SERVER_KEY: self._key.hex()}

    def __enter__(self) -> StepServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker and return once it has imported everything and listens."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the worker and return at once: the caller can do other work while it
        imports (on another core), then call `wait_ready`."""
        if self._process is not None and self._process.poll() is None:
            return
        self._cleanup()
        self._dir = tempfile.mkdtemp(prefix="npo-step-")  # 0700: only we can connect
        address = os.path.join(self._dir, "worker.sock")
        if len(address.encode()) > _MAX_SOCKET_PATH:
            self._cleanup()
            raise RuntimeError(
                f"socket path {address!r} is too long for a unix socket: set TMPDIR shorter"
            )
        self._address, self._key = address, os.urandom(32)
        config = WorkerConfig(
            runner=self.runner,
            preload=self.preload,
            address=address,
            authkey=self._key,
            relay_progress=self.on_progress is not None,
            env=self.extra_env,
        )
        ours, theirs = socket.socketpair()
        with theirs:
            # `python -m`: a fresh interpreter that imports nothing of ours but the worker
            self._process = subprocess.Popen(
                [sys.executable, "-m", "npo.stepserver.worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env={**os.environ, **self.extra_env},
            )
        self._conn = Connection(ours.detach())
        self._conn.send(config)
        self._ready.clear()
        self._error = None
        self.worker_pid = None
        self._reader = threading.Thread(target=self._read, name="step-server", daemon=True)
        self._reader.start()

    def wait_ready(self) -> None:
        """Block until the worker serves (starting a new one if it died); raise
        RuntimeError with its traceback or exit status if it cannot start."""
        if self._process is None or self._process.poll() is not None or self._lost():
            self.close()
            self.launch()
        if not self._ready.wait(self.start_timeout_s):
            self.close()
            raise RuntimeError(
                f"the step server's worker did not start in {self.start_timeout_s} s"
            )
        if self._error is not None or self.worker_pid is None:
            code = self._process.wait(timeout=self.stop_grace_s) if self._process else None
            why = self._error or f"it exited with status {code}"
            self.close()
            raise RuntimeError(f"the step server's worker failed to start: {why}")

    def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after `stop_grace_s`); idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()

    # -- internals ------------------------------------------------------------------------

    def _lost(self) -> bool:
        """Whether the worker's end of our connection is closed: the worker is dead or
        dying. A killed process closes its sockets a moment before it can be reaped, so a
        task that saw its connection drop may ask before `poll()` knows. Peeks, so the
        reader thread still gets every message."""
        if self._conn is None:
            return True
        with socket.socket(fileno=os.dup(self._conn.fileno())) as peek:
            try:
                return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

    def _cleanup(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        if self._reader is not None:
            self._reader.join(timeout=self.stop_grace_s)
            self._reader = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._address, self.worker_pid = None, None

    def _read(self) -> None:
        """The worker's messages: ready, a start-up error, progress events."""
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._ready.set()  # a waiter sees no pid: the worker is gone
                return
            kind = message[0]
            if kind == "ready":
                self.worker_pid = message[1]
                self._ready.set()
            elif kind == "error":
                self._error = message[1]
                self._ready.set()
            elif kind == "progress" and self.on_progress is not None:
                try:
                    self.on_progress(*message[1:])
                except Exception:  # a broken progress bar must not stop the run
                    _log.exception("step server: the progress callback failed")
