"""The paper's comparison sources: LUFFY's external teacher, ExGRPO's own-past replay and
RLEP's replay of a finished run. LUFFY and ExGRPO train like GRPO with their own source in
slot G (`schedule_flow`); RLEP caches verified trajectories of the finished run's last
checkpoint for every prompt of the budget, then trains with them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npo import stages
from npo.config import ExperimentConfig
from npo.flow import Flow
from npo.methods.common import guide_and_verify

if TYPE_CHECKING:
    from npo.guidance.sources import TrajectorySource
    from npo.steps.context import RunContext

LATEST = -1  # the guide step meaning "the guide run's latest checkpoint"


def rlep_flow(f: Flow, run_id: Any) -> Any:
    """One cache for the whole budget (the guide is fixed: that run has finished), then one
    train task with it."""
    cfg, steps = f.cfg, f.cfg.train.steps
    assert cfg.baselines.rlep_run is not None
    checked = guide_and_verify(
        f,
        "replay",
        cache_id=f"{cfg.name}.rlep000000",
        guide_run=cfg.baselines.rlep_run,
        guide_step=LATEST,
        current_run=run_id,
        current_step=0,
        start=0,
        end=steps,
    )
    trained = f.call(
        stages.train,
        "train",
        run_id=run_id,
        start=0,
        end=steps,
        guidance=checked["cache_id"],
        phase="rlep",
    )
    return trained["run_id"]


def check_rlep(cfg: ExperimentConfig) -> None:
    if not cfg.baselines.rlep_run:
        raise ValueError("method rlep needs baselines.rlep_run: a finished run to replay")


def luffy_source(ctx: RunContext) -> TrajectorySource:
    """The gold solution of every prompt, as LUFFY's external teacher."""
    from npo.guidance.sources import GoldTeacher
    from npo.training.state import load_train_state

    start = load_train_state(ctx.store, ctx.root_id, 0, ctx.cfg.model.dtype, db=ctx.db)
    return GoldTeacher(start.tokenizer)


def exgrpo_source(ctx: RunContext) -> TrajectorySource:
    """A pool of the run's own past successes (restored from the checkpoint it resumes)."""
    from npo.guidance.sources import ExperienceReplay

    problems = {p.id: p for p in ctx.task.train_problems()}
    return ExperienceReplay(problems, ctx.cfg.seed, ctx.cfg.baselines.exgrpo_fraction)
