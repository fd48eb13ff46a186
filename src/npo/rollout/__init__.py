"""Generation backends. `hf` (transformers) runs everywhere; `vllm` is an optional GPU extra.

`rollout(cfg, model, tokenizer, prompts, n)` samples with the backend the config names;
both return the same RolloutBatch (behaviour log-probs of the tempered distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from npo.rollout.batch import RolloutBatch
from npo.rollout.hf import response_mask_from_ids, sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from npo.config import RolloutConfig

__all__ = ["RolloutBatch", "response_mask_from_ids", "rollout", "sample"]


def rollout(
    cfg: RolloutConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n: int,
    seeds: list[int] | None = None,
) -> RolloutBatch:
    """`n` samples per prompt at the config's temperature and length, on its backend (hf:
    `hf_batch_size` sequences per generate call; `seeds`: one generator per prompt group,
    see npo.rollout.hf. vLLM takes one seed per call and ignores them)."""
    if cfg.backend == "vllm":
        from npo.rollout import vllm

        # vLLM has its own sampler RNG: seed it from ours, so a run stays reproducible.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return vllm.sample(
            model,
            tokenizer,
            prompts,
            n=n,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.vllm_max_model_len,
        )
    return sample(
        model,
        tokenizer,
        prompts,
        n=n,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.hf_batch_size,
        seeds=seeds,
    )
