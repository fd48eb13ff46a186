"""One forward pass per distinct prompt, shared by the rows that answer it.

A GRPO batch holds G responses to each prompt. `prompt_pass` runs each distinct prompt
once with the KV cache on and gathers the cache out to the rows (an index_select, so
under autograd the gradients of every row flow back into the one prompt pass). Sampling
(`npo.rollout.hf`) and the teacher-forced passes of training (`npo.training.forward`)
both continue from it.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel


def prompt_pass(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, Cache, torch.Tensor]:
    """ids, mask [U, P] (left-padded distinct prompts), rows [B] (each row's prompt) ->
    the logits [B, V] that predict each row's first response token, the KV cache of the
    rows' prompts (batch B) and their attention mask [B, P], which the continuation extends
    (its first position id is the mask's row sum). Position ids follow the mask, as in a
    whole-sequence pass.
    """
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    cache.reorder_cache(rows)
    return out.logits[:, -1][rows], cache, mask[rows]
