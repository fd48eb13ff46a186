"""Toy arithmetic task: "042+317=" -> "9530" (digits reversed by default).

Operands are drawn from [0, 10**digits - 1] and written zero-padded to `digits`; the
response is the result zero-padded to the widest result the operation can give (add:
digits + 1, sub: digits, mul: 2 * digits), least-significant digit first when
`answer_format` is "reversed" (a left-to-right model can then carry like a human).
Problem sets are deterministic given `seed`: the eval set is drawn first (so it depends only
on seed, operation, digits and n_eval), then the train set from the remaining pairs.
For "sub" the operands are ordered so the result is never negative, and each unordered
pair counts once (it is drawn uniformly over distinct problems, not over operand pairs).

    task = ArithmeticTask(ArithmeticTaskConfig(digits=3, operation="add"))
    p = task.train_problems()[0]
    task.verify(p, p.target)  # Verdict(reward=1.0, reason='correct')
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Sequence

from npo.config import AnswerFormat, ArithmeticTaskConfig
from npo.tasks.base import Problem, TaskError, Verdict, check_batch, clip

MAX_RESPONSE_CHARS = 64  # far above any result width (<= 18 digits); longer is not an answer

_OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("+", operator.add),
    "sub": ("-", operator.sub),
    "mul": ("*", operator.mul),
}


def verify_arithmetic(
    response: str, answer: str, answer_format: AnswerFormat | str = AnswerFormat.plain
) -> Verdict:
    """Grade `response` against the canonical `answer` (no padding); never raises.

    Digits are compared as strings, so a 10,000-digit response is just wrong (int() refuses
    strings over 4300 digits). Only ASCII digits count; leading zeros are padding.

    >>> verify_arithmetic("0359", "359")
    Verdict(reward=1.0, reason='correct')
    >>> verify_arithmetic("9530", "359", "reversed")
    Verdict(reward=1.0, reason='correct')
    >>> verify_arithmetic("358", "359")
    Verdict(reward=0.0, reason='wrong: got 358, want 359')
    >>> verify_arithmetic("３５９", "359")
    Verdict(reward=0.0, reason="not a number: '３５９'")
    """
    text = response.strip()
    if not text:
        return Verdict(0.0, "empty")
    if len(text) > MAX_RESPONSE_CHARS:
        return Verdict(0.0, "too long")
    if not (text.isascii() and text.isdigit()):  # str.isdigit alone accepts '٣', '３', '²'
        return Verdict(0.0, f"not a number: {clip(text)!r}")
    if answer_format == AnswerFormat.reversed:
        text = text[::-1]
    got = text.lstrip("0") or "0"
    if got == answer:
        return Verdict(1.0, "correct")
    return Verdict(0.0, f"wrong: got {clip(got)}, want {answer}")


def result_width(operation: str, digits: int) -> int:
    """Most digits the result of `operation` on two `digits`-digit operands can have."""
    return {"add": digits + 1, "sub": digits, "mul": 2 * digits}[operation]


def arithmetic_problem(
    a: int,
    b: int,
    *,
    operation: str,
    digits: int,
    answer_format: AnswerFormat | str,
    id: str = "",
) -> Problem:
    """The problem "a<op>b=" with its gold answer and padded (maybe reversed) target.

    >>> arithmetic_problem(42, 317, operation="add", digits=3, answer_format="reversed")
    Problem(id='', prompt='042+317=', answer='359', target='9530', teacher=None)
    """
    symbol, fn = _OPS[operation]
    result = fn(a, b)
    if result < 0:
        raise ValueError(f"{a}{symbol}{b} is negative; order sub operands so a >= b")
    target = f"{result:0{result_width(operation, digits)}d}"
    if answer_format == AnswerFormat.reversed:
        target = target[::-1]
    prompt = f"{a:0{digits}d}{symbol}{b:0{digits}d}="
    return Problem(id=id, prompt=prompt, answer=str(result), target=target)


def _n_pairs(operation: str, n: int) -> int:
    # sub keeps only a >= b (the triangle), add and mul keep ordered pairs.
    return n * (n + 1) // 2 if operation == "sub" else n * n


def _pair(index: int, operation: str, n: int) -> tuple[int, int]:
    """Decode a pair index in [0, _n_pairs) into operands (a, b)."""
    if operation == "sub":
        a = (math.isqrt(8 * index + 1) - 1) // 2  # row of the triangle a >= b
        return a, index - a * (a + 1) // 2
    return divmod(index, n)


def _draw(rng: random.Random, n_pairs: int, k: int, exclude: set[int]) -> list[int]:
    """k distinct pair indices outside `exclude`, in draw order."""
    if n_pairs <= 4 * (k + len(exclude)):  # dense: rejection would stall, enumerate instead
        return rng.sample([i for i in range(n_pairs) if i not in exclude], k)
    chosen: dict[int, None] = {}  # an insertion-ordered set keeps the draw deterministic
    while len(chosen) < k:
        i = rng.randrange(n_pairs)
        if i not in exclude:
            chosen[i] = None
    return list(chosen)


class ArithmeticTask:
    """Disjoint train/eval sets of `digits`-digit problems for one operation."""

    name = "arithmetic"

    def __init__(self, cfg: ArithmeticTaskConfig) -> None:
        self.cfg = cfg
        n = 10**cfg.digits
        n_pairs = _n_pairs(cfg.operation, n)
        if cfg.n_train + cfg.n_eval > n_pairs:
            raise TaskError(
                f"task.n_train + task.n_eval = {cfg.n_train + cfg.n_eval} exceeds the "
                f"{n_pairs} distinct '{cfg.operation}' problems with {cfg.digits} digit(s); "
                "lower task.n_train / task.n_eval or raise task.digits"
            )
        rng = random.Random(cfg.seed)
        eval_idx = _draw(rng, n_pairs, cfg.n_eval, set())
        train_idx = _draw(rng, n_pairs, cfg.n_train, set(eval_idx))
        self._eval = self._problems("eval", eval_idx, n)
        self._train = self._problems("train", train_idx, n)

    def _problems(self, split: str, indices: list[int], n: int) -> list[Problem]:
        c = self.cfg
        return [
            arithmetic_problem(
                *_pair(i, c.operation, n),
                operation=c.operation,
                digits=c.digits,
                answer_format=c.answer_format,
                id=f"{c.operation}{c.digits}-{split}-{k:06d}",
            )
            for k, i in enumerate(indices)
        ]

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def verify(self, problem: Problem, response: str) -> Verdict:
        return verify_arithmetic(response, problem.answer, self.cfg.answer_format)

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        check_batch(problems, responses)
        return [self.verify(p, r) for p, r in zip(problems, responses, strict=True)]

    def alphabet(self) -> str:
        return "".join(sorted(set("0123456789=" + _OPS[self.cfg.operation][0])))

    def close(self) -> None:
        """Nothing to release; here so every task can be closed alike."""
