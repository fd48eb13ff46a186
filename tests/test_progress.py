"""What a run prints: bars on a terminal, full plain lines in a pipe, JSON lines for
machines (npo.progress)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from npo.learning_signal import NO_SIGNAL
from npo.progress import JsonProgress, PlainProgress, RichProgress, make_output


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


LONG = {"reward/mean": 0.5123, "actor/entropy": 1.25, "perf/step_time_s": 0.31}


def test_plain_lines_come_at_the_ends_at_evaluations_and_every_interval() -> None:
    out, clock = io.StringIO(), Clock()
    plain = PlainProgress(out, io.StringIO(), interval_s=5.0, clock=clock)
    for step in range(1, 101):  # one step a second
        metrics = dict(LONG)
        if step % 25 == 0:
            metrics["eval/accuracy"] = step / 100
        plain("grpo", step, 100, metrics)
        clock.now += 1.0
    lines = out.getvalue().splitlines()
    printed = [int(line.split()[1].split("/")[0]) for line in lines]
    # the first step, then every 5 s, the evaluations (25, 50, 75) and the last step
    assert printed == [
        1,
        6,
        11,
        16,
        21,
        25,
        30,
        35,
        40,
        45,
        50,
        55,
        60,
        65,
        70,
        75,
        80,
        85,
        90,
        95,
        100,
    ]
    assert lines[0] == "grpo 1/100 (1%) 0:00:00  reward 0.512  entropy 1.250  s/step 0.310"
    # the last evaluation is carried on, and a line is never cut to a terminal's width
    assert lines[-1] == (
        "grpo 100/100 (100%) 0:01:39  reward 0.512  eval 1.000  entropy 1.250  s/step 0.310"
    )


def test_plain_phases_keep_their_own_clock_and_a_warning_is_printed_at_once() -> None:
    out, clock = io.StringIO(), Clock()
    plain = PlainProgress(out, io.StringIO(), interval_s=5.0, clock=clock)
    plain("warm-up", 1, 10, {"sft/loss": 2.0})
    clock.now += 1.0
    plain("grpo", 1, 10, {})  # a new phase prints its first step at once
    plain("grpo", 2, 10, {NO_SIGNAL: 2.0, "reward/all_correct_frac": 0.0, "reward/mean": 0.0})
    lines = out.getvalue().splitlines()
    assert lines[0] == "warm-up 1/10 (10%) 0:00:00  loss 2.000"
    assert lines[1] == "grpo 1/10 (10%) 0:00:00"
    assert lines[2].startswith("grpo 2/10 (20%) 0:00:00  reward 0.000")
    assert lines[3].startswith("warning: grpo step 2: no learning signal for 2 policy steps")


def test_plain_messages_and_the_stopped_line_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    plain = PlainProgress(out, err)
    plain.notice("resuming run 'r' (interrupted): its last checkpoint is policy step 25")
    plain.summary({"run": "r", "final accuracy": 0.53125, "policy steps": 40})
    plain.stopped("interrupted", "SIGINT; run 'r' marked interrupted")
    assert out.getvalue().splitlines() == [
        "resuming run 'r' (interrupted): its last checkpoint is policy step 25",
        "run summary",
        "  run             r",
        "  final accuracy  0.5312",
        "  policy steps    40",
    ]
    assert err.getvalue() == "run interrupted: SIGINT; run 'r' marked interrupted\n"


def test_json_is_one_object_a_line_and_every_event() -> None:
    out = io.StringIO()
    machine = JsonProgress(out, clock=lambda: 1765000000.5)
    machine("grpo", 1, 3, {"reward/mean": 0.5, "actor/entropy": float("nan")})
    machine("grpo", 2, 3, {NO_SIGNAL: 2.0, "reward/all_correct_frac": 1.0, "reward/mean": 1.0})
    machine.notice("resuming run 'r'")
    machine.summary({"run": "r", "final accuracy": float("nan")})
    machine.stopped("failed", "task 'train' failed")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == [
        "progress",
        "progress",
        "warning",
        "notice",
        "summary",
        "stopped",
    ]
    assert events[0] == {
        "event": "progress",
        "time": 1765000000.5,
        "phase": "grpo",
        "done": 1,
        "total": 3,
        "metrics": {"reward/mean": 0.5, "actor/entropy": None},  # strict JSON: NaN is null
    }
    assert events[2]["phase"] == "grpo" and events[2]["step"] == 2
    assert "no learning signal" in events[2]["message"] and "all-correct" in events[2]["message"]
    assert events[4]["summary"] == {"run": "r", "final accuracy": None}
    assert events[5] == {
        "event": "stopped",
        "time": 1765000000.5,
        "status": "failed",
        "message": "task 'train' failed",
    }


@pytest.mark.parametrize(
    ("fmt", "terminal", "kind"),
    [
        ("auto", True, RichProgress),
        ("auto", False, PlainProgress),
        ("rich", False, RichProgress),
        ("plain", True, PlainProgress),
        ("json", True, JsonProgress),
    ],
)
def test_auto_is_bars_on_a_terminal_and_lines_elsewhere(fmt, terminal, kind) -> None:
    console = Console(file=io.StringIO(), force_terminal=terminal)
    assert isinstance(make_output(fmt, console, Console(file=io.StringIO())), kind)


def test_quiet_drops_progress_but_keeps_warnings_and_messages() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    quiet = make_output("plain", console, Console(file=io.StringIO()), quiet=True)
    with quiet:
        quiet("grpo", 1, 10, {"reward/mean": 0.5})
        quiet("grpo", 2, 10, {NO_SIGNAL: 2.0, "reward/all_correct_frac": 0.0, "reward/mean": 0.0})
        quiet.notice("report: r/report.md")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("warning: grpo step 2: no learning signal")
    assert lines[1] == "report: r/report.md"
    assert len(lines) == 2
    with pytest.raises(ValueError, match="log format 'xml': one of auto, rich, plain, json"):
        make_output("xml", console, console)
