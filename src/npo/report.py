"""The run report: training curves as a PNG and a Markdown summary, from the metric history.

The history is the run's `metrics.jsonl`, one JSON object per logged step with key "step"
(the policy step) and whatever metrics that step produced ("reward/mean",
"actor/entropy", and "eval/*" keys on eval steps only):

    append_history(run_dir / "metrics.jsonl", {"step": 3, "reward/mean": 0.4})
    history = load_history(run_dir / "metrics.jsonl")
    png, md = write_report(run_dir, history, {"final_accuracy": 0.81}, title="toy-grpo")

A step that appears twice (a replay after a restart) is plotted once, with its last value.
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
def _plot(history: list[dict[str, Any]], title: str, path: Path) -> None:
    # Figure without pyplot: no global state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 9), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title, fontsize=13)

    steps, reward = _series(history, REWARD)
    ax = axes[0]
    if len(steps) >= 3:
        window = min(max(2, len(steps) // 10), 50)
        ax.plot(steps, reward, color="tab:blue", alpha=0.35, lw=1, marker=".", label="raw")
        ax.plot(steps, smooth(reward, window), color="tab:blue", lw=2, label=f"avg of {window}")
        ax.legend(loc="lower right", fontsize=8)
    elif len(steps):
        ax.plot(steps, reward, color="tab:blue", marker="o")
    ax.set_title("Train reward (mean over rollouts)")
    ax.set_ylabel("reward")

    steps, acc = _series(history, ACCURACY)
    ax = axes[1]
    if len(steps):
        ax.plot(steps, acc, color="tab:green", marker="o", lw=1.5)
        if acc.min() >= 0 and acc.max() <= 1:
            ax.set_ylim(-0.02, 1.02)
    ax.set_title("Eval accuracy (greedy pass@1)")
    ax.set_ylabel("accuracy")

    steps, ent = _series(history, ENTROPY)
    ax = axes[2]
    if len(steps):
        ax.plot(steps, ent, color="tab:red", lw=1.5, marker="." if len(steps) < 50 else None)
    ax.set_title("Policy entropy (nats/token)")
    ax.set_ylabel("entropy")
    ax.set_xlabel("policy step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110)


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


def _markdown(history: list[dict[str, Any]], summary: dict[str, Any], title: str) -> str:
    out = [f"# {title}", "", "| metric | value |", "|---|---:|"]
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
    out += ["", "![training curves](report.png)", ""]
    return "\n".join(out)


def write_report(
    run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any], title: str
) -> tuple[Path, Path]:
    """Write `run_dir/report.png` (reward, eval accuracy, entropy by policy step) and
    `run_dir/report.md` (summary table, eval table, image link); return both paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    png, md = run_dir / "report.png", run_dir / "report.md"
    _plot(history, title, png)
    md.write_text(_markdown(history, summary, title), encoding="utf-8")
    return png, md
