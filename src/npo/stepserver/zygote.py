"""The zygote: a spawned, single-threaded process that imports the stages once and forks one
worker per request.

Lifecycle: `zygote_main` (run by `python -m npo.stepserver.zygote FD`) applies the
server's env, imports the preload modules and the runner (imports only: no torch op may run
before a fork), binds the socket and reports "ready" on the control pipe. `Zygote.serve`
then polls the listening socket, the control pipe (a "stop" message or EOF: the parent is
gone) and a SIGCHLD wake-up pipe.

Each accepted connection is handed to a forked worker, which reads the request itself (so
the client's stdout/stderr descriptors never enter the zygote), runs the stage in its own
process group and replies. The zygote keeps its copy of the connection to (a) report a
worker that died without replying (its exit status goes to the client) and (b) notice the
client hanging up (POLLRDHUP), which terminates the worker like killing the task would.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from npo.stepserver.client import ProgressLogger, Runner, json_result, resolve_runner
from npo.stepserver.protocol import (
    ACK,
    ConnectionLost,
    pack,
    recv_frame_with_fds,
    send_frame,
)

_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ZygoteConfig:
    """What the parent tells the zygote (pickled over the control socket)."""

    runner: str
    preload: tuple[str, ...]
    socket_path: str
    progress_path: str | None  # None: workers log progress to stdout, like a pod
    env: dict[str, str] = field(default_factory=dict)
    stop_grace_s: float = 5.0


def zygote_main(config: ZygoteConfig, control: Connection) -> None:
    """Spawn target: warm up, report ("ready", pid, warning) or ("error", traceback), serve."""
    # The parent owns our lifetime (it sends "stop"); a terminal Ctrl-C reaches it anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _apply_env(config.env)
        for module in config.preload:
            importlib.import_module(module)
        runner = resolve_runner(config.runner)
        warning = _check_forkable()
        listener = _listen(config.socket_path)
    except BaseException:
        control.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    zygote = Zygote(config, runner, listener, control)
    control.send(("ready", os.getpid(), warning))
    zygote.serve()


def _apply_env(env: dict[str, str]) -> None:
    """The server's env overrides, before the preload imports read them. PYTHONPATH is
    also put on sys.path: the interpreter read it at start-up, before this ran."""
    os.environ.update(env)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def _check_forkable() -> str:
    """Refuse a zygote that initialised CUDA (a forked worker cannot use it); return a
    warning if a preload import started Python threads (a fork copies only this one: a lock
    another thread held stays locked in every worker). Native pools are not counted:
    OpenBLAS's, started by importing numpy, re-creates itself after a fork."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        raise RuntimeError(
            "a preload module initialised CUDA in the step-server zygote; forked workers "
            "could not use it (preload modules must only import)"
        )
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if not threads:
        return ""
    return (
        f"the step-server zygote runs threads {threads} after its preload imports; "
        "forking it may deadlock workers (a preload module should only import)"
    )


class Zygote:
    """The serving loop: accept, fork, reap, report, stop."""

    def __init__(
        self, config: ZygoteConfig, runner: Runner, listener: socket.socket, control: Connection
    ) -> None:
        self._config = config
        self._runner = runner
        self._listener = listener
        self._control = control
        self._workers: dict[int, socket.socket | None] = {}  # pid -> connection (None: gone)
        self._conn_pids: dict[int, int] = {}  # connection fd -> worker pid
        self._stopping = False
        self._zygote_pid = os.getpid()
        self._prctl = _load_prctl()
        self._wake_r, self._wake_w = os.pipe()
        # Workers write their pid here just before replying: a client hanging up after
        # that has its answer, and the worker may finish its exit (atexit) in peace.
        self._replied_r, self._replied_w = os.pipe()
        self._replied: set[int] = set()
        for fd in (self._wake_r, self._wake_w, self._replied_r):
            os.set_blocking(fd, False)
        self._poller = select.poll()

    # -- the loop -------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until told to stop (or the parent dies), then end every worker."""
        signal.set_wakeup_fd(self._wake_w)
        # Handlers only need to exist: the C-level handler writes to the wake-up pipe.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        for fd in (self._listener.fileno(), self._control.fileno(), self._wake_r, self._replied_r):
            self._poller.register(fd, select.POLLIN)
        try:
            while not self._stopping:
                for fd, events in self._poller.poll():
                    self._dispatch(fd, events)
                self._reap()
        finally:
            self._shutdown()

    def _request_stop(self) -> None:
        self._stopping = True

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self._listener.fileno():
            self._accept_all()
        elif fd == self._control.fileno():
            self._read_control()
        elif fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        elif fd == self._replied_r:
            self._read_replied()
        elif fd in self._conn_pids and events & _HANGUP:
            self._client_gone(fd)

    def _read_replied(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._replied_r, 4096):
                data += chunk
        # Writes of 4 bytes to a pipe are atomic: the data is whole pids.
        for i in range(0, len(data) - len(data) % 4, 4):
            pid = int.from_bytes(data[i : i + 4], "little")
            if pid in self._workers:  # a reaped pid could be reused: never mark it
                self._replied.add(pid)

    def _read_control(self) -> None:
        try:
            message = self._control.recv()
        except (EOFError, OSError):
            message = "stop"  # the parent died: never outlive it
        if message == "stop":
            self._stopping = True

    def _accept_all(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(True)
            self._fork_worker(conn)

    # -- workers --------------------------------------------------------------------------

    def _fork_worker(self, conn: socket.socket) -> None:
        _flush_stdio()  # else buffered zygote output would be written again by the worker
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN/ENOMEM: fail this call, keep serving
            with contextlib.suppress(OSError):
                send_frame(conn, {"ok": False, "error": f"the step server cannot fork: {exc}"})
            conn.close()
            return
        if pid == 0:
            status = 1
            try:
                status = self._become_worker(conn)
            finally:
                os._exit(status)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the worker: whichever runs first wins
        self._workers[pid] = conn
        self._conn_pids[conn.fileno()] = pid
        self._poller.register(conn.fileno(), select.POLLRDHUP)

    def _become_worker(self, conn: socket.socket) -> int:
        """In the forked child: drop the zygote's state and run one request."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # own group: the zygote can end the stage's subprocesses too
        _die_with_parent(self._prctl, self._zygote_pid)
        _forget_inherited_exit_actions()
        keep = conn.fileno()
        for other in self._workers.values():
            if other is not None and other.fileno() != keep:
                other.close()
        self._listener.close()
        self._control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.close(self._replied_r)
        return run_worker(conn, self._runner, self._config.progress_path, self._replied_w)

    def _reap(self) -> None:
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self._workers.pop(pid, None)
            self._replied.discard(pid)
            # A finished task's leftover subprocesses end with it, as in a pod.
            _signal_group(pid, signal.SIGKILL)
            if conn is not None:
                self._report_exit(conn, pid, status)
                self._drop_conn(conn)

    def _report_exit(self, conn: socket.socket, pid: int, status: int) -> None:
        """Tell the client how the worker ended. A client whose worker replied has already
        read its one frame and ignores this; one whose worker crashed reads it instead."""
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            name = signal.Signals(number).name if number in signal.valid_signals() else "?"
            error = f"worker process {pid} was killed by signal {number} ({name})"
        else:
            code = os.waitstatus_to_exitcode(status)
            error = f"worker process {pid} exited with status {code} before replying"
        frame = pack({"ok": False, "error": error, "traceback": ""})
        with contextlib.suppress(OSError):  # never block the zygote on a client
            conn.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

    def _client_gone(self, fd: int) -> None:
        """The client hung up: a killed task stops its stage, as with a subprocess (unless
        the worker has replied: then the client simply read its answer and left)."""
        pid = self._conn_pids[fd]
        conn = self._workers.get(pid)
        self._read_replied()  # a worker's mark precedes its reply, hence this hang-up
        if pid in self._workers:
            if pid not in self._replied:
                _signal_group(pid, signal.SIGTERM)
            self._workers[pid] = None
        if conn is not None:
            self._drop_conn(conn)

    def _drop_conn(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        self._conn_pids.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)
        conn.close()

    # -- stopping -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """SIGTERM every worker group, SIGKILL what is left after the grace period, reap all,
        then remove the socket."""
        for pid in list(self._workers):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.stop_grace_s
        while self._workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        for pid in list(self._workers):
            _signal_group(pid, signal.SIGKILL)
        while self._workers:
            pid = next(iter(self._workers))
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            conn = self._workers.pop(pid)
            if conn is not None:
                self._report_exit(conn, pid, status)
                self._drop_conn(conn)
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self._config.socket_path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's process group (it leads one), or the worker alone before it has
    one; a group or process already gone is fine."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), loaded once in the zygote; None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int] | None, parent: int) -> None:
    """Have the kernel SIGKILL this worker if the zygote dies (were the zygote killed, its
    shutdown, which ends the workers, would never run). Best effort: Linux only."""
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the zygote died before prctl took effect
        os._exit(1)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


# -- the worker ---------------------------------------------------------------------------


class ProgressRelay:
    """The worker's progress callback: each event goes to the parent's listener, and the
    call returns once the parent's callback has (so events arrive in order and all before
    the reply). If the parent stops listening, events are dropped: the stage goes on."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._broken = False

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        if self._broken:
            return
        event = {"phase": phase, "done": done, "total": total, "metrics": _floats(metrics)}
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(self._path)
            send_frame(self._sock, event)
            if self._sock.recv(1) != ACK:
                raise ConnectionLost("the progress listener closed")
        except (OSError, ValueError):
            self._broken = True
            if self._sock is not None:
                self._sock.close()


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as plain floats (numpy/torch scalars included); others are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError):
            out[str(key)] = float(value)
    return out


def run_worker(
    conn: socket.socket, runner: Runner, progress_path: str | None, replied_fd: int = -1
) -> int:
    """Read one request from `conn`, run it as the client's process would, reply.

    Just before replying, the worker's pid goes to `replied_fd` (the zygote's pipe), if any.

    Returns the worker's exit status: 0 once a reply is sent, 2 for an unreadable request.
    """
    try:
        request, fds = recv_frame_with_fds(conn)
    except (OSError, ValueError):
        return 2
    _adopt_descriptors(fds, request.get("fds", []))
    name = str(request.get("name", "?"))
    try:
        _adopt_context(request)
        progress = ProgressRelay(progress_path) if progress_path else ProgressLogger(name)
        result = runner(name, progress=progress, **request.get("params", {}))
        reply = {"ok": True, "result": json_result(name, result)}
    except BaseException as exc:  # SystemExit/KeyboardInterrupt too: the client must hear
        text = str(exc)
        error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        reply = {"ok": False, "error": error, "traceback": traceback.format_exc()}
    _flush_stdio()  # the stage's output reaches the task log before its result
    if replied_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(replied_fd, os.getpid().to_bytes(4, "little"))
    try:
        send_frame(conn, reply)
    except OSError:
        return 1
    _finalize()
    return 0


def _forget_inherited_exit_actions() -> None:
    """Drop the exit actions the worker inherited from the zygote: they clean up the zygote's
    own import-time state (a temporary directory made at import, multiprocessing's process
    record), which later workers still use. What the stage registers still runs."""
    atexit._clear()
    for info in getattr(weakref.finalize, "_registry", {}).values():
        info.atexit = False  # objects of the zygote: not this worker's to finalize
    # Registered once per process, so inherited as done: register them again.
    atexit.register(weakref.finalize._exitfunc)
    if "logging" in sys.modules:
        atexit.register(sys.modules["logging"].shutdown)


def _finalize() -> None:
    """What a fresh interpreter does on exit, which os._exit skips: stop the stage's thread
    pools and wait for its non-daemon threads, run atexit handlers (logging, tracking
    clients), flush stdio. After the reply, as a subprocess's exit follows its result."""
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()  # threading's own exit hooks (thread pools), then the joins
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    _flush_stdio()


def _adopt_descriptors(fds: list[int], targets: list[int]) -> None:
    """Install the client's stdout/stderr as this process's 1 and 2."""
    for fd, target in zip(fds, targets, strict=False):
        if target in (1, 2):
            os.dup2(fd, target)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _adopt_context(request: dict[str, Any]) -> None:
    """The client's environment and working directory, as a subprocess would inherit."""
    env = request.get("env")
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    cwd = request.get("cwd")
    if cwd:
        os.chdir(cwd)


def _boot() -> None:
    """`python -m npo.stepserver.zygote FD`: the server's end of the control socket is FD;
    the first message on it is the ZygoteConfig."""
    control = Connection(int(sys.argv[1]))
    _die_with_parent(_load_prctl(), os.getppid())  # never outlive the server
    zygote_main(control.recv(), control)
    # Workers are reaped and the socket is gone: run the exit actions of what the zygote
    # imported, but skip the interpreter's teardown of torch, transformers and MLflow
    # (over a second of module clean-up nobody needs).
    atexit._run_exitfuncs()
    _flush_stdio()
    os._exit(0)


if __name__ == "__main__":
    _boot()
