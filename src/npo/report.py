"""The run report: training curves as a PNG and a Markdown summary, from the metric history.

The history is the run's `metrics.jsonl`, one JSON object per logged step with key "step"
(the global step: every update counts, replays included), "policy_step" (where the policy
is; it goes back after an AutoNPO rollback) and whatever metrics that step produced
("reward/mean", "actor/entropy", and "eval/*" keys on eval steps only):

    append_history(run_dir / "metrics.jsonl", {"step": 3, "policy_step": 3, "reward/mean": 0.4})
    history = load_history(run_dir / "metrics.jsonl")
    events = [{"step": 20, "label": "guide from step 40", "kind": "early"}]
    png, md = write_report(run_dir, history, {"final_accuracy": 0.81}, "toy-npo", events)

A step that appears twice (a replay after a restart) is plotted once, with its last value.
Events (interventions) are dashed vertical lines at their global step, one colour per kind,
and an "Interventions" table in the Markdown. When the policy step ever goes back (a
rollback), a fourth panel plots policy step against global step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

REWARD, ACCURACY, ENTROPY = "reward/mean", "eval/accuracy", "actor/entropy"


# --------------------------------------------------------------------------- history
def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def append_history(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a JSON line and fsync, so a crash loses at most that row."""
    line = json.dumps(row, default=_jsonable) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_history(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl. A torn last line (a crash mid-write) is ignored; a bad line
    elsewhere raises ValueError naming the line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from e
    return rows


def _series(history: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key, sorted by step, last value per step, None skipped."""
    points: dict[int, float] = {}
    for row in history:
        value = row.get(key)
        if value is not None and "step" in row:
            points[int(row["step"])] = float(value)
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[int(s)] for s in steps], dtype=float)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average what exists so far.

    >>> smooth(np.array([0.0, 2.0, 4.0, 6.0]), 2).tolist()
    [0.0, 1.0, 3.0, 5.0]
    """
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


# --------------------------------------------------------------------------- figure
EVENT_COLORS = {
    "early": "tab:orange",
    "late": "tab:purple",
    "rolling": "tab:brown",
    "auto": "tab:olive",
}
OTHER_EVENT_COLOR = "tab:gray"


def event_color(kind: str) -> str:
    """The line colour of an event kind; unknown kinds are grey.

    >>> event_color("early"), event_color("whatever")
    ('tab:orange', 'tab:gray')
    """
    return EVENT_COLORS.get(kind, OTHER_EVENT_COLOR)


def clean_events(events: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Events with a usable step, sorted by step, with "label" and "kind" defaulted."""
    out = []
    for ev in events or []:
        step = ev.get("step")
        if step is None:
            continue
        try:
            step = int(step)
        except (TypeError, ValueError):
            continue
        out.append(
            {"step": step, "label": str(ev.get("label", "")), "kind": str(ev.get("kind", "event"))}
        )
    return sorted(out, key=lambda e: e["step"])


def draw_events(
    ax: Any, events: list[dict[str, Any]], color: str | None = None, text: bool = True
) -> None:
    """Dashed vertical lines at each event's step (colour by kind unless `color`), with the
    label written along the line near the top of the axes."""
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for ev in events:
        c = color or event_color(ev["kind"])
        ax.axvline(ev["step"], color=c, ls="--", lw=1.2, alpha=0.8, zorder=1)
        if text and ev["label"]:
            ax.text(
                ev["step"],
                0.98,
                f" {ev['label']}",
                transform=trans,
                rotation=90,
                ha="right",
                va="top",
                fontsize=7,
                color=c,
                clip_on=True,
            )


def policy_steps(history: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(global steps, policy steps) sorted by global step, last row per global step."""
    return _series(history, "policy_step")


def has_rewind(history: list[dict[str, Any]]) -> bool:
    """Whether the policy step ever goes back as the global step goes on (a rollback).

    >>> has_rewind([{"step": 0, "policy_step": 0}, {"step": 1, "policy_step": 1}])
    False
    >>> has_rewind([{"step": i, "policy_step": p} for i, p in enumerate([0, 1, 2, 1, 2])])
    True
    """
    _, pol = policy_steps(history)
    return bool(len(pol) > 1 and (np.diff(pol) < 0).any())


def _figure(
    history: list[dict[str, Any]], title: str, events: list[dict[str, Any]] | None = None
) -> Any:
    # Figure without pyplot: no global state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    events = clean_events(events)
    rewind = has_rewind(history)
    if rewind:
        fig = Figure(figsize=(8, 11), layout="constrained")
        axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 3, 1.8]})
    else:
        fig = Figure(figsize=(8, 9), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title, fontsize=13)

    steps, reward = _series(history, REWARD)
    ax = axes[0]
    if len(steps) >= 3:
        window = min(max(2, len(steps) // 10), 50)
        ax.plot(steps, reward, color="tab:blue", alpha=0.35, lw=1, marker=".", label="raw")
        ax.plot(steps, smooth(reward, window), color="tab:blue", lw=2, label=f"avg of {window}")
    elif len(steps):
        ax.plot(steps, reward, color="tab:blue", marker="o")
    ax.set_title("Train reward (mean over rollouts)")
    ax.set_ylabel("reward")

    steps, acc = _series(history, ACCURACY)
    ax = axes[1]
    if len(steps):
        ax.plot(steps, acc, color="tab:green", marker="o", lw=1.5, label="greedy pass@1")
        if acc.min() >= 0 and acc.max() <= 1:
            ax.set_ylim(-0.02, 1.02)
    sampled_steps, sampled = _series(history, "eval/mean_at_k")  # train.eval_samples
    if len(sampled_steps):
        ax.plot(sampled_steps, sampled, color="tab:olive", marker="s", lw=1.5, label="mean@k")
        ax.legend(loc="upper left", fontsize=7)
    ax.set_title("Eval accuracy (greedy pass@1)" + (", sampled mean@k" if len(sampled) else ""))
    ax.set_ylabel("accuracy")

    steps, ent = _series(history, ENTROPY)
    ax = axes[2]
    if len(steps):
        ax.plot(steps, ent, color="tab:red", lw=1.5, marker="." if len(steps) < 50 else None)
    ax.set_title("Policy entropy (nats/token)")
    ax.set_ylabel("entropy")

    if rewind:
        ax = axes[3]
        glob, pol = policy_steps(history)
        ax.plot(glob, glob, color="0.6", ls=":", lw=1, label="no rollback")
        ax.plot(glob, pol, color="tab:cyan", lw=1.8, drawstyle="steps-post", label="policy step")
        ax.set_title("Policy step vs global step (rollback + replay)", fontsize=10)
        ax.set_ylabel("policy step")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left", fontsize=7)
    axes[-1].set_xlabel("global step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if not ax.lines:  # before the event lines, which would count as lines
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        draw_events(ax, events)
    handles, labels = axes[0].get_legend_handles_labels()
    for kind in dict.fromkeys(ev["kind"] for ev in events):
        handles.append(Line2D([], [], color=event_color(kind), ls="--", lw=1.2))
        labels.append(kind)
    if handles:
        axes[0].legend(handles, labels, loc="lower right", fontsize=8)
    return fig


def _plot(
    history: list[dict[str, Any]],
    title: str,
    path: Path,
    events: list[dict[str, Any]] | None = None,
) -> None:
    _figure(history, title, events).savefig(path, dpi=110)


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def events_table(events: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of an events table (step, kind, label), or a sentence when empty."""
    if not events:
        return ["No interventions."]
    out = ["| step | kind | label |", "|---:|---|---|"]
    out += [f"| {ev['step']} | {_fmt(ev['kind'])} | {_fmt(ev['label'])} |" for ev in events]
    return out


def _markdown(
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    title: str,
    events: list[dict[str, Any]] | None = None,
) -> str:
    out = [f"# {title}", ""]
    if summary.get("warning"):  # first, where it is read: the numbers below may mislead
        out += [f"> **Warning:** {summary['warning']}", ""]
    out += ["| metric | value |", "|---|---:|"]
    out += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in summary.items()]

    eval_keys = sorted({k for row in history for k in row if k.startswith("eval/")})
    eval_keys.sort(key=lambda k: k != ACCURACY)  # accuracy first
    out += ["", "## Eval by step", ""]
    if eval_keys:
        cols = {k: dict(zip(*_series(history, k), strict=True)) for k in eval_keys}
        steps = sorted({s for col in cols.values() for s in col})
        out.append("| step | " + " | ".join(k.removeprefix("eval/") for k in eval_keys) + " |")
        out.append("|---:|" + "---:|" * len(eval_keys))
        for s in steps:
            cells = [_fmt(cols[k][s]) if s in cols[k] else "" for k in eval_keys]
            out.append(f"| {int(s)} | " + " | ".join(cells) + " |")
    else:
        out.append("No eval steps logged.")
    if events is not None:
        out += ["", "## Interventions", "", *events_table(clean_events(events))]
    out += ["", "![training curves](report.png)", ""]
    return "\n".join(out)


def write_report(
    run_dir: Path,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    title: str,
    events: list[dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write `run_dir/report.png` (reward, eval accuracy, entropy by global step, events as
    dashed lines; plus policy step vs global step if the policy step ever goes back) and
    `run_dir/report.md` (summary table, eval table, interventions table when `events` is
    given, image link); return both paths.

    `events`: [{"step": global step, "label": str, "kind": "early"|"late"|"rolling"|"auto"}].
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    png, md = run_dir / "report.png", run_dir / "report.md"
    _plot(history, title, png, events)
    md.write_text(_markdown(history, summary, title, events), encoding="utf-8")
    return png, md
