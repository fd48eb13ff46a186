"""Runs that train nothing are said to: no learning signal (every group all-correct or
all-wrong for train.no_signal_steps steps in a row) and a warm-up that memorised its train
prompts, in the progress, the summary and the report, with the advice that fits.

Pure functions on hand-made histories, then one seconds-long run of the direct engine.

Run: .venv/bin/python -m pytest tests/test_no_signal.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

from helpers import write_tiny_config
from rich.console import Console

from npo.config import load_config
from npo.experiment import run_experiment, summarize
from npo.learning_signal import (
    NO_SIGNAL,
    TRAINED_ZERO_VAR,
    memorised_warning,
    no_signal_warning,
    progress_notes,
    trailing_streak,
)
from npo.progress import RichProgress
from npo.report import write_report
from npo.steps.train_segment import note_signal
from npo.store.artifacts import open_store

WARMUP = {"step": 0, "policy_step": 0, "eval/accuracy": 0.5, "warmup/steps": 100.0}


def step(n: int, zero_var: float, all_correct: float, reward: float, **more: float) -> dict:
    """One RL row of a history."""
    return {
        "step": n,
        "policy_step": n,
        "reward/zero_var_frac": zero_var,
        "reward/all_correct_frac": all_correct,
        "reward/mean": reward,
        "perf/step_time_s": 0.1,
        **more,
    }


def history(*rows: dict) -> list[dict]:
    return [WARMUP, *rows]


ALL_CORRECT = [step(n, 1.0, 1.0, 1.0) for n in range(1, 21)]
ALL_WRONG = [step(n, 1.0, 0.0, 0.0) for n in range(1, 21)]


def test_streaks_count_steps_without_signal_at_the_end():
    assert trailing_streak(history(*ALL_CORRECT)) == 20  # the warm-up row ends it
    assert trailing_streak(history(step(1, 0.5, 0.2, 0.5), *ALL_WRONG[1:4])) == 3
    assert trailing_streak(history(*ALL_WRONG[:3], step(4, 0.75, 0.5, 0.6))) == 0
    # guide rows can give a group its signal: what was trained on counts
    assert trailing_streak(history(step(1, 1.0, 0.0, 0.0, **{TRAINED_ZERO_VAR: 0.5}))) == 0


def test_all_correct_groups_say_too_easy_or_memorised():
    warning = no_signal_warning(history(*ALL_CORRECT), limit=10)
    assert warning is not None
    assert "no learning signal for 20 RL steps in a row (steps 1-20 of 20" in warning
    assert "all-correct" in warning and "too easy" in warning
    assert "fewer warmup.steps" in warning and "more training data" in warning
    assert "rollout.group_size" in warning


def test_all_wrong_groups_say_too_hard():
    warning = no_signal_warning(history(*ALL_WRONG), limit=10)
    assert warning is not None
    assert "all-wrong" in warning and "too hard" in warning
    assert "raise warmup.steps" in warning and "easier task" in warning


def test_a_mix_of_both_asks_for_larger_groups():
    mixed = [step(n, 1.0, 0.5, 0.5) for n in range(1, 11)]
    warning = no_signal_warning(history(*mixed), limit=10)
    assert warning is not None and "raise rollout.group_size or rollout.temperature" in warning


def test_no_warning_below_the_limit_or_with_a_broken_streak():
    assert no_signal_warning(history(*ALL_WRONG[:9]), limit=10) is None
    broken = [*ALL_WRONG[:9], step(10, 0.5, 0.0, 0.2), *ALL_WRONG[10:19]]
    assert no_signal_warning(history(*broken), limit=10) is None
    assert no_signal_warning(history(*broken), limit=9) is not None
    assert no_signal_warning([WARMUP], limit=1) is None  # train.steps 0


def test_the_train_step_marks_where_the_streak_reaches_the_limit():
    cfg = load_config(None, ["train.no_signal_steps=3"])
    streak, marked = 0, []
    for n, zero_var in enumerate([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0], start=1):
        metrics = {"reward/zero_var_frac": zero_var}
        streak = note_signal(cfg, metrics, streak)
        if NO_SIGNAL in metrics:
            marked.append((n, metrics[NO_SIGNAL]))
    assert marked == [(6, 3.0)]  # once per streak, not at every later step


def test_the_progress_says_so():
    metrics = {NO_SIGNAL: 10.0, "reward/all_correct_frac": 1.0, "reward/mean": 1.0}
    (note,) = progress_notes("grpo", 10, metrics)
    assert note.startswith("grpo step 10: no learning signal for 10 policy steps in a row")
    assert "all-correct" in note
    assert progress_notes("grpo", 3, {"reward/mean": 0.5}) == []
    out = io.StringIO()
    with RichProgress(Console(file=out, width=300)) as progress:
        progress("grpo", 10, 20, metrics)
    assert "warning: grpo step 10: no learning signal" in out.getvalue()


def test_a_memorised_warmup():
    memorised = {**WARMUP, "eval/accuracy": 0.04, "warmup/train_loss": 0.0005}
    warning = memorised_warning(memorised)
    assert warning is not None
    assert "memorised its train prompts: train loss 0.0005 but eval accuracy 4.0%" in warning
    assert "more warm-up steps will not help" in warning
    assert memorised_warning({**memorised, "eval/accuracy": 0.3}) is None  # it generalises
    assert memorised_warning({**memorised, "warmup/train_loss": 0.4}) is None  # not learnt
    assert memorised_warning(WARMUP) is None  # no warm-up steps: no loss


def fake_run(tmp_path: Path, rows: list[dict], *overrides: str) -> SimpleNamespace:
    """What summarize reads of a run: config, history, store (no guidance), tracker."""
    return SimpleNamespace(
        cfg=load_config(None, list(overrides)),
        run_id="r",
        history=lambda: rows,
        store=open_store((tmp_path / "artifacts").as_uri()),
        tracker=SimpleNamespace(run_id=None),
    )


def test_the_summary_replaces_the_cap_advice_of_a_memorised_warmup(tmp_path):
    warmup = {**WARMUP, "eval/accuracy": 0.04, "warmup/train_loss": 0.0005}
    summary = summarize(fake_run(tmp_path, [warmup, *ALL_CORRECT]), 1.0)
    assert "memorised its train prompts" in summary["warning"]
    assert "raise warmup.steps or lower warmup.lr" not in summary["warning"]  # wrong advice
    assert "no learning signal for 20 RL steps" in summary["warning"]
    # a warm-up that just stopped early still gets the cap advice
    early = {**WARMUP, "eval/accuracy": 0.04, "warmup/train_loss": 0.8}
    summary = summarize(fake_run(tmp_path, [early, *ALL_WRONG[:5]]), 1.0)
    assert "stopped at its cap" in summary["warning"]
    assert "no learning signal" not in summary["warning"]
    assert "warning" not in summarize(fake_run(tmp_path, [WARMUP, *ALL_WRONG[:5]]), 1.0)


def test_the_report_shows_the_warning_first(tmp_path):
    summary = {"warning": "no learning signal for 20 RL steps in a row", "run": "r"}
    _, md = write_report(tmp_path, history(*ALL_WRONG), summary, "grpo · r")
    text = md.read_text()
    assert "> **Warning:** no learning signal for 20 RL steps" in text
    assert text.index("**Warning:**") < text.index("| metric | value |")


def test_a_run_without_signal_says_so(tmp_path: Path, one_thread) -> None:
    """An untrained policy (no warm-up) gets every 2-digit sum wrong: no group has a
    correct response, so the run learns nothing, and its progress, summary and report
    say why."""
    root = tmp_path / "runs"
    path = write_tiny_config(
        tmp_path / "c.yaml",
        root,
        "flat",
        4,
        warmup={"steps": 0, "target_accuracy": None},
        rollout={"prompts_per_step": 2, "group_size": 2},
        train={"eval_every": 4, "checkpoint_every": 4, "eval_size": 4, "no_signal_steps": 3},
        tracking={"enabled": False},
    )
    out = io.StringIO()
    with RichProgress(Console(file=out, width=300)) as progress:
        summary = run_experiment(load_config(path), progress=progress)
    assert "no learning signal for 3 policy steps in a row" in out.getvalue()
    assert "all-wrong" in summary["warning"] and "too hard" in summary["warning"]
    assert "no learning signal for 4 RL steps" in summary["warning"]
    saved = json.loads((root / "flat" / "summary.json").read_text())
    assert saved["warning"] == summary["warning"]
    assert "> **Warning:** no learning signal" in (root / "flat" / "report.md").read_text()
    rows = [json.loads(line) for line in (root / "flat" / "metrics.jsonl").open()]
    assert [r.get(NO_SIGNAL) for r in rows] == [None, None, None, 3.0, None]
