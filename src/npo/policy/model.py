"""Policy loading: the built-in tiny Llama-style model, or any Hugging Face model folder.

Both go through `save_pretrained` / `from_pretrained`, so the code path that loads the toy
model is the one that loads a real Qwen checkpoint. The ids that end a response (the
tokenizer's EOS, the checkpoint's own generation_config EOS ids, `model.stop_tokens`) live on
`model.generation_config.eos_token_id`, so every checkpoint saves them with the weights.
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
from npo.policy.compute import DTYPES, attention, policy_device
from npo.policy.tokenizer import build_char_tokenizer
from npo.store.inputs import fetch_folder


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
        attn_implementation=attention() or "sdpa",
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
    # Only the stop ids are kept: the checkpoint's EOS ids (one or several) and ours.
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_ordered_ids([tokenizer.eos_token_id, *stop_token_ids(model)]),
        bos_token_id=tokenizer.bos_token_id,
    )


def _ordered_ids(ids: list[int | None]) -> list[int]:
    return [i for i in dict.fromkeys(ids) if i is not None]


def stop_token_ids(model: PreTrainedModel) -> list[int]:
    """The ids that end a response: `model.generation_config.eos_token_id` as a list (the
    tokenizer's EOS first for models from `init_policy` / `load_policy`)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list | tuple) else [int(eos)]


def stop_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The one id of `token`: a token of the vocabulary (special ones included, e.g.
    '<|im_end|>') or text that encodes to exactly one known token (e.g. a newline)."""
    unk = tokenizer.unk_token_id
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is not None and tid != unk:
        return int(tid)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != unk:
        return int(ids[0])
    why = "it is not in the vocabulary" if unk in ids else f"it encodes to {len(ids)} tokens"
    raise ValueError(f"model.stop_tokens: {token!r} is not a single token of the tokenizer: {why}")


def add_stop_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: list[str]
) -> None:
    """Make each of `tokens` end a response too: appended (deduplicated) to the stop ids on
    `model.generation_config`, which `save_pretrained` writes with the checkpoint."""
    ids = [stop_token_id(tokenizer, t) for t in tokens]
    model.generation_config.eos_token_id = _ordered_ids([*stop_token_ids(model), *ids])


def init_policy(
    cfg: ModelConfig, alphabet: str, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy named by `cfg.source` ('tiny' builds one, else a local HF
    folder or a store URI of one, fetched first), with `cfg.stop_tokens` added to its stop
    ids."""
    if cfg.source == "tiny":
        tokenizer = build_char_tokenizer(alphabet)
        model = build_tiny_model(cfg.tiny, tokenizer, seed)
        model = model.to(device=policy_device(), dtype=DTYPES[cfg.dtype])
    else:
        model, tokenizer = load_policy(fetch_folder(cfg.source), cfg.dtype)
    add_stop_tokens(model, tokenizer, cfg.stop_tokens)
    return model, tokenizer


def load_policy(
    path: Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer saved with `save_policy` (or any local HF causal-LM folder)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attention()
    ).to(policy_device())
    _plain_generation_config(model, tokenizer)
    return model, tokenizer


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write weights (safetensors), config and tokenizer into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
