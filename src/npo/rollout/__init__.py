"""Generation backends. `hf` (transformers) runs everywhere; `vllm` is an optional GPU extra."""

from npo.rollout.batch import RolloutBatch
from npo.rollout.hf import response_mask_from_ids, sample

__all__ = ["RolloutBatch", "response_mask_from_ids", "sample"]
