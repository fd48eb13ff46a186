"""The run report: PNG + Markdown from a metric history, and the metrics.jsonl helpers."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from npo import report
from npo.report import append_history, load_history, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(steps: int = 40, eval_every: int = 10) -> list[dict]:
    rows = []
    for s in range(steps):
        row = {"step": s, "reward/mean": s / steps, "actor/entropy": 2.0 - s / steps}
        if s % eval_every == 0 or s == steps - 1:
            row["eval/accuracy"] = 0.25 + s / 100
            row["eval/length_mean"] = 5.0
        rows.append(row)
    return rows


def test_doctests() -> None:
    assert doctest.testmod(report).failed == 0


def test_smooth_matches_loop() -> None:
    x = np.random.default_rng(0).normal(size=37)
    w = 5
    expected = [x[max(0, i + 1 - w) : i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(report.smooth(x, w), expected)


def test_write_report_png_and_markdown(tmp_path) -> None:
    summary = {
        "warmup_accuracy": 0.3125,
        "final_accuracy": 0.6425,
        "best_accuracy": 0.6425,
        "delta_points": 33.0,
        "steps": 40,
        "wall_time_s": 81.25,
        "tokens_per_s": 12345.6,
    }
    png, md = write_report(tmp_path / "run", _history(), summary, title="toy-grpo seed 0")
    assert png == tmp_path / "run" / "report.png" and md == tmp_path / "run" / "report.md"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000

    text = md.read_text()
    assert text.startswith("# toy-grpo seed 0\n")
    for line in [
        "| warmup_accuracy | 0.3125 |",
        "| final_accuracy | 0.6425 |",
        "| delta_points | 33 |",
        "| steps | 40 |",
        "| wall_time_s | 81.25 |",
        "| tokens_per_s | 12,346 |",
        "| step | accuracy | length_mean |",
        "| 0 | 0.25 | 5 |",
        "| 10 | 0.35 | 5 |",
        "| 39 | 0.64 | 5 |",
        "![training curves](report.png)",
    ]:
        assert line in text, line
    # Only eval steps appear in the eval table: 0, 10, 20, 30, 39.
    eval_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [int(ln.split("|")[1]) for ln in eval_rows] == [0, 10, 20, 30, 39]


def test_missing_series_and_single_point(tmp_path) -> None:
    png, md = write_report(tmp_path, [{"step": 0, "reward/mean": 0.5}], {}, title="one")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "No eval steps logged." in md.read_text()
    png, md = write_report(tmp_path / "empty", [], {"note": "a|b"}, title="empty")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "| note | a\\|b |" in md.read_text()


def test_replayed_steps_keep_last_value() -> None:
    rows = [{"step": 0, "x": 1.0}, {"step": 1, "x": 2.0}, {"step": 1, "x": 3.0}, {"step": 2}]
    steps, values = report._series(rows, "x")
    assert steps.tolist() == [0, 1] and values.tolist() == [1.0, 3.0]


def test_history_round_trip(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "reward/mean": 0.125, "eval/accuracy": 0.5},
        {"step": 1, "reward/mean": np.float32(0.25), "actor/entropy": float("nan")},
    ]
    for row in rows:
        append_history(path, row)
    loaded = load_history(path)
    assert loaded[0] == rows[0]
    assert loaded[1]["reward/mean"] == 0.25 and math.isnan(loaded[1]["actor/entropy"])
    assert len(path.read_text().splitlines()) == 2


def test_load_history_torn_last_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "rew')
    assert load_history(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_history(path)
