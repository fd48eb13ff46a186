"""Progress bars for local runs (rich), fed by the steps' progress callback."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from npo.learning_signal import NO_SIGNAL, no_signal_message

# Which metrics the bar shows, in order, with a short label.
_SHOWN = {
    "sft/loss": "loss",
    "reward/mean": "reward",
    "eval/accuracy": "eval",
    "actor/entropy": "entropy",
    "perf/step_time_s": "s/step",
}


class RichProgress:
    """A context manager and a `ProgressFn`: one bar per phase (warm-up, grpo, ...)."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<7}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self._tasks: dict[str, int] = {}
        self._last_eval: dict[str, float] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="")
        for key in ("eval/accuracy", "sft/eval_accuracy"):
            if key in metrics:
                self._last_eval[phase] = metrics[key]
        shown = {**metrics}
        if phase in self._last_eval:
            shown.setdefault("eval/accuracy", self._last_eval[phase])
        info = "  ".join(
            f"{label} {shown[key]:.3f}" for key, label in _SHOWN.items() if key in shown
        )
        self._progress.update(self._tasks[phase], completed=done, total=total, info=info)
        for note in notes(phase, done, metrics):
            # above the bars, where it stays when they move on
            self._progress.console.print(Text("warning: ", style="yellow") + Text(note))


def notes(phase: str, done: int, metrics: dict[str, float]) -> list[str]:
    """What a progress event asks to tell the user besides the bars: a run without
    learning signal (npo.learning_signal), e.g. "grpo step 10: no learning signal ..."."""
    if NO_SIGNAL not in metrics:
        return []
    message = no_signal_message(
        int(metrics[NO_SIGNAL]),
        metrics.get("reward/all_correct_frac", math.nan),
        metrics.get("reward/mean", math.nan),
    )
    return [f"{phase} step {done}: {message}"]
