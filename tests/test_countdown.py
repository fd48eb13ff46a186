"""The Countdown task: generated problems, the safe expression verifier, the teacher style."""

from __future__ import annotations

import pytest

from npo.config import ConfigError, CountdownTaskConfig, load_config
from npo.tasks import CountdownTask, TaskError, make_task
from npo.tasks.countdown import (
    MAX_DEPTH,
    parse_expression,
    parse_prompt,
    verify_countdown,
)


@pytest.fixture(scope="module")
def task() -> CountdownTask:
    return CountdownTask(CountdownTaskConfig(n_train=300, n_eval=100))


@pytest.mark.parametrize(
    "response",
    ["7*3+9", "9+3*7", "3*7+9", "(3*7)+9", "((7*3)+9)", " 9 + 7 * 3 ", "9+7*3", "(9+7*3)"],
)
def test_many_responses_are_right(response):
    assert verify_countdown(response, [3, 7, 9], 30).reward == 1.0


def test_division_is_exact_and_the_order_of_operations_holds():
    assert verify_countdown("(8-2)/4*2", [8, 2, 4, 2], 3).reward == 1.0
    assert verify_countdown("8-2/4*2", [8, 2, 4, 2], 7).reward == 1.0  # 8 - 1
    # 7/2*2 is exactly 7 in rationals (a float or integer division would not say so)
    assert verify_countdown("7/2*2", [7, 2, 2], 7).reward == 1.0
    assert verify_countdown("9-7-1", [9, 7, 1], 1).reward == 1.0  # left-associative
    assert verify_countdown("(8-2)/4", [8, 2, 4], 1).reason == "wrong: got 3/2, want 1"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("3*9+7", "wrong: got 34, want 30"),
        ("3*7+7", "numbers: used 3,7,7, want each of 3,7,9 once"),
        ("3*7", "numbers: used 3,7, want each of 3,7,9 once"),
        ("30", "numbers: used 30, want each of 3,7,9 once"),
        ("9/(7-7)+3", "division by zero"),
        ("-3+9*7", "not an expression: expected a number or '(' at 0, found '-'"),
        ("3*7+9=30", "not an expression: unexpected '=30' at 5"),
        ("(3*7+9", "not an expression: missing ')' at 6"),
        ("3**7", "not an expression: expected a number or '(' at 2, found '*'"),
        ("3*7+", "not an expression: expected a number or '(' at 4, found the end"),
        (
            "__import__('os').system('x')",
            "not an expression: expected a number or '(' at 0, found '_'",
        ),
        ("３*7+9", "not an expression: expected a number or '(' at 0, found '３'"),
        ("3²+9", "not an expression: unexpected '²+9' at 1"),
        ("99999999*0+30", "not an expression: number 99999999 is not one of the given numbers"),
        ("3" * 65, "too long"),
    ],
)
def test_wrong_and_adversarial_responses_get_zero_and_a_reason(response, reason):
    verdict = verify_countdown(response, [3, 7, 9], 30)
    assert verdict.reward == 0.0
    assert verdict.reason == reason


def test_nesting_past_the_limit_is_refused_without_recursing_away():
    deep = "(" * (MAX_DEPTH + 1) + "9" + ")" * (MAX_DEPTH + 1)
    assert (
        verify_countdown(deep, [9], 9).reason
        == f"not an expression: nested deeper than {MAX_DEPTH}"
    )
    ok = "(" * MAX_DEPTH + "9" + ")" * MAX_DEPTH
    assert verify_countdown(ok, [9], 9).reward == 1.0
    # a long response can never reach Python's recursion limit: the length cap comes first
    assert verify_countdown("(" * 5000 + "9" + ")" * 5000, [9], 9).reason == "too long"


def test_parse_expression_returns_the_numbers_in_order():
    value, used = parse_expression("12*(5+1)")
    assert value == 72 and used == [12, 5, 1]


def test_every_gold_and_teacher_text_verifies_and_they_differ(task):
    problems = task.train_problems() + task.eval_problems()
    assert all(task.verify(p, p.target).reward == 1.0 for p in problems)
    assert all(task.verify(p, p.teacher).reward == 1.0 for p in problems)
    # the teacher's style: fully parenthesised, so never the warm-up's text
    assert all(p.teacher != p.target and p.teacher.startswith("(") for p in problems)


def test_problem_sets_are_deterministic_disjoint_and_in_range(task):
    again = CountdownTask(CountdownTaskConfig(n_train=300, n_eval=100))
    assert again.train_problems() == task.train_problems()
    assert again.eval_problems() == task.eval_problems()
    train = {p.prompt for p in task.train_problems()}
    evals = {p.prompt for p in task.eval_problems()}
    assert len(train) == 300 and len(evals) == 100 and not train & evals
    for p in task.train_problems():
        numbers, target = parse_prompt(p.prompt)
        assert len(numbers) == 3 and all(1 <= n <= 20 for n in numbers)
        assert numbers == sorted(numbers) and 1 <= target <= 99 and p.answer == str(target)
    other = CountdownTask(CountdownTaskConfig(n_train=300, n_eval=100, seed=7))
    assert other.eval_problems() != task.eval_problems()


def test_alphabet_covers_prompts_targets_and_teacher_texts(task):
    chars = set(task.alphabet())
    for p in task.train_problems():
        assert set(p.prompt + p.target + p.teacher) <= chars


def test_generated_solutions_follow_the_game_rules():
    """Intermediate values are positive integers, so '-' and '/' appear only where exact."""
    task = CountdownTask(
        CountdownTaskConfig(ops="-/", count=2, max_number=50, n_train=50, n_eval=10)
    )
    for p in task.train_problems():
        numbers, target = parse_prompt(p.prompt)
        big, small = max(numbers), min(numbers)
        assert target in {big - small, big // small} and (big - small == target or big % small == 0)


def test_too_few_distinct_prompts_is_refused_naming_the_settings():
    with pytest.raises(TaskError, match=r"only \d+ distinct countdown prompts for count=2"):
        CountdownTask(CountdownTaskConfig(count=2, max_number=3, n_train=100, n_eval=10))


def test_config_selects_the_task_and_checks_its_fields():
    cfg = load_config(
        None, ["task.kind=countdown", "task.count=4", "task.n_train=50", "task.n_eval=10"]
    )
    assert isinstance(make_task(cfg.task), CountdownTask)
    assert cfg.task.count == 4
    with pytest.raises(ConfigError, match=r"task\.(countdown\.)?ops"):
        load_config(None, ["task.kind=countdown", "task.ops=++"])
    with pytest.raises(ConfigError, match=r"task\.(countdown\.)?ops"):
        load_config(None, ["task.kind=countdown", "task.ops=x"])
