"""Greedy pass@1 of a policy on held-out problems, in one process or split over ranks."""

from __future__ import annotations

from collections import Counter
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.config import ExperimentConfig, RolloutConfig
from npo.rollout import sample
from npo.tasks import Problem, Task
from npo.training.distributed import Ranks


def eval_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """evaluate_policy's keyword arguments for a run: response length, HF chunk size, and
    the vLLM settings when train.eval_backend is 'rollout' and the rollouts run on vLLM."""
    ro = cfg.rollout
    on_vllm = cfg.train.eval_backend == "rollout" and ro.backend == "vllm"
    return {
        "max_new_tokens": ro.max_new_tokens,
        "batch_size": ro.hf_batch_size,
        "vllm": ro if on_vllm else None,
    }


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int | None = None,
    vllm: RolloutConfig | None = None,
) -> dict[str, float]:
    """Greedy decode each problem once and verify: {"eval/accuracy", "eval/n", ...}.

    batch_size: problems per HF generate call (rollout.hf_batch_size; None = 512).
    vllm: decode on the vLLM engine with these settings instead of HF.
    """
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": max_new_tokens}
    prompts = [p.prompt for p in problems]
    if vllm is not None:
        from npo.rollout import vllm as vllm_backend

        batch = vllm_backend.sample(
            model,
            tokenizer,
            prompts,
            **greedy,
            gpu_memory_utilization=vllm.vllm_gpu_memory_utilization,
            max_model_len=vllm.vllm_max_model_len,
        )
    else:
        batch = sample(model, tokenizer, prompts, **greedy, batch_size=batch_size or 512)
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


def evaluate_on_ranks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    ranks: Ranks,
    **settings: Any,
) -> dict[str, float]:
    """evaluate_policy over `problems`, each rank decoding its contiguous share (greedy:
    the same answers as one process): the means weighted by each share's size, eval/n the
    total; every rank gets the result. `settings`: eval_settings(cfg). Under FSDP, call it
    inside npo.training.distributed.full_weights (the shares differ in size)."""
    if not ranks.active or len(problems) < ranks.world:
        return evaluate_policy(model, tokenizer, task, problems, **settings)
    mine = evaluate_policy(
        model, tokenizer, task, problems[ranks.uneven_shard(len(problems))], **settings
    )
    n = mine["eval/n"]
    total = ranks.sum_values({k: (v if k == "eval/n" else v * n) for k, v in mine.items()})
    return {k: (v if k == "eval/n" else v / total["eval/n"]) for k, v in total.items()}
