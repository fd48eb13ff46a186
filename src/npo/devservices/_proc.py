"""Small process and port helpers shared by the service launchers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of HOST that are free right now (held open together, so none
    repeats). Another process may still take one before it is used: callers start promptly."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on HOST:port now. With SO_REUSEADDR, as the servers
    here set it: connections of a stopped server lingering in TIME_WAIT do not count, a
    listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None) -> int:
    """``preferred`` if it is set and free, else any free port."""
    if preferred and port_is_free(preferred):
        return preferred
    return free_port()


def _set_pdeathsig() -> None:
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child server: on Linux, the kernel sends the child SIGTERM when
    its parent dies (even by SIGKILL), so a crashed launcher leaves no server behind.

    None (no preexec_fn) off Linux, and off the main thread: the kernel ties the signal to
    the starting *thread*, so a server started from a short-lived thread would die with it.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    return _set_pdeathsig


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds; a group
    already gone is fine."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
