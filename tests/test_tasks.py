"""Problem sets: determinism, disjointness, formats, the registry, and JSONL loading errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from npo.config import ArithmeticTaskConfig, MathTaskConfig
from npo.tasks import ArithmeticTask, MathTask, Problem, Task, TaskError, make_task
from npo.tasks.arithmetic import arithmetic_problem
from npo.tasks.math_jsonl import load_problems

DATA = Path(__file__).parent / "data"


def arith(**kw) -> ArithmeticTask:
    kw = {"digits": 3, "n_train": 200, "n_eval": 50, "seed": 7} | kw
    return ArithmeticTask(ArithmeticTaskConfig(**kw))


def operands(p: Problem, symbol: str) -> tuple[int, int]:
    a, b = p.prompt.removesuffix("=").split(symbol)
    return int(a), int(b)


# --------------------------------------------------------------------------- arithmetic
def test_same_seed_same_problems_other_seed_other_problems():
    assert arith(seed=1).train_problems() == arith(seed=1).train_problems()
    assert arith(seed=1).eval_problems() == arith(seed=1).eval_problems()
    assert arith(seed=1).train_problems() != arith(seed=2).train_problems()
    assert arith(seed=1).eval_problems() != arith(seed=2).eval_problems()


def test_eval_set_does_not_depend_on_n_train():
    assert arith(n_train=10).eval_problems() == arith(n_train=300).eval_problems()


@pytest.mark.parametrize("operation", ["add", "sub", "mul"])
def test_sizes_disjoint_and_unique(operation):
    task = arith(operation=operation, n_train=300, n_eval=40)
    train, evals = task.train_problems(), task.eval_problems()
    assert (len(train), len(evals)) == (300, 40)
    train_prompts = {p.prompt for p in train}
    eval_prompts = {p.prompt for p in evals}
    assert len(train_prompts) == 300 and len(eval_prompts) == 40
    assert not train_prompts & eval_prompts
    assert len({p.id for p in train + evals}) == 340
    assert train[5].id == f"{operation}3-train-000005"
    assert evals[0].id == f"{operation}3-eval-000000"


def test_reversed_target_example():
    p = arithmetic_problem(42, 317, operation="add", digits=3, answer_format="reversed")
    assert (p.prompt, p.answer, p.target) == ("042+317=", "359", "9530")
    p = arithmetic_problem(42, 317, operation="add", digits=3, answer_format="plain")
    assert (p.prompt, p.answer, p.target) == ("042+317=", "359", "0359")
    p = arithmetic_problem(7, 5, operation="mul", digits=2, answer_format="reversed")
    assert (p.prompt, p.answer, p.target) == ("07*05=", "35", "5300")
    p = arithmetic_problem(5, 5, operation="sub", digits=2, answer_format="plain")
    assert (p.prompt, p.answer, p.target) == ("05-05=", "0", "00")
    with pytest.raises(ValueError, match="negative"):
        arithmetic_problem(1, 2, operation="sub", digits=1, answer_format="plain")


@pytest.mark.parametrize(
    ("operation", "symbol", "width", "fn"),
    [
        ("add", "+", 4, lambda a, b: a + b),
        ("sub", "-", 3, lambda a, b: a - b),
        ("mul", "*", 6, lambda a, b: a * b),
    ],
)
@pytest.mark.parametrize("fmt", ["plain", "reversed"])
def test_every_problem_is_consistent(operation, symbol, width, fn, fmt):
    task = arith(operation=operation, answer_format=fmt)
    for p in task.train_problems() + task.eval_problems():
        a, b = operands(p, symbol)
        assert len(p.prompt) == 3 + 1 + 3 + 1  # both operands zero-padded to 3 digits
        assert 0 <= a <= 999 and 0 <= b <= 999
        result = fn(a, b)
        assert result >= 0
        assert p.answer == str(result)
        padded = f"{result:0{width}d}"
        assert p.target == (padded[::-1] if fmt == "reversed" else padded)


def test_sub_orders_operands():
    task = arith(operation="sub", digits=1, n_train=40, n_eval=15)
    pairs = [operands(p, "-") for p in task.train_problems() + task.eval_problems()]
    assert all(a >= b for a, b in pairs)
    assert len(set(pairs)) == 55  # every pair with a >= b: 10 * 11 / 2


def test_all_pairs_fit_exactly_and_one_more_is_an_error():
    task = arith(digits=1, n_train=90, n_eval=10)
    prompts = {p.prompt for p in task.train_problems() + task.eval_problems()}
    assert prompts == {f"{a}+{b}=" for a in range(10) for b in range(10)}
    with pytest.raises(TaskError, match=r"n_train \+ task.n_eval = 101 exceeds the 100"):
        arith(digits=1, n_train=91, n_eval=10)
    with pytest.raises(ValueError, match="exceeds the 55 distinct 'sub'"):
        arith(digits=1, operation="sub", n_train=50, n_eval=6)


def test_alphabet_covers_prompts_and_targets():
    for operation, expected in [("add", "+0123456789="), ("mul", "*0123456789=")]:
        task = arith(operation=operation)
        assert task.alphabet() == expected
        used = {
            c for p in task.train_problems() + task.eval_problems() for c in p.prompt + p.target
        }
        assert used <= set(expected)


def test_problem_lists_are_copies():
    task = arith()
    task.train_problems().clear()
    assert len(task.train_problems()) == 200


# --------------------------------------------------------------------------- registry
def test_make_task_by_kind():
    task = make_task(ArithmeticTaskConfig(digits=2, n_train=20, n_eval=5))
    assert isinstance(task, ArithmeticTask) and isinstance(task, Task)
    assert len(task.train_problems()) == 20
    cfg = MathTaskConfig(train_path=DATA / "math_train.jsonl", eval_path=DATA / "math_eval.jsonl")
    with make_task(cfg) as math_task:
        assert isinstance(math_task, MathTask) and isinstance(math_task, Task)
        assert len(math_task.train_problems()) == 4
        assert math_task.verifier.pid is None  # the worker starts on first verify, not on load
    with pytest.raises(
        TaskError, match=r"unknown task\.kind 'chess'; known: arithmetic, countdown, math"
    ):
        make_task(SimpleNamespace(kind="chess"))


# --------------------------------------------------------------------------- math JSONL
def test_math_loading_with_template():
    cfg = MathTaskConfig(
        train_path=DATA / "math_train.jsonl",
        eval_path=DATA / "math_eval.jsonl",
        prompt_template="Q: {prompt}\nA:",
    )
    task = MathTask(cfg)
    train, evals = task.train_problems(), task.eval_problems()
    assert [p.id for p in train] == [f"math-train-00000{i}" for i in range(4)]
    assert train[0] == Problem(
        id="math-train-000000",
        prompt="Q: What is 1/4 + 1/4?\nA:",
        answer="\\frac{1}{2}",
        target="\\frac{1}{2}",
    )
    assert [p.answer for p in train] == ["\\frac{1}{2}", "12", "3", "0.5"]  # numbers as text
    # braces in a prompt are not format fields
    assert evals[1].prompt == "Q: Simplify {x}/{x} for x != 0.\nA:"
    alphabet = task.alphabet()
    assert alphabet == "".join(sorted(set(alphabet)))
    assert set(alphabet) == {c for p in train + evals for c in p.prompt + p.target}
    assert "\\" in alphabet and "{" in alphabet and "\n" in alphabet


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "p", "answer": " 7 "}\r\n{"prompt": "q", "answer": 8}\r\n'
    )
    problems = load_problems(path, "eval")
    assert [(p.prompt, p.answer) for p in problems] == [("p", "7"), ("q", "8")]


GOOD = '{"prompt": "ok", "answer": "1"}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "x", "answer": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got array"),
        ('"just a string"', "expected a JSON object, got string"),
        ("42", "expected a JSON object, got number"),
        ('{"answer": "1"}', "missing key 'prompt'"),
        ('{"prompt": "x"}', "missing key 'answer'"),
        ('{"prompt": "", "answer": "1"}', "empty 'prompt'"),
        ('{"prompt": "x", "answer": "  "}', "empty 'answer'"),
        ('{"prompt": 5, "answer": "1"}', "'prompt' must be a string, got number"),
        ('{"prompt": "x", "answer": null}', "'answer' must be a string, got null"),
        ('{"prompt": "x", "answer": true}', "'answer' must be a string, got boolean"),
        ('{"prompt": "x", "answer": [1]}', "'answer' must be a string, got array"),
        ('{"prompt": "x", "answer": NaN}', "'answer' must be a string, got number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "train.jsonl"
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n")
    with pytest.raises(TaskError) as err:
        load_problems(path, "train")
    assert str(err.value).startswith(f"{path}:4: {message}")


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(TaskError, match=r"train\.jsonl:2: not valid UTF-8"):
        load_problems(path, "train")


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskError, match=r"nope\.jsonl: file not found"):
        load_problems(missing, "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TaskError, match=r"empty\.jsonl: no problems"):
        load_problems(empty, "train")
    # the task reports the eval file too, not only the train file
    cfg = MathTaskConfig(train_path=DATA / "math_train.jsonl", eval_path=missing)
    with pytest.raises(TaskError, match=r"nope\.jsonl"):
        MathTask(cfg)
