"""Pipeline step: roll out a guide checkpoint on a segment's prompts and cache guidance.

    cache = generate_guidance(ctx, guide=("run.late000100", 125), current=("run", 100),
                              problems=segment_prompts, policy_step=100)

The guide samples `npo.guidance.tries` responses per prompt; the first verified-correct one
becomes the prompt's entry (token ids, text, the guide's per-token log-probs, reward). To
show whether the guide is really ahead, the current checkpoint samples the same prompts with
the same budget: Q̂ = share of the prompts the current policy fails (no correct answer in k
tries) that the guide solves; both checkpoints' greedy eval accuracy is recorded too.
Idempotent: a cache already in the store is loaded (and its DB rows upserted), not rebuilt.
"""

from __future__ import annotations

import time

import torch

from npo.guidance.cache import (
    GuidanceCache,
    first_correct_rows,
    load_cache,
    payload_key,
    save_cache,
    trajectory_from_row,
)
from npo.rollout import RolloutBatch
from npo.steps.context import RunContext
from npo.steps.evaluate import eval_settings, evaluate_policy
from npo.steps.pool_rollout import sample_checkpoint
from npo.tasks import Problem

CheckpointRef = tuple[str, int]  # (run_id, policy step)


def generate_guidance(
    ctx: RunContext,
    cache_id: str,
    guide: CheckpointRef,
    current: CheckpointRef,
    problems: list[Problem],
    policy_step: int,
) -> GuidanceCache:
    """Build (or load) the guidance cache `cache_id` for `problems`."""
    cfg = ctx.cfg
    tries = cfg.npo.guidance.tries
    key = payload_key(ctx.run_id, cache_id)
    if ctx.store.exists(key):  # a re-run: the payload is committed; (re-)index it
        cache = load_cache(ctx.store, ctx.run_id, cache_id)
        _index(ctx, cache, key, tries)
        return cache
    evals = ctx.task.eval_problems()[: cfg.train.eval_size]
    started = time.perf_counter()

    def rollout(ref: CheckpointRef) -> tuple[RolloutBatch, list[int | None], float]:
        out = sample_checkpoint(ctx, ref, problems, tries, policy_step, stream=4)
        acc = evaluate_policy(out.model, out.tokenizer, ctx.task, evals, **eval_settings(cfg))
        return out.batch, first_correct_rows(out.rewards), acc["eval/accuracy"]

    guide_batch, guide_first, guide_acc = rollout(guide)
    if current == guide:  # the Δ=0 control: the guide is the current policy itself
        current_first, current_acc = guide_first, guide_acc
    else:
        _, current_first, current_acc = rollout(current)

    entries = {
        problems[i].id: trajectory_from_row(guide_batch, row, problems[i].id, 1.0)
        for i, row in enumerate(guide_first)
        if row is not None
    }
    failed = [i for i, r in enumerate(current_first) if r is None]
    rescued = [i for i in failed if guide_first[i] is not None]
    stats = {
        "prompts": float(len(problems)),
        "solved": float(len(entries)),
        "solved_frac": len(entries) / max(len(problems), 1),
        "current_failed": float(len(failed)),
        "q_hat": len(rescued) / len(failed) if failed else 0.0,
        "guide_accuracy": guide_acc,
        "current_accuracy": current_acc,
        "accuracy_gap": guide_acc - current_acc,
        "sampled_tokens": float(guide_batch.num_response_tokens),
        "seconds": time.perf_counter() - started,
    }
    cache = GuidanceCache(cache_id, guide[0], guide[1], policy_step, entries, stats)
    key = save_cache(ctx.store, ctx.run_id, cache)
    _index(ctx, cache, key, tries)
    return cache


def _index(ctx: RunContext, cache: GuidanceCache, key: str, tries: int) -> None:
    """Index the cache and its entries in the metadata DB (idempotent)."""
    s = cache.stats
    ctx.db.record_guidance_cache(
        {
            "id": cache.cache_id,
            "run_id": ctx.run_id,
            "guide_run_id": cache.guide_run_id,
            "guide_step": cache.guide_step,
            "policy_step": cache.policy_step,
            "prompts_total": int(s["prompts"]),
            "prompts_attempted": int(s["prompts"]),
            "prompts_solved": int(s["solved"]),
            "tries_per_prompt": tries,
            "q_hat": s["q_hat"],
            "guide_accuracy": s["guide_accuracy"],
            "current_accuracy": s["current_accuracy"],
            "sampled_tokens": int(s["sampled_tokens"]),
            "payload_uri": f"{ctx.store.uri.rstrip('/')}/{key}",
        }
    )
    ctx.db.record_guidance_entries(
        cache.cache_id,
        [
            {
                "prompt_id": t.prompt_id,
                "reward": t.reward,
                "response_tokens": len(t.response_ids),
                "guide_logprob_sum": float(torch.tensor(t.logprobs).sum()),
            }
            for t in cache.entries.values()
        ],
    )
