"""The task side: `call_stage` runs one stage, through a warm step server or in this process.

Stdlib only and imported by every pipeline task: nothing heavy (torch, transformers, the
stages themselves) may be imported at module level. A call to the server is one
`multiprocessing.connection` exchange (authenticated with the server's key): the request,
this process's stdout and stderr descriptors (`multiprocessing.reduction.send_handle`),
then the reply.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

ENV_SERVER = "NPO_STEP_SERVER"  # the server's unix socket path
ENV_SERVER_KEY = "NPO_STEP_SERVER_KEY"  # its authkey, hex
ENV_RUNNER = "NPO_STAGE_RUNNER"
DEFAULT_RUNNER = "npo.stages:run_stage"

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
Runner = Callable[..., Any]


class StageFailed(RuntimeError):
    """A stage raised, crashed, or could not be reached; the message carries its traceback."""

    def __init__(self, stage: str, error: str, traceback_text: str = "") -> None:
        self.stage = stage
        self.error = error
        self.traceback_text = traceback_text
        message = f"stage {stage!r} failed: {error}"
        if traceback_text:
            message += f"\n\n--- traceback of stage {stage!r} ---\n{traceback_text.rstrip()}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduction would call StageFailed(message): keep the three fields.
        return (type(self), (self.stage, self.error, self.traceback_text))


class ProgressLogger:
    """A progress callback for pod logs: one compact stdout line per 1/`marks` of a phase.

    Prints the first event of a phase, then whenever `done` crosses the next 10% mark (the
    final event included), so a 10,000-step phase logs about a dozen lines; and every event
    that carries a warning (npo.learning_signal.progress_notes), with the warning.
    """

    def __init__(self, stage: str = "", marks: int = 10, max_metrics: int = 8) -> None:
        self._prefix = f"[{stage}] " if stage else ""
        self._marks = marks
        self._max_metrics = max_metrics
        self._last_bucket: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int, metrics: Mapping[str, Any]) -> None:
        from npo.learning_signal import progress_notes  # stdlib only, like this module

        notes = progress_notes(phase, done, metrics)
        bucket = done * self._marks // total if total > 0 else done  # integers: no 0.3/0.1 < 3
        if phase in self._last_bucket and bucket <= self._last_bucket[phase] and not notes:
            return
        self._last_bucket[phase] = max(bucket, self._last_bucket.get(phase, bucket))
        print(self.format(phase, done, total, metrics), flush=True)
        for note in notes:  # a run that learns nothing says so in its pod's log too
            print(f"{self._prefix}warning: {note}", flush=True)

    def format(self, phase: str, done: int, total: int, metrics: Mapping[str, Any]) -> str:
        """The line printed for one event, e.g. `[train] grpo 40/100 (40%) reward/mean=0.51`."""
        percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        shown = [
            f"{key}={value:.4g}"
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ][: self._max_metrics]
        return " ".join([f"{self._prefix}{phase} {done}/{total}{percent}", *shown])


def resolve_runner(path: str) -> Runner:
    """Import a "package.module:function" path (the attribute part may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"stage runner {path!r} is not of the form 'module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"stage runner {path!r} is not callable")
    return target


def json_result(stage: str, result: Any) -> dict[str, Any]:
    """The stage's result as it travels over the wire (a JSON round trip), checked.

    Applied in both modes so a result is the same whether or not a step server ran it
    (tuples become lists, keys become strings) and a non-JSON value fails in both.
    """
    if not isinstance(result, dict):
        raise TypeError(f"stage {stage!r} returned {type(result).__name__}, expected a dict")
    return json.loads(encode(result))


def encode(message: dict[str, Any]) -> str:
    """A message as JSON (NaN/inf allowed: metrics may hold them)."""
    return json.dumps(message, separators=(",", ":"))


def call_stage(name: str, **params: Any) -> dict[str, Any]:
    """Run stage `name` with `params` (JSON values) and return its result dict.

    With NPO_STEP_SERVER set (a unix socket path), a warm worker of that server runs it with
    this process's environment, working directory, stdout and stderr; otherwise it runs
    here through the runner named by NPO_STAGE_RUNNER (default npo.stages:run_stage).
    Raises StageFailed when the stage raises or its worker dies.
    """
    params = json.loads(encode(params))  # same values in both modes; rejects non-JSON early
    address = os.environ.get(ENV_SERVER)
    if address:
        return _call_remote(address, name, params)
    return _call_local(name, params)


def _call_local(name: str, params: dict[str, Any]) -> dict[str, Any]:
    runner = resolve_runner(os.environ.get(ENV_RUNNER) or DEFAULT_RUNNER)
    try:
        return json_result(name, runner(name, progress=ProgressLogger(name), **params))
    except Exception as exc:
        import traceback  # only on failure: keeps the import of this module light

        raise StageFailed(name, describe(exc), traceback.format_exc()) from exc


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_stdio() -> list[int]:
    """The standard descriptors (1, 2) this process has open, flushed first so that what
    the worker writes to them comes after what this process wrote."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    fds = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    return fds


def _call_remote(
    address: str, name: str, params: dict[str, Any], key: bytes | None = None
) -> dict[str, Any]:
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client
    from multiprocessing.reduction import send_handle

    if key is None:
        key = bytes.fromhex(os.environ.get(ENV_SERVER_KEY, ""))
    try:
        conn = Client(address, family="AF_UNIX", authkey=key or None)
    except (OSError, EOFError, AuthenticationError) as exc:
        raise StageFailed(name, f"cannot reach the step server at {address}: {exc}") from exc
    with conn:
        fds = _open_stdio()
        request = {
            "name": name,
            "params": params,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "fds": fds,  # where the worker installs the descriptors sent after the request
        }
        try:
            conn.send(request)
            for fd in fds:
                send_handle(conn, fd, 0)  # SCM_RIGHTS over the unix socket
            # Blocks for as long as the stage runs.
            reply = conn.recv()
        except (EOFError, OSError) as exc:
            raise StageFailed(
                name,
                f"lost the connection to the step server at {address} (its worker died?): "
                f"{type(exc).__name__}",
            ) from exc
    if reply[0] == "ok":
        return reply[1]
    raise StageFailed(name, reply[1], reply[2])
