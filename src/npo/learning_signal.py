"""Runs that train nothing: no learning signal in RL, or a warm-up that memorised.

GRPO learns only from groups whose rewards differ: a group where all G responses are right
(or all wrong) has zero advantages, so a step whose every group is like that
(`reward/zero_var_frac` = 1) leaves the policy as it was. After `train.no_signal_steps` such
steps in a row the train stage logs `NO_SIGNAL` with that step's metrics and says so (log,
progress), and the run's summary carries the warning with advice that depends on why.

A warm-up whose train loss is near 0 while its eval accuracy stays low learnt its train
prompts by heart, not the task: more warm-up steps make that worse, not better.

Pure functions of metric rows (the history: one dict per global step).
Tests: .venv/bin/python -m pytest tests/test_no_signal.py -q
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

ZERO_VAR = "reward/zero_var_frac"  # groups whose rewards are all equal (on-policy)
# the same over the groups trained on, logged when a slot-G source (guidance, a teacher,
# a replay) mixed rows in: a guide row can give an all-wrong group its signal
TRAINED_ZERO_VAR = "reward/trained_zero_var_frac"
NO_SIGNAL = "warn/no_signal_steps"  # logged at the step where a streak reaches the limit
MEMORISED_LOSS = 0.01  # warm-up train loss below this ...
MEMORISED_ACCURACY = 0.10  # ... with eval accuracy below this: memorised


def without_signal(row: Mapping[str, Any]) -> bool:
    """Whether the step of `row` had no group with differing rewards (no gradient)."""
    value = row.get(TRAINED_ZERO_VAR, row.get(ZERO_VAR))
    return value is not None and value >= 1.0


def trailing_streak(rows: Sequence[Mapping[str, Any]]) -> int:
    """Steps in a row without signal at the end of `rows` (a resumed segment goes on
    counting from its history); a row without rollout metrics (the warm-up) ends it."""
    streak = 0
    for row in reversed(rows):
        if not without_signal(row):
            break
        streak += 1
    return streak


def no_signal_advice(all_correct_frac: float, reward_mean: float) -> str:
    """Why the groups had no signal and what to change, from the streak's rewards."""
    if all_correct_frac >= 0.999:
        return (
            "every group was all-correct: the task is too easy for the policy, or the "
            "warm-up memorised the train set; use fewer warmup.steps (or a lower "
            "warmup.target_accuracy), more training data, or a larger rollout.group_size"
        )
    if reward_mean <= 0.001:
        return (
            "every group was all-wrong: the task is too hard for the policy; warm up more "
            "(raise warmup.steps or warmup.target_accuracy) or use an easier task"
        )
    return (
        f"every group was all-correct ({all_correct_frac:.0%} of them) or all-wrong: "
        "raise rollout.group_size or rollout.temperature so that a group's answers differ"
    )


def no_signal_message(steps: int, all_correct_frac: float, reward_mean: float) -> str:
    """The line the progress and the logs show when a streak reaches `steps`."""
    return (
        f"no learning signal for {steps} policy steps in a row (reward/zero_var_frac = 1, "
        f"every advantage 0, nothing learnt): {no_signal_advice(all_correct_frac, reward_mean)}"
    )


def _longest_streak(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    best: list[Mapping[str, Any]] = []
    current: list[Mapping[str, Any]] = []
    for row in rows:
        current = [*current, row] if without_signal(row) else []
        if len(current) > len(best):
            best = current
    return best


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else math.nan


def no_signal_warning(rows: Sequence[Mapping[str, Any]], limit: int) -> str | None:
    """The summary's warning when `limit` or more policy steps in a row had no signal
    (`rows`: the run's history), else None."""
    streak = _longest_streak(rows)
    if len(streak) < limit:
        return None
    trained = sum(1 for r in rows if r.get(ZERO_VAR) is not None)
    span = f"steps {streak[0].get('step', '?')}-{streak[-1].get('step', '?')} of {trained}"
    advice = no_signal_advice(
        _mean(streak, "reward/all_correct_frac"), _mean(streak, "reward/mean")
    )
    return (
        f"no learning signal for {len(streak)} RL steps in a row ({span}; "
        "reward/zero_var_frac = 1, so every advantage was 0 and the updates did nothing): "
        f"{advice}"
    )


def memorised_warning(warmup_row: Mapping[str, Any]) -> str | None:
    """The summary's warning when the warm-up (history row 0) got its train loss near 0
    but its eval accuracy stayed low: it memorised the train prompts; else None."""
    loss, accuracy = warmup_row.get("warmup/train_loss"), warmup_row.get("eval/accuracy")
    if loss is None or accuracy is None:
        return None
    if not (loss < MEMORISED_LOSS and accuracy < MEMORISED_ACCURACY):
        return None
    return (
        f"the warm-up memorised its train prompts: train loss {loss:.2g} but eval accuracy "
        f"{accuracy:.1%}, so it learnt those answers, not the task (more warm-up steps will "
        "not help); use more training data, fewer warmup.steps, or a smaller model"
    )


def progress_notes(phase: str, done: int, metrics: Mapping[str, float]) -> list[str]:
    """What a progress event asks to tell the user besides the numbers: a run without
    learning signal, e.g. "grpo step 10: no learning signal ..." (bars, log lines, pod
    logs)."""
    if NO_SIGNAL not in metrics:
        return []
    message = no_signal_message(
        int(metrics[NO_SIGNAL]),
        metrics.get("reward/all_correct_frac", math.nan),
        metrics.get("reward/mean", math.nan),
    )
    return [f"{phase} step {done}: {message}"]
