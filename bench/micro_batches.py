"""What forwarding each micro-batch at its own width saves (`RolloutBatch.trimmed`).

One PPO update (`npo.training.rl_step.ppo_update`, `algo.micro_batch_size` rows per
forward/backward) of a small random Qwen2-shaped model on responses of skewed lengths, as
RLVR produces them (most short, a few up to `--response-len`): with every micro-batch
padded to the batch's longest response, and trimmed to its own. Prints both times and the
ratio; the gradient is the same either way (tests/test_training.py).

    .venv/bin/python bench/micro_batches.py [--rows 32] [--response-len 512] [--micro 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from npo.config import AlgoConfig
from npo.rollout.batch import RolloutBatch
from npo.training import rl_step

VOCAB = 4096


def skewed_batch(rows: int, prompt_len: int, response_len: int, seed: int) -> RolloutBatch:
    """`rows` responses with lengths response_len * u^3 (u uniform): most short."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(rows, generator=gen) ** 3 * response_len).long().clamp(min=8)
    mask = (torch.arange(response_len)[None] < lengths[:, None]).long()
    ids = torch.randint(0, VOCAB, (rows, response_len), generator=gen) * mask
    return RolloutBatch(
        prompt_ids=torch.randint(0, VOCAB, (rows, prompt_len), generator=gen),
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.long),
        response_ids=ids,
        response_mask=mask,
        logprobs=torch.zeros(rows, response_len),
        texts=[""] * rows,
        prompt_index=torch.arange(rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=512)
    parser.add_argument("--micro", type=int, default=2, help="algo.micro_batch_size")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt_len + args.response_len,
    )
    model = Qwen2ForCausalLM(config)
    batch = skewed_batch(args.rows, args.prompt_len, args.response_len, seed=1)
    advantages = torch.randn(args.rows)
    old = rl_step.sequence_logprobs(model, batch, 1.0, args.micro)
    algo = AlgoConfig(micro_batch_size=args.micro)

    def update_seconds(trim: bool) -> float:
        trimmed = RolloutBatch.trimmed
        if not trim:  # the padded baseline: every micro-batch at the batch's width
            RolloutBatch.trimmed = lambda self: self  # type: ignore[method-assign]
        try:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay as they are
            start = time.perf_counter()
            rl_step.ppo_update(model, optimizer, batch, advantages, algo, 1.0, old_logprobs=old)
            return time.perf_counter() - start
        finally:
            RolloutBatch.trimmed = trimmed  # type: ignore[method-assign]

    update_seconds(True)  # warm-up
    padded = min(update_seconds(False) for _ in range(args.repeats))
    trimmed = min(update_seconds(True) for _ in range(args.repeats))
    valid = int(batch.response_mask.sum())
    print(
        json.dumps(
            {
                "rows": args.rows,
                "micro_batch_size": args.micro,
                "valid_response_tokens": valid,
                "padded_response_tokens": args.rows * args.response_len,
                "padded_s": round(padded, 3),
                "trimmed_s": round(trimmed, 3),
                "padded/trimmed": round(padded / trimmed, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
