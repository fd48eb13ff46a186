"""Where and how this process computes: the policy device, the forward passes' dtype and
the attention kernels, set once per run (`npo.stages.use_compute`).

Apart from `npo.policy.model` because these need torch only: a model stage sets them at
start-up, before anything imports transformers' model classes (a second or more).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_device = torch.device("cpu")  # where loaded policies go; set per run by use_device
_compute_dtype: torch.dtype | None = None  # autocast dtype of forwards; set by use_compute_dtype
_attention: str | None = None  # attn_implementation of built or loaded policies; use_attention


def use_device(name: str) -> torch.device:
    """Place the policies this process builds or loads on `name` ("auto": cuda when one is
    visible, else cpu); returns the device. One process runs one run (a stage, a task)."""
    global _device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is visible")
    _device = torch.device(name)
    return _device


def policy_device() -> torch.device:
    """The device set by `use_device` (cpu until then)."""
    return _device


def use_compute_dtype(name: str | None) -> torch.dtype | None:
    """Run this process's forward passes (training, rollouts, eval) under autocast in `name`
    (None: in the parameter dtype); returns the dtype. Set per run, like `use_device`.
    float16 gets no loss scaling here (its small gradients can underflow): prefer bfloat16."""
    global _compute_dtype
    _compute_dtype = None if name is None else DTYPES[name]
    return _compute_dtype


def use_attention(name: str | None) -> None:
    """Build and load this process's policies with attention kernels `name` (transformers'
    attn_implementation; None = its default, sdpa). Set per run, like `use_device`: the
    choice is not saved with a checkpoint."""
    global _attention
    _attention = name


def attention() -> str | None:
    """The attention kernels set by `use_attention` (None: transformers' default)."""
    return _attention


def forward_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype `model`'s forward passes compute in: the compute dtype, else its own."""
    return _compute_dtype or model.dtype


def compute_context(model: PreTrainedModel) -> AbstractContextManager[object]:
    """Wrap a forward pass (or `generate`) of `model`: autocast to the compute dtype when it
    differs from the parameter dtype, else nothing. Weights, gradients and optimizer state
    stay in the parameter dtype; callers cast logits `.float()` for the loss math."""
    dtype = forward_dtype(model)
    if dtype == model.dtype:
        return nullcontext()
    if dtype == torch.float32:
        # autocast only lowers precision: it would silently run bf16 weights in bf16
        raise ValueError(
            f"model.compute_dtype=float32 needs model.dtype=float32 (weights are {model.dtype})"
        )
    return torch.autocast(model.device.type, dtype=dtype)
