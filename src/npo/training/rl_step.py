"""One policy-gradient update on a scored rollout batch (clipped PPO objective, GRPO-style).

The caller samples, verifies and computes advantages; this module recomputes the old
log-probs with the pre-update policy, then runs `ppo_epochs` x `minibatches` optimizer steps.
Where the source of a trajectory changes (NPO's guide slot), only `old_logprobs` change:
pass them in and they are used instead of the recomputed ones.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel

from npo.algo import agg_loss, entropy_from_logits, kl_penalty, policy_loss, token_logprobs
from npo.config import AlgoConfig
from npo.rollout import RolloutBatch
from npo.training.forward import response_logits


def _forward(model: PreTrainedModel, batch: RolloutBatch) -> torch.Tensor:
    return response_logits(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask
    )


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, batch: RolloutBatch, temperature: float, chunk: int = 256
) -> torch.Tensor:
    """Per-token log-probs [B, R] of the batch's responses under `model` (no grad)."""
    batch = batch.to(model.device)
    out = []
    for i in range(0, len(batch), chunk):
        part = batch.select(torch.arange(i, min(i + chunk, len(batch))))
        logp = token_logprobs(_forward(model, part), part.response_ids, temperature)
        out.append(logp * part.response_mask)
    return torch.cat(out)


def ppo_update(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    advantages: torch.Tensor,
    algo: AlgoConfig,
    temperature: float,
    ref_model: PreTrainedModel | None = None,
    old_logprobs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    shaped_rows: torch.Tensor | None = None,
    shaping_gamma: float = 0.1,
) -> dict[str, float]:
    """Optimise the clipped objective on `batch` with per-sequence `advantages` [B].

    old_logprobs [B, R] defaults to the current (pre-update) policy's own log-probs, so the
    first minibatch step starts at ratio 1. shaped_rows [B] (LUFFY teacher rows) use the
    shaped objective f(w) = w/(w + shaping_gamma). Returns metrics averaged over all updates.
    """
    was_training = model.training
    batch = batch.to(model.device)
    advantages = advantages.to(model.device)
    if shaped_rows is not None:
        shaped_rows = shaped_rows.to(model.device)
    if old_logprobs is None:
        old_logprobs = sequence_logprobs(model, batch, temperature)
    old_logprobs = old_logprobs.to(model.device)
    ref_logprobs = None
    if algo.kl_coef > 0:
        if ref_model is None:
            raise ValueError("algo.kl_coef > 0 needs a reference model")
        ref_logprobs = sequence_logprobs(ref_model, batch, temperature).to(model.device)

    model.train()
    sums: dict[str, float] = defaultdict(float)
    updates = 0
    size = len(batch) // algo.minibatches
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator).to(model.device)
        for start in range(0, len(batch), size):
            idx = order[start : start + size]
            mb = batch.select(idx)
            mask = mb.response_mask.float()
            logits = _forward(model, mb).float() / temperature
            logp = token_logprobs(logits, mb.response_ids)
            loss, metrics = policy_loss(
                logp,
                old_logprobs[idx],
                advantages[idx],
                mask,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                agg=algo.loss_agg,
                shaped_rows=None if shaped_rows is None else shaped_rows[idx],
                shaping_gamma=shaping_gamma,
            )
            entropy = agg_loss(entropy_from_logits(logits), mask, algo.loss_agg)
            if algo.entropy_coef > 0:
                loss = loss - algo.entropy_coef * entropy
            if ref_logprobs is not None:
                kl = agg_loss(
                    kl_penalty(logp, ref_logprobs[idx], algo.kl_estimator), mask, algo.loss_agg
                )
                loss = loss + algo.kl_coef * kl
                metrics["actor/kl_ref"] = kl.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), algo.max_grad_norm)
            optimizer.step()
            metrics["actor/entropy"] = entropy.item()
            metrics["actor/grad_norm"] = grad_norm.item()
            metrics["actor/loss"] = loss.item()
            for k, v in metrics.items():
                sums[k] += v
            updates += 1
    model.train(was_training)
    return {k: v / updates for k, v in sums.items()}
