"""Pipeline step: build the initial policy and warm it up on gold answers -> checkpoint 0.

Idempotent: when checkpoint 0 of the run exists, nothing is recomputed.
"""

from __future__ import annotations

import time

import torch

from npo.policy import init_policy
from npo.steps.context import RunContext
from npo.steps.evaluate import evaluate_policy
from npo.store.checkpoint import list_checkpoints
from npo.training.history import record_checkpoint, record_metrics, truncate_history
from npo.training.seeding import batch_indices, derive_seed, seed_everything
from npo.training.sft import sft_step
from npo.training.state import save_train_state


def warmup(ctx: RunContext) -> dict[str, float]:
    """Run the supervised warm-up and commit it as checkpoint 0; returns its eval metrics."""
    cfg = ctx.cfg
    if 0 in list_checkpoints(ctx.store, ctx.run_id):
        return {}
    truncate_history(ctx, -1)  # rows of an attempt that died before checkpoint 0
    seed_everything(derive_seed(cfg.seed, 0, stream=2))
    model, tokenizer = init_policy(cfg.model, ctx.task.alphabet(), cfg.seed)
    train = ctx.task.train_problems()
    evals = ctx.task.eval_problems()[: cfg.train.eval_size]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.0)
    started = time.perf_counter()
    target = cfg.warmup.target_accuracy
    done = 0
    while done < cfg.warmup.steps:
        idx = batch_indices(len(train), cfg.warmup.batch_size, done, derive_seed(cfg.seed, 0, 3))
        metrics = sft_step(model, opt, tokenizer, [train[i] for i in idx], cfg.algo.max_grad_norm)
        done += 1
        reached = False
        if done % cfg.warmup.check_every == 0 or done == cfg.warmup.steps:
            if target is not None:
                acc = evaluate_policy(
                    model, tokenizer, ctx.task, evals, cfg.rollout.max_new_tokens
                )["eval/accuracy"]
                metrics["sft/eval_accuracy"] = acc
                reached = acc >= target
            ctx.tracker.log_metrics(metrics, step=done)
        ctx.progress("warm-up", cfg.warmup.steps if reached else done, cfg.warmup.steps, metrics)
        if reached:
            break
    result = evaluate_policy(model, tokenizer, ctx.task, evals, cfg.rollout.max_new_tokens)
    result["warmup/steps"] = float(done)
    result["perf/warmup_seconds"] = time.perf_counter() - started
    state = {
        "policy_step": 0,
        "global_step": 0,
        "phase": "warmup",
        "warmup_accuracy": result["eval/accuracy"],
    }
    # Step 0 row of the history: the RL phase's starting accuracy.
    record_metrics(ctx, result, global_step=0, policy_step=0)
    manifest = save_train_state(ctx.store, ctx.run_id, 0, model, tokenizer, None, state)
    record_checkpoint(ctx, 0, manifest, result)
    return result
