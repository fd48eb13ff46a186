"""Rollouts with Hugging Face `generate`: batched sampling with the KV cache.

`sample(model, tokenizer, prompts, n, ...)` draws `n` responses per prompt and returns a
`RolloutBatch` whose behaviour log-probs are those of the tempered distribution we sampled
from (no top-k / top-p: see npo.policy.model). Greedy decoding (eval) is `temperature=0`.
A response ends at the first of the model's stop ids (`npo.policy.stop_token_ids`).
`generate` runs in the run's compute dtype (`npo.policy.model.compute_context`); the
recorded log-probs are float32 log-softmax of the logits it sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.policy.model import compute_context, stop_token_ids
from npo.rollout.batch import RolloutBatch


def response_mask_from_ids(response_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """[B, R] -> [B, R] mask: 1 up to and including the first stop token, 0 after it.

    >>> ids = torch.tensor([[5, 2, 0], [5, 6, 7], [9, 5, 2]])
    >>> response_mask_from_ids(ids, stop_ids=[2, 9]).tolist()
    [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    """
    stops = torch.as_tensor(list(stop_ids), dtype=response_ids.dtype, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops).long()
    # Count of stop tokens strictly before each position: a token is kept while that is 0.
    stops_before = torch.cumsum(is_stop, dim=1) - is_stop
    return (stops_before == 0).long()


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int | None = None,
) -> RolloutBatch:
    """Sample `n` responses for each prompt (grouped: rows i*n .. i*n+n-1 answer prompt i).

    temperature == 0 means greedy decoding (evaluation): its logprobs are not recorded (0).
    batch_size bounds how many sequences go through `generate` at once (None = all).
    """
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    was_training = model.training
    model.eval()
    expanded = [p for p in prompts for _ in range(n)]
    index = torch.arange(len(prompts)).repeat_interleave(n)
    chunk = batch_size or len(expanded)
    parts = [
        _generate(model, tokenizer, expanded[i : i + chunk], temperature, max_new_tokens)
        for i in range(0, len(expanded), chunk)
    ]
    model.train(was_training)
    batch = _concat(parts, tokenizer.pad_token_id)
    batch.prompt_index = index
    return batch


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    temperature: float,
    max_new_tokens: int,
) -> RolloutBatch:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    greedy = temperature <= 0
    stops = stop_token_ids(model)
    with compute_context(model):
        out = model.generate(
            **enc,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None,
            top_p=None,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=not greedy,  # R x [B, V]: a real model's vocabulary makes it large
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
    prompt_len = enc["input_ids"].shape[1]
    response_ids = out.sequences[:, prompt_len:]
    mask = response_mask_from_ids(response_ids, stops)
    if greedy:  # evaluation: no behaviour log-probs needed
        logp = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    else:
        logp = _drawn_logprobs(out.logits, response_ids, temperature) * mask
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        [ids[m.bool()].tolist() for ids, m in zip(response_ids, mask, strict=True)],
        skip_special_tokens=True,
    )
    return RolloutBatch(
        prompt_ids=enc["input_ids"].cpu(),
        prompt_mask=enc["attention_mask"].cpu(),
        response_ids=response_ids.cpu(),
        response_mask=mask.cpu(),
        logprobs=logp.cpu(),
        texts=texts,
        prompt_index=torch.zeros(len(prompts), dtype=torch.long),
    )


def _drawn_logprobs(
    logits: tuple[torch.Tensor, ...], drawn: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Tempered log-probs [B, R] of the drawn tokens [B, R] from the raw logits of each
    step (R x [B, V]); one step at a time, so no float32 [B, R, V] copy is ever made."""
    return torch.stack(
        [
            torch.log_softmax(step.float() / temperature, dim=-1)
            .gather(-1, drawn[:, t : t + 1])
            .squeeze(-1)
            for t, step in enumerate(logits)
        ],
        dim=1,
    )


def _pad_to(x: torch.Tensor, width: int, value: int | float, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    if len(parts) == 1:
        return parts[0]
    p = max(b.prompt_ids.shape[1] for b in parts)
    r = max(b.response_ids.shape[1] for b in parts)
    return RolloutBatch(
        prompt_ids=torch.cat([_pad_to(b.prompt_ids, p, pad_id, True) for b in parts]),
        prompt_mask=torch.cat([_pad_to(b.prompt_mask, p, 0, True) for b in parts]),
        response_ids=torch.cat([_pad_to(b.response_ids, r, pad_id, False) for b in parts]),
        response_mask=torch.cat([_pad_to(b.response_mask, r, 0, False) for b in parts]),
        logprobs=torch.cat([_pad_to(b.logprobs, r, 0.0, False) for b in parts]),
        texts=[t for b in parts for t in b.texts],
        prompt_index=torch.cat([b.prompt_index for b in parts]),
    )
