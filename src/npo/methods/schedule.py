"""GRPO, LUFFY, ExGRPO and NPO's manual schedules: the segments of `plan_segments`.

An unguided segment is one train task (a retried task resumes from its last checkpoint, so
the DAG needs no task per checkpoint interval). A guided one trains a look-ahead branch of
the run (its near future; none with the Δ=0 control), caches and re-verifies the guide's
trajectories for the segment's prompts, then trains the segment with them. The rolling
schedule's windows grow with the budget, so they run inside one `schedule` task, by the
same `run_segment` executed in process.
"""

from __future__ import annotations

from typing import Any

from npo import stages
from npo.config import ExperimentConfig
from npo.flow import Flow, Outputs
from npo.guidance.schedule import Segment, plan_segments
from npo.methods.common import guide_and_verify


def schedule_flow(f: Flow, run_id: Any) -> Any:
    """The RL phase: every segment in order; returns the run id to evaluate."""
    if f.cfg.method == "npo" and f.cfg.npo.rolling.enabled:
        steps = f.cfg.train.steps
        return f.call(stages.schedule, "rolling", run_id=run_id, start=0, end=steps)["run_id"]
    if not plan_segments(f.cfg):  # train.steps 0: the warm-up is the run
        return run_id
    return run_segments(f, run_id, 0, f.cfg.train.steps)["run_id"]


def run_segments(f: Flow, run_id: Any, start: int, end: int) -> Outputs:
    """The segments within (start, end], in order; the last train's outputs."""
    plan = plan_segments(f.cfg)
    last: Outputs = {}
    for number, segment in enumerate(plan, 1):
        if start <= segment.start and segment.end <= end:
            label = "train" if len(plan) == 1 else f"segment {number} · train"
            last = run_segment(f, segment, run_id, label)
            run_id = last["run_id"]
    return last


def guide_label(segment: Segment, cfg: ExperimentConfig) -> str:
    """'early' / 'late', or 'rolling 3' for the third rolling window."""
    guide = segment.guide
    assert guide is not None
    if guide.kind == "rolling":
        return f"rolling {segment.start // cfg.npo.rolling.every + 1}"
    return guide.kind


def run_segment(f: Flow, segment: Segment, run_id: Any, label: str) -> Outputs:
    """One segment: trained plainly, or guided by its look-ahead (module docstring)."""
    cfg, guide = f.cfg, segment.guide
    span = {"start": segment.start, "end": segment.end}
    if guide is None:
        return f.call(stages.train, label, run_id=run_id, phase=cfg.method, **span)
    label = guide_label(segment, cfg)
    guide_run, guide_step = run_id, guide.branch_from  # the Δ=0 control: the fork point
    if guide.lookahead > 0:
        ahead = f.call(
            stages.train,
            f"{label} · look-ahead",
            run_id=f"{cfg.name}.{guide.branch}",
            start=guide.branch_from,
            end=guide.guide_step,
            phase=f"{guide.kind}·ahead",
            fork_from=run_id,  # a channel on a cluster: forks once the run reached it
        )
        guide_run, guide_step = ahead["run_id"], guide.guide_step
    checked = guide_and_verify(
        f,
        label,
        cache_id=f"{cfg.name}.{guide.kind}{segment.start:06d}",
        guide_run=guide_run,
        guide_step=guide_step,
        current_run=run_id,
        current_step=guide.branch_from,
        kind=guide.kind,
        **span,
    )
    return f.call(
        stages.train,
        f"{label} · train",
        run_id=run_id,
        guidance=checked["cache_id"],
        phase=f"npo·{guide.kind}",
        **span,
    )


def check_npo(cfg: ExperimentConfig) -> None:
    """A manual schedule is on, and the schedules fit each other and the budget."""
    npo, steps = cfg.npo, cfg.train.steps
    schedules = [n for n in ("early", "late", "rolling") if getattr(npo, n).enabled]
    if not schedules:
        raise ValueError(
            "method npo needs a schedule: set npo.early.enabled, npo.late.enabled "
            "or npo.rolling.enabled"
        )
    if npo.rolling.enabled and len(schedules) > 1:
        raise ValueError("npo.rolling cannot be combined with npo.early / npo.late")
    if npo.early.enabled and npo.early.window > steps:
        raise ValueError(f"npo.early.window ({npo.early.window}) > train.steps ({steps})")
    if npo.late.enabled:
        end = npo.late.at_step + npo.late.lookahead
        if end > steps:
            raise ValueError(
                f"npo.late.at_step + npo.late.lookahead ({end}) > train.steps ({steps})"
            )
        if npo.early.enabled and npo.late.at_step < npo.early.window:
            raise ValueError("npo.late.at_step must come after npo.early.window")
