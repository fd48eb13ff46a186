"""Is Countdown a testbed where NPO's claims can show? Properties of the task under a
warmed-up tiny policy, before any RL:

- diversity: distinct verified-correct responses per prompt among `--samples` samples
  (counted over prompts with at least one correct sample);
- sparsity: the share of all-wrong groups at the start of RL (groups of `--group`);
- the teacher's distribution gap: mean per-token log-prob, under the policy, of the external
  teacher's solutions (`Problem.teacher`) against the policy's own correct samples (what a
  near-future guide would be drawn from).

The warm-up is the project's recipe (npo.training.sft on the gold targets, AdamW) for
`--warmup-steps` steps, from the tiny model of the config; everything is seeded. This
script measures and prints; it asserts nothing.

Run:
    .venv/bin/python bench/countdown_testbed.py [--warmup-steps 600] [--set task.count=4 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from npo.algo import token_logprobs
from npo.config import load_config
from npo.policy.model import init_policy
from npo.rollout import sample
from npo.stages import use_compute
from npo.steps.evaluate import eval_settings, evaluate_policy
from npo.tasks import Problem, make_task
from npo.training.forward import response_logits
from npo.training.seeding import batch_indices, seed_everything
from npo.training.sft import encode_targets, sft_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup-steps", type=int, default=600)
    p.add_argument("--prompts", type=int, default=128, help="train prompts sampled")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (diversity)")
    p.add_argument("--group", type=int, default=8, help="RL group size (all-wrong share)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args()


@torch.no_grad()
def mean_token_logprob(model, tokenizer, problems: list[Problem], texts: list[str]) -> float:
    """Mean over all tokens (EOS included) of log pi(text | prompt), temperature 1."""
    rows = [Problem(p.id, p.prompt, p.answer, t) for p, t in zip(problems, texts, strict=True)]
    batch = encode_targets(tokenizer, rows)
    logits = response_logits(model, **batch).float()
    logp = token_logprobs(logits, batch["response_ids"])
    mask = batch["response_mask"].float()
    return float((logp * mask).sum() / mask.sum())


def main() -> None:
    args = parse_args()
    cfg = load_config(None, ["task.kind=countdown", *args.overrides])
    use_compute(cfg)
    task = make_task(cfg.task)
    seed_everything(cfg.seed)
    model, tokenizer = init_policy(cfg.model, task.alphabet(), cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.0)
    train = task.train_problems()
    started = time.perf_counter()
    loss = float("nan")
    for step in range(args.warmup_steps):
        idx = batch_indices(len(train), cfg.warmup.batch_size, step, cfg.seed)
        loss = sft_step(model, opt, tokenizer, [train[i] for i in idx])["sft/loss"]
    warmup_s = time.perf_counter() - started
    evals = task.eval_problems()[: cfg.train.eval_size]
    accuracy = evaluate_policy(model, tokenizer, task, evals, **eval_settings(cfg))
    accuracy = accuracy["eval/accuracy"]

    # Samples at the rollout temperature from prompts RL will see.
    problems = train[: args.prompts]
    batch = sample(
        model,
        tokenizer,
        [p.prompt for p in problems],
        n=args.samples,
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
    )
    owners = [problems[i] for i in batch.prompt_index.tolist()]
    verdicts = task.verify_batch(owners, batch.texts)
    correct: dict[str, set[str]] = defaultdict(set)
    correct_rows: list[tuple[Problem, str]] = []
    per_group: dict[str, list[float]] = defaultdict(list)
    for p, text, v in zip(owners, batch.texts, verdicts, strict=True):
        per_group[p.id].append(v.reward)
        if v.reward > 0:
            correct[p.id].add(text.strip())
            correct_rows.append((p, text.strip()))
    distinct = [len(correct[p.id]) for p in problems if correct[p.id]]
    # all-wrong share at the RL group size: the first `group` samples of each prompt
    groups = [rewards[: args.group] for rewards in per_group.values()]
    all_wrong = sum(1 for g in groups if not any(g)) / len(groups)
    teacher = mean_token_logprob(
        model, tokenizer, problems, [p.teacher or p.target for p in problems]
    )
    gold = mean_token_logprob(model, tokenizer, problems, [p.target for p in problems])
    own = (
        mean_token_logprob(
            model, tokenizer, [p for p, _ in correct_rows], [t for _, t in correct_rows]
        )
        if correct_rows
        else float("nan")
    )
    report = {
        "task": cfg.task.model_dump(),
        "warmup_steps": args.warmup_steps,
        "warmup_seconds": warmup_s,
        "warmup_final_loss": loss,
        "eval_accuracy_greedy": accuracy,
        "sample_accuracy": sum(v.reward for v in verdicts) / len(verdicts),
        "distinct_correct_per_prompt_mean": statistics.fmean(distinct) if distinct else 0.0,
        "distinct_correct_per_prompt_max": max(distinct, default=0),
        "prompts_with_a_correct_sample": len(distinct) / len(problems),
        "all_wrong_group_share": all_wrong,
        "logprob_per_token": {"teacher": teacher, "gold_style": gold, "own_correct": own},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
