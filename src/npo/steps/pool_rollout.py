"""Sample a policy (in memory or a committed checkpoint) on given prompts and verify:
guidance, pool confirmation and the rollback scoring all roll policies out this way."""

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


Policy = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def sample_policy(
    ctx: RunContext, policy: Policy, problems: list[Problem], n: int, seed_step: int, stream: int
) -> CheckpointRollout:
    """Draw n samples per problem from `policy` (model, tokenizer), seeded by
    (seed, seed_step, stream), at the rollout temperature, and verify them."""
    model, tokenizer = policy
    seed_everything(derive_seed(ctx.cfg.seed, seed_step, stream=stream))
    batch = rollout(ctx.cfg.rollout, model, tokenizer, [p.prompt for p in problems], n)
    verdicts = ctx.task.verify_batch(
        [problems[i] for i in batch.prompt_index.tolist()], batch.texts
    )
    rewards = torch.tensor([v.reward for v in verdicts]).view(len(problems), n)
    return CheckpointRollout(batch, rewards, model, tokenizer)


def sample_checkpoint(
    ctx: RunContext,
    checkpoint: tuple[str, int],
    problems: list[Problem],
    n: int,
    seed_step: int,
    stream: int,
) -> CheckpointRollout:
    """Load `checkpoint` (run_id, step) and sample it as `sample_policy` does."""
    loaded = load_train_state(
        ctx.store, checkpoint[0], checkpoint[1], ctx.cfg.model.dtype, db=ctx.db
    )
    return sample_policy(ctx, (loaded.model, loaded.tokenizer), problems, n, seed_step, stream)


def _train_problems(ctx: RunContext, prompt_ids: list[str]) -> list[Problem]:
    by_id = {p.id: p for p in ctx.task.train_problems()}
    return [by_id[i] for i in prompt_ids]


def _rates(problems: list[Problem], out: CheckpointRollout) -> dict[str, float]:
    rates = out.rewards.mean(dim=1).tolist()
    return {p.id: r for p, r in zip(problems, rates, strict=True)}


def rollout_prompts(
    ctx: RunContext, checkpoint: tuple[str, int], prompt_ids: list[str], stream: int
) -> tuple[CheckpointRollout, dict[str, float]]:
    """G samples per training prompt id from `checkpoint`: the rollout, {id: pass rate}."""
    problems = _train_problems(ctx, prompt_ids)
    out = sample_checkpoint(
        ctx, checkpoint, problems, ctx.cfg.rollout.group_size, checkpoint[1], stream
    )
    return out, _rates(problems, out)


def pool_pass_rates(
    ctx: RunContext, policy: Policy, step: int, prompt_ids: list[str], stream: int
) -> dict[str, float]:
    """{id: pass rate} of G samples per training prompt id from `policy` at policy step
    `step` (the in-memory policy a train task watches, or a loaded checkpoint)."""
    problems = _train_problems(ctx, prompt_ids)
    out = sample_policy(ctx, policy, problems, ctx.cfg.rollout.group_size, step, stream)
    return _rates(problems, out)
