"""The RL phase of a run, by method: plain GRPO, NPO's manual schedules, AutoNPO.

This is the local engine: it calls the pipeline steps (npo.steps) in the order the Kubeflow
pipeline does. Every step is idempotent, so re-running after a crash replays the same
decisions from the committed checkpoints, caches and history, and resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npo.guidance.cache import GuidanceCache
from npo.guidance.schedule import Segment, plan_segments
from npo.guidance.sources import CachedGuidance, ExperienceReplay, GoldTeacher
from npo.steps.context import RunConflict, RunContext
from npo.steps.detect_plateau import detect_plateau
from npo.steps.generate_guidance import generate_guidance
from npo.steps.rollback import (
    Lineage,
    NoRollbackCandidate,
    checkpoint_at,
    choose_rollback_distance,
)
from npo.steps.train_segment import train_segment
from npo.store.checkpoint import latest_checkpoint
from npo.tasks import Problem
from npo.training.seeding import batch_indices
from npo.training.state import fork_checkpoint, load_train_state


def train(ctx: RunContext) -> None:
    """Run the RL phase of `ctx.cfg.method` from checkpoint 0 to train.steps."""
    METHODS[ctx.cfg.method](ctx)


def run_schedule(ctx: RunContext) -> None:
    """GRPO, or NPO's manual schedules: guided segments get a look-ahead guide first."""
    gate = ctx.cfg.npo.guidance.gate
    for segment in plan_segments(ctx.cfg):
        source = CachedGuidance(prepare_guidance(ctx, segment), gate) if segment.guide else None
        phase = f"npo·{segment.guide.kind}" if segment.guide else ctx.cfg.method
        train_segment(ctx, segment.start, segment.end, source=source, phase=phase)


def run_luffy(ctx: RunContext) -> None:
    """LUFFY-style external teacher: the gold solution takes slot G of every group."""
    tokenizer = load_train_state(ctx.store, ctx.run_id, 0, ctx.cfg.model.dtype).tokenizer
    source = GoldTeacher(tokenizer)
    train_segment(ctx, 0, ctx.cfg.train.steps, source=source, phase="luffy")


def run_exgrpo(ctx: RunContext) -> None:
    """ExGRPO-style own-past replay: half of each batch from the run's experience pool."""
    problems = {p.id: p for p in ctx.task.train_problems()}
    source = ExperienceReplay(problems, ctx.cfg.seed, ctx.cfg.baselines.exgrpo_fraction)
    train_segment(ctx, 0, ctx.cfg.train.steps, source=source, phase="exgrpo")


def run_rlep(ctx: RunContext) -> None:
    """RLEP-style far-future replay: each window's prompts get a verified trajectory from
    the last checkpoint of a finished run (no look-ahead: that run is already done)."""
    base, steps = ctx.cfg.baselines, ctx.cfg.train.steps
    assert base.rlep_run is not None
    final = latest_checkpoint(ctx.store, base.rlep_run)
    if final is None:
        raise RunConflict(f"baselines.rlep_run={base.rlep_run}: no checkpoint in the store")
    for t in range(0, steps, base.rlep_every):
        end = min(t + base.rlep_every, steps)
        cache = generate_guidance(
            ctx,
            f"{ctx.run_id}.rlep{t:06d}",
            guide=(base.rlep_run, final),
            current=(ctx.run_id, t),
            problems=segment_problems(ctx, t, end),
            policy_step=t,
        )
        train_segment(ctx, t, end, source=CachedGuidance(cache, base.rlep_gate), phase="rlep")


def segment_problems(ctx: RunContext, start: int, end: int) -> list[Problem]:
    """The training prompts of policy steps (start, end], each once, in order of use."""
    pool, per_step = ctx.task.train_problems(), ctx.cfg.rollout.prompts_per_step
    seen: dict[int, None] = {}
    for step in range(start, end):
        seen.update(dict.fromkeys(batch_indices(len(pool), per_step, step, ctx.cfg.seed)))
    return [pool[i] for i in seen]


def prepare_guidance(ctx: RunContext, segment: Segment) -> GuidanceCache:
    """Look ahead on a branch (unless Δ=0), then cache the guide's trajectories."""
    guide = segment.guide
    assert guide is not None
    guide_ref = (ctx.run_id, guide.branch_from)
    if guide.lookahead > 0:
        branch = ctx.branch(guide.branch)
        fork_checkpoint(ctx.store, ctx.run_id, branch.run_id, guide.branch_from)
        train_segment(branch, guide.branch_from, guide.guide_step, phase=f"{guide.kind}·ahead")
        guide_ref = (branch.run_id, guide.guide_step)
    cache = generate_guidance(
        ctx,
        cache_id=f"{ctx.run_id}.{guide.kind}{segment.start:06d}",
        guide=guide_ref,
        current=(ctx.run_id, guide.branch_from),
        problems=segment_problems(ctx, segment.start, segment.end),
        policy_step=segment.start,
    )
    ctx.db.record_intervention(
        ctx.run_id,
        guide.kind,
        at_step=segment.start,
        delta=guide.lookahead,
        rollback_to=segment.start,
        guide_step=guide.guide_step,
        signals={},
        s_table=[],
    )
    ctx.tracker.log_metrics(
        {f"guide/{k}": v for k, v in cache.stats.items() if k != "seconds"}, step=segment.start
    )
    return cache


def run_autonpo(ctx: RunContext) -> None:
    """Train in windows of `autonpo.check_every`; after each, check for a plateau and, when
    confirmed, roll back Δ* steps and replay that segment with guidance from the current
    checkpoint on the mistake-pool prompts."""
    acfg, steps = ctx.cfg.autonpo, ctx.cfg.train.steps
    chain: Lineage = [(ctx.run_id, 0)]
    lineage, t = ctx, 0
    last: int | None = None
    done = 0
    while t < steps:
        end = min(t + acfg.check_every, steps)
        state = train_segment(lineage, t, end, phase="autonpo")
        t, global_step = end, state["global_step"]
        if t >= steps:
            break
        decision = detect_plateau(ctx, (lineage.run_id, t), global_step, last, done)
        if not decision.intervene:
            continue
        try:
            lineage, cache = _intervene(ctx, chain, t, global_step, done + 1, decision.signals)
        except NoRollbackCandidate as e:  # nothing to score yet: keep training
            ctx.tracker.set_tags({f"autonpo.skipped.{t}": str(e)})
            continue
        done += 1
        last = global_step
        source = CachedGuidance(cache, ctx.cfg.npo.guidance.gate)
        train_segment(lineage, chain[-1][1], t, source=source, phase="autonpo·replay")


def _intervene(
    ctx: RunContext, chain: Lineage, t: int, global_step: int, k: int, signals: dict[str, Any]
) -> tuple[RunContext, GuidanceCache]:
    """Choose Δ*, cache guidance from the current checkpoint, fork lineage k at t - Δ*."""
    current = checkpoint_at(ctx, chain, t)
    assert current is not None
    choice = choose_rollback_distance(ctx, chain, t)
    delta, back = choice["delta"], choice["rollback_to"]
    pool = ctx.db.mistakes_by_step(ctx.root_id, until_step=t)
    pooled = {pid for pids in pool.values() for pid in pids}
    problems = [p for p in segment_problems(ctx, t - delta, t) if p.id in pooled]
    cache = generate_guidance(
        ctx,
        f"{ctx.root_id}.auto{global_step:06d}",
        guide=current,
        current=back,
        problems=problems,
        policy_step=t - delta,
    )
    ctx.db.record_intervention(
        ctx.root_id,
        "auto",
        at_step=global_step,  # unique even when a later rollback revisits policy step t
        delta=delta,
        rollback_to=t - delta,
        guide_step=t,
        signals=signals,
        s_table=choice["table"],
    )
    ctx.tracker.log_metrics(
        {
            "autonpo/delta": float(delta),
            "autonpo/rollback_to": float(t - delta),
            **{f"guide/{k2}": v for k2, v in cache.stats.items() if k2 != "seconds"},
        },
        step=global_step,
    )
    lineage = ctx.lineage(k)
    fork_checkpoint(ctx.store, back[0], lineage.run_id, t - delta, {"global_step": global_step})
    chain.append((lineage.run_id, t - delta))
    return lineage, cache


METHODS: dict[str, Callable[[RunContext], None]] = {
    "grpo": run_schedule,
    "npo": run_schedule,
    "autonpo": run_autonpo,
    "luffy": run_luffy,
    "exgrpo": run_exgrpo,
    "rlep": run_rlep,
}
