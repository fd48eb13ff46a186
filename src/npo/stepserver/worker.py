"""The warm worker: one process that imports the stages once and runs them one call at a
time, each with the calling task's environment, working directory, stdout and stderr.

Started by `StepServer` (`python -m npo.stepserver.worker FD`: a fresh interpreter; FD is
its end of a socketpair wrapped in a `multiprocessing.connection.Connection`), it applies the
server's env, imports the preload modules and the runner, listens on a unix socket
(`multiprocessing.connection.Listener`, with an authkey) and reports "ready" on its pipe to
the parent. Each connection is one call: the request (stage, params, environment, cwd)
and the task's stdout/stderr descriptors (`multiprocessing.reduction.send_handle`), then
the reply. Progress events go to the parent over the same pipe (its bars), or, with no
parent listening for them, to the task's stdout as compact lines, as in a pod.

The worker exits when its parent does (a watchdog thread compares os.getppid()).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from multiprocessing.reduction import recv_handle
from typing import Any

from npo.stepserver.client import ProgressLogger, Runner, describe, json_result, resolve_runner


@dataclass(frozen=True)
class WorkerConfig:
    """What the parent tells the worker (pickled by multiprocessing's spawn)."""

    runner: str
    preload: tuple[str, ...]
    address: str
    authkey: bytes
    relay_progress: bool  # False: progress lines go to the task's stdout
    env: dict[str, str] = field(default_factory=dict)


def worker_main(config: WorkerConfig, parent: Connection) -> None:
    """Spawn target: warm up, report ("ready", pid) or ("error", traceback), serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns our lifetime
    try:
        os.environ.update(config.env)
        for path in reversed(config.env.get("PYTHONPATH", "").split(os.pathsep)):
            if path and path not in sys.path:
                sys.path.insert(0, path)
        for module in config.preload:
            importlib.import_module(module)
        runner = resolve_runner(config.runner)
        listener = Listener(config.address, family="AF_UNIX", backlog=16, authkey=config.authkey)
    except BaseException:
        parent.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    _watch_parent(os.getppid())
    parent.send(("ready", os.getpid()))
    while True:
        try:
            client = listener.accept()
        except (AuthenticationError, EOFError, ConnectionError):
            continue  # a caller without the key, or one that hung up while connecting
        except OSError:  # the listener was closed: stop
            return
        with client:
            _serve(client, runner, config, parent)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (we would be reparented)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _serve(client: Connection, runner: Runner, config: WorkerConfig, parent: Connection) -> None:
    """One call: run the stage as the task would, reply ("ok", result) or ("error", ...)."""
    try:
        request = client.recv()
        fds = [recv_handle(client) for _ in request["fds"]]
    except (EOFError, OSError):
        return  # the task went away before asking
    name = request["name"]

    def relay(phase: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        parent.send(("progress", phase, done, total, dict(metrics)))

    progress = relay if config.relay_progress else ProgressLogger(name)
    try:
        with _as_the_task(request, dict(zip(request["fds"], fds, strict=True))):
            result = json_result(name, runner(name, progress=progress, **request["params"]))
        reply: tuple[Any, ...] = ("ok", result)
    except BaseException as exc:  # a stage's SystemExit too: the task fails, we go on
        reply = ("error", describe(exc), traceback.format_exc())
    finally:
        for fd in fds:
            os.close(fd)
        gc.collect()  # the stage's models and tensors: freed before the next call
        _empty_cuda_cache()
    with contextlib.suppress(OSError):
        client.send(reply)


@contextlib.contextmanager
def _as_the_task(request: dict[str, Any], fds: dict[int, int]) -> Iterator[None]:
    """The task's environment, working directory and standard descriptors, for one call."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_fds = {target: os.dup(target) for target in fds}
    _flush()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for target, fd in fds.items():
        os.dup2(fd, target)
    try:
        yield
    finally:
        _flush()
        for target, fd in saved_fds.items():
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


if __name__ == "__main__":  # python -m npo.stepserver.worker FD (from StepServer)
    _parent = Connection(int(sys.argv[1]))
    worker_main(_parent.recv(), _parent)
