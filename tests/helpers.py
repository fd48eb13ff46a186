"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY = {
    "task": {"kind": "arithmetic", "digits": 2, "n_train": 512, "n_eval": 32},
    "model": {
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    },
    "warmup": {"steps": 10, "batch_size": 16, "lr": 3e-3},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 5},
    "train": {"eval_every": 3, "checkpoint_every": 3, "threads": 1},
}


# AutoNPO on the toy with one intervention forced at policy step 6 (rollback, guidance,
# replay): the pipeline tests' If branch, in-process and in containers.
FORCED_AUTONPO = {
    "method": "autonpo",
    "npo": {"guidance": {"gate": 1.5, "tries": 4}},
    "autonpo": {
        "check_every": 3,
        "window": 2,
        "candidates": [3, 6],
        "force_at": [6],
        "cooldown": 100,
        "mistake_below": 1.01,
        "confirm_prompts": 8,
    },
}


def run_history(run_dir: Path) -> list[dict]:
    """The history of the run `run_dir` (= <store.root>/<name>) from the default SQLite
    metadata DB under its store root: what the stages read, also mid-run."""
    from npo.store.metadata import MetadataDB, default_metadata_url

    with MetadataDB(default_metadata_url(run_dir.parent.resolve())) as db:
        return db.history(run_dir.name)


def write_tiny_config(path: Path, root: Path, name: str, steps: int, **extra: object) -> Path:
    """Write a seconds-long experiment YAML (1-layer model, 2-digit sums) and return its path.

    `extra` sections are merged into the defaults (e.g. store={...}, tracking={...}).
    """
    data = json.loads(json.dumps(TINY))
    data |= {"name": name, "store": {"root": str(root)}}
    data["train"] = {**data["train"], "steps": steps}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


# A chat format like Qwen's: a turn ends with <|im_end|>, the tokenizer's EOS is another token.
CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


# Qwen's chat template, reduced to what CHAT_TEMPLATE renders.
QWEN_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_hf_model(
    folder: Path, texts: list[str], seed: int = 0, chat_template: str | None = None
) -> Path:
    """A real-model-shaped folder: a randomly initialised Qwen2 causal LM (~0.1M parameters)
    and a byte-level BPE tokenizer trained on `texts`, with Qwen's special tokens
    (EOS <|endoftext|>, turn end <|im_end|>) and, if given, a chat template. Written with
    save_pretrained, as a hub checkpoint is; returns `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = chat_template
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
