"""Rollouts with vLLM on a GPU (optional extra: `pip install npo[vllm]`).

Returns the same `RolloutBatch` as the HF backend: left-padded prompts (our tokenizer's
ids, so training sees exactly the tokens vLLM was given), right-padded responses masked up to
and including the first stop token (any of the model's stop ids, see
npo.policy.stop_token_ids; vLLM gets the ones besides the tokenizer's EOS as
`stop_token_ids`), and behaviour log-probs of the *tempered* distribution the
tokens were drawn from: the engine runs with `logprobs_mode="processed_logprobs"` (log-probs
after temperature; no top-k/top-p/penalties are ever set), the convention of npo.rollout.hf.

One engine per process, built on first use from the policy being trained (saved once to a
temporary Hugging Face folder), and kept: before every call the current weights are loaded
into it (cast to the engine's dtype: model.compute_dtype when set, e.g. bfloat16 sampling
from float32 master weights), so a train task samples on-policy at every step and a new
segment (a new task, or a rollback to an older checkpoint) needs no restart. The engine
core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that loading weights is a
direct call, not an RPC.

Written against vLLM 0.32's public API (the `vllm` extra's pin): `LLM(logprobs_mode=...)`,
`SamplingParams`, `vllm.inputs.TokensPrompt` and `LLM.apply_model` for the weight sync.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.policy.compute import forward_dtype
from npo.policy.model import stop_token_ids
from npo.rollout.batch import RolloutBatch


class VllmUnavailable(RuntimeError):
    """rollout.backend=vllm without the vllm package or a CUDA device."""


@dataclass
class Completion:
    """One sampled response: its token ids (the stop token included when it stopped at one)
    and the behaviour log-prob of each."""

    token_ids: list[int]
    logprobs: list[float]


def batch_from_completions(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Completion]],
    stop_ids: Sequence[int],
    pad_id: int,
    decode: Callable[[list[list[int]]], list[str]],
) -> RolloutBatch:
    """RolloutBatch from per-prompt completions (prompt i's n responses become rows
    i*n .. i*n+n-1). Tokens after the first of any stop id are dropped, as the HF backend
    masks them.

    >>> b = batch_from_completions([[5, 6], [7]], [[Completion([1, 2], [-.1, -.2])],
    ...     [Completion([3, 9, 2, 4], [-.3, -.4, -.5, -.6])]], stop_ids=[2, 9], pad_id=0,
    ...     decode=lambda rows: [str(r) for r in rows])
    >>> b.prompt_ids.tolist(), b.response_ids.tolist(), b.response_mask.tolist()
    ([[5, 6], [0, 7]], [[1, 2], [3, 9]], [[1, 1], [1, 1]])
    """
    if len(prompt_ids) != len(completions):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completions)} completion lists")
    stops = set(stop_ids)
    rows_prompt, rows_ids, rows_lp, index = [], [], [], []
    for i, (prompt, outs) in enumerate(zip(prompt_ids, completions, strict=True)):
        for out in outs:
            if len(out.token_ids) != len(out.logprobs):
                raise ValueError(f"prompt {i}: {len(out.token_ids)} tokens but "
                                 f"{len(out.logprobs)} log-probs")  # fmt: skip
            ids = list(out.token_ids)
            cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            rows_prompt.append(list(prompt))
            rows_ids.append(ids[:cut])
            rows_lp.append(list(out.logprobs[:cut]))
            index.append(i)
    p = max(len(r) for r in rows_prompt)
    r = max(1, max(len(x) for x in rows_ids))
    b = len(rows_ids)
    prompt_t = torch.full((b, p), pad_id, dtype=torch.long)
    prompt_m = torch.zeros((b, p), dtype=torch.long)
    resp_t = torch.full((b, r), pad_id, dtype=torch.long)
    resp_m = torch.zeros((b, r), dtype=torch.long)
    logp = torch.zeros((b, r), dtype=torch.float32)
    for k, (pr, ids, lp) in enumerate(zip(rows_prompt, rows_ids, rows_lp, strict=True)):
        prompt_t[k, p - len(pr) :] = torch.tensor(pr, dtype=torch.long)
        prompt_m[k, p - len(pr) :] = 1
        if ids:
            resp_t[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            resp_m[k, : len(ids)] = 1
            logp[k, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=prompt_t,
        prompt_mask=prompt_m,
        response_ids=resp_t,
        response_mask=resp_m,
        logprobs=logp,
        texts=decode(rows_ids),
        prompt_index=torch.tensor(index, dtype=torch.long),
    )


def extra_stop_ids(stop_ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The stop ids vLLM must be told of (`SamplingParams.stop_token_ids`): all but the
    tokenizer's EOS, which vLLM stops at by itself.

    >>> extra_stop_ids([2, 7, 9], eos_id=2)
    [7, 9]
    """
    return [i for i in stop_ids if i != eos_id]


def completions_from_request(request_output: Any) -> list[Completion]:
    """vLLM RequestOutput -> our Completions: each CompletionOutput's token ids and, from
    its per-position {token id: Logprob} dicts, the log-prob of the token drawn."""
    out = []
    for c in request_output.outputs:
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise ValueError("vLLM returned no per-token log-probs (SamplingParams.logprobs)")
        drawn = [float(pos[t].logprob) for t, pos in zip(ids, c.logprobs, strict=True)]
        out.append(Completion(ids, drawn))
    return out


def importlib_available() -> bool:
    """Whether the vllm package is installed (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_available() -> None:
    """Raise VllmUnavailable naming what is missing (before any run state is written)."""
    if not importlib_available():
        raise VllmUnavailable(
            "rollout.backend=vllm needs the vllm extra (pip install 'npo[vllm]', or the "
            "CUDA image); use rollout.backend=hf on machines without it"
        )
    if not torch.cuda.is_available():
        raise VllmUnavailable("rollout.backend=vllm needs a CUDA GPU; none is visible")


class VllmEngine:
    """A vLLM engine for one policy architecture, weights synced from the trained model."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int,
                 gpu_memory_utilization: float, max_model_len: int) -> None:  # fmt: skip
        check_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._dir = tempfile.TemporaryDirectory(prefix="npo-vllm-")
        model.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        # The engine samples in the compute dtype (model.compute_dtype, else the weights'):
        # float32 master weights are cast to it on load, here and in every load_weights.
        self.dtype = forward_dtype(model)
        self.llm = LLM(
            model=self._dir.name,
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )

    def load_weights(self, model: PreTrainedModel) -> None:
        """Copy the trained model's current weights into the engine (every call: the
        policy changes every optimizer step)."""
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        dtype = self.dtype
        # Cast one tensor at a time (a generator per call): no second full copy of the
        # weights in the engine dtype is held while they load.
        self.llm.apply_model(lambda m: m.load_weights((k, v.to(dtype)) for k, v in weights))

    def sample(self, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int],
               prompts: list[str], n: int, temperature: float, max_new_tokens: int,
               seed: int) -> RolloutBatch:  # fmt: skip
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Tokenized as the HF backend does (BOS included): training sees the same ids.
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        params = SamplingParams(
            n=n,
            temperature=max(temperature, 0.0),
            top_p=1.0,
            top_k=0,  # 0: disabled
            max_tokens=max_new_tokens,
            logprobs=0,  # the drawn token's log-prob only
            seed=seed,
            stop_token_ids=extra_stop_ids(stop_ids, tokenizer.eos_token_id),
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False
        )
        return batch_from_completions(
            prompt_ids,
            [completions_from_request(o) for o in outputs],
            stop_ids,
            tokenizer.pad_token_id,
            lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True),
        )


_ENGINE: VllmEngine | None = None


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    *,
    seed: int = 0,
    gpu_memory_utilization: float = 0.5,
    max_model_len: int = 2048,
) -> RolloutBatch:
    """npo.rollout.hf.sample's contract on vLLM: `n` responses per prompt of the current
    weights of `model` (temperature 0: greedy)."""
    global _ENGINE
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    if _ENGINE is None:
        _ENGINE = VllmEngine(model, tokenizer, seed, gpu_memory_utilization, max_model_len)
    else:
        _ENGINE.load_weights(model)
    stop_ids = stop_token_ids(model)
    return _ENGINE.sample(tokenizer, stop_ids, prompts, n, temperature, max_new_tokens, seed)
