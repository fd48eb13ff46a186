"""Several runs on one figure: eval accuracy and train reward by global step, side by side.

    runs = [
        RunCurves("grpo", load_history(a / "metrics.jsonl"), summary_a),
        RunCurves("autonpo", load_history(b / "metrics.jsonl"), summary_b, events=events_b),
    ]
    png, md = write_comparison(out_dir, runs, title="grpo vs autonpo", threshold=0.6)

The x axis is the global step (every update, replays included), so runs are compared at
equal compute. Each run's interventions are dashed vertical lines in that run's colour.
A pure function of its inputs: missing metrics or summary keys show as "-" / "no data".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npo.report import ACCURACY, REWARD, _fmt, _series, clean_events, draw_events, smooth

WALL_KEYS = ("wall time (s)", "wall_time_s")
MISSING = "-"


@dataclass
class RunCurves:
    """One run to compare: its label, metric history, summary and intervention events."""

    label: str
    history: list[dict]
    summary: dict[str, Any]
    events: list[dict] = field(default_factory=list)


def steps_to_threshold(
    history: list[dict[str, Any]], threshold: float, metric: str = ACCURACY
) -> int | None:
    """First global step whose eval accuracy (or `metric`) is >= `threshold`, or None.

    >>> h = [{"step": 0, "eval/accuracy": 0.3}, {"step": 5}, {"step": 10, "eval/accuracy": 0.6}]
    >>> steps_to_threshold(h, 0.5), steps_to_threshold(h, 0.6), steps_to_threshold(h, 0.9)
    (10, 10, None)
    """
    steps, acc = _series(history, metric)
    hits = np.flatnonzero(acc >= threshold)
    return int(steps[hits[0]]) if len(hits) else None


def accuracy_at(history: list[dict[str, Any]], step: int, metric: str = ACCURACY) -> float | None:
    """Eval accuracy (or `metric`) of the last eval at or before global `step` (None if none).

    Compares runs at equal compute: a baseline's accuracy after as many updates as another
    method spent.

    >>> h = [{"step": 0, "eval/accuracy": 0.3}, {"step": 5}, {"step": 10, "eval/accuracy": 0.6}]
    >>> accuracy_at(h, 9), accuracy_at(h, 10), accuracy_at(h, 99), accuracy_at(h, -1)
    (0.3, 0.6, 0.6, None)
    """
    steps, acc = _series(history, metric)
    upto = np.flatnonzero(steps <= step)
    return float(acc[upto[-1]]) if len(upto) else None


def _run_row(run: RunCurves, threshold: float | None) -> dict[str, Any]:
    _, acc = _series(run.history, ACCURACY)
    finite = np.isfinite(acc)
    row: dict[str, Any] = {
        "final": acc[-1] if len(acc) else None,
        "best": acc[finite].max() if finite.any() else None,
        # Gain over the first eval (the step-0 / warm-up eval in a normal run), in points.
        "gain": 100.0 * (acc[-1] - acc[0]) if len(acc) >= 2 else None,
    }
    if threshold is not None:
        reached = steps_to_threshold(run.history, threshold)
        row["to_threshold"] = "not reached" if reached is None else reached
    all_steps = [int(r["step"]) for r in run.history if isinstance(r.get("step"), int | float)]
    row["updates"] = max(all_steps) if all_steps else None
    row["wall"] = next((run.summary[k] for k in WALL_KEYS if k in run.summary), None)
    row["interventions"] = len(clean_events(run.events))
    return row


def _cell(value: Any, points: bool = False) -> str:
    if value is None:
        return MISSING
    if points and isinstance(value, float) and math.isfinite(value):
        return f"{value:+.1f}"
    return _fmt(value.item() if hasattr(value, "item") else value)


def _markdown(runs: list[RunCurves], title: str, threshold: float | None) -> str:
    out = [f"# {title}", ""]
    head = ["run", "final eval acc", "best eval acc", "gain (points)"]
    if threshold is not None:
        head.append(f"steps to {_fmt(threshold)}")
    head += ["total updates", "wall time (s)", "interventions"]
    out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        r = _run_row(run, threshold)
        cells = [_fmt(run.label), _cell(r["final"]), _cell(r["best"]), _cell(r["gain"], True)]
        if threshold is not None:
            cells.append(_cell(r["to_threshold"]))
        cells += [_cell(r["updates"]), _cell(r["wall"]), _cell(r["interventions"])]
        out.append("| " + " | ".join(cells) + " |")
    if not runs:
        out += ["", "No runs."]

    out += ["", "## Interventions"]
    for run in runs:
        events = clean_events(run.events)
        out += ["", f"### {run.label}", ""]
        if not events:
            out.append("No interventions.")
            continue
        out += ["| step | kind | label |", "|---:|---|---|"]
        out += [f"| {e['step']} | {_fmt(e['kind'])} | {_fmt(e['label'])} |" for e in events]
    out += ["", "![comparison](comparison.png)", ""]
    return "\n".join(out)


def _plot(runs: list[RunCurves], title: str, threshold: float | None, path: Path) -> None:
    # Figure without pyplot: no global state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 8), layout="constrained")
    ax_acc, ax_rew = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title, fontsize=13)
    colors = [f"C{i % 10}" for i in range(len(runs))]

    in_unit = True
    for run, color in zip(runs, colors, strict=True):
        steps, acc = _series(run.history, ACCURACY)
        if len(steps):
            ax_acc.plot(steps, acc, color=color, marker="o", ms=4, lw=1.5, label=run.label)
            in_unit &= bool(np.nanmin(acc) >= 0 and np.nanmax(acc) <= 1)
        steps, reward = _series(run.history, REWARD)
        if len(steps):
            window = min(max(2, len(steps) // 10), 50) if len(steps) >= 3 else 1
            ax_rew.plot(steps, smooth(reward, window), color=color, lw=1.8, label=run.label)

    if ax_acc.lines and in_unit:
        ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_title("Eval accuracy (greedy pass@1)")
    ax_acc.set_ylabel("accuracy")
    ax_rew.set_title("Train reward (trailing average)")
    ax_rew.set_ylabel("reward")
    ax_rew.set_xlabel("global step")
    ax_rew.xaxis.set_major_locator(MaxNLocator(integer=True))

    for ax in (ax_acc, ax_rew):
        ax.grid(True, alpha=0.3)
        if not ax.lines:  # before the event / threshold lines, which count as lines
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif len(runs):
            ax.legend(loc="lower right", fontsize=8)
        for run, color in zip(runs, colors, strict=True):
            # Colour is the run's, so the kind goes into the text.
            events = [
                {**e, "label": f"{e['kind']}: {e['label']}"} for e in clean_events(run.events)
            ]
            draw_events(ax, events, color=color, text=ax is ax_acc)
    if threshold is not None:
        ax_acc.axhline(threshold, color="black", ls="--", lw=1, alpha=0.7)
        ax_acc.annotate(
            f"threshold {_fmt(threshold)}",
            (0.0, threshold),
            xycoords=("axes fraction", "data"),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
        )
    fig.savefig(path, dpi=110)


def write_comparison(
    out_dir: Path, runs: list[RunCurves], title: str, threshold: float | None = None
) -> tuple[Path, Path]:
    """Write `out_dir/comparison.png` (eval accuracy and smoothed train reward per run by
    global step, events in each run's colour, `threshold` as a dashed line) and
    `out_dir/comparison.md` (one row per run: final / best eval accuracy, gain in points
    over the first eval, steps to `threshold`, total updates, wall time, interventions;
    then each run's interventions; then the image link); return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / "comparison.png", out_dir / "comparison.md"
    _plot(runs, title, threshold, png)
    md.write_text(_markdown(runs, title, threshold), encoding="utf-8")
    return png, md
