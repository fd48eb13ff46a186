"""Throughput of the toy setup: rollout, PPO training and greedy eval, in tokens per second.

For the default experiment (ExperimentConfig defaults: the ~1M-parameter tiny model, 3-digit
addition, 16 prompts x group 8, max_new_tokens 8) it times, on CPU:

- rollout: `npo.rollout.sample` at the config's temperature; tokens = generated response
  tokens (up to and including EOS, as counted by the response mask);
- train:   one `ppo_update` (1 epoch x 1 minibatch) on a sampled batch; tokens = real
  prompt + response tokens (padding excluded). ppo_update's own no-grad pass for the old
  log-probs is included, as it is in training;
- eval:    `evaluate_policy` (greedy decoding + verification) on the eval prompts (256 by
  default); tokens = generated response tokens.

Each figure is the median of --repeats timed calls after one untimed warm-up call. The model
is untrained, so its responses stop at random (EOS is one of 16 tokens): compare tokens/s, not
calls/s, with a trained policy. This script only measures; it asserts nothing.

Run:
    make bench
    .venv/bin/python bench/throughput.py [--threads 2] [--batch 16] [--group 8] \
        [--max-new-tokens 8] [--repeats 5] [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.utils import logging as hf_logging

from npo.config import ExperimentConfig
from npo.policy.model import init_policy
from npo.rollout import RolloutBatch, sample
from npo.steps.evaluate import evaluate_policy
from npo.tasks import make_task
from npo.training.rl_step import ppo_update


def parse_args() -> argparse.Namespace:
    defaults = ExperimentConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=defaults.train.threads, help="torch threads")
    p.add_argument(
        "--batch",
        type=int,
        default=defaults.rollout.prompts_per_step,
        help="prompts per rollout / update",
    )
    p.add_argument(
        "--group", type=int, default=defaults.rollout.group_size, help="responses per prompt"
    )
    p.add_argument("--max-new-tokens", type=int, default=defaults.rollout.max_new_tokens)
    p.add_argument("--eval-size", type=int, default=None, help="eval prompts (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per phase (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args()


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls of fn after one warm-up call, and the last result."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def row(name: str, work: str, tokens: float, seconds: float, **extra: float) -> dict[str, Any]:
    return {
        "phase": name,
        "work": work,
        "tokens_per_call": tokens,
        "seconds_per_call": seconds,
        "tokens_per_s": tokens / seconds,
        **extra,
    }


def main() -> None:
    args = parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ExperimentConfig.model_validate(
        {
            "seed": args.seed,
            "rollout": {
                "prompts_per_step": args.batch,
                "group_size": args.group,
                "max_new_tokens": args.max_new_tokens,
            },
            "algo": {"ppo_epochs": 1, "minibatches": 1},
        }
    )
    task = make_task(cfg.task)
    model, tokenizer = init_policy(cfg.model, task.alphabet(), cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [p.prompt for p in task.train_problems()[: cfg.rollout.prompts_per_step]]
    eval_problems = task.eval_problems()[: args.eval_size]
    r = cfg.rollout

    # ---------------------------------------------------------------- rollout
    def rollout() -> RolloutBatch:
        torch.manual_seed(args.seed)  # same draws every call, so every call does equal work
        return sample(model, tokenizer, prompts, r.group_size, r.temperature, r.max_new_tokens)

    sec, batch = timed(rollout, args.repeats)
    rows = [
        row(
            "rollout",
            f"{len(prompts)}x{r.group_size} seqs",
            batch.num_response_tokens,
            sec,
            mean_response_len=batch.num_response_tokens / len(batch),
        )
    ]

    # ---------------------------------------------------------------- train
    advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.algo.lr, weight_decay=cfg.algo.weight_decay
    )
    train_tokens = int(batch.prompt_mask.sum()) + batch.num_response_tokens

    def train() -> dict[str, float]:
        return ppo_update(model, optimizer, batch, advantages, cfg.algo, r.temperature)

    sec, _ = timed(train, args.repeats)
    rows.append(row("train", f"{len(batch)} seqs, 1 update", train_tokens, sec))

    # ---------------------------------------------------------------- eval
    def evaluate() -> dict[str, float]:
        return evaluate_policy(model, tokenizer, task, eval_problems, r.max_new_tokens)

    sec, result = timed(evaluate, args.repeats)
    eval_tokens = result["eval/response_length"] * result["eval/n"]
    rows.append(
        row(
            "eval",
            f"{len(eval_problems)} prompts, greedy",
            eval_tokens,
            sec,
            problems_per_s=len(eval_problems) / sec,
        )
    )

    # ---------------------------------------------------------------- report
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(
        f"npo throughput: {n_params / 1e6:.2f}M params, {args.threads} thread(s), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"median of {args.repeats}"
    )
    print(f"{'phase':<8} {'work':<22} {'tokens/call':>11} {'s/call':>8} {'tokens/s':>10}")
    for x in rows:
        print(
            f"{x['phase']:<8} {x['work']:<22} {x['tokens_per_call']:>11.0f} "
            f"{x['seconds_per_call']:>8.4f} {x['tokens_per_s']:>10.0f}"
        )
    print(f"train/rollout tokens/s ratio: {ratio:.2f}")
    print(f"eval problems/s: {rows[2]['problems_per_s']:.0f}")

    if args.json:
        report = {
            "params": n_params,
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "config": {
                "prompts_per_step": r.prompts_per_step,
                "group_size": r.group_size,
                "max_new_tokens": r.max_new_tokens,
                "temperature": r.temperature,
                "eval_prompts": len(eval_problems),
            },
            **{x["phase"]: {k: v for k, v in x.items() if k != "phase"} for x in rows},
            "train_over_rollout": ratio,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
