"""Put off-policy trajectories into on-policy groups (NPO step 3, and the baselines).

A source (`npo.guidance.sources`) picks the groups and trajectories; slot G of each picked
group (the last row) is replaced. Advantages are then computed over the mixed group as
usual; the replaced row carries its behaviour log-probs for the optional IS correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npo.algo.npo import mix_group_rewards
from npo.guidance.sources import Pick
from npo.rollout import RolloutBatch


@dataclass
class MixedGroups:
    """batch: B = N*G rows with guide rows swapped in; rewards [N, G] of the mixed groups;
    is_guide [B]: rows that came from the guide; gated [N]: groups below the gate;
    replaced [N]: groups that got a guide row (gated and cached)."""

    batch: RolloutBatch
    rewards: torch.Tensor
    is_guide: torch.Tensor
    gated: torch.Tensor
    replaced: torch.Tensor


def _widen(x: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x.clone()
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


def inject_guidance(
    batch: RolloutBatch, rewards: torch.Tensor, pick: Pick, pad_id: int
) -> MixedGroups:
    """Replace the last slot of each picked group. rewards [N, G], batch rows N*G."""
    n, g = rewards.shape
    if len(batch) != n * g or len(pick.gated) != n:
        raise ValueError(f"batch of {len(batch)} rows does not match {n} groups of {g}")
    guides = pick.replacements
    replaced = torch.zeros(n, dtype=torch.bool)
    replaced[list(guides)] = True

    width = max([batch.response_ids.shape[1], *(len(t.response_ids) for t in guides.values())])
    ids = _widen(batch.response_ids, width, pad_id)
    mask = _widen(batch.response_mask, width, 0)
    logprobs = _widen(batch.logprobs, width, 0.0)
    texts = list(batch.texts)
    is_guide = torch.zeros(n * g, dtype=torch.bool)
    guide_reward = torch.zeros(n)
    for i, traj in guides.items():
        row = i * g + g - 1
        length = len(traj.response_ids)
        ids[row] = pad_id
        ids[row, :length] = torch.tensor(traj.response_ids)
        mask[row] = 0
        mask[row, :length] = 1
        logprobs[row] = 0.0
        logprobs[row, :length] = torch.tensor(traj.logprobs)
        texts[row] = traj.text
        is_guide[row] = True
        guide_reward[i] = traj.reward
    mixed = RolloutBatch(
        prompt_ids=batch.prompt_ids,
        prompt_mask=batch.prompt_mask,
        response_ids=ids,
        response_mask=mask,
        logprobs=logprobs,
        texts=texts,
        prompt_index=batch.prompt_index,
    )
    return MixedGroups(
        batch=mixed,
        rewards=mix_group_rewards(rewards, replaced, guide_reward),
        is_guide=is_guide,
        gated=pick.gated,
        replaced=replaced,
    )
