"""Greedy pass@1 of a policy on held-out problems."""

from __future__ import annotations

from collections import Counter

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.rollout import sample
from npo.tasks import Problem, Task


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Greedy decode each problem once and verify: {"eval/accuracy", "eval/n", ...}.

    batch_size: problems per generate call (rollout.hf_batch_size; None = 512).
    """
    batch = sample(
        model,
        tokenizer,
        [p.prompt for p in problems],
        n=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size or 512,
    )
    verdicts = task.verify_batch(problems, batch.texts)
    correct = sum(v.reward for v in verdicts)
    lengths = batch.response_mask.sum(dim=1).float()
    reasons = Counter(v.reason.split(":")[0] for v in verdicts if v.reward == 0)
    return {
        "eval/accuracy": correct / len(problems),
        "eval/n": float(len(problems)),
        "eval/response_length": float(lengths.mean()),
        "eval/no_answer_frac": reasons.get("not a number", 0) / len(problems),
    }
