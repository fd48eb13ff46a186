"""Near-future guidance: the pass-rate gate, the mixed group, and the guide slot's π_old.

NPO (arXiv 2604.20733) changes where ONE slot of a group comes from: for a prompt whose
on-policy pass rate is below a threshold and whose guidance cache holds a verified-correct
trajectory from the near-future checkpoint π_{t+Δ}, slot G of the group is that trajectory.
Advantages (`npo.algo.compute_advantages`) and the clipped loss (`npo.algo.policy_loss`) are
unchanged; the functions here only build their inputs:

- `pass_rates`, `guidance_gate`: which groups get the guide (the paper gates at 0.6).
- `mix_group_rewards`: the rewards of the mixed groups, `[N, G]`.
- `old_logprobs_for_mix`: π_old of the PPO ratio, per row; the guide's log-probs with IS
  correction, the current policy's own without (the paper's ablation finds no loss either way).
- `luffy_shaped_loss`: the LUFFY comparison run's policy shaping of teacher tokens.
- `offpolicy_stats`: metrics of the guide rows (`npo/guide_*`).

Shapes: N prompts x G responses; B = N·G sequences x T response tokens with a `mask [B, T]`.
Pure tensor functions, no state. Tests: .venv/bin/python -m pytest tests/test_algo_npo.py -q
"""

from __future__ import annotations

import torch
from torch import Tensor


def pass_rates(rewards: Tensor) -> Tensor:
    """Mean reward of each group: the on-policy pass rate p̂(x) for 0/1 verifier rewards.

    rewards: [N, G] (bool, int or float; floats are averaged as they are) -> [N], float.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    return rewards.float().mean(dim=1)


def guidance_gate(pass_rate: Tensor, has_guide: Tensor, threshold: float) -> Tensor:
    """Which groups get the guide: p̂(x) < threshold (strict) and the cache holds a trajectory.

    pass_rate: [N] float, has_guide: [N] bool (or 0/1) -> [N] bool.
    threshold: the paper uses 0.6, so a group at exactly 0.6 is NOT guided. Since p̂ <= 1,
    any threshold > 1.0 guides every group with a cached trajectory (LUFFY-like mixing, no
    gate); 1.0 itself guides all but the fully solved groups. 0.0 disables guidance.
    """
    if pass_rate.dim() != 1 or tuple(has_guide.shape) != tuple(pass_rate.shape):
        raise ValueError(
            f"pass_rate and has_guide must both be [N], got {tuple(pass_rate.shape)} "
            f"and {tuple(has_guide.shape)}"
        )
    return (pass_rate < threshold) & has_guide.bool()


def mix_group_rewards(
    rewards: Tensor, replace: Tensor, guide_reward: Tensor | float = 1.0
) -> Tensor:
    """Rewards of the mixed groups: a copy with slot G (the last) of each replaced group set to
    the guide trajectory's reward.

    rewards: [N, G], replace: [N] bool (e.g. `guidance_gate`'s output),
    guide_reward: [N] or a scalar (1.0: cached guides are verified correct) -> [N, G], float.
    The paper replaces slot G. Any fixed slot is equivalent: the G on-policy samples are
    exchangeable, and group advantages do not depend on the order within a group. Using the
    last slot keeps the on-policy samples at indices 0..G-2 of every group.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    if tuple(replace.shape) != (rewards.shape[0],):
        raise ValueError(f"replace must be [N] = [{rewards.shape[0]}], got {tuple(replace.shape)}")
    out = rewards.float().clone()
    guide = torch.as_tensor(guide_reward, dtype=out.dtype, device=out.device)
    if guide.dim() != 0 and tuple(guide.shape) != (rewards.shape[0],):
        raise ValueError(f"guide_reward must be a scalar or [N], got {tuple(guide.shape)}")
    out[:, -1] = torch.where(replace.bool(), guide, out[:, -1])
    return out


def old_logprobs_for_mix(
    current: Tensor, behaviour: Tensor, is_offpolicy: Tensor, importance_sampling: bool
) -> Tensor:
    """π_old of the PPO ratio for a batch mixing on-policy rows and guide rows.

    current: [B, T] log-probs of the policy that sampled the on-policy rows, recomputed for
    every row before the update. behaviour: [B, T] log-probs the guide π_{t+Δ} gave its own
    tokens (read only on guide rows; anything elsewhere). is_offpolicy: [B] bool.
    -> [B, T], detached (π_old is a constant of the surrogate).
    - on-policy rows: always `current`.
    - guide rows with `importance_sampling`: `behaviour`, so ρ = π_θ / π_guide, clipped by
      `policy_loss` like any other token.
    - guide rows without it: `current`, so ρ = 1 at the first update: the guide slot is
      treated as if the current policy had sampled it.
    """
    if current.dim() != 2 or tuple(behaviour.shape) != tuple(current.shape):
        raise ValueError(
            f"current and behaviour must both be [B, T], got {tuple(current.shape)} "
            f"and {tuple(behaviour.shape)}"
        )
    if tuple(is_offpolicy.shape) != (current.shape[0],):
        raise ValueError(
            f"is_offpolicy must be [B] = [{current.shape[0]}], got {tuple(is_offpolicy.shape)}"
        )
    if not importance_sampling:
        return current.detach()
    return torch.where(is_offpolicy.bool().unsqueeze(-1), behaviour, current).detach()


def luffy_shaped_loss(logp: Tensor, advantages: Tensor, mask: Tensor, gamma: float = 0.1) -> Tensor:
    """Per-token loss of LUFFY's policy shaping for teacher tokens (arXiv 2504.14945).

    With the behaviour probability taken as 1, the importance weight of a teacher token is
    w = π_θ(token) = exp(logp); LUFFY replaces it by f(w) = w / (w + γ), which enlarges the
    gradient of low-probability teacher tokens, and does not clip:
        loss_t = -A · f(w_t),   d loss_t / d logp_t = -A · γ · w_t / (w_t + γ)².
    logp: [B, T] (carries grad), advantages: [B] (broadcast over tokens) or [B, T],
    mask: [B, T] -> [B, T], 0 off the mask (aggregate with `agg_loss(·, mask, agg)`).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if logp.dim() != 2 or tuple(mask.shape) != tuple(logp.shape):
        raise ValueError(
            f"logp and mask must both be [B, T], got {tuple(logp.shape)} and {tuple(mask.shape)}"
        )
    adv = _per_token(advantages, logp)
    m = mask.bool()
    # Zero logp off the mask first: padding with a large log-prob would make exp() inf and
    # inf / inf a nan gradient, even behind a later torch.where.
    w = torch.exp(torch.where(m, logp, 0.0))
    return torch.where(m, -adv * (w / (w + gamma)), 0.0)


def offpolicy_stats(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, is_offpolicy: Tensor
) -> dict[str, float]:
    """Metrics of the guide rows, over their response tokens only; {} when there are none.

    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T]; is_offpolicy: [B] bool.
    -> python floats, token-means over guide tokens (a [B] advantage counts once per token):
       npo/guide_adv_mean, npo/guide_ratio_mean, npo/guide_ratio_max, npo/guide_ratio_min
       (ratio = exp(logp - old_logp), the PPO ratio before clipping), npo/guide_logp_mean.
    """
    if logp.dim() != 2 or not (tuple(logp.shape) == tuple(old_logp.shape) == tuple(mask.shape)):
        raise ValueError(
            f"logp, old_logp, mask must all be [B, T], got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if tuple(is_offpolicy.shape) != (logp.shape[0],):
        raise ValueError(
            f"is_offpolicy must be [B] = [{logp.shape[0]}], got {tuple(is_offpolicy.shape)}"
        )
    with torch.no_grad():
        g = mask.bool() & is_offpolicy.bool().unsqueeze(-1)
        n = g.sum()
        if n.item() == 0:
            return {}
        adv = _per_token(advantages, logp).float()
        lp = torch.where(g, logp.float(), 0.0)
        ratio = torch.exp(torch.where(g, logp.float() - old_logp.float(), 0.0))
        stats = torch.stack(
            [
                torch.where(g, adv, 0.0).sum() / n,
                torch.where(g, ratio, 0.0).sum() / n,
                torch.where(g, ratio, 0.0).max(),  # ratio > 0, so 0 never wins the max
                torch.where(g, ratio, torch.inf).min(),
                lp.sum() / n,
            ]
        )
    keys = ("adv_mean", "ratio_mean", "ratio_max", "ratio_min", "logp_mean")
    return {f"npo/guide_{k}": v for k, v in zip(keys, stats.tolist(), strict=True)}


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    # [B] -> [B, T] broadcast; [B, T] must match exactly (no silent [B, 1] broadcasting).
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)
    if tuple(advantages.shape) == tuple(like.shape):
        return advantages
    raise ValueError(
        f"advantages must be [B] or [B, T] = {tuple(like.shape)}, got {tuple(advantages.shape)}"
    )


__all__ = [
    "guidance_gate",
    "luffy_shaped_loss",
    "mix_group_rewards",
    "offpolicy_stats",
    "old_logprobs_for_mix",
    "pass_rates",
]
