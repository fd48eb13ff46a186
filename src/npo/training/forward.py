"""Teacher-forced forward passes over (prompt, response) pairs, in the run's compute dtype
(`npo.policy.compute.compute_context`).

Rows that share a prompt share its forward pass (`npo.policy.prefix.prompt_pass`) and the
responses run on top of its gathered KV cache. The logits are those of one pass over the
whole sequences (up to float rounding); the prompt work shrinks by the group size.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from npo.policy.compute import compute_context
from npo.policy.prefix import prompt_pass


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
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    distinct, rows = torch.unique(
        torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True
    )
    with compute_context(model):
        if len(distinct) == len(rows):  # nothing shared: one pass over the whole sequences
            return _whole_pass(model, prompt_ids, prompt_mask, response_ids, response_mask)
        return _shared_prompt_pass(
            model, distinct.split(prompt_ids.shape[1], dim=1), rows, response_ids, response_mask
        )


def _whole_pass(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    p, r = prompt_ids.shape[1], response_ids.shape[1]
    return out.logits[:, p - 1 : p + r - 1]


def _shared_prompt_pass(
    model: PreTrainedModel,
    distinct: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """distinct: (ids, mask) [U, P] of the distinct prompts; rows [B]: each row's prompt."""
    first, cache, mask = prompt_pass(model, *distinct, rows)
    first = first.unsqueeze(1)  # predicts response token 0
    if response_ids.shape[1] == 1:
        return first
    inputs = response_ids[:, :-1]
    positions = mask.sum(dim=1, keepdim=True) + torch.arange(inputs.shape[1], device=mask.device)
    rest = model(
        input_ids=inputs,
        attention_mask=torch.cat([mask, response_mask[:, :-1]], dim=1),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return torch.cat([first, rest.logits], dim=1)
