"""Tasks: problem sets with verifiable rewards, chosen by `task.kind` through `TASKS`.

Build one from the config, grade a rollout batch, and close it to stop helper processes:

    task = make_task(cfg.task)  # ArithmeticTask or MathTask
    verdicts = task.verify_batch(problems, responses)
    task.close()  # stops the math-verify worker, if any
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npo.config import TaskConfig
from npo.tasks.arithmetic import ArithmeticTask
from npo.tasks.base import Problem, Task, TaskError, Verdict
from npo.tasks.countdown import CountdownTask
from npo.tasks.math_jsonl import MathTask

# kind (the `task.kind` config value) -> factory taking that kind's config.
TASKS: dict[str, Callable[[Any], Task]] = {
    "arithmetic": ArithmeticTask,
    "math": MathTask,
    "countdown": CountdownTask,
}


def make_task(cfg: TaskConfig) -> Task:
    """Build the task named by `cfg.kind`."""
    factory = TASKS.get(cfg.kind)
    if factory is None:
        raise TaskError(f"unknown task.kind {cfg.kind!r}; known: {', '.join(sorted(TASKS))}")
    return factory(cfg)


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "MathTask",
    "Problem",
    "Task",
    "TaskError",
    "Verdict",
    "make_task",
]
