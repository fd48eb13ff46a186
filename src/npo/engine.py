"""The RL phase of a run, by method: plain GRPO, NPO's manual schedules, AutoNPO, baselines.

This is the local engine: it calls the stages (npo.stages) in the order, and with the
parameters, the Kubeflow pipeline's tasks do (npo.pipelines.build unrolls the same loops
into a DAG). Every stage is idempotent, so re-running after a crash replays the same
decisions from the committed checkpoints, caches, interventions and history, and resumes.
"""

from __future__ import annotations

from collections.abc import Callable

from npo import stages
from npo.guidance.schedule import chunks, plan_segments
from npo.steps.context import RunConflict, RunContext
from npo.store.checkpoint import latest_checkpoint


def train(ctx: RunContext) -> None:
    """Run the RL phase of `ctx.cfg.method` from checkpoint 0 to train.steps."""
    METHODS[ctx.cfg.method](ctx)


def run_schedule(ctx: RunContext) -> None:
    """GRPO, or NPO's manual schedules: guided segments get a look-ahead guide first."""
    root, every = ctx.run_id, ctx.cfg.train.checkpoint_every
    for segment in plan_segments(ctx.cfg):
        guide = segment.guide
        if guide is None:
            for a, b in chunks(segment.start, segment.end, every):
                stages.train(ctx, root, a, b)
            continue
        guide_run = root  # the Δ=0 control: the guide is the fork point itself
        if guide.lookahead > 0:
            guide_run = f"{root}.{guide.branch}"
            stages.train(
                ctx,
                guide_run,
                guide.branch_from,
                guide.guide_step,
                phase=f"{guide.kind}·ahead",
                fork_from=root,
            )
        cache_id = f"{root}.{guide.kind}{segment.start:06d}"
        stages.guidance(
            ctx,
            cache_id,
            guide_run,
            guide.guide_step,
            root,
            guide.branch_from,
            segment.start,
            segment.end,
            kind=guide.kind,
        )
        stages.verify(ctx, cache_id)
        stages.train(
            ctx, root, segment.start, segment.end, guidance=cache_id, phase=f"npo·{guide.kind}"
        )


def run_sourced(ctx: RunContext) -> None:
    """LUFFY (gold teacher in slot G) and ExGRPO (own-past replay): the train stage picks
    the method's source itself."""
    for a, b in chunks(0, ctx.cfg.train.steps, ctx.cfg.train.checkpoint_every):
        stages.train(ctx, ctx.run_id, a, b)


def run_rlep(ctx: RunContext) -> None:
    """RLEP-style far-future replay: each window's prompts get a verified trajectory from
    the last checkpoint of a finished run (no look-ahead: that run is already done)."""
    base, steps, root = ctx.cfg.baselines, ctx.cfg.train.steps, ctx.run_id
    assert base.rlep_run is not None
    if latest_checkpoint(ctx.store, base.rlep_run) is None:
        raise RunConflict(f"baselines.rlep_run={base.rlep_run}: no checkpoint in the store")
    for t, end in chunks(0, steps, base.rlep_every):
        cache_id = f"{root}.rlep{t:06d}"
        stages.guidance(ctx, cache_id, base.rlep_run, -1, root, t, t, end)
        stages.verify(ctx, cache_id)
        stages.train(ctx, root, t, end, guidance=cache_id, phase="rlep")


def run_autonpo(ctx: RunContext) -> None:
    """Train in windows of `autonpo.check_every`; after each, check for a plateau and, when
    confirmed, roll back Δ* steps and replay that segment with guidance from the current
    checkpoint on the mistake-pool prompts."""
    steps, run, t = ctx.cfg.train.steps, ctx.run_id, 0
    for t, end in chunks(0, steps, ctx.cfg.autonpo.check_every):
        trained = stages.train(ctx, run, t, end, phase="autonpo")
        if end >= steps:
            break
        global_step = trained["global_step"]
        decision = stages.detect(ctx, run, end, global_step)
        if not decision["intervene"]:
            continue
        back = stages.rollback(ctx, run, end, global_step, decision["signals"])
        cache = stages.guidance(
            ctx,
            back["cache_id"],
            back["guide_run"],
            end,
            back["back_run"],
            back["rollback_to"],
            back["rollback_to"],
            end,
            pool_only=True,
            log_step=global_step,
        )
        stages.verify(ctx, cache["cache_id"])
        stages.train(
            ctx,
            back["lineage_run_id"],
            back["rollback_to"],
            end,
            guidance=cache["cache_id"],
            phase="autonpo·replay",
        )
        run = back["lineage_run_id"]


METHODS: dict[str, Callable[[RunContext], None]] = {
    "grpo": run_schedule,
    "npo": run_schedule,
    "autonpo": run_autonpo,
    "luffy": run_sourced,
    "exgrpo": run_sourced,
    "rlep": run_rlep,
}
