"""What `npo run` and `npo compare` print while they work, in one of three formats.

- rich: live bars (one per phase: warm-up, grpo, ...), for a terminal;
- plain: one full line per progress event, at most every `interval_s` per phase but always
  at a phase's first and last step, an evaluation and a warning: for a pipe or a log file,
  where bars would be redrawn into nothing and cut at 80 columns;
- json: one JSON object per line and event (`{"event": "progress", ...}`), for machines.

Each is a context manager and a `ProgressFn` (the steps' progress callback), plus the run's
other messages: notices (a resumed run), warnings, the summary, the comparison, the line
that ends an interrupted or failed run. `make_output("auto", ...)` picks rich on a terminal
and plain elsewhere.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import IO, Any, Literal, Protocol, get_args

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from npo.learning_signal import progress_notes

LogFormat = Literal["auto", "rich", "plain", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)

# Which metrics a bar or a line shows, in order, with a short label.
_SHOWN = {
    "sft/loss": "loss",
    "reward/mean": "reward",
    "eval/accuracy": "eval",
    "eval/mean_at_k": "mean@k",
    "actor/entropy": "entropy",
    "perf/step_time_s": "s/step",
}
_EVAL_KEYS = ("eval/accuracy", "sft/eval_accuracy")


class RunOutput(Protocol):
    """What the CLI prints through while a run works (see the module docstring)."""

    def __enter__(self) -> RunOutput: ...
    def __exit__(self, *exc: object) -> None: ...
    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None: ...
    def notice(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def summary(self, summary: Mapping[str, Any]) -> None: ...
    def comparison(self, markdown: str, files: Mapping[str, str]) -> None: ...
    def stopped(self, status: str, message: str) -> None: ...


class _Evals:
    """The last evaluation of each phase: shown with the later events of that phase."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def shown(self, phase: str, metrics: Mapping[str, float]) -> dict[str, float]:
        for key in _EVAL_KEYS:
            if key in metrics:
                self._last[phase] = metrics[key]
        shown = dict(metrics)
        if phase in self._last:
            shown.setdefault("eval/accuracy", self._last[phase])
        return shown


def _info(shown: Mapping[str, float]) -> str:
    return "  ".join(f"{label} {shown[key]:.3f}" for key, label in _SHOWN.items() if key in shown)


class RichProgress:
    """Live bars on a terminal, one per phase; messages print above them."""

    def __init__(self, console: Console | None = None, err: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<7}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self._console = self._progress.console
        self._err = err or Console(stderr=True)
        self._tasks: dict[str, int] = {}
        self._evals = _Evals()

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="")
        info = _info(self._evals.shown(phase, metrics))
        self._progress.update(self._tasks[phase], completed=done, total=total, info=info)
        for note in progress_notes(phase, done, metrics):
            self.warning(note)  # above the bars, where it stays when they move on

    def notice(self, text: str) -> None:
        self._console.print(Text(text))

    def warning(self, text: str) -> None:
        self._console.print(Text("warning: ", style="yellow") + Text(text))

    def summary(self, summary: Mapping[str, Any]) -> None:
        table = Table(title="run summary", show_header=False)
        for key, value in summary.items():
            table.add_row(key, _value_text(value))
        self._console.print(table)

    def comparison(self, markdown: str, files: Mapping[str, str]) -> None:
        self._console.print(markdown, markup=False, highlight=False)
        self._console.print(Text(" and ".join(files.values()), style="bold"))

    def stopped(self, status: str, message: str) -> None:
        self._err.print(Text(f"run {status}: ", style="bold red") + Text(message))


class PlainProgress:
    """Full lines, never redrawn or cut: `grpo 40/150 (27%) 0:00:13  reward 0.512 ...`.

    A phase prints its first and last event, every event with an evaluation or a warning,
    and otherwise at most one line per `interval_s`."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        err: IO[str] | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = stream or sys.stdout
        self._err = err or sys.stderr
        self._interval = interval_s
        self._clock = clock
        self._started: dict[str, float] = {}
        self._printed: dict[str, float] = {}
        self._evals = _Evals()
        self._lock = threading.Lock()  # events come from the step server's reader thread

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.flush()

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        now = self._clock()
        start = self._started.setdefault(phase, now)
        notes = progress_notes(phase, done, metrics)
        due = (
            phase not in self._printed
            or done >= total
            or any(k in metrics for k in _EVAL_KEYS)
            or notes
            or now - self._printed[phase] >= self._interval
        )
        if not due:
            return
        self._printed[phase] = now
        percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        elapsed = timedelta(seconds=int(now - start))
        info = _info(self._evals.shown(phase, metrics))
        self._write(self._out, f"{phase} {done}/{total}{percent} {elapsed}  {info}".rstrip())
        for note in notes:
            self.warning(note)

    def _write(self, stream: IO[str], line: str) -> None:
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def notice(self, text: str) -> None:
        self._write(self._out, text)

    def warning(self, text: str) -> None:
        self._write(self._out, f"warning: {text}")

    def summary(self, summary: Mapping[str, Any]) -> None:
        width = max((len(k) for k in summary), default=0)
        lines = [f"  {k:<{width}}  {_value_text(v)}" for k, v in summary.items()]
        self._write(self._out, "\n".join(["run summary", *lines]))

    def comparison(self, markdown: str, files: Mapping[str, str]) -> None:
        self._write(self._out, markdown.rstrip("\n"))
        self._write(self._out, " and ".join(files.values()))

    def stopped(self, status: str, message: str) -> None:
        self._write(self._err, f"run {status}: {message}")


class JsonProgress:
    """One JSON object per line: {"event": "progress" | "notice" | "warning" | "summary" |
    "comparison" | "stopped", "time": unix seconds, ...}; non-finite numbers as null."""

    def __init__(
        self, stream: IO[str] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._out = stream or sys.stdout
        self._clock = clock
        self._lock = threading.Lock()

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.flush()

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(self._clock(), 3), **fields}
        line = json.dumps(_finite(record), allow_nan=False, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        self.emit("progress", phase=phase, done=done, total=total, metrics=dict(metrics))
        for note in progress_notes(phase, done, metrics):
            self.emit("warning", phase=phase, step=done, message=note)

    def notice(self, text: str) -> None:
        self.emit("notice", message=text)

    def warning(self, text: str) -> None:
        self.emit("warning", message=text)

    def summary(self, summary: Mapping[str, Any]) -> None:
        self.emit("summary", summary=dict(summary))

    def comparison(self, markdown: str, files: Mapping[str, str]) -> None:
        self.emit("comparison", markdown=markdown, files=dict(files))

    def stopped(self, status: str, message: str) -> None:
        self.emit("stopped", status=status, message=message)


class _Quiet:
    """Drops progress events; passes every message on (`--quiet`)."""

    def __init__(self, inner: RunOutput) -> None:
        self._inner = inner

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        for note in progress_notes(phase, done, metrics):
            self._inner.warning(note)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def make_output(log_format: str, console: Console, err: Console, quiet: bool = False) -> RunOutput:
    """The output for `--log-format` (auto: rich on a terminal, plain elsewhere); quiet: no
    progress events, the other messages still."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    if log_format == "auto":
        log_format = "rich" if console.is_terminal else "plain"
    output: RunOutput
    if log_format == "rich":
        output = RichProgress(console, err)
    elif log_format == "plain":
        output = PlainProgress(console.file, err.file)
    else:
        output = JsonProgress(console.file)
    return _Quiet(output) if quiet else output


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
