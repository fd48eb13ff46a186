"""The run report: PNG + Markdown from a metric history, and the metrics.jsonl helpers."""

from __future__ import annotations

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


EVENTS = [
    {"step": 30, "label": "guide from step 45", "kind": "late"},
    {"step": 12, "label": "guide from step 20", "kind": "early"},
    {"step": 20, "label": "plateau → rollback", "kind": "auto"},
]


def test_events_lines_and_interventions_table(tmp_path) -> None:
    png, md = write_report(tmp_path, _history(), {}, title="npo", events=EVENTS)
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert "## Interventions" in text
    table = text[text.index("## Interventions") :]
    # Sorted by step, one row each, before the image link.
    for line in [
        "| step | kind | label |",
        "| 12 | early | guide from step 20 |",
        "| 20 | auto | plateau → rollback |",
        "| 30 | late | guide from step 45 |",
    ]:
        assert line in table, line
    assert table.index("| 12 |") < table.index("| 20 |") < table.index("| 30 |")
    assert text.index("## Interventions") < text.index("![training curves](report.png)")

    fig = report._figure(_history(), "npo", EVENTS)
    assert len(fig.axes) == 3
    for ax in fig.axes:  # one dashed vertical line per event on every panel, kind colours
        vlines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert sorted(ln.get_xdata()[0] for ln in vlines) == [12, 20, 30]
    colours = {
        ln.get_xdata()[0]: ln.get_color() for ln in fig.axes[0].lines if ln.get_linestyle() == "--"
    }
    assert colours == {12: "tab:orange", 20: "tab:olive", 30: "tab:purple"}


def test_no_events_no_interventions_section(tmp_path) -> None:
    _, md = write_report(tmp_path / "a", _history(), {}, title="grpo")
    assert "Interventions" not in md.read_text()
    _, md = write_report(tmp_path / "b", _history(), {}, title="grpo", events=[])
    assert "No interventions." in md.read_text()
    # Missing keys / unusable steps are tolerated.
    bad = [{"label": "no step"}, {"step": "x"}, {"step": 5}]
    _, md = write_report(tmp_path / "c", _history(), {}, title="grpo", events=bad)
    assert "| 5 | event |  |" in md.read_text()


def _rewind_history() -> list[dict]:
    # Global steps 0..29; policy 0..19, rollback to 10 at global 20, replay to 19.
    policy = list(range(20)) + list(range(10, 20))
    rows = []
    for g, p in enumerate(policy):
        row = {"step": g, "policy_step": p, "reward/mean": g / 30, "actor/entropy": 1.0}
        if g % 5 == 0:
            row["eval/accuracy"] = 0.3 + g / 100
        rows.append(row)
    return rows


def test_fourth_panel_only_on_rewind(tmp_path) -> None:
    straight = [{**r, "policy_step": r["step"]} for r in _history()]
    assert not report.has_rewind(straight) and not report.has_rewind(_history())
    assert len(report._figure(straight, "t").axes) == 3

    rows = _rewind_history()
    assert report.has_rewind(rows)
    fig = report._figure(rows, "t", [{"step": 20, "label": "rollback", "kind": "auto"}])
    assert len(fig.axes) == 4
    ax = fig.axes[3]
    assert "policy step" in ax.get_title().lower()
    policy_line = next(ln for ln in ax.lines if ln.get_label() == "policy step")
    assert list(policy_line.get_ydata()) == [r["policy_step"] for r in rows]
    assert fig.axes[3].get_xlabel() == "global step"

    png, _ = write_report(tmp_path, rows, {}, title="autonpo")
    assert png.read_bytes()[:8] == PNG_MAGIC and len(png.read_bytes()) > 20_000


def test_the_sampled_eval_is_a_second_line_of_the_eval_panel() -> None:
    rows = [
        {**r, "eval/mean_at_k": r["eval/accuracy"] / 2} for r in _history() if "eval/accuracy" in r
    ]
    lines = {ln.get_label(): ln for ln in report._figure(rows, "t").axes[1].lines}
    assert list(lines["mean@k"].get_ydata()) == [r["eval/mean_at_k"] for r in rows]
    assert list(lines["greedy pass@1"].get_ydata()) == [r["eval/accuracy"] for r in rows]
    # without train.eval_samples: the greedy line only
    assert [ln.get_label() for ln in report._figure(_history(), "t").axes[1].lines] == [
        "greedy pass@1"
    ]
