"""One policy-gradient update on a scored rollout batch (clipped PPO objective, GRPO-style).

The caller samples, verifies and computes advantages; this module recomputes the old
log-probs with the pre-update policy (with one update per batch they come from that
update's own forward pass), then runs `ppo_epochs` x `minibatches` optimizer steps.
Where the source of a trajectory changes (NPO's guide slot), only `old_logprobs` change:
pass them in and they are used instead of the recomputed ones.

With `algo.micro_batch_size`, each minibatch's forward/backward runs in micro-batches whose
losses are weighted by their share of the minibatch's aggregation denominator (valid tokens
for token-mean, sequences with a token for seq-mean-token-mean): the accumulated gradient
and the logged metrics are the whole minibatch's, and there is one optimizer step per
minibatch either way.

Rows whose advantage is exactly 0 add nothing to the clipped objective's gradient: when the
loss has no other term (no KL, no entropy bonus) they are forwarded without autograd, for
their share of the metrics only, and never backpropagated. Under GRPO every row of a
zero-variance group is such a row. The gradient, the optimizer step (a zero gradient is
still a step for Adam's moments) and the metrics are those of the full backward.

On several ranks (`npo.training.distributed`; the model wrapped by `wrap_model`) each rank
holds an equal, contiguous share of the batch's rows. The minibatches are cut from one
permutation of the global rows, the same on every rank; each rank forwards its own rows of
a minibatch, and the aggregation divides by the minibatch's global denominator (summed over
ranks) times the world size that DDP's gradient average divides out again: the gradient,
the step and the metrics are those of one process holding the whole batch. Every rank runs
exactly one gradient-syncing backward per minibatch (the others under `no_sync`; a rank
whose rows are all idle backpropagates one idle part, whose gradient is exactly 0). An
FSDP-sharded model runs each minibatch inside `full_weights`, its parts' forwards needing
no collective, and steps on its shards.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import PreTrainedModel

from npo.algo import agg_loss, entropy_from_logits, kl_penalty, policy_loss, token_logprobs
from npo.config import AlgoConfig, LossAgg
from npo.rollout import RolloutBatch
from npo.training.distributed import Ranks, clip_grad_norm, full_weights, no_sync
from npo.training.forward import response_logits


def _forward(model: PreTrainedModel, batch: RolloutBatch) -> Tensor:
    return response_logits(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask
    )


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, batch: RolloutBatch, temperature: float, chunk: int | None = None
) -> Tensor:
    """Per-token log-probs [B, R] of the batch's responses under `model` (no grad), `chunk`
    rows per forward pass (algo.micro_batch_size; None = 256)."""
    chunk = chunk or 256
    batch = batch.to(model.device)
    out = []
    width = batch.response_ids.shape[1]
    for i in range(0, len(batch), chunk):
        part = batch.select(torch.arange(i, min(i + chunk, len(batch)))).trimmed()
        logp = token_logprobs(_forward(model, part), part.response_ids, temperature)
        logp = logp * part.response_mask
        out.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
    return torch.cat(out)


def agg_denominator(mask: Tensor, agg: LossAgg | str) -> Tensor:
    """What `agg_loss(·, mask, agg)` divides by (before its clamp to >= 1): the valid tokens
    (token-mean) or the sequences holding one (seq-mean-token-mean). mask [B, T] -> scalar.

    A micro-batch's loss times its denominator / the minibatch's adds up to the minibatch's
    loss, since agg_loss is a sum over tokens (or sequences) divided by this count.

    >>> m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    >>> agg_denominator(m, "token-mean").item(), agg_denominator(m, "seq-mean-token-mean").item()
    (3, 2)
    """
    m = mask.bool()
    if agg == LossAgg.token_mean:
        return m.sum()
    if agg == LossAgg.seq_mean_token_mean:
        return m.any(dim=-1).sum()
    raise ValueError(f"unknown loss aggregation {agg!r}; known: {[a.value for a in LossAgg]}")


# policy_loss's ratio statistics are token-means over the tokens of the PPO (not shaped)
# rows whatever the loss aggregation, and ratio_max is a max: they combine differently.
_RATIO_MEANS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/ratio_mean")
_RATIO_MAX = "actor/ratio_max"


def _ratio_tokens(mask: Tensor, shaped_rows: Tensor | None) -> Tensor:
    m = mask.bool()
    if shaped_rows is not None:
        m = m & ~shaped_rows.bool().unsqueeze(-1)
    return m.sum()


def rows_without_gradient(advantages: Tensor, algo: AlgoConfig) -> Tensor:
    """Which rows' loss has zero gradient, so needs no backward pass: advantage exactly 0
    while the loss has no KL or entropy term. advantages [B] -> bool [B].

    >>> rows_without_gradient(torch.tensor([0.0, 1.5, 0.0]), AlgoConfig())
    tensor([ True, False,  True])
    >>> rows_without_gradient(torch.tensor([0.0, 1.5]), AlgoConfig(entropy_coef=0.01))
    tensor([False, False])
    """
    if algo.kl_coef > 0 or algo.entropy_coef > 0:
        return torch.zeros_like(advantages, dtype=torch.bool)
    return advantages == 0


def ppo_update(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    advantages: Tensor,
    algo: AlgoConfig,
    temperature: float,
    ref_model: PreTrainedModel | None = None,
    old_logprobs: Tensor | None = None,
    generator: torch.Generator | None = None,
    shaped_rows: Tensor | None = None,
    shaping_gamma: float = 0.1,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Optimise the clipped objective on `batch` with per-sequence `advantages` [B].

    old_logprobs [B, R] defaults to the current (pre-update) policy's own log-probs, so the
    first minibatch step starts at ratio 1 (with one update per batch they are taken from
    the update's own forward pass, detached). shaped_rows [B] (LUFFY teacher rows) use the
    shaped objective f(w) = w/(w + shaping_gamma). Each minibatch is forwarded in chunks of
    `algo.micro_batch_size` rows with gradients accumulated (see the module docstring).
    Returns metrics averaged over all updates. `ranks`: this rank's share of a batch split
    over several (`batch` holds rows rank*B .. rank*B+B-1 of the global batch; module
    docstring); the model is then the DDP-wrapped or FSDP-sharded policy.
    """
    ranks = ranks or Ranks.single()
    was_training = model.training
    batch = batch.to(model.device)
    advantages = advantages.to(model.device)
    if shaped_rows is not None:
        shaped_rows = shaped_rows.to(model.device)
    chunk = algo.micro_batch_size
    # With one update per batch the pre-update policy is the one being differentiated: its
    # detached log-probs are the old ones (ratio 1), so no extra forward pass is needed.
    one_update = algo.ppo_epochs == 1 and algo.minibatches == 1
    if old_logprobs is None and not one_update:
        with full_weights(model):
            old_logprobs = sequence_logprobs(model, batch, temperature, chunk)
    if old_logprobs is not None:
        old_logprobs = old_logprobs.to(model.device)
    ref_logprobs = None
    if algo.kl_coef > 0:
        if ref_model is None:
            raise ValueError("algo.kl_coef > 0 needs a reference model")
        ref_logprobs = sequence_logprobs(ref_model, batch, temperature, chunk).to(model.device)

    def loss_of(idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The objective of rows `idx` alone, aggregated over them, and its metrics."""
        mb = batch.select(idx).trimmed()
        width = mb.response_ids.shape[1]  # the padding no row of `idx` uses is not computed
        mask = mb.response_mask.float()
        logits = _forward(model, mb).float() / temperature
        logp = token_logprobs(logits, mb.response_ids)
        loss, metrics = policy_loss(
            logp,
            logp.detach() if old_logprobs is None else old_logprobs[idx, :width],
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
                kl_penalty(logp, ref_logprobs[idx, :width], algo.kl_estimator), mask, algo.loss_agg
            )
            loss = loss + algo.kl_coef * kl
            metrics["actor/kl_ref"] = kl.item()
        metrics["actor/entropy"] = entropy.item()
        metrics["actor/loss"] = loss.item()
        return loss, metrics

    def backward_minibatch(idx: Tensor) -> dict[str, float]:
        """Accumulate the gradient of rows `idx`' loss, micro-batch by micro-batch; returns
        the minibatch's metrics, each combined as the whole minibatch computes it."""

        def shaped(rows: Tensor) -> Tensor | None:
            return None if shaped_rows is None else shaped_rows[rows]

        mask = batch.response_mask
        # The denominators of the whole (global) minibatch; clamp_min(1): an empty
        # minibatch's loss is 0, and so is each of its parts' weight.
        loss_total = ranks.sum(agg_denominator(mask[idx], algo.loss_agg)).clamp_min(1).item()
        ratio_total = ranks.sum(_ratio_tokens(mask[idx], shaped(idx))).clamp_min(1).item()
        out: dict[str, float] = defaultdict(float)
        idle = idle_rows[idx]
        parts = [(part, True) for part in torch.split(idx[~idle], chunk or len(idx))]
        parts += [(part, False) for part in torch.split(idx[idle], chunk or len(idx))]
        parts = [(part, grad) for part, grad in parts if len(part)] or [(idx, True)]
        if ranks.active and not parts[0][1]:
            parts[0] = (parts[0][0], True)  # DDP: every rank takes part in the all-reduce
        last_grad = max(i for i, (_, grad) in enumerate(parts) if grad) if ranks.active else -1
        for i, (part, needs_grad) in enumerate(parts):
            w_loss = agg_denominator(mask[part], algo.loss_agg).item() / loss_total
            w_ratio = _ratio_tokens(mask[part], shaped(part)).item() / ratio_total
            # the forward too: DDP decides in its forward whether the backward all-reduces
            syncing = not needs_grad or not ranks.active or i == last_grad
            with torch.set_grad_enabled(needs_grad), nullcontext() if syncing else no_sync(model):
                loss, metrics = loss_of(part)
                if needs_grad:
                    # the ranks' gradients are averaged: world * (share of the global sum)
                    (loss * w_loss * ranks.world).backward()
            for k, v in metrics.items():
                if k == _RATIO_MAX:
                    out[k] = max(out[k], v)  # ratios are > 0; 0 = no PPO token (as policy_loss)
                else:
                    out[k] += v * (w_ratio if k in _RATIO_MEANS else w_loss)
        return ranks.sum_values(out, maxima=(_RATIO_MAX,))

    idle_rows = rows_without_gradient(advantages, algo)
    model.train()
    sums: dict[str, float] = defaultdict(float)
    updates = 0
    rows = len(batch) * ranks.world  # the global batch; ours are rows offset .. offset+len-1
    offset = ranks.rank * len(batch)
    size = rows // algo.minibatches
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(rows, generator=generator).to(model.device)
        for start in range(0, rows, size):
            optimizer.zero_grad(set_to_none=True)
            mb = order[start : start + size]
            mine = mb[(mb >= offset) & (mb < offset + len(batch))] - offset
            with full_weights(model):
                metrics = backward_minibatch(mine)
            if all(p.grad is None for p in model.parameters()):
                # every row idle: a zero gradient, on which Adam still steps (its moments)
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            grad_norm = clip_grad_norm(model, algo.max_grad_norm)
            optimizer.step()
            metrics["actor/grad_norm"] = grad_norm
            for k, v in metrics.items():
                sums[k] += v
            updates += 1
    model.train(was_training)
    return {k: v / updates for k, v in sums.items()}
