"""What every task provides: problems with gold answers, and a verifier that grades responses.

A task hands out `Problem`s (a prompt, the canonical gold answer, and a gold response text
for the supervised warm-up) and grades a model response with `verify`, which returns a
`Verdict` (reward 1.0 or 0.0 plus a short reason). Verifiers never raise on model output:
garbage gets reward 0 and a reason saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class TaskError(ValueError):
    """A task that cannot be built (bad dataset, impossible sizes); says which file and line."""


@dataclass(frozen=True)
class Problem:
    id: str
    """Stable id, e.g. "add3-train-000123" or "math-eval-000007"."""
    prompt: str
    """Text fed to the model."""
    answer: str
    """Canonical gold answer, what `verify` compares against, e.g. "579"."""
    target: str
    """Gold response text for the supervised warm-up, in the task's answer format."""
    teacher: str | None = None
    """An external teacher's correct response in its own style (LUFFY's teacher), where the
    task has one; None: the teacher writes `target`."""


@dataclass(frozen=True)
class Verdict:
    reward: float
    """1.0 when the response is correct, 0.0 otherwise."""
    reason: str
    """Short and human readable: "correct", "wrong: got 578, want 579", "timeout", ..."""


@runtime_checkable
class Task(Protocol):
    name: str

    def train_problems(self) -> list[Problem]: ...

    def eval_problems(self) -> list[Problem]: ...

    def verify(self, problem: Problem, response: str) -> Verdict: ...

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        """Grade a whole rollout batch at once (one round-trip where grading is remote)."""
        ...

    def alphabet(self) -> str:
        """Every character prompts and targets use, sorted and unique (for a char tokenizer)."""
        ...

    def close(self) -> None:
        """Release helper processes; the task stays usable (they restart on demand)."""
        ...


def clip(text: str, n: int = 30) -> str:
    r"""Truncate to `n` characters and escape non-printables, for use inside a reason.

    >>> clip("12\x0034")
    '12\\x0034'
    >>> clip("9" * 40, 5)
    '99999…'
    """
    head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:n])
    return head + "…" if len(text) > n else head


def check_batch(problems: Sequence[Problem], responses: Sequence[str]) -> None:
    """Reject a batch whose problems and responses do not pair up."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
