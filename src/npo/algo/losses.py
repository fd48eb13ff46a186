"""Per-token quantities and the clipped policy-gradient loss of GRPO-style RLVR.

Pure tensor functions over a padded response batch: B sequences x T response tokens, with a
`mask [B, T]` (1 = real response token, 0 = prompt or padding). Nothing here holds state.

- `token_logprobs`, `entropy_from_logits`: from logits `[B, T, V]`, in float32.
- `agg_loss`: token-mean (default) or seq-mean-token-mean over the masked tokens.
- `policy_loss`: PPO clipped surrogate (arXiv 1707.06347) with GRPO's group advantages
  (arXiv 2402.03300) and DAPO's decoupled bounds "clip-higher" (arXiv 2503.14476):
  loss_t = max(-A·ρ_t, -A·clip(ρ_t, 1 - clip_low, 1 + clip_high)), ρ_t = exp(logπ - logπ_old).
  For NPO's guide slot, `old_logp` is the guide's log-prob when IS correction is on, or the
  current policy's own (detached) log-prob when it is off; optional `is_weights` multiply the
  per-token loss.
- `kl_penalty`: k1 and k3 estimators of KL(π || π_ref) per token (Schulman, "Approximating
  KL divergence", 2020); k3 is what GRPO uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from npo.algo.npo import luffy_shaped_loss
from npo.config import KLEstimator, LossAgg

# exp(±20) ≈ 4.9e8: large enough to never bind on sane policies, small enough that k3 and
# its gradient stay finite when a token's ref log-prob is -inf or far below the policy's.
_K3_LOG_RATIO_CLAMP = 20.0


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at the sampled tokens, in float32.

    logits: [B, T, V], tokens: [B, T] (int64) -> [B, T]. Use the sampling temperature so the
    log-probs are those of the distribution the tokens were drawn from.
    """
    z = logits.float() / temperature
    # gather - logsumexp: same value as log_softmax().gather() without a second [B, T, V].
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - Σ softmax(z)·z, in float32.

    logits: [B, T, V] -> [B, T]. Pass logits / temperature for the sampling distribution's
    entropy. Logits of -inf (masked vocabulary) contribute 0.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    pz = torch.where(p > 0, p * z, 0.0)  # 0·(-inf) would be nan
    return torch.logsumexp(z, dim=-1) - pz.sum(dim=-1)


def agg_loss(values: Tensor, mask: Tensor, mode: LossAgg | str = LossAgg.token_mean) -> Tensor:
    """Average per-token `values` over the tokens where `mask` is set.

    values: [B, T], mask: [B, T] (bool or 0/1) -> scalar.
    - "token-mean": Σ values·mask / Σ mask over the whole batch (each token weighs the same).
    - "seq-mean-token-mean": each sequence's token mean, then the mean over sequences with
      at least one token (each sequence weighs the same).
    An empty mask gives 0, still attached to `values`' graph (backward yields zero grads).
    Masked-out positions never reach the result, even when they hold inf or nan.
    """
    m = mask.bool()
    v = torch.where(m, values, 0.0)
    if mode == LossAgg.token_mean:
        return v.sum() / m.sum().clamp_min(1)
    if mode == LossAgg.seq_mean_token_mean:
        n_tok = m.sum(dim=-1)
        seq_mean = v.sum(dim=-1) / n_tok.clamp_min(1)
        has_tok = n_tok > 0
        return torch.where(has_tok, seq_mean, 0.0).sum() / has_tok.sum().clamp_min(1)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {[a.value for a in LossAgg]}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: LossAgg | str = LossAgg.token_mean,
    is_weights: Tensor | None = None,
    shaped_rows: Tensor | None = None,
    shaping_gamma: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with decoupled clip bounds; returns (loss, metrics).

    logp: [B, T] log-probs under the policy being trained (carries grad).
    old_logp: [B, T] behaviour log-probs (treated as constants; pass them detached).
    advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    mask: [B, T] response tokens. is_weights: optional [B, T] factors multiplied into the
    per-token loss (gradient flows through them if they carry grad).
    shaped_rows: optional [B] bool: those rows (LUFFY's teacher trajectories) use the shaped
    objective -A·f(π_θ), f(w) = w/(w + shaping_gamma), instead of the clipped ratio
    (`npo.algo.npo.luffy_shaped_loss`); the ratio metrics then cover the other rows only.
    -> loss: scalar, aggregated with `agg_loss(·, mask, agg)`;
       metrics (python floats, token-means over the mask):
       actor/pg_loss, actor/pg_clipfrac (share of tokens where the clipped branch is the
       strict max, i.e. the gradient is cut), actor/ppo_kl (mean of old_logp - logp),
       actor/ratio_mean, actor/ratio_max.
    """
    _same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)
    if is_weights is not None:
        _same_shape(logp=logp, is_weights=is_weights)
    m = mask.bool()

    # Zero the log-ratio off the mask, so padding with arbitrary log-probs cannot overflow
    # exp() and turn the masked sum (or its gradient) into nan.
    log_ratio = torch.where(m, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    if shaped_rows is not None:
        rows = shaped_rows.bool().unsqueeze(-1)
        shaped = luffy_shaped_loss(logp, advantages, mask, shaping_gamma)
        per_token = torch.where(rows, shaped, per_token)
        m = m & ~rows  # ratio statistics: the PPO rows only
    loss = agg_loss(per_token, mask, agg)

    with torch.no_grad():
        n = m.sum().clamp_min(1)
        masked_ratio = torch.where(m, ratio, 0.0)  # ratio > 0, so 0 never wins the max
        stats = torch.stack(
            [
                loss.detach(),
                ((clipped > unclipped) & m).sum() / n,
                -torch.where(m, log_ratio, 0.0).sum() / n,
                masked_ratio.sum() / n,
                masked_ratio.max() if masked_ratio.numel() else ratio.new_zeros(()),
            ]
        )
    # One .tolist(): a single device sync for all metrics.
    keys = ("pg_loss", "pg_clipfrac", "ppo_kl", "ratio_mean", "ratio_max")
    return loss, {f"actor/{k}": v for k, v in zip(keys, stats.float().tolist(), strict=True)}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator | str) -> Tensor:
    """Per-token estimate of KL(π || π_ref) from log-probs of tokens sampled from π.

    logp, ref_logp: [B, T] -> [B, T] (unmasked; aggregate with `agg_loss`).
    - k1 = logp - ref_logp: unbiased, can be negative.
    - k3 = exp(x) - x - 1 with x = ref_logp - logp: unbiased, always >= 0, lower variance.
      x is clamped to [-20, 20] so the value and its gradient stay finite.
    """
    _same_shape(logp=logp, ref_logp=ref_logp)
    if estimator == KLEstimator.k1:
        return logp - ref_logp
    if estimator == KLEstimator.k3:
        x = (ref_logp - logp).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
        return torch.exp(x) - x - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {[k.value for k in KLEstimator]}")


def _same_shape(**tensors: Tensor) -> None:
    # Broadcasting would silently turn a [B, T] vs [B, 1] mix-up into a wrong loss.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


__all__ = ["agg_loss", "entropy_from_logits", "kl_penalty", "policy_loss", "token_logprobs"]
