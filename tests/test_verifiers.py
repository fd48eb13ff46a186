"""Verifiers: right answers pass, everything else gets reward 0 with a reason, fast, no raise."""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from npo.config import ArithmeticTaskConfig, MathTaskConfig
from npo.tasks import ArithmeticTask, MathTask, Problem, TaskError, Verdict
from npo.tasks.arithmetic import verify_arithmetic
from npo.tasks.math_jsonl import MathVerifier

pytestmark = pytest.mark.timeout(60)  # a hang fails the test instead of stalling the suite

DATA = Path(__file__).parent / "data"
CORRECT = Verdict(1.0, "correct")
TIMEOUT = Verdict(0.0, "timeout")


def _random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x110000)) for _ in range(n))  # incl. NULs, surrogates


# Model outputs that must never crash or hang a verifier.
ADVERSARIAL = {
    "empty": "",
    "whitespace": " \t\n\r ",
    "garbage": "asdf qwerty ?!",
    "nines_10k": "9" * 10000,
    "arabic_indic_digits": "٣٥٩",
    "fullwidth_digits": "３５９",
    "superscript_digits": "³⁵⁹",
    "emoji": "😀🔥",
    "nul": "\x00",
    "nul_in_digits": "35\x009",
    "lone_surrogate": "\ud800",
    "random_10k": _random_text(10000, 0),
    "random_3k": _random_text(3000, 1),
    "signed": "-359",
    "float": "3.59e2",
    "unbalanced_frac": "\\frac{1}{2",
    "frac_bomb": "\\frac{" * 500,
    "nested_frac": "\\frac{" * 300 + "1" + "}{2}" * 300,
    "brace_bomb": "{" * 3000,
    "sqrt_bomb": "\\sqrt{" * 600,
    "left_bomb": "\\left(" * 600,
    "matrix_bomb": "\\begin{pmatrix}" * 200,
    "dollar_bomb": "$" * 3999,
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_power": "$10^{10^{10}}$",
    "factorial_tower": "\\boxed{100!!!}",
}


# --------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(
    ("response", "fmt", "expected"),
    [
        ("359", "plain", CORRECT),
        ("0359", "plain", CORRECT),
        ("00000359", "plain", CORRECT),
        (" 359\n", "plain", CORRECT),
        ("358", "plain", Verdict(0.0, "wrong: got 358, want 359")),
        ("3590", "plain", Verdict(0.0, "wrong: got 3590, want 359")),
        ("9530", "reversed", CORRECT),
        ("953", "reversed", CORRECT),
        ("359", "reversed", Verdict(0.0, "wrong: got 953, want 359")),
        ("0953", "reversed", Verdict(0.0, "wrong: got 3590, want 359")),
    ],
)
def test_arithmetic_answers(response, fmt, expected):
    assert verify_arithmetic(response, "359", fmt) == expected


def test_arithmetic_zero():
    assert verify_arithmetic("0", "0") == CORRECT
    assert verify_arithmetic("000", "0", "reversed") == CORRECT
    assert verify_arithmetic("010", "0") == Verdict(0.0, "wrong: got 10, want 0")


@pytest.mark.parametrize("fmt", ["plain", "reversed"])
@pytest.mark.parametrize("operation", ["add", "sub", "mul"])
def test_every_target_verifies(fmt, operation):
    task = ArithmeticTask(
        ArithmeticTaskConfig(digits=4, operation=operation, answer_format=fmt, n_train=10)
    )
    problems = task.eval_problems()
    assert task.verify_batch(problems, [p.target for p in problems]) == [CORRECT] * len(problems)
    # a rotated pairing is (almost surely) wrong for every problem
    shifted = [p.target for p in problems[1:] + problems[:1]]
    verdicts = task.verify_batch(problems, shifted)
    assert sum(v.reward for v in verdicts) <= 2
    assert verdicts == [task.verify(p, r) for p, r in zip(problems, shifted, strict=True)]


def test_batch_length_mismatch():
    task = ArithmeticTask(ArithmeticTaskConfig(digits=2, n_train=5, n_eval=5))
    with pytest.raises(ValueError, match="5 problems but 4 responses"):
        task.verify_batch(task.eval_problems(), ["1"] * 4)


@pytest.mark.parametrize("fmt", ["plain", "reversed"])
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_arithmetic_adversarial(name, fmt):
    verdict = verify_arithmetic(ADVERSARIAL[name], "359", fmt)
    assert verdict.reward == 0.0 and verdict.reason


def test_arithmetic_adversarial_reasons():
    assert verify_arithmetic("", "1").reason == "empty"
    assert verify_arithmetic(" \n", "1").reason == "empty"
    assert verify_arithmetic("9" * 10000, "1").reason == "too long"
    assert verify_arithmetic("٣٥٩", "359").reason == "not a number: '٣٥٩'"
    assert verify_arithmetic("35\x009", "359").reason == "not a number: '35\\\\x009'"
    long_garbage = verify_arithmetic("x" * 50, "1").reason
    assert long_garbage == f"not a number: '{'x' * 30}…'"


# --------------------------------------------------------------------------- math
@pytest.fixture(scope="module")
def math_task():
    cfg = MathTaskConfig(
        train_path=DATA / "math_train.jsonl", eval_path=DATA / "math_eval.jsonl", timeout_s=1.0
    )
    with MathTask(cfg) as task:
        yield task


def _problem(answer: str) -> Problem:
    return Problem(id="t", prompt="", answer=answer, target=answer)


@pytest.mark.parametrize(
    ("gold", "response"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("0.5", "1/2"),
        ("1/2", "The answer is $\\boxed{0.5}$."),
        ("3", "\\boxed{3}"),
        ("3", "So x = 3"),
        ("12", "12"),
        ("x^2+1", "$1 + x^2$"),
        # E notation, which math-verify alone reads as its mantissa (1e5 -> 1)
        ("1e5", "1e5"),
        ("1e5", "100000"),
        ("2.5e-3", "0.0025"),
        ("0.0025", "\\boxed{2.5E-3}"),
        # a bare LaTeX answer (what the warm-up teaches) is read as the gold is
        ("3\\sqrt{2}", "3\\sqrt{2}"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
    ],
)
def test_math_correct(math_task, gold, response):
    assert math_task.verify(_problem(gold), response) == CORRECT


def test_math_wrong(math_task):
    assert math_task.verify(_problem("3"), "\\boxed{4}") == Verdict(0.0, "wrong: got 4, want 3")
    assert math_task.verify(_problem("1e5"), "1").reward == 0.0  # not the mantissa
    assert math_task.verify(_problem("0.5"), "1/3").reward == 0.0
    assert math_task.verify(_problem("3"), "no idea") == Verdict(0.0, "no answer found")


def test_math_dataset_targets_verify(math_task):
    problems = math_task.train_problems() + math_task.eval_problems()
    verdicts = math_task.verify_batch(problems, [p.target for p in problems])
    assert verdicts == [CORRECT] * len(problems)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_math_adversarial(math_task, name):
    verdict = math_task.verify(_problem("7"), ADVERSARIAL[name])
    assert verdict.reward == 0.0 and verdict.reason
    assert verdict.reason != "verifier crashed"


def test_math_length_and_empty_checked_before_the_worker(math_task):
    assert math_task.verify(_problem("7"), "9" * 10000) == Verdict(0.0, "too long")
    assert math_task.verify(_problem("7"), " \n") == Verdict(0.0, "empty")


def test_math_batch_keeps_order(math_task):
    golds = ["3", "3", "0.5", "7", "2", "7"]
    responses = ["\\boxed{3}", "", "1/2", "\\boxed{100!!!}", "9" * 5000, "7"]
    verdicts = math_task.verify_batch([_problem(g) for g in golds], responses)
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert [verdicts[1].reason, verdicts[4].reason] == ["empty", "too long"]


def test_gold_answers_that_do_not_verify_against_themselves_are_refused_at_load(tmp_path):
    train = tmp_path / "train.jsonl"
    # an escaped dollar amount, as GSM8K-style data has it: math-verify cannot parse it
    lines = ['{"prompt": "a", "answer": "3"}', '{"prompt": "b", "answer": "\\\\$5"}']
    train.write_text("\n".join(lines) + "\n")
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "c", "answer": "1e5"}\n')  # reads as 1e5 now, so it passes
    with MathTask(MathTaskConfig(train_path=train, eval_path=evals)) as task:
        assert task.verifier.pid is None  # loading alone grades nothing
        with pytest.raises(TaskError, match=r"1 gold answer\(s\) do not verify") as info:
            task.check_gold_answers()
    assert f"{train}:2: '\\\\$5' (gold answer not parsable" in str(info.value)


def test_a_batch_is_graded_within_its_time_budget():
    """Four items that each take 0.4 s of a 0.6 s budget: two are graded, the rest get
    'timeout: batch budget spent' at once, and the worker lives on."""
    slow = {"gold": "1", "response": "1", "sleep_s": 0.4}
    with MathVerifier(timeout_s=5.0, batch_budget_s=0.6) as v:
        assert v.grade([("1", "1")]) == [CORRECT]  # worker started outside the timing
        pid = v.pid
        start = time.monotonic()
        out = v._run([slow] * 4, v.batch_budget_s)
        took = time.monotonic() - start
    spent = Verdict(0.0, "timeout: batch budget spent")
    assert out[0] == CORRECT and out[2:] == [spent, spent], out
    assert out[1] in (CORRECT, TIMEOUT)  # cut to the 0.2 s left of the budget
    assert took < 2.0 and pid is not None


# --------------------------------------------------------------------------- worker life
def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # kills or waits out the worker process
def test_soft_timeout_keeps_the_worker():
    with MathVerifier(timeout_s=0.3, grace_s=5.0) as v:
        assert v.grade([("1", "1")]) == [CORRECT]
        pid = v.pid
        items = [{"gold": "1", "response": "1", "sleep_s": 30}, {"gold": "2", "response": "2"}]
        assert v._run(items) == [TIMEOUT, CORRECT]
        assert v.pid == pid


@pytest.mark.slow  # kills or waits out the worker process
def test_hard_timeout_kills_and_restarts_the_worker():
    # block_alarm makes the worker's own timeout miss, like a hang inside C code
    hang = {"gold": "1", "response": "1", "sleep_s": 30, "block_alarm": True}
    with MathVerifier(timeout_s=0.2, grace_s=0.3) as v:
        ok = {"gold": "2", "response": "\\boxed{2}"}
        assert v._run([ok]) == [CORRECT]
        pid = v.pid
        assert v._run([ok, hang, ok]) == [CORRECT, TIMEOUT, CORRECT]
        assert _gone(pid)
        assert v.pid not in (None, pid)
        assert v.grade([("5", "5")]) == [CORRECT]


@pytest.mark.slow  # kills or waits out the worker process
def test_worker_killed_mid_item_then_recovers():
    with MathVerifier(timeout_s=20.0) as v:
        assert v.grade([("1", "1")]) == [CORRECT]
        threading.Timer(0.5, os.kill, (v.pid, signal.SIGKILL)).start()
        slow = {"gold": "1", "response": "1", "sleep_s": 30}
        out = v._run([slow, {"gold": "2", "response": "2"}])
        assert out == [Verdict(0.0, "verifier crashed"), CORRECT]


@pytest.mark.slow  # kills or waits out the worker process
def test_worker_killed_while_idle_is_restarted():
    with MathVerifier() as v:
        assert v.grade([("1", "1")]) == [CORRECT]
        os.kill(v.pid, signal.SIGKILL)
        v._proc.wait(timeout=5)
        assert v.grade([("2", "2")]) == [CORRECT]


@pytest.mark.slow  # kills or waits out the worker process
def test_close_and_garbage_collection_stop_the_worker():
    v = MathVerifier()
    v.grade([("1", "1")])
    pid = v.pid
    v.close()
    assert v.pid is None and _gone(pid)
    assert v.grade([("1", "1")]) == [CORRECT]  # usable again after close
    proc = v._proc
    del v
    gc.collect()
    assert proc.wait(timeout=5) is not None
