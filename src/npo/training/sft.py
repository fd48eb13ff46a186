"""Supervised warm-up on the task's gold responses.

RLVR needs a policy at the edge of competence: at 0% every group is all-wrong and GRPO gets
no signal, at 90% there is little left to learn. A short supervised phase on gold targets
puts the tiny toy model in between before RL starts. Forward passes run in the run's compute
dtype (npo.training.forward); `algo.micro_batch_size` bounds the rows per forward.

On several ranks (npo.training.distributed) each rank takes a share of the step's problems
and the loss divides by the whole batch's token count: the gradient the ranks average is
the one-process gradient, as in the RL update.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.tasks import Problem
from npo.training.distributed import Ranks, clip_grad_norm, full_weights, no_sync
from npo.training.forward import response_logits


def encode_targets(
    tokenizer: PreTrainedTokenizerBase, problems: list[Problem]
) -> dict[str, torch.Tensor]:
    """Tokenise prompts (left-padded) and gold targets + EOS (right-padded).

    Returns prompt_ids/prompt_mask [B, P] and response_ids/response_mask [B, R].
    """
    enc = tokenizer(
        [p.prompt for p in problems], return_tensors="pt", padding=True, padding_side="left"
    )
    # Any stop id ends a response; the tokenizer's EOS (the first stop id) is the one every
    # policy has, so a gold target does not depend on the run's model.stop_tokens.
    targets = [
        tokenizer(p.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for p in problems
    ]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "response_ids": ids,
        "response_mask": mask,
    }


def sft_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    max_grad_norm: float = 1.0,
    micro_batch_size: int | None = None,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """One cross-entropy step on the gold responses of `problems`; returns metrics.

    The token-mean loss is accumulated over chunks of `micro_batch_size` problems (None = all
    at once), each chunk's token sum divided by the whole batch's token count: the gradient
    is the whole batch's. `ranks`: `problems` is this rank's share (at least one problem)
    of a batch split over them, the model DDP-wrapped or FSDP-sharded; the token count is
    summed over the ranks, the loss scaled by the world size that their gradient average
    divides out, and only the last chunk's backward syncs. The metrics are the batch's.
    """
    ranks = ranks or Ranks.single()
    batch = {k: v.to(model.device) for k, v in encode_targets(tokenizer, problems).items()}
    model.train()
    tokens = ranks.sum(batch["response_mask"].float().sum())
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    parts = torch.arange(len(problems)).split(micro_batch_size or len(problems))
    with full_weights(model):  # FSDP: ranks may hold different numbers of chunks
        for i, rows in enumerate(parts):
            part = {k: v[rows.to(v.device)] for k, v in batch.items()}
            with nullcontext() if i == len(parts) - 1 else no_sync(model):
                logits = response_logits(model, **part)
                mask = part["response_mask"].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), part["response_ids"], reduction="none"
                )
                loss = (nll * mask).sum() / tokens
                (loss * ranks.world if ranks.active else loss).backward()
            total += loss.item()
    grad_norm = clip_grad_norm(model, max_grad_norm)
    optimizer.step()
    return {"sft/loss": ranks.sum_values({"loss": total})["loss"], "sft/grad_norm": grad_norm}
