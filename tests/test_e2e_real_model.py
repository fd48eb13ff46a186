"""A real-model experiment as a cluster runs one, shrunk to CPU size.

A Qwen2 model with a BPE tokenizer and chat-format prompts (EOS <|endoftext|>, turns end
with <|im_end|>) and math JSONL datasets are staged into a real S3 server with `npo stage`;
the config names only their URIs (model.source, task.train_path / eval_path), as
configs/math_autonpo.yaml does. AutoNPO is forced to intervene once, so guidance is
generated and replayed with this tokenizer too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from helpers import CHAT_TEMPLATE, write_tiny_hf_model
from typer.testing import CliRunner

from npo.cli import app
from npo.config import load_config
from npo.experiment import run_experiment
from npo.report import load_history
from npo.store.artifacts import open_store
from npo.store.checkpoint import list_checkpoints, read_manifest

pytestmark = pytest.mark.slow


def write_sevens(path: Path, n: int, seed: int) -> list[str]:
    """`n` sums that all make 7: a short supervised warm-up teaches this random model to
    answer them, so its rollouts and the near-future guide earn rewards."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a = rng.randint(0, 7)
        lines.append({"prompt": f"What is {a} + {7 - a}?", "answer": 7})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [f"{d['prompt']} {d['answer']}" for d in lines]


@pytest.fixture
def staged(tmp_path, s3_env, s3_bucket, monkeypatch) -> dict[str, str]:
    """Model and datasets in the bucket, staged through the CLI; their URIs."""
    monkeypatch.setenv("NPO_CACHE_DIR", str(tmp_path / "cache"))
    texts = write_sevens(tmp_path / "train.jsonl", 48, seed=1)
    texts += write_sevens(tmp_path / "eval.jsonl", 8, seed=2)
    write_tiny_hf_model(tmp_path / "model", [CHAT_TEMPLATE, *texts])
    uris = {
        "model": f"s3://{s3_bucket}/models/tiny-qwen",
        "train": f"s3://{s3_bucket}/datasets/sums/train.jsonl",
        "eval": f"s3://{s3_bucket}/datasets/sums/eval.jsonl",
    }
    for source, uri in [("model", uris["model"]), ("train.jsonl", uris["train"])]:
        result = CliRunner().invoke(app, ["stage", str(tmp_path / source), uri])
        assert result.exit_code == 0, result.output
        assert f"-> {uri}" in result.stdout
    result = CliRunner().invoke(app, ["stage", str(tmp_path / "eval.jsonl"), uris["eval"]])
    assert "1 files" in result.stdout
    return uris


# pipeline: the Kubeflow pipeline through kfp.local, each stage in a child process, as a
# cluster's pods run it (the environment, S3 keys and NPO_CACHE_DIR, reaches them)
@pytest.mark.parametrize("engine", ["direct", "pipeline"])
def test_staged_model_and_datasets_run_end_to_end(tmp_path, staged, s3_bucket, engine):
    config = {
        "name": "real",
        "method": "autonpo",
        "task": {
            "kind": "math",
            "train_path": staged["train"],
            "eval_path": staged["eval"],
            "prompt_template": CHAT_TEMPLATE,
        },
        "model": {"source": staged["model"], "stop_tokens": ["<|im_end|>"]},
        "warmup": {"steps": 200, "lr": 3e-3, "batch_size": 16, "target_accuracy": 0.75},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12},
        "algo": {"lr": 1e-3, "minibatches": 2},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "threads": 1},
        "npo": {"guidance": {"gate": 1.5, "tries": 4}},  # guide every group
        "autonpo": {
            **{"check_every": 2, "window": 2, "candidates": [2], "force_at": [2]},
            **{"cooldown": 100, "mistake_below": 1.01, "confirm_prompts": 4},
        },
        "store": {"root": str(tmp_path / "runs"), "artifacts_uri": f"s3://{s3_bucket}/npo"},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = run_experiment(load_config(path), engine=engine)

    assert summary["warm-up accuracy"] >= 0.75 and "warning" not in summary
    store = open_store(f"s3://{s3_bucket}/npo")
    # the forced intervention at 2 rolls back to 0 and the replay lineage runs on to 4
    assert list_checkpoints(store, "real") == [0, 2]
    assert list_checkpoints(store, "real.r1") == [0, 2, 4]
    # What the warm-up started from is the staged model, bit for bit (the fetch checks it).
    (fetched,) = (tmp_path / "cache").glob("tiny-qwen-*")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (fetched / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    # Checkpoint 0 carries the stop ids: the tokenizer's EOS, then <|im_end|>.
    ckpt0 = tmp_path / "ckpt0"
    store.get_file("runs/real/ckpt/000000/policy/generation_config.json", ckpt0 / "gen.json")
    tokenizer = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    stops = json.loads((ckpt0 / "gen.json").read_text())["eos_token_id"]
    assert stops == [ids["<|endoftext|>"], ids["<|im_end|>"]]
    assert read_manifest(store, "real.r1", 4)["meta"]["policy_step"] == 4

    rows = load_history(tmp_path / "runs" / "real" / "metrics.jsonl")
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert all(8 * a == int(8 * a) for a in evals)  # the 8 staged eval prompts
    guided = [r["npo/guided_frac"] for r in rows if "npo/guided_frac" in r]
    assert len(guided) == 2 and min(guided) > 0  # the replay after step 2 had guide rows
    train = [r for r in rows if "reward/mean" in r]
    assert all(1 <= r["response/length_mean"] <= 12 for r in train)
