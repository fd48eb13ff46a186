"""Roll a checkpoint out on mistake-pool prompts: per-prompt pass rates (and the batch)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.rollout import RolloutBatch, sample
from npo.steps.context import RunContext
from npo.training.seeding import derive_seed, seed_everything
from npo.training.state import load_train_state


def rollout_prompts(
    ctx: RunContext, checkpoint: tuple[str, int], prompt_ids: list[str], stream: int
) -> tuple[RolloutBatch, dict[str, float], PreTrainedModel, PreTrainedTokenizerBase]:
    """G samples per prompt id from `checkpoint` (run_id, step): batch, {id: pass rate}."""
    cfg, ro = ctx.cfg, ctx.cfg.rollout
    by_id = {p.id: p for p in ctx.task.train_problems()}
    problems = [by_id[i] for i in prompt_ids]
    loaded = load_train_state(ctx.store, checkpoint[0], checkpoint[1], cfg.model.dtype)
    seed_everything(derive_seed(cfg.seed, checkpoint[1], stream=stream))
    batch = sample(
        loaded.model,
        loaded.tokenizer,
        [p.prompt for p in problems],
        n=ro.group_size,
        temperature=ro.temperature,
        max_new_tokens=ro.max_new_tokens,
    )
    verdicts = ctx.task.verify_batch(
        [problems[i] for i in batch.prompt_index.tolist()], batch.texts
    )
    rates = {
        p.id: sum(v.reward for v in verdicts[i * ro.group_size : (i + 1) * ro.group_size])
        / ro.group_size
        for i, p in enumerate(problems)
    }
    return batch, rates, loaded.model, loaded.tokenizer


def pool_pass_rates(
    ctx: RunContext, checkpoint: tuple[str, int], prompt_ids: list[str], stream: int
) -> dict[str, float]:
    return rollout_prompts(ctx, checkpoint, prompt_ids, stream)[1]
