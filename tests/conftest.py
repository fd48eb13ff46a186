"""Shared fixtures: single-threaded torch and a tiny char-level policy with peaked outputs.

torch is imported inside the fixtures so files that do not use them (config, tasks) stay fast.
"""

from __future__ import annotations

import pytest

from npo.config import ModelConfig, TinyModelConfig

ALPHABET = "+0123456789="  # what the default arithmetic task (3-digit add) uses
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture
def alphabet() -> str:
    """The characters of the default arithmetic task, which tiny_policy's tokenizer covers."""
    return ALPHABET


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_policy(one_thread):
    """(model, tokenizer): a ~11k-parameter Llama-style model over ALPHABET, seeded.

    The weight matrices are redrawn at std 0.2: at the default init (std 0.02) every
    next-token distribution is nearly uniform, so a log-prob computed at the wrong position,
    temperature or padding would still look right to within a few hundredths.
    """
    import torch

    from npo.policy import init_policy

    model, tokenizer = init_policy(ModelConfig(tiny=TINY), ALPHABET, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tokenizer
