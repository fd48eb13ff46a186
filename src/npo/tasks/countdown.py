"""Countdown: reach a target from given numbers, "3,7,9:30=" -> "7*3+9".

Each prompt lists `count` numbers in [1, max_number] and a target; a response is an
arithmetic expression (+ - * / and parentheses, integers only) that uses each listed number
exactly once and equals the target. Many responses are right for one prompt ("7*3+9",
"9+3*7", "(3*7)+9", ...), unlike arithmetic, where the answer is one string: trajectories
that reach the same answer can still differ, which is what NPO's guides are about.

Targets come from random expression trees over the numbers whose every intermediate value
is a positive integer (the game's rule: no fractions, no negatives); the gold target (the
warm-up's text) is that tree written with as few parentheses as possible, in the drawn
operand order. `Problem.teacher` is the same solution in another style, what an external
solver that never saw the policy writes: every operation parenthesised, the larger operand
of + and * first. It is always right and, to a policy warmed up on the gold style,
improbable: an external teacher with a distribution gap (LUFFY's setting).

Grading parses the response with a small recursive-descent parser (no `eval`), in exact
rational arithmetic, with limits on length, number size and nesting, so adversarial output
gets reward 0 and a reason. Problem sets are deterministic given `seed` (eval drawn first).

    task = CountdownTask(CountdownTaskConfig(count=3))
    p = task.train_problems()[0]
    task.verify(p, p.target)  # Verdict(reward=1.0, reason='correct')
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from npo.config import CountdownTaskConfig
from npo.tasks.base import Problem, TaskError, Verdict, check_batch, clip

MAX_RESPONSE_CHARS = 64  # a 6-number expression fully parenthesised is under 40
MAX_DEPTH = 12  # parentheses nesting; deeper is not an answer (and would recurse)
MAX_NUMBER_DIGITS = 4  # no listed number has more; "99999999" is not one of them
_OPS = "+-*/"
_DIGITS = frozenset("0123456789")  # str.isdigit would take '٣' and '²'
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class ParseError(ValueError):
    """The response is not an expression of the allowed form (says where)."""


@dataclass(frozen=True)
class Expr:
    """A binary expression tree: a leaf holds a number, a node an operator and two sides."""

    value: int
    op: str | None = None
    left: Expr | None = None
    right: Expr | None = None

    def numbers(self) -> list[int]:
        if self.op is None:
            return [self.value]
        return self.left.numbers() + self.right.numbers()  # type: ignore[union-attr]

    def minimal(self) -> str:
        """Written with the parentheses precedence needs, plus those around a right operand
        of equal precedence unless it is the same associative operator.

        >>> Expr(30, "+", Expr(21, "*", Expr(3), Expr(7)), Expr(9)).minimal()
        '3*7+9'
        >>> Expr(4, "-", Expr(9), Expr(5, "-", Expr(7), Expr(2))).minimal()
        '9-(7-2)'
        """
        if self.op is None:
            return str(self.value)
        left, right = self.left, self.right
        assert left is not None and right is not None
        mine = _PRECEDENCE[self.op]
        lhs = left.minimal()
        if left.op is not None and _PRECEDENCE[left.op] < mine:
            lhs = f"({lhs})"
        rhs = right.minimal()
        # a right operand of equal precedence needs them unless the operator is associative
        # with it (a+(b+c), a*(b*c)); a-(b+c), a/(b*c), a*(b/c) keep them
        if right.op is not None and (
            _PRECEDENCE[right.op] < mine
            or (_PRECEDENCE[right.op] == mine and (self.op in "-/" or right.op != self.op))
        ):
            rhs = f"({rhs})"
        return f"{lhs}{self.op}{rhs}"

    def solver_style(self) -> str:
        """Every operation parenthesised, the larger operand of + and * first: the teacher's.

        >>> Expr(30, "+", Expr(21, "*", Expr(3), Expr(7)), Expr(9)).solver_style()
        '((7*3)+9)'
        """
        if self.op is None:
            return str(self.value)
        left, right = self.left, self.right
        assert left is not None and right is not None
        if self.op in "+*" and right.value > left.value:
            left, right = right, left
        return f"({left.solver_style()}{self.op}{right.solver_style()})"


def _apply(op: str, a: int, b: int) -> int | None:
    """a op b when it is a positive integer (the game's rule), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def random_tree(numbers: list[int], ops: str, rng: random.Random) -> Expr | None:
    """A random tree using every number once in the drawn order (random split points and
    operators); None when an intermediate value breaks the rule."""
    if len(numbers) == 1:
        return Expr(numbers[0])
    split = rng.randint(1, len(numbers) - 1)
    left = random_tree(numbers[:split], ops, rng)
    right = random_tree(numbers[split:], ops, rng)
    if left is None or right is None:
        return None
    op = rng.choice(ops)
    value = _apply(op, left.value, right.value)
    return None if value is None else Expr(value, op, left, right)


# --------------------------------------------------------------------------- parsing
def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(value, numbers used) of an expression over integers with + - * / and parentheses.

    Raises ParseError on anything else (names the position) and ZeroDivisionError on a
    division by zero.

    >>> parse_expression("7*3+9")
    (Fraction(30, 1), [7, 3, 9])
    >>> parse_expression("(8-2)/4")
    (Fraction(3, 2), [8, 2, 4])
    """
    parser = _Parser(text.replace(" ", ""))
    value = parser.expr(0)
    if parser.pos != len(parser.text):
        raise ParseError(f"unexpected {clip(parser.text[parser.pos :], 8)!r} at {parser.pos}")
    return value, parser.numbers


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos, self.numbers = text, 0, []

    def _peek(self) -> str:
        """The next character; "" at the end (in no operator or digit set)."""
        return self.text[self.pos] if self.pos < len(self.text) else "\0"

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            value = value * rhs if op == "*" else value / rhs  # ZeroDivisionError on 0
        return value

    def factor(self, depth: int) -> Fraction:
        c = self._peek()
        if c == "(":
            if depth >= MAX_DEPTH:
                raise ParseError(f"nested deeper than {MAX_DEPTH}")
            self.pos += 1
            value = self.expr(depth + 1)
            if self._peek() != ")":
                raise ParseError(f"missing ')' at {self.pos}")
            self.pos += 1
            return value
        start = self.pos
        while self._peek() in _DIGITS:
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            found = "the end" if c == "\0" else repr(c)
            raise ParseError(f"expected a number or '(' at {start}, found {found}")
        if len(digits) > MAX_NUMBER_DIGITS:
            raise ParseError(f"number {clip(digits, 8)} is not one of the given numbers")
        self.numbers.append(int(digits))
        return Fraction(int(digits))


def verify_countdown(response: str, numbers: Sequence[int], target: int) -> Verdict:
    """Grade an expression: each of `numbers` used exactly once, value equal to `target`.

    >>> verify_countdown("9+3*7", [3, 7, 9], 30)
    Verdict(reward=1.0, reason='correct')
    >>> verify_countdown("3*7+7", [3, 7, 9], 30).reason
    'numbers: used 3,7,7, want each of 3,7,9 once'
    >>> verify_countdown("3*9+7", [3, 7, 9], 30).reason
    'wrong: got 34, want 30'
    """
    text = response.strip()
    if not text:
        return Verdict(0.0, "empty")
    if len(text) > MAX_RESPONSE_CHARS:
        return Verdict(0.0, "too long")
    try:
        value, used = parse_expression(text)
    except ParseError as e:
        return Verdict(0.0, f"not an expression: {e}")
    except ZeroDivisionError:
        return Verdict(0.0, "division by zero")
    if Counter(used) != Counter(numbers):
        have = ",".join(map(str, sorted(used)))
        want = ",".join(map(str, sorted(numbers)))
        return Verdict(0.0, f"numbers: used {have}, want each of {want} once")
    if value != target:
        got = str(value.numerator) if value.denominator == 1 else f"{value}"
        return Verdict(0.0, f"wrong: got {clip(got)}, want {target}")
    return Verdict(1.0, "correct")


# --------------------------------------------------------------------------- task
def prompt_of(numbers: Sequence[int], target: int) -> str:
    """The prompt text.

    >>> prompt_of([3, 7, 9], 30)
    '3,7,9:30='
    """
    return f"{','.join(map(str, numbers))}:{target}="


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """The numbers and target of a prompt_of text (what `verify` grades against)."""
    numbers, target = prompt.rstrip("=").split(":")
    return [int(n) for n in numbers.split(",")], int(target)


class CountdownTask:
    """Generated Countdown problems and their exact verifier (see the module docstring)."""

    name = "countdown"

    def __init__(self, cfg: CountdownTaskConfig) -> None:
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        total = cfg.n_eval + cfg.n_train
        drawn = self._draw(rng, total)
        if len(drawn) < total:
            raise TaskError(
                f"task: only {len(drawn)} distinct countdown prompts for count={cfg.count}, "
                f"max_number={cfg.max_number}, max_target={cfg.max_target}, ops={cfg.ops!r}; "
                f"n_train + n_eval = {total}: lower them or widen the ranges"
            )
        self._eval = [self._problem("eval", i, t) for i, t in enumerate(drawn[: cfg.n_eval])]
        self._train = [self._problem("train", i, t) for i, t in enumerate(drawn[cfg.n_eval :])]

    def _draw(self, rng: random.Random, total: int) -> list[Expr]:
        """Up to `total` trees with distinct (sorted numbers, target) prompts."""
        seen: set[tuple[tuple[int, ...], int]] = set()
        trees: list[Expr] = []
        attempts = 0
        while len(trees) < total and attempts < 50 * total:
            attempts += 1
            numbers = [rng.randint(1, self.cfg.max_number) for _ in range(self.cfg.count)]
            tree = random_tree(numbers, self.cfg.ops, rng)
            if tree is None or not 1 <= tree.value <= self.cfg.max_target:
                continue
            key = (tuple(sorted(numbers)), tree.value)
            if key in seen:
                continue
            seen.add(key)
            trees.append(tree)
        return trees

    def _problem(self, split: str, i: int, tree: Expr) -> Problem:
        # the prompt lists the numbers sorted, so the gold text's order is a choice it makes
        prompt = prompt_of(sorted(tree.numbers()), tree.value)
        return Problem(
            id=f"countdown{self.cfg.count}-{split}-{i:06d}",
            prompt=prompt,
            answer=str(tree.value),
            target=tree.minimal(),
            teacher=tree.solver_style(),
        )

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def verify(self, problem: Problem, response: str) -> Verdict:
        numbers, target = parse_prompt(problem.prompt)
        return verify_countdown(response, numbers, target)

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        check_batch(problems, responses)
        return [self.verify(p, r) for p, r in zip(problems, responses, strict=True)]

    def alphabet(self) -> str:
        chars = set("0123456789,:=()" + _OPS)
        return "".join(sorted(chars))

    def close(self) -> None:
        """Nothing to release."""
