"""Fake stages for tests/test_stepserver.py: a `run_stage` with the real one's signature.

IMPORT_PID records which process imported this module: under a step server, its worker
(once, before serving).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("NPO_FAKE_DIE_ON_IMPORT"):
    os._exit(5)  # a worker that dies while warming up

IMPORT_PID = os.getpid()

Progress = Callable[[str, int, int, dict[str, float]], None]


def _compute(progress: Progress, a: int, b: int, config: str = "") -> dict[str, Any]:
    return {"sum": a + b, "pair": (a, b), "by_int": {1: "one"}, "config": config}


def _pids(progress: Progress) -> dict[str, Any]:
    return {"import_pid": IMPORT_PID, "pid": os.getpid()}


def _fail(progress: Progress, message: str) -> dict[str, Any]:
    raise ValueError(f"boom: {message}")


def _progress(progress: Progress, n: int) -> dict[str, Any]:
    for i in range(n):
        progress("phase", i + 1, n, {"x": float(i), "y": i * 2})
    return {"n": n}


def _print(progress: Progress, text: str) -> dict[str, Any]:
    print(f"{text} on stdout")
    print(f"{text} on stderr", file=sys.stderr)
    return {"printed": True}


def _environment(progress: Progress, key: str) -> dict[str, Any]:
    return {"value": os.environ.get(key), "cwd": os.getcwd()}


def _exit(progress: Progress, code: int) -> dict[str, Any]:
    os._exit(code)


def _kill(progress: Progress, signum: int) -> dict[str, Any]:
    os.kill(os.getpid(), signum)
    time.sleep(10)
    return {}


def _sleep(
    progress: Progress, seconds: float, pid_file: str = "", grandchild: bool = True
) -> dict[str, Any]:
    """Sleep, with a grandchild process; `pid_file` gets "worker grandchild" pids first
    (0 for no grandchild)."""
    child = None
    if grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    if pid_file:
        tmp = Path(pid_file + ".tmp")
        tmp.write_text(f"{os.getpid()} {child.pid if child else 0}")
        tmp.rename(pid_file)
    time.sleep(seconds)
    if child:
        child.kill()
        child.wait()
    return {"slept": seconds, "pid": os.getpid()}


def _wrong_type(progress: Progress) -> Any:
    return [1, 2]


def _system_exit(progress: Progress, code: int) -> dict[str, Any]:
    raise SystemExit(code)


STAGES: dict[str, Callable[..., Any]] = {
    "compute": _compute,
    "pids": _pids,
    "fail": _fail,
    "progress": _progress,
    "print": _print,
    "environment": _environment,
    "exit": _exit,
    "kill": _kill,
    "sleep": _sleep,
    "wrong_type": _wrong_type,
    "system_exit": _system_exit,
}


def run_stage(name: str, progress: Progress, **params: Any) -> Any:
    """Dispatch like npo.stages.run_stage."""
    return STAGES[name](progress, **params)


def _torch_sum(progress: Progress, n: int) -> dict[str, Any]:
    """A torch op in the worker (torch preloaded)."""
    import torch

    return {
        "sum": float(torch.arange(n, dtype=torch.float64).sum()),
        "threads": torch.get_num_threads(),
    }


STAGES["torch_sum"] = _torch_sum
