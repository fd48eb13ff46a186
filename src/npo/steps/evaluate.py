"""Greedy pass@1 of a policy on held-out problems (and, when asked, the mean reward of k
sampled responses per problem), in one process or split over ranks."""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.config import ExperimentConfig, RolloutConfig
from npo.rollout import sample
from npo.tasks import Problem, Task
from npo.training.distributed import Ranks
from npo.training.seeding import derive_seed

SAMPLED_EVAL_STREAM = 11  # derive_seed stream of the sampled eval's per-problem seeds


def eval_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """evaluate_policy's keyword arguments for a run: response length, HF chunk size, the
    vLLM settings when train.eval_backend is 'rollout' and the rollouts run on vLLM, and the
    sampled eval's k (train.eval_samples), temperature and seed."""
    ro = cfg.rollout
    on_vllm = cfg.train.eval_backend == "rollout" and ro.backend == "vllm"
    return {
        "max_new_tokens": ro.max_new_tokens,
        "batch_size": ro.hf_batch_size,
        "vllm": ro if on_vllm else None,
        "samples": cfg.train.eval_samples,
        "temperature": ro.temperature,
        "seed": cfg.seed,
    }


def sampled_eval_seeds(problems: list[Problem], seed: int) -> list[int]:
    """One sampling seed per problem, from the run seed and the problem's id: the same at
    every eval of a run (two evals differ by the policy only, not by sampling luck) and
    whatever the split over ranks or train.eval_size."""
    return [
        derive_seed(seed, zlib.crc32(p.id.encode()), stream=SAMPLED_EVAL_STREAM) for p in problems
    ]


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int | None = None,
    vllm: RolloutConfig | None = None,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy decode each problem once and verify: {"eval/accuracy", "eval/n", ...}.

    batch_size: problems per HF generate call (rollout.hf_batch_size; None = 512).
    vllm: decode on the vLLM engine with these settings instead of HF.
    samples: also sample k responses per problem at `temperature` (HF, seeded per problem
    by `sampled_eval_seeds(problems, seed)`) and add "eval/mean_at_k" (their mean reward:
    the sampled pass@1, which RL moves before it moves the greedy answer) and
    "eval/pass_at_k" (the share of problems with a correct one); 0 = greedy only.
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
    out = {
        "eval/accuracy": correct / len(problems),
        "eval/n": float(len(problems)),
        "eval/response_length": float(lengths.mean()),
        "eval/no_answer_frac": reasons.get("not a number", 0) / len(problems),
    }
    if samples:
        out |= _sampled_eval(
            model, tokenizer, task, problems, samples, temperature, max_new_tokens, batch_size,
            seed,
        )  # fmt: skip
    return out


def _sampled_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int | None,
    seed: int,
) -> dict[str, float]:
    batch = sample(
        model,
        tokenizer,
        [p.prompt for p in problems],
        n=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size or 512,
        seeds=sampled_eval_seeds(problems, seed),
    )
    expanded = [p for p in problems for _ in range(k)]
    rewards = [v.reward for v in task.verify_batch(expanded, batch.texts)]
    groups = [rewards[i * k : (i + 1) * k] for i in range(len(problems))]
    return {
        "eval/mean_at_k": sum(rewards) / len(rewards),
        "eval/pass_at_k": sum(max(g) > 0 for g in groups) / len(problems),
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
