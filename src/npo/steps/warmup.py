"""Pipeline step: build the initial policy and warm it up on gold answers -> checkpoint 0.

Idempotent: when checkpoint 0 of the run exists (and the metadata DB recorded it), nothing
is recomputed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from npo.config import current_dump, public_dump
from npo.policy import init_policy
from npo.steps.context import RunConflict, RunContext
from npo.steps.evaluate import eval_settings, evaluate_policy
from npo.store.checkpoint import list_checkpoints, recorded_steps
from npo.training.history import record_checkpoint, record_metrics, truncate_history
from npo.training.seeding import batch_indices, derive_seed, seed_everything
from npo.training.sft import sft_step
from npo.training.state import fork_checkpoint, save_train_state


def warmup(ctx: RunContext) -> dict[str, float]:
    """Run the supervised warm-up and commit it as checkpoint 0; returns its eval metrics."""
    cfg = ctx.cfg
    # done once recorded: a checkpoint 0 whose recording died with the task is redone, as a
    # run with recorded checkpoints refuses to load an unrecorded one
    if 0 in list_checkpoints(ctx.store, ctx.run_id) and 0 in recorded_steps(ctx.db, ctx.run_id):
        return {}
    # where the gold targets are first used: a dataset line whose answer cannot score is
    # refused here, once per run (the math task's check)
    check = getattr(ctx.task, "check_gold_answers", None)
    if check is not None:
        check()
    source = cfg.warmup.init_from
    if source and 0 in list_checkpoints(ctx.store, source):
        return _reuse(ctx, source)
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
        problems = [train[i] for i in idx]
        metrics = sft_step(
            model, opt, tokenizer, problems, cfg.algo.max_grad_norm, cfg.algo.micro_batch_size
        )
        done += 1
        reached = False
        if done % cfg.warmup.check_every == 0 or done == cfg.warmup.steps:
            if target is not None:
                acc = evaluate_policy(model, tokenizer, ctx.task, evals, **eval_settings(cfg))[
                    "eval/accuracy"
                ]
                metrics["sft/eval_accuracy"] = acc
                reached = acc >= target
            ctx.tracker.log_metrics(metrics, step=done)
        ctx.progress("warm-up", cfg.warmup.steps if reached else done, cfg.warmup.steps, metrics)
        if reached:
            break
    result = evaluate_policy(model, tokenizer, ctx.task, evals, **eval_settings(cfg))
    result["warmup/steps"] = float(done)
    if done:  # its last train loss: near 0 at a low accuracy = memorised (summarize says)
        result["warmup/train_loss"] = float(metrics["sft/loss"])
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


def _warmup_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The config fields that determine checkpoint 0."""
    warm = {k: v for k, v in data["warmup"].items() if k != "init_from"}
    # where the model runs is not what it is: a CPU warm-up can seed a GPU run
    model = {k: v for k, v in data["model"].items() if k != "device"}
    return {
        "seed": data["seed"],
        "task": data["task"],
        "model": model,
        "warmup": warm,
        "max_new_tokens": data["rollout"]["max_new_tokens"],
        "eval_size": data["train"]["eval_size"],
    }


def warmup_mismatch(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """The parts of two dumped configs that make one's checkpoint 0 not the other's."""
    a, b = _warmup_identity(current_dump(theirs) or theirs), _warmup_identity(ours)
    return sorted(k for k in b if a.get(k) != b[k])


def _reuse(ctx: RunContext, source: str) -> dict[str, float]:
    """Fork checkpoint 0 (and its history row) of `source` after checking it is ours."""
    row = ctx.db.get_run(source)
    if row is None:
        raise RunConflict(
            f"warmup.init_from={source}: the store holds its checkpoint 0 but the metadata DB "
            f"({ctx.db.safe_url}) has no such run"
        )
    theirs, ours = row.config, public_dump(ctx.cfg)
    differ = warmup_mismatch(theirs, ours)
    if differ:
        raise RunConflict(
            f"warmup.init_from={source}: that run's {', '.join(differ)} settings differ "
            f"from this run's; its checkpoint 0 is not this run's warm-up"
        )
    manifest = fork_checkpoint(ctx.store, source, ctx.run_id, 0, db=ctx.db)
    (first,) = ctx.db.history(source, until_step=0)
    metrics = {k: v for k, v in first.items() if k not in ("step", "policy_step")}
    truncate_history(ctx, -1)
    record_metrics(ctx, metrics, global_step=0, policy_step=0)
    record_checkpoint(ctx, 0, manifest, metrics)  # again, with the history row's metrics
    return metrics
