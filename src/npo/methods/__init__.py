"""The methods, one registry entry each: its flow, what fills slot G, its gate, its checks
and its description. The KFP pipeline builder and the in-process engine both execute
`experiment(f)`, which runs the method's flow between the warm-up and the report.

    from npo.flow import InProcess
    experiment(InProcess(open_run(cfg)))          # what `npo run --engine direct` does

Add a method: write its flow (a function of a `npo.flow.Flow` and the warm-up's run id that
returns the run id to evaluate) and an entry in METHODS; `method:` accepts the new name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npo import stages
from npo.config import ExperimentConfig
from npo.flow import Flow, Outputs
from npo.methods.autonpo import autonpo_flow
from npo.methods.baselines import check_rlep, exgrpo_source, luffy_source, rlep_flow
from npo.methods.schedule import check_npo, schedule_flow

if TYPE_CHECKING:
    from npo.guidance.sources import TrajectorySource
    from npo.steps.context import RunContext


def _npo_gate(cfg: ExperimentConfig) -> float:
    return cfg.npo.guidance.gate


def _no_checks(cfg: ExperimentConfig) -> None:
    pass


@dataclass(frozen=True)
class Method:
    """description: the pipeline's description in the KFP UI. flow(f, run_id): the RL
    phase. source(ctx): the method's own slot-G source (None: only guidance caches fill
    it). gate(cfg): the pass-rate gate of a guidance cache's rows. check(cfg): raise
    ValueError on settings the method cannot run with."""

    description: str
    flow: Callable[[Flow, Any], Any]
    source: Callable[[RunContext], TrajectorySource] | None = None
    gate: Callable[[ExperimentConfig], float] = _npo_gate
    check: Callable[[ExperimentConfig], None] = _no_checks


METHODS: dict[str, Method] = {
    "grpo": Method("GRPO baseline: warm-up, RL, evaluation, report.", schedule_flow),
    "npo": Method(
        "NPO with manual schedules: guided segments take verified trajectories from a "
        "look-ahead branch of the run (its near future).",
        schedule_flow,
        check=check_npo,
    ),
    "autonpo": Method(
        "AutoNPO: train until reward stagnates while entropy falls (confirmed on the "
        "mistake pool), roll back Δ* and replay guided by the current checkpoint.",
        autonpo_flow,
    ),
    "luffy": Method(
        "LUFFY-style baseline: the gold solution takes a slot of every group.",
        schedule_flow,
        source=luffy_source,
    ),
    "exgrpo": Method(
        "ExGRPO-style baseline: part of each batch replays the run's own past successes.",
        schedule_flow,
        source=exgrpo_source,
    ),
    "rlep": Method(
        "RLEP-style baseline: replays verified trajectories of a finished run.",
        rlep_flow,
        gate=lambda cfg: cfg.baselines.rlep_gate,
        check=check_rlep,
    ),
}


def experiment(f: Flow) -> Outputs:
    """The whole experiment for every method: warm-up, the method's RL phase, greedy
    evaluation of its final checkpoint, report; returns the report's outputs."""
    warm = f.call(stages.prepare, "warm-up")
    run_id = METHODS[f.cfg.method].flow(f, warm["run_id"])
    evaluated = f.call(stages.evaluate, "evaluate", run_id=run_id, step=f.cfg.train.steps)
    return f.call(stages.report, "report", after=evaluated)
