"""Comparison report of several runs: PNG + Markdown, steps to a threshold."""

from __future__ import annotations

from npo.report_compare import RunCurves, steps_to_threshold, write_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(accs: dict[int, float], steps: int) -> list[dict]:
    rows = []
    for s in range(steps + 1):
        row = {"step": s, "policy_step": s, "reward/mean": s / steps}
        if s in accs:
            row["eval/accuracy"] = accs[s]
        rows.append(row)
    return rows


# grpo: 0.25 → 0.5 at 40 (never ≥ 0.6): gain +25, best 0.55 at 30.
GRPO = _history({0: 0.25, 10: 0.3, 20: 0.45, 30: 0.55, 40: 0.5}, 40)
# autonpo: 0.25 → 0.75 at 50; first ≥ 0.6 at step 30: gain +50, best 0.75.
AUTO = _history({0: 0.25, 10: 0.35, 20: 0.55, 30: 0.625, 40: 0.7, 50: 0.75}, 50)
AUTO_EVENTS = [
    {"step": 25, "label": "guide from step 40", "kind": "late"},
    {"step": 15, "label": "guide from step 22", "kind": "auto"},
]


def test_steps_to_threshold() -> None:
    assert steps_to_threshold(AUTO, 0.6) == 30
    assert steps_to_threshold(AUTO, 0.25) == 0
    assert steps_to_threshold(GRPO, 0.6) is None
    assert steps_to_threshold([], 0.5) is None
    # Replayed step: the last value counts.
    rows = [{"step": 3, "eval/accuracy": 0.9}, {"step": 3, "eval/accuracy": 0.1}]
    assert steps_to_threshold(rows, 0.5) is None


def test_write_comparison(tmp_path) -> None:
    runs = [
        RunCurves("grpo", GRPO, {"wall time (s)": 81.25}),
        RunCurves("autonpo", AUTO, {"wall_time_s": 120.5}, events=AUTO_EVENTS),
    ]
    png, md = write_comparison(tmp_path / "cmp", runs, title="grpo vs autonpo", threshold=0.6)
    assert png == tmp_path / "cmp" / "comparison.png"
    assert md == tmp_path / "cmp" / "comparison.md"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000

    text = md.read_text()
    assert text.startswith("# grpo vs autonpo\n")
    header = "| run | final eval acc | best eval acc | gain (points) | steps to 0.6 | total updates"
    assert header in text
    assert "| grpo | 0.5 | 0.55 | +25.0 | not reached | 40 | 81.25 | 0 |" in text
    assert "| autonpo | 0.75 | 0.75 | +50.0 | 30 | 50 | 120.5 | 2 |" in text
    section = text[text.index("### autonpo") :]
    assert section.index("| 15 | auto | guide from step 22 |") < section.index(
        "| 25 | late | guide from step 40 |"
    )
    assert "No interventions." in text[text.index("### grpo") : text.index("### autonpo")]
    assert text.rstrip().endswith("![comparison](comparison.png)")


def test_no_threshold_and_missing_keys(tmp_path) -> None:
    runs = [
        RunCurves("empty", [], {}),
        RunCurves("no-eval", [{"step": 0}, {"step": 7, "reward/mean": 0.5}, {"x": 1}], {}),
        RunCurves("one-eval", [{"step": 0, "eval/accuracy": 0.4}], {}, events=[{"label": "?"}]),
    ]
    png, md = write_comparison(tmp_path, runs, title="odd")
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert "steps to" not in text
    assert "| empty | - | - | - | - | - | 0 |" in text
    assert "| no-eval | - | - | - | 7 | - | 0 |" in text
    assert "| one-eval | 0.4 | 0.4 | - | 0 | - | 0 |" in text

    png, md = write_comparison(tmp_path / "none", [], title="nothing", threshold=0.5)
    assert png.read_bytes()[:8] == PNG_MAGIC and "No runs." in md.read_text()
