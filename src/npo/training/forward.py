"""Teacher-forced forward passes over (prompt, response) pairs, in the run's compute dtype
(`npo.policy.model.compute_context`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from npo.policy.model import compute_context


def response_logits(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits that predict each response token.

    prompt_ids, prompt_mask [B, P] (left-padded); response_ids, response_mask [B, R]
    (right-padded) -> logits [B, R, V] where logits[:, j] predicts response_ids[:, j].
    Position ids follow the attention mask so left padding does not shift positions.
    The logits are in the compute dtype (e.g. bfloat16 under autocast): cast them `.float()`
    before log-softmax.
    """
    device = model.device
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    with compute_context(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    p = prompt_ids.shape[1]
    r = response_ids.shape[1]
    return out.logits[:, p - 1 : p + r - 1]
