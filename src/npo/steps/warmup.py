"""Pipeline step: build the initial policy and warm it up on gold answers -> checkpoint 0.

Idempotent: when checkpoint 0 of the run exists (and the metadata DB recorded it), nothing
is recomputed. Every `warmup.checkpoint_every` supervised steps the warm-up commits its
progress under its own run id (`<run>.warmup`), so a task that dies resumes from there with
the same batches ahead of it; checkpoint 0 replaces those checkpoints when it is committed.

With more than one rank on one node (distributed.nproc_per_node; `on_ranks`) the task runs
the warm-up on them (npo.steps.ranks) and reads checkpoint 0 back: each rank trains on its
share of every batch (npo.training.sft) and evaluates its share of the eval prompts, the
model wrapped as the train stage wraps it (DDP or FSDP), and rank 0 alone writes, in the
one-process format.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from npo.config import ExperimentConfig, current_dump, public_dump
from npo.policy.model import init_policy
from npo.steps.context import RunConflict, RunContext, warmup_progress_id
from npo.steps.evaluate import eval_settings, evaluate_on_ranks
from npo.steps.ranks import RanksFailed, needs_ranks, run_on_ranks
from npo.store.checkpoint import checkpoint_uri, list_checkpoints, manifest_digest, recorded_steps
from npo.tasks import Problem
from npo.training.distributed import (
    Ranks,
    backend_for,
    current,
    full_weights,
    load_optimizer,
    to_save,
    unwrap,
    wrap_model,
)
from npo.training.history import record_checkpoint, record_metrics, truncate_history
from npo.training.seeding import batch_indices, derive_seed, seed_everything, set_rng_state
from npo.training.sft import sft_step
from npo.training.state import fork_checkpoint, load_train_state, save_train_state

# model, tokenizer, optimizer, supervised steps done, seconds spent, that step's metrics
_Resumed = tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.optim.Optimizer, int, float, dict]


def _committed(ctx: RunContext) -> bool:
    # done once recorded: a checkpoint 0 whose recording died with the task is redone, as a
    # run with recorded checkpoints refuses to load an unrecorded one
    return 0 in list_checkpoints(ctx.store, ctx.run_id) and 0 in recorded_steps(ctx.db, ctx.run_id)


def on_ranks(cfg: ExperimentConfig) -> bool:
    """Whether this task runs the warm-up on the config's ranks: on one node, where their
    devices are (nccl: a GPU per rank in this pod). A multi-node config (the pipeline runs
    no cluster job for the prepare task) or a pod without the GPUs warms up in one
    process, as it does with one rank: the result is the same, only slower."""
    if not needs_ranks(cfg) or cfg.distributed.nodes > 1:
        return False
    gpus = torch.cuda.device_count()
    return backend_for(cfg) != "nccl" or gpus >= cfg.distributed.nproc_per_node


def warmup(ctx: RunContext) -> dict[str, float]:
    """Run the supervised warm-up and commit it as checkpoint 0; returns its eval metrics
    (none when it was committed already)."""
    cfg = ctx.cfg
    if _committed(ctx):
        return {}
    # where the gold targets are first used: a dataset line whose answer cannot score is
    # refused here, once per run (the math task's check)
    check = getattr(ctx.task, "check_gold_answers", None)
    if check is not None:
        check()
    source = cfg.warmup.init_from
    if source and 0 in list_checkpoints(ctx.store, source):
        return _reuse(ctx, source)
    if on_ranks(cfg):  # the ranks commit checkpoint 0 (below); its history row is read back
        if cfg.warmup.batch_size < cfg.distributed.world_size:
            raise ValueError(
                f"warmup.batch_size ({cfg.warmup.batch_size}) < {cfg.distributed.world_size} "
                "ranks: each rank trains on a share of every batch, at least one problem"
            )
        run_on_ranks(cfg, "prepare", {})
        if not _committed(ctx):
            raise RanksFailed(f"warm-up of {ctx.run_id}: the ranks ended without checkpoint 0")
        (first,) = ctx.db.history(ctx.run_id, until_step=0)
        return {k: v for k, v in first.items() if k not in ("step", "policy_step")}
    ranks = current()
    if ranks.main:
        truncate_history(ctx, -1)  # rows of an attempt that died before checkpoint 0
    ranks.barrier()
    seed_everything(derive_seed(cfg.seed, 0, stream=2))
    resumed = _resume(ctx, ranks)
    if resumed is None:
        model, tokenizer = init_policy(cfg.model, ctx.task.alphabet(), cfg.seed)
        # the same seeded init on every rank (FSDP shards it as it is)
        model = wrap_model(model, ranks, cfg.distributed.strategy)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.0)
        done, spent, metrics = 0, 0.0, {}
    else:
        model, tokenizer, opt, done, spent, metrics = resumed
    train = ctx.task.train_problems()
    evals = ctx.task.eval_problems()[: cfg.train.eval_size]
    started = time.perf_counter() - spent
    target = cfg.warmup.target_accuracy
    reached = False
    while done < cfg.warmup.steps and not reached:
        # each step's batch is a function of the step alone: a resumed warm-up draws the
        # batches the uninterrupted one would have
        idx = batch_indices(len(train), cfg.warmup.batch_size, done, derive_seed(cfg.seed, 0, 3))
        problems = [train[i] for i in idx][ranks.uneven_shard(len(idx))]
        metrics = sft_step(
            model,
            opt,
            tokenizer,
            problems,
            cfg.algo.max_grad_norm,
            cfg.algo.micro_batch_size,
            ranks,
        )
        done += 1
        if done % cfg.warmup.check_every == 0 or done == cfg.warmup.steps:
            if target is not None:
                acc = _evaluate(ctx, model, tokenizer, evals, ranks, sampled=False)
                acc = acc["eval/accuracy"]
                metrics["sft/eval_accuracy"] = acc
                reached = acc >= target  # the same on every rank: the whole set's accuracy
            ctx.tracker.log_metrics(metrics, step=done)
        if ranks.main:
            shown = cfg.warmup.steps if reached else done
            ctx.progress("warm-up", shown, cfg.warmup.steps, metrics)
        if not reached and done < cfg.warmup.steps and done % cfg.warmup.checkpoint_every == 0:
            seconds = time.perf_counter() - started
            _save_progress(ctx, model, tokenizer, opt, done, seconds, metrics, ranks)
    result = _evaluate(ctx, model, tokenizer, evals, ranks)
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
    weights, _ = to_save(model, None, ranks)  # FSDP: gathered to rank 0
    if ranks.main:
        # Step 0 row of the history: the RL phase's starting accuracy.
        record_metrics(ctx, result, global_step=0, policy_step=0)
        manifest = save_train_state(ctx.store, ctx.run_id, 0, weights, tokenizer, None, state)
        record_checkpoint(ctx, 0, manifest, result)
        _drop_progress(ctx)  # checkpoint 0 supersedes them
    ranks.barrier()  # a rank that returns finds checkpoint 0 committed
    return result


def _evaluate(
    ctx: RunContext,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evals: list[Problem],
    ranks: Ranks,
    sampled: bool = True,
) -> dict[str, float]:
    # sampled=False: greedy only (the target checks; the sampled eval is the RL start's)
    settings = eval_settings(ctx.cfg) | ({} if sampled else {"samples": 0})
    with full_weights(model):  # FSDP: uneven shares, no collective inside
        return evaluate_on_ranks(unwrap(model), tokenizer, ctx.task, evals, ranks, **settings)


def _save_progress(
    ctx: RunContext,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    opt: torch.optim.Optimizer,
    done: int,
    seconds: float,
    metrics: dict[str, float],
    ranks: Ranks,
) -> None:
    """Commit the warm-up after `done` supervised steps (weights, AdamW state, RNG), so that
    an interrupted warm-up resumes there instead of at step 1 (rank 0 writes; under FSDP
    every rank takes part in the gather)."""
    weights, moments = to_save(model, opt, ranks)
    if weights is None:
        return
    run_id = warmup_progress_id(ctx.run_id)
    ctx.db.upsert_run(run_id, run_id, f"{ctx.cfg.method}-warmup", ctx.cfg.seed, {})
    state = {"phase": "warmup", "warmup_step": done, "seconds": seconds, "metrics": metrics}
    manifest = save_train_state(ctx.store, run_id, done, weights, tokenizer, moments, state)
    ctx.db.record_checkpoint(
        run_id, done, checkpoint_uri(ctx.store, run_id, done), manifest_digest(manifest), metrics
    )


def latest_progress(ctx: RunContext) -> int | None:
    """The warm-up step of the newest committed and recorded warm-up checkpoint, if any."""
    run_id = warmup_progress_id(ctx.run_id)
    steps = sorted(set(list_checkpoints(ctx.store, run_id)) & set(recorded_steps(ctx.db, run_id)))
    return steps[-1] if steps else None


def _resume(ctx: RunContext, ranks: Ranks) -> _Resumed | None:
    """The warm-up's state at its newest checkpoint (the stop ids travel in the saved
    generation config), or None to start at step 1; every rank loads it, the model
    wrapped for `ranks`."""
    step = latest_progress(ctx)
    if step is None or step >= ctx.cfg.warmup.steps:
        return None
    cfg = ctx.cfg
    loaded = load_train_state(
        ctx.store, warmup_progress_id(ctx.run_id), step, cfg.model.dtype, ctx.db
    )
    model = wrap_model(loaded.model, ranks, cfg.distributed.strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.0)
    if loaded.optimizer_state is not None:
        load_optimizer(model, opt, loaded.optimizer_state)
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    if ranks.main:  # the task log says it (a pod's log on a cluster; pipeline.log locally)
        print(f"warm-up: resuming from its checkpoint at step {step} of {cfg.warmup.steps}")
    state = loaded.state
    return model, loaded.tokenizer, opt, step, float(state["seconds"]), state["metrics"]


def _drop_progress(ctx: RunContext) -> None:
    run_id = warmup_progress_id(ctx.run_id)
    ctx.store.delete_prefix(f"runs/{run_id}/")
    ctx.db.delete_run(run_id)


def _warmup_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The config fields that determine checkpoint 0."""
    # where it came from and where it kept its progress are not what it is
    warm = {k: v for k, v in data["warmup"].items() if k not in ("init_from", "checkpoint_every")}
    # where the model runs is not what it is: a CPU warm-up can seed a GPU run
    model = {k: v for k, v in data["model"].items() if k != "device"}
    return {
        "seed": data["seed"],
        "task": data["task"],
        "model": model,
        "warmup": warm,
        "max_new_tokens": data["rollout"]["max_new_tokens"],
        "eval_size": data["train"]["eval_size"],
        "eval_samples": data["train"].get("eval_samples", 0),  # its step-0 row carries them
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
