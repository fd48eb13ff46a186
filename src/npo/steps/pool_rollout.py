"""Sample a committed checkpoint on given prompts and verify: guidance, pool confirmation
and the rollback scoring all roll checkpoints out this way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.rollout import RolloutBatch, rollout
from npo.steps.context import RunContext
from npo.tasks import Problem
from npo.training.seeding import derive_seed, seed_everything
from npo.training.state import load_train_state


@dataclass
class CheckpointRollout:
    """batch: n samples per problem (rows i*n .. i*n+n-1); rewards [N, n]."""

    batch: RolloutBatch
    rewards: torch.Tensor
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def sample_checkpoint(
    ctx: RunContext,
    checkpoint: tuple[str, int],
    problems: list[Problem],
    n: int,
    seed_step: int,
    stream: int,
) -> CheckpointRollout:
    """Load `checkpoint` (run_id, step), draw n samples per problem (seeded by
    (seed, seed_step, stream)) at the rollout temperature, and verify them."""
    cfg, ro = ctx.cfg, ctx.cfg.rollout
    loaded = load_train_state(ctx.store, checkpoint[0], checkpoint[1], cfg.model.dtype)
    seed_everything(derive_seed(cfg.seed, seed_step, stream=stream))
    batch = rollout(ro, loaded.model, loaded.tokenizer, [p.prompt for p in problems], n)
    verdicts = ctx.task.verify_batch(
        [problems[i] for i in batch.prompt_index.tolist()], batch.texts
    )
    rewards = torch.tensor([v.reward for v in verdicts]).view(len(problems), n)
    return CheckpointRollout(batch, rewards, loaded.model, loaded.tokenizer)


def rollout_prompts(
    ctx: RunContext, checkpoint: tuple[str, int], prompt_ids: list[str], stream: int
) -> tuple[CheckpointRollout, dict[str, float]]:
    """G samples per training prompt id from `checkpoint`: the rollout, {id: pass rate}."""
    by_id = {p.id: p for p in ctx.task.train_problems()}
    problems = [by_id[i] for i in prompt_ids]
    out = sample_checkpoint(
        ctx, checkpoint, problems, ctx.cfg.rollout.group_size, checkpoint[1], stream
    )
    rates = out.rewards.mean(dim=1).tolist()
    return out, {p.id: r for p, r in zip(problems, rates, strict=True)}


def pool_pass_rates(
    ctx: RunContext, checkpoint: tuple[str, int], prompt_ids: list[str], stream: int
) -> dict[str, float]:
    return rollout_prompts(ctx, checkpoint, prompt_ids, stream)[1]
