"""Policy loading: the built-in tiny Llama-style model, or any local Hugging Face model folder.

Both go through `save_pretrained` / `from_pretrained`, so the code path that loads the toy
model is the one that loads a real Qwen checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from npo.config import ModelConfig, TinyModelConfig
from npo.policy.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_device = torch.device("cpu")  # where loaded policies go; set per run by use_device


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


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """A randomly initialised Llama-config causal LM sized by `cfg` (seeded, deterministic)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _plain_generation_config(model, tokenizer)
    return model


def _plain_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Sampling must draw from the plain tempered distribution: a checkpoint's own sampling
    # knobs (top-k/p, min-p, repetition penalty, suppressed tokens...) would make the
    # behaviour log-probs we record differ from the distribution we sampled from.
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def init_policy(
    cfg: ModelConfig, alphabet: str, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy named by `cfg.source`: 'tiny' builds one, else a local HF folder."""
    if cfg.source == "tiny":
        tokenizer = build_char_tokenizer(alphabet)
        model = build_tiny_model(cfg.tiny, tokenizer, seed)
        return model.to(device=_device, dtype=DTYPES[cfg.dtype]), tokenizer
    return load_policy(Path(cfg.source), cfg.dtype)


def load_policy(
    path: Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer saved with `save_policy` (or any local HF causal-LM folder)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(_device)
    _plain_generation_config(model, tokenizer)
    return model, tokenizer


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write weights (safetensors), config and tokenizer into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
