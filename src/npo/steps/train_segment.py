"""Pipeline step: GRPO policy steps from a checkpoint, with evals and checkpoints.

    train_segment(ctx, start_step=0, end_step=150)

Loads the newest complete checkpoint in [start_step, end_step] (so a re-run after a crash
resumes where the last committed checkpoint left off), then for each policy step: sample G
responses for each of the step's prompts, verify, compute group advantages, run the clipped
PPO update. Evaluates greedy pass@1 every `train.eval_every` steps and commits a checkpoint
every `train.checkpoint_every` steps and at `end_step`.
"""

from __future__ import annotations

import time

import torch

from npo.algo import compute_advantages, zero_variance_fraction
from npo.rollout import RolloutBatch, sample
from npo.steps.context import RunContext
from npo.steps.evaluate import evaluate_policy
from npo.store.checkpoint import list_checkpoints
from npo.tasks import Problem
from npo.training.history import record_checkpoint, record_metrics, truncate_history
from npo.training.rl_step import ppo_update
from npo.training.seeding import batch_indices, derive_seed, seed_everything, set_rng_state
from npo.training.state import load_train_state, save_train_state


def rollout_metrics(rewards: torch.Tensor, batch: RolloutBatch, eos_id: int) -> dict[str, float]:
    """Reward and response statistics of one step. rewards [N, G]."""
    lengths = batch.response_mask.sum(dim=1).float()
    ended = ((batch.response_ids == eos_id) & batch.response_mask.bool()).any(dim=1)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/pass_at_g": float((rewards.max(dim=1).values > 0).float().mean()),
        "reward/all_correct_frac": float((rewards.min(dim=1).values > 0).float().mean()),
        "reward/zero_var_frac": zero_variance_fraction(rewards),
        "response/length_mean": float(lengths.mean()),
        "response/truncated_frac": 1.0 - float(ended.float().mean()),
    }


def _resume_point(ctx: RunContext, start_step: int, end_step: int) -> int:
    done = [s for s in list_checkpoints(ctx.store, ctx.run_id) if start_step <= s <= end_step]
    if not done:
        raise FileNotFoundError(
            f"run {ctx.run_id}: no checkpoint at step {start_step} to start the segment from"
        )
    return max(done)


def train_segment(ctx: RunContext, start_step: int, end_step: int) -> dict[str, float]:
    """Train policy steps start_step+1 .. end_step; returns the last step's metrics."""
    cfg, algo, ro = ctx.cfg, ctx.cfg.algo, ctx.cfg.rollout
    step = _resume_point(ctx, start_step, end_step)
    loaded = load_train_state(ctx.store, ctx.run_id, step, cfg.model.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
    if loaded.optimizer_state is not None:
        optimizer.load_state_dict(loaded.optimizer_state)
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    ref_model = None
    if algo.kl_coef > 0:
        ref_model = load_train_state(ctx.store, ctx.run_id, 0, cfg.model.dtype).model.eval()
    state = dict(loaded.state)
    truncate_history(ctx, state["global_step"])

    train: list[Problem] = ctx.task.train_problems()
    evals = ctx.task.eval_problems()[: cfg.train.eval_size]
    last: dict[str, float] = {}
    ctx.progress("grpo", step - start_step, end_step - start_step, last)
    while step < end_step:
        step += 1
        t0 = time.perf_counter()
        seed_everything(derive_seed(cfg.seed, step))
        # From the step number, not a scheduler object: a resumed run needs no extra state.
        lr = algo.lr * min(1.0, step / algo.lr_warmup_steps) if algo.lr_warmup_steps else algo.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(train), ro.prompts_per_step, step - 1, cfg.seed)
        problems = [train[i] for i in idx]
        batch = sample(
            model,
            tokenizer,
            [p.prompt for p in problems],
            n=ro.group_size,
            temperature=ro.temperature,
            max_new_tokens=ro.max_new_tokens,
        )
        t_rollout = time.perf_counter() - t0
        verdicts = ctx.task.verify_batch(
            [problems[i] for i in batch.prompt_index.tolist()], batch.texts
        )
        rewards = torch.tensor([v.reward for v in verdicts]).view(len(problems), ro.group_size)
        advantages = compute_advantages(algo.adv_estimator, rewards, algo.adv_eps).reshape(-1)
        t1 = time.perf_counter()
        metrics = ppo_update(model, optimizer, batch, advantages, algo, ro.temperature, ref_model)
        t_train = time.perf_counter() - t1
        tokens = batch.num_response_tokens + int(batch.prompt_mask.sum())
        metrics |= rollout_metrics(rewards, batch, tokenizer.eos_token_id)
        metrics |= {
            "actor/lr": lr,
            "perf/step_time_s": time.perf_counter() - t0,
            "perf/rollout_tokens_per_s": batch.num_response_tokens / max(t_rollout, 1e-9),
            "perf/train_tokens_per_s": tokens * algo.ppo_epochs / max(t_train, 1e-9),
        }
        state["global_step"] += 1
        state["policy_step"] = step
        if step % cfg.train.eval_every == 0 or step == end_step:
            metrics |= evaluate_policy(model, tokenizer, ctx.task, evals, ro.max_new_tokens)
        record_metrics(ctx, metrics, state["global_step"], step)
        if step % cfg.train.checkpoint_every == 0 or step == end_step:
            state["phase"] = "grpo"
            state["data_cursor"] = step * ro.prompts_per_step
            manifest = save_train_state(
                ctx.store, ctx.run_id, step, model, tokenizer, optimizer, state
            )
            record_checkpoint(ctx, step, manifest, {k: v for k, v in metrics.items() if "/" in k})
        ctx.progress("grpo", step - start_step, end_step - start_step, metrics)
        last = metrics
    return last
