"""Pipeline step: GRPO policy steps from a checkpoint, with evals and checkpoints.

    train_segment(ctx, start_step=0, end_step=150)

Loads the newest complete checkpoint in [start_step, end_step] (so a re-run after a crash
resumes where the last committed checkpoint left off), then for each policy step: sample G
responses for each of the step's prompts, verify, compute group advantages, run the clipped
PPO update. Evaluates greedy pass@1 every `train.eval_every` steps and commits a checkpoint
every `train.checkpoint_every` steps and at `end_step`.

With a `watch` (AutoNPO), every `watch.every` policy steps before `end_step` it commits a
checkpoint (a rollback target) and asks the watch whether to stop there: when it returns
signals, the segment ends at that step and the checkpoint records them (`state["trigger"]`),
so a retried task returns the same stop instead of training past it.

Under torchrun (distributed.nproc_per_node / nodes > 1; `npo.steps.ranks` starts it) every
rank runs this function: each samples and trains its share of the step's prompt groups
(npo.training.distributed), the sampling of a prompt is seeded by its place in the step so
the ranks draw what one process would, evaluation prompts are split too, and only rank 0
writes metrics, checkpoints (the same format whatever the rank count: a DDP replica, or
the FSDP shards gathered to rank 0) and progress. Sources with state of their own
(ExGRPO's pool) are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedModel

from npo.algo import compute_advantages, zero_variance_fraction
from npo.algo.npo import offpolicy_stats, old_logprobs_for_mix, pass_rates
from npo.guidance.inject import inject_guidance
from npo.guidance.sources import Stateless, TrajectorySource
from npo.learning_signal import (
    NO_SIGNAL,
    TRAINED_ZERO_VAR,
    trailing_streak,
    without_signal,
)
from npo.policy.model import stop_token_ids
from npo.rollout import RolloutBatch, rollout
from npo.steps.context import RunContext
from npo.steps.evaluate import eval_settings, evaluate_on_ranks
from npo.store.checkpoint import list_checkpoints, read_manifest, recorded_steps
from npo.tasks import Problem, Task
from npo.training.distributed import (
    Ranks,
    current,
    full_weights,
    load_optimizer,
    to_save,
    wrap_model,
)
from npo.training.history import record_checkpoint, record_metrics, truncate_history
from npo.training.rl_step import ppo_update, sequence_logprobs
from npo.training.seeding import batch_indices, derive_seed, seed_everything, set_rng_state
from npo.training.state import load_train_state, save_train_state

if TYPE_CHECKING:
    from npo.config import ExperimentConfig


def rollout_metrics(
    rewards: torch.Tensor, batch: RolloutBatch, stop_ids: Sequence[int]
) -> dict[str, float]:
    """Reward and response statistics of one step. rewards [N, G]; a response ended when it
    holds any of `stop_ids` (else it was truncated at max_new_tokens)."""
    lengths = batch.response_mask.sum(dim=1).float()
    stops = torch.as_tensor(list(stop_ids), dtype=torch.long, device=batch.response_ids.device)
    ended = (torch.isin(batch.response_ids, stops) & batch.response_mask.bool()).any(dim=1)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/pass_at_g": float((rewards.max(dim=1).values > 0).float().mean()),
        "reward/all_correct_frac": float((rewards.min(dim=1).values > 0).float().mean()),
        "reward/zero_var_frac": zero_variance_fraction(rewards),
        "response/length_mean": float(lengths.mean()),
        "response/truncated_frac": 1.0 - float(ended.float().mean()),
    }


def note_signal(cfg: ExperimentConfig, metrics: dict[str, float], streak: int) -> int:
    """The no-signal streak after a step with `metrics`. When it reaches
    `train.no_signal_steps`, marks that step (NO_SIGNAL: history, MLflow, and the progress,
    which says why) so a run that trains nothing does not go unnoticed."""
    streak = streak + 1 if without_signal(metrics) else 0
    if streak == cfg.train.no_signal_steps:
        metrics[NO_SIGNAL] = float(streak)
    return streak


def scored_rollout(
    cfg: ExperimentConfig,
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    problems: list[Problem],
    seeds: list[int] | None = None,
) -> tuple[RolloutBatch, torch.Tensor, dict[str, float]]:
    """Sample `rollout.group_size` responses per problem and verify them: the batch
    [N*G rows], the rewards [N, G] and the step's rollout metrics. seeds: one sampling
    generator per problem (see npo.rollout.hf)."""
    ro = cfg.rollout
    batch = rollout(ro, model, tokenizer, [p.prompt for p in problems], ro.group_size, seeds)
    verdicts = task.verify_batch([problems[i] for i in batch.prompt_index.tolist()], batch.texts)
    rewards = torch.tensor([v.reward for v in verdicts]).view(len(problems), ro.group_size)
    return batch, rewards, rollout_metrics(rewards, batch, stop_token_ids(model))


class Watch(Protocol):
    """Asked every `every` policy steps of a segment whether to stop there."""

    every: int

    def __call__(
        self, model: PreTrainedModel, tokenizer: Any, step: int, global_step: int
    ) -> dict[str, Any] | None:
        """The signals to stop with at policy step `step`, or None to go on."""
        ...


def finished_state(ctx: RunContext, start_step: int, end_step: int) -> dict[str, Any] | None:
    """The loop state the segment (start_step, end_step] ended with, read from its last
    checkpoint's manifest, when it already ended (at end_step, or stopped by its watch);
    None when there is training left. No weights are loaded."""
    step = _resume_point(ctx, start_step, end_step)
    state = read_manifest(ctx.store, ctx.run_id, step, ctx.db)["meta"]
    if step > start_step and state.get("trigger"):
        return state
    if step == end_step:  # an empty segment (start = end) must not report an older stop
        return {k: v for k, v in state.items() if k != "trigger"}
    return None


def _resume_point(ctx: RunContext, start_step: int, end_step: int) -> int:
    done = [s for s in list_checkpoints(ctx.store, ctx.run_id) if start_step <= s <= end_step]
    recorded = recorded_steps(ctx.db, ctx.run_id)
    if recorded:  # one saved but not recorded when the task died is redone, not trusted
        done = [s for s in done if s in recorded]
    if not done:
        raise FileNotFoundError(
            f"run {ctx.run_id}: no checkpoint at step {start_step} to start the segment from"
        )
    return max(done)


def _record_mistakes(
    ctx: RunContext, step: int, problems: list[Problem], rewards: torch.Tensor, ranks: Ranks
) -> None:
    """AutoNPO's mistake pool: prompts whose group pass rate is below the threshold (rank 0
    records every rank's)."""
    rates = pass_rates(rewards).tolist()
    failed = [(p.id, r) for p, r in zip(problems, rates, strict=True)]
    failed = [(pid, r) for pid, r in failed if r < ctx.cfg.autonpo.mistake_below]
    failed = [f for part in ranks.gather_object(failed) for f in part]
    if failed and ranks.main:
        ctx.db.record_mistakes(ctx.root_id, step, failed)


def _mix_in(
    ctx: RunContext,
    model: PreTrainedModel,
    batch: RolloutBatch,
    rewards: torch.Tensor,
    problems: list[Problem],
    source: TrajectorySource,
    pad_id: int,
) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Swap the source's rows into its groups; returns batch, rewards, pi_old, guide rows,
    metrics."""
    temperature = ctx.cfg.rollout.temperature
    mixed = inject_guidance(batch, rewards, source.pick(problems, rewards), pad_id)
    current = sequence_logprobs(model, mixed.batch, temperature, ctx.cfg.algo.micro_batch_size)
    # Shaped (LUFFY) rows do not use a ratio; NPO rows use the guide's log-probs if IS is on.
    importance_sampling = ctx.cfg.npo.guidance.importance_sampling and not source.shaped
    old = old_logprobs_for_mix(
        current,
        mixed.batch.logprobs.to(current.device),
        mixed.is_guide.to(current.device),
        importance_sampling,
    )
    advantages = compute_advantages(ctx.cfg.algo.adv_estimator, mixed.rewards).reshape(-1)
    metrics = {
        "npo/gated_frac": float(mixed.gated.float().mean()),
        "npo/guided_frac": float(mixed.replaced.float().mean()),
        TRAINED_ZERO_VAR: zero_variance_fraction(mixed.rewards),
        **offpolicy_stats(
            current,
            old,
            advantages,
            mixed.batch.response_mask.to(current.device),
            mixed.is_guide.to(current.device),
        ),
    }
    return mixed.batch, mixed.rewards, old, mixed.is_guide, metrics


def sampling_seeds(seed: int, global_step: int, positions: range) -> list[int]:
    """The sampling seed of each prompt of a step, by its place in the step's prompts: the
    same whichever rank samples it.

    >>> a = sampling_seeds(0, 3, range(4)); a[2:] == sampling_seeds(0, 3, range(2, 4))
    True
    """
    base = derive_seed(seed, global_step, stream=2)
    return [derive_seed(base, i, stream=3) for i in positions]


def train_segment(
    ctx: RunContext,
    start_step: int,
    end_step: int,
    source: Callable[[], TrajectorySource | None] = lambda: None,
    phase: str = "grpo",
    watch: Watch | None = None,
) -> dict[str, Any]:
    """Train policy steps start_step+1 .. end_step; with a `source` (NPO guidance, a LUFFY
    teacher, an RLEP replay: made only when there is training left) its trajectories take
    slot G of the groups it picks. A `watch` may stop the segment early (module docstring).

    Returns the loop state where the segment ended: policy_step, global_step, phase, and
    `trigger` (the watch's signals) when the watch stopped it.
    """
    done = finished_state(ctx, start_step, end_step)
    if done is not None:  # a re-run of a finished task: nothing to load
        return done
    cfg, algo, ro = ctx.cfg, ctx.cfg.algo, ctx.cfg.rollout
    step = _resume_point(ctx, start_step, end_step)
    ranks = current()
    loaded = load_train_state(ctx.store, ctx.run_id, step, cfg.model.dtype, db=ctx.db)
    model, tokenizer = loaded.model, loaded.tokenizer
    # what the update differentiates: DDP's wrapper, or the model itself sharded by FSDP
    replica = wrap_model(model, ranks, cfg.distributed.strategy)
    optimizer = torch.optim.AdamW(replica.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
    if loaded.optimizer_state is not None:
        load_optimizer(replica, optimizer, loaded.optimizer_state)
    if loaded.rng is not None:
        set_rng_state(loaded.rng)
    ref_model = None
    if algo.kl_coef > 0:
        # The reference is the warm-up policy of the experiment (branches included).
        ref = load_train_state(ctx.store, ctx.root_id, 0, cfg.model.dtype, db=ctx.db)
        ref_model = ref.model.eval()
    slot_source = source()
    if slot_source is not None:
        if ranks.active and not isinstance(slot_source, Stateless):
            raise NotImplementedError(
                f"{type(slot_source).__name__} keeps state of its own, which ranks would "
                "split: run this method with distributed.nproc_per_node = nodes = 1"
            )
        slot_source.restore(loaded.extra)
    state = dict(loaded.state)
    state.pop("trigger", None)  # a stop recorded at the start point is not this segment's
    if step < end_step and ranks.main:  # resuming mid-segment: rows past it died in a crash
        truncate_history(ctx, state["global_step"])
    ranks.barrier()  # the history every rank reads next is the truncated one

    # steps without signal so far (a resumed or later segment goes on counting)
    streak = trailing_streak(ctx.history(until_step=state["global_step"]))
    train: list[Problem] = ctx.task.train_problems()
    evals = ctx.task.eval_problems()[: cfg.train.eval_size]
    # Progress in policy steps of the whole run: a run cut into several train tasks (a
    # pipeline) keeps one bar per phase instead of restarting it per task.
    total = max(end_step, cfg.train.steps)
    if ranks.main:
        ctx.progress(phase, step, total, {})
    while step < end_step:
        step += 1
        t0 = time.perf_counter()
        # Sampling randomness follows the global step (a replayed policy step samples
        # afresh); the prompts follow the policy step (a replay revisits its segment).
        seed_everything(derive_seed(cfg.seed, state["global_step"] + 1))
        # From the step number, not a scheduler object: a resumed run needs no extra state.
        lr = algo.lr * min(1.0, step / algo.lr_warmup_steps) if algo.lr_warmup_steps else algo.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(train), ro.prompts_per_step, step - 1, cfg.seed)
        problems = [train[i] for i in idx]
        if slot_source is not None:
            problems = slot_source.select(problems, step)
        share = ranks.shard(len(problems))  # whole groups: advantages stay on one rank
        problems = problems[share]
        seeds = sampling_seeds(cfg.seed, state["global_step"] + 1, range(len(idx))[share])
        with full_weights(replica):  # FSDP: ranks stop sampling at different lengths
            batch, rewards, on_policy = scored_rollout(
                cfg, model, tokenizer, ctx.task, problems, seeds
            )
        t_rollout = time.perf_counter() - t0
        sampled_tokens = batch.num_response_tokens
        if cfg.method == "autonpo":
            _record_mistakes(ctx, step, problems, rewards, ranks)
        t1 = time.perf_counter()
        old, shaped, extra = None, None, {}
        if slot_source is not None:
            sampled, sampled_rewards = batch, rewards
            with full_weights(replica):
                batch, rewards, old, guide_rows, extra = _mix_in(
                    ctx, model, batch, rewards, problems, slot_source, tokenizer.pad_token_id
                )
            # after its pick: no self-replay
            slot_source.observe(problems, sampled, sampled_rewards)
            shaped = guide_rows if slot_source.shaped else None
        advantages = compute_advantages(algo.adv_estimator, rewards, algo.adv_eps).reshape(-1)
        metrics = ppo_update(
            replica,
            optimizer,
            batch,
            advantages,
            algo,
            ro.temperature,
            ref_model,
            old_logprobs=old,
            shaped_rows=shaped,
            shaping_gamma=cfg.baselines.luffy_gamma,
            ranks=ranks,
        )
        t_train = time.perf_counter() - t1
        tokens = batch.num_response_tokens + int(batch.prompt_mask.sum())
        # means over equal shards: the whole batch's mean is the mean of the ranks'
        metrics |= ranks.mean_values(on_policy | extra)
        counts = ranks.sum_values({"sampled": sampled_tokens, "trained": tokens})
        sampled_tokens, tokens = counts["sampled"], counts["trained"]
        metrics |= {
            "actor/lr": lr,
            "perf/step_time_s": time.perf_counter() - t0,
            "perf/rollout_tokens_per_s": sampled_tokens / max(t_rollout, 1e-9),
            "perf/train_tokens_per_s": tokens * algo.ppo_epochs / max(t_train, 1e-9),
        }
        streak = note_signal(cfg, metrics, streak)
        state["global_step"] += 1
        state["policy_step"] = step
        # a check may end the segment: evaluate there too, as at every segment's end
        checked = watch is not None and step % watch.every == 0 and step < end_step
        if step % cfg.train.eval_every == 0 or step == end_step or checked:
            with full_weights(replica):  # FSDP: uneven shares, no collective inside
                metrics |= evaluate_on_ranks(
                    model, tokenizer, ctx.task, evals, ranks, **eval_settings(cfg)
                )
        if ranks.main:
            record_metrics(ctx, metrics, state["global_step"], step)
        trigger = None
        if checked:  # rank 0 decides; every rank stops with it
            with full_weights(replica):  # FSDP: rank 0's forwards alone, no collective
                trigger = (
                    watch(model, tokenizer, step, state["global_step"]) if ranks.main else None
                )
            trigger = ranks.broadcast_object(trigger)
        saving = step % cfg.train.checkpoint_every == 0 or step == end_step or checked
        if saving:
            state["phase"] = phase
            state["data_cursor"] = step * ro.prompts_per_step
            if trigger is not None:
                state["trigger"] = trigger
        # FSDP gathers the shards to rank 0 (every rank takes part), DDP has them there
        weights, moments = to_save(replica, optimizer, ranks) if saving else (None, None)
        if saving and weights is not None:
            manifest = save_train_state(
                ctx.store,
                ctx.run_id,
                step,
                weights,
                tokenizer,
                moments,
                state,
                extra=slot_source.state_files() if slot_source is not None else None,
            )
            record_checkpoint(ctx, step, manifest, {k: v for k, v in metrics.items() if "/" in k})
        if saving:
            ranks.barrier()  # a rank that returns finds the segment's checkpoint committed
        if ranks.main:
            ctx.progress(phase, step, total, metrics)
        if trigger is not None:
            break
    return state
