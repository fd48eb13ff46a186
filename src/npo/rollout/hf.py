"""Rollouts on a Hugging Face model: batched sampling with its KV cache.

`sample(model, tokenizer, prompts, n, ...)` draws `n` responses per prompt and returns a
`RolloutBatch` whose behaviour log-probs are those of the tempered distribution we sampled
from (no top-k / top-p: see npo.policy.model). Greedy decoding (eval) is `temperature=0`.
A response ends at the first of the model's stop ids (`npo.policy.stop_token_ids`).
Sampling runs in the run's compute dtype (`npo.policy.compute.compute_context`); the
recorded log-probs are float32 log-softmax of the logits it sampled from.

The decoding loop is the model's own forward with its KV cache rather than `generate`:
the G rows of a group then share one pass over their prompt (generate would run the
prompt once per row, which is most of the work for short answers), and no logits
processors run that would have to be switched off to keep the distribution plain.

With `seeds` (one per prompt) each group draws from its own generator: the responses of a
prompt then do not depend on which other prompts share the call or how `batch_size` cuts
it, so ranks that each sample a share of a step's prompts draw what one process drawing
them all would (up to float rounding of the batched forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.policy.compute import compute_context
from npo.policy.model import stop_token_ids
from npo.policy.prefix import prompt_pass
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
    seeds: Sequence[int] | None = None,
) -> RolloutBatch:
    """Sample `n` responses for each prompt (grouped: rows i*n .. i*n+n-1 answer prompt i).

    temperature == 0 means greedy decoding (evaluation): its logprobs are not recorded (0).
    batch_size bounds how many sequences go through `generate` at once (None = all; with
    `seeds` rounded down to whole groups, at least one). seeds: one per prompt, for each
    group's own generator (module docstring); None draws from torch's global RNG.
    """
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"sample(): {len(seeds)} seeds for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    expanded = [p for p in prompts for _ in range(n)]
    index = torch.arange(len(prompts)).repeat_interleave(n)
    chunk = batch_size or len(expanded)
    generators = None
    if seeds is not None:
        chunk = max(n, chunk - chunk % n)
        generators = [torch.Generator(model.device).manual_seed(int(s)) for s in seeds]
    parts = [
        _generate(
            model,
            tokenizer,
            expanded[i : i + chunk],
            temperature,
            max_new_tokens,
            None if generators is None else (generators[i // n : (i + chunk) // n], n),
        )
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
    groups: tuple[list[torch.Generator], int] | None = None,
) -> RolloutBatch:
    """One response per entry of `prompts` (which may repeat: a group's rows); `groups`:
    (one generator per run of n consecutive rows, n)."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    rows = torch.tensor([where[p] for p in prompts], device=model.device)
    enc = tokenizer(distinct, return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = enc["input_ids"].to(model.device)
    prompt_mask = enc["attention_mask"].to(model.device)
    stops = stop_token_ids(model)
    with compute_context(model):
        response_ids, logp = _decode(
            model, prompt_ids, prompt_mask, rows, temperature, max_new_tokens, stops, groups
        )
    mask = response_mask_from_ids(response_ids, stops)
    logp = logp * mask
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        [ids[m.bool()].tolist() for ids, m in zip(response_ids, mask, strict=True)],
        skip_special_tokens=True,
    )
    return RolloutBatch(
        prompt_ids=prompt_ids[rows].cpu(),
        prompt_mask=prompt_mask[rows].cpu(),
        response_ids=response_ids.cpu(),
        response_mask=mask.cpu(),
        logprobs=logp.cpu(),
        texts=texts,
        prompt_index=torch.zeros(len(prompts), dtype=torch.long),
    )


def _decode(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rows: torch.Tensor,
    temperature: float,
    max_new_tokens: int,
    stops: Sequence[int],
    groups: tuple[list[torch.Generator], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or, at temperature 0, pick the argmax of) up to `max_new_tokens` tokens for
    each row, from the KV cache of its prompt: each distinct prompt [U, P] is run once and
    its cache gathered out to the rows [B] that answer it. Stops early once every row has
    drawn a stop id; finished rows stay in the batch, so each row's draws do not depend on
    when the others stop. Returns the drawn ids [B, R] (anything after a row's stop is
    filler) and their log-probs [B, R] under softmax(logits / temperature) (0 if greedy)."""
    logits, cache, mask = prompt_pass(model, prompt_ids, prompt_mask, rows)
    position = mask.sum(dim=1, keepdim=True)
    stop_ids = torch.as_tensor(list(stops), dtype=torch.long, device=rows.device)
    ended = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    drawn: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        if temperature <= 0:
            token = logits.argmax(dim=-1)
            logps.append(torch.zeros(len(rows), device=rows.device))
        else:
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            token = _draw(logp.exp(), groups)
            logps.append(logp.gather(1, token[:, None]).squeeze(1))
        drawn.append(token)
        ended |= torch.isin(token, stop_ids)
        if t == max_new_tokens - 1 or bool(ended.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position + t,
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
    return torch.stack(drawn, dim=1), torch.stack(logps, dim=1)


def _draw(probs: torch.Tensor, groups: tuple[list[torch.Generator], int] | None) -> torch.Tensor:
    """One token per row of probs [B, V] -> [B]: from the global RNG, or each run of n rows
    from its own generator."""
    if groups is None:
        return torch.multinomial(probs, 1).squeeze(1)
    generators, n = groups
    return torch.cat(
        [
            torch.multinomial(probs[i * n : (i + 1) * n], 1, generator=g).squeeze(1)
            for i, g in enumerate(generators)
        ]
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
