"""The parent side: `StepServer` starts and stops the zygote and relays workers' progress.

Used by the local pipeline runner (`npo run`): tasks started with `server.env()` in their
environment send their stage to a worker forked from the warm zygote instead of importing
torch, transformers and the stages again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from npo.stepserver.client import DEFAULT_RUNNER, ENV_SERVER
from npo.stepserver.protocol import ACK, ConnectionLost, recv_frame
from npo.stepserver.zygote import ZygoteConfig

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]

_log = logging.getLogger(__name__)
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class StepServer:
    """A warm stage server: a spawned zygote that forks one worker per `call_stage`.

    >>> with StepServer(on_progress=bars) as server:      # doctest: +SKIP
    ...     os.environ.update(server.env())               # the tasks inherit it
    ...     run_the_pipeline()

    runner: "module:function" the workers call as `runner(name, progress=..., **params)`.
    preload: modules the zygote imports before forking (imports only: no torch op).
    on_progress: receives every worker's progress events, in order, on a listener thread;
        None: workers print compact progress lines to the task's stdout instead.
    env: environment overrides for the zygote, applied before the preload imports (its
        PYTHONPATH entries are also added to sys.path). A worker runs with the calling
        task's full environment instead, as a subprocess would.

    A worker behaves like the task's own process: the task's environment, working directory,
    stdout and stderr; its exit runs the stage's atexit handlers and kills processes the
    stage left behind. A task that goes away before its answer (killed, Ctrl-C) has its
    worker SIGTERMed; a worker that dies without answering fails the task with its exit
    status or signal.

    Exiting stops the zygote, terminates workers still running (SIGTERM, then SIGKILL after
    `stop_grace_s`) and removes the socket directory.
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
        self._dir: str | None = None
        self._address: str | None = None
        self._process: _ZygoteProcess | None = None
        self._control: Any = None  # our end of the control pipe
        self._listener: _ProgressListener | None = None
        self._pending_address: str | None = None
        self.zygote_pid: int | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The unix socket path tasks connect to."""
        if self._address is None:
            raise RuntimeError("the step server is not running")
        return self._address

    def env(self) -> dict[str, str]:
        """The environment a task needs to use this server."""
        return {ENV_SERVER: self.address}

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
        """Spawn the zygote and return once it has imported everything and listens."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Spawn the zygote and return at once: the caller can do other work while the
        zygote imports (on another core), then call `wait_ready`."""
        if self._process is not None:
            raise RuntimeError("the step server is already running")
        try:
            self._launch()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Block until the launched zygote listens; raise (and clean up) if it failed."""
        if self._process is None or self._pending_address is None:
            raise RuntimeError("the step server was not launched")
        try:
            self.zygote_pid = self._await_ready()
        except BaseException:
            self.close()
            raise
        self._address, self._pending_address = self._pending_address, None

    def close(self) -> None:
        """Stop the zygote and its workers, the progress listener, and remove the socket
        directory. Idempotent; each step runs even if an earlier one raised."""
        self._address = None
        try:
            self._stop_zygote()
        finally:
            listener, self._listener = self._listener, None
            directory, self._dir = self._dir, None
            try:
                if listener is not None:
                    listener.stop()
            finally:
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)

    # -- start ----------------------------------------------------------------------------

    def _launch(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="npo-step-")  # mode 0700: only we can connect
        address = os.path.join(self._dir, "stage.sock")
        if len(address.encode()) > _MAX_SOCKET_PATH:
            raise RuntimeError(
                f"socket path {address!r} is too long for a unix socket: set TMPDIR shorter"
            )
        progress_path = None
        if self.on_progress is not None:
            progress_path = os.path.join(self._dir, "progress.sock")
            self._listener = _ProgressListener(progress_path, self.on_progress)
        config = ZygoteConfig(
            runner=self.runner,
            preload=self.preload,
            socket_path=address,
            progress_path=progress_path,
            env=self.extra_env,
            stop_grace_s=self.stop_grace_s,
        )
        # A fresh interpreter, never a fork of this process (it may have threads, CUDA,
        # rich's refresher), and not multiprocessing's spawn either: that re-runs the
        # caller's __main__, which a script without a main guard cannot survive.
        ours, theirs = socket.socketpair()
        self._control = Connection(ours.detach())
        try:
            process = _ZygoteProcess(theirs.fileno())
        finally:
            theirs.close()
        self._control.send(config)
        self._process = process
        self._pending_address = address

    def _await_ready(self) -> int:
        """Wait for the zygote's handshake; raise with its traceback if it failed."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._control.poll(0.05):
                try:
                    message = self._control.recv()
                except (EOFError, OSError):
                    message = None
                if message and message[0] == "ready":
                    _, pid, warning = message
                    if warning:
                        warnings.warn(warning, RuntimeWarning, stacklevel=4)
                    return pid
                if message and message[0] == "error":
                    raise RuntimeError(f"the step-server zygote failed to start:\n{message[1]}")
                self._process.join(5)
                raise RuntimeError(
                    "the step-server zygote died during start-up "
                    f"(exit code {self._process.exitcode})"
                )
            if not self._process.is_alive():
                raise RuntimeError(
                    "the step-server zygote died during start-up "
                    f"(exit code {self._process.exitcode})"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the step-server zygote was not ready after {self.start_timeout_s:.0f} s"
                )

    # -- stop -----------------------------------------------------------------------------

    def _stop_zygote(self) -> None:
        process, self._process = self._process, None
        control, self._control = self._control, None
        if process is None:
            return
        if control is not None:
            with contextlib.suppress(OSError, ValueError):
                control.send("stop")
        # The zygote itself waits up to stop_grace_s for its workers before SIGKILLing them.
        process.join(self.stop_grace_s + 10)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        if control is not None:
            control.close()


class _ZygoteProcess:
    """`python -m npo.stepserver.zygote FD`, with the parts of multiprocessing.Process's
    interface the server uses (join, is_alive, exitcode, terminate, kill)."""

    def __init__(self, control_fd: int) -> None:
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "npo.stepserver.zygote", str(control_fd)],
            pass_fds=(control_fd,),
            stdin=subprocess.DEVNULL,
        )
        # Should close() never run (the parent crashed), end the zygote with the parent.
        atexit.register(self.kill_if_alive)

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    def kill_if_alive(self) -> None:
        if self.is_alive():
            self._popen.kill()
            self._popen.wait()


class _ProgressListener:
    """A thread serving the progress socket: one connection per worker, one JSON frame per
    event, acknowledged after `callback` returns (workers wait for it: in-order delivery
    and backpressure, as if the callback ran in the worker)."""

    def __init__(self, path: str, callback: ProgressCallback) -> None:
        self._callback = callback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(64)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "stop")
        self._thread = threading.Thread(target=self._run, name="npo-step-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_w.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data == "stop":
                    return
                if key.data == "accept":
                    conn, _ = self._sock.accept()
                    conn.settimeout(30)  # a frame arrives whole; never hang on a dead worker
                    self._selector.register(conn, selectors.EVENT_READ, "event")
                else:
                    self._serve(key.fileobj)  # type: ignore[arg-type]

    def _serve(self, conn: socket.socket) -> None:
        try:
            event = recv_frame(conn)
        except (ConnectionLost, OSError, ValueError):
            self._selector.unregister(conn)
            conn.close()
            return
        try:
            self._callback(event["phase"], event["done"], event["total"], event["metrics"])
        except Exception:
            _log.exception("the step server's progress callback raised")
        with contextlib.suppress(OSError):
            conn.sendall(ACK)
