"""The experiment as a Kubeflow pipeline, unrolled from its config.

`build_pipeline(cfg)` returns a `@dsl.pipeline` whose one parameter, `config`, defaults to the
config as JSON (`public_dump`: no credentials). KFP v2 has no loops over runtime values, so
the task graph is fixed here from the config and mirrors the local engine (npo/engine.py)
segment by segment:

- grpo, luffy, exgrpo: warm-up -> train in segments of `train.checkpoint_every` steps
  (luffy/exgrpo: the train stage picks the method's trajectory source itself);
- npo: the segments of `plan_segments`; a guided one trains a look-ahead branch, caches and
  verifies the guide's trajectories, then trains the segment with them;
- autonpo: one sub-pipeline per `autonpo.check_every` window: train -> detect -> If
  (intervene): rollback -> guidance -> verify -> replay, Else: keep; dsl.OneOf merges the
  run id the next window continues from (the last window only trains);
- rlep: per `baselines.rlep_every` window, guidance from the finished run's last checkpoint;
and every method ends with evaluate (final step) -> report.

    from npo.config import load_config
    from kfp import compiler
    compiler.Compiler().compile(build_pipeline(load_config("configs/toy_npo.yaml")), "x.yaml")

No `from __future__ import annotations`: KFP reads the pipeline functions' annotations.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kfp import dsl
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineChannel

from npo.config import ExperimentConfig, public_dump
from npo.guidance.schedule import Segment, chunks, plan_segments
from npo.pipelines.components import Components, make_components
from npo.pipelines.kubernetes import apply_cluster

DESCRIPTIONS = {
    "grpo": "GRPO baseline: warm-up, RL in checkpointed segments, evaluation, report.",
    "npo": "NPO with manual schedules: guided segments take verified trajectories from a "
    "look-ahead branch of the run (its near future).",
    "autonpo": "AutoNPO: after each window, detect a plateau and, when confirmed, roll back "
    "and replay the window guided by the current checkpoint.",
    "luffy": "LUFFY-style baseline: the gold solution takes a slot of every group.",
    "exgrpo": "ExGRPO-style baseline: part of each batch replays the run's own past successes.",
    "rlep": "RLEP-style baseline: each window replays verified trajectories of a finished run.",
}
# RLEP's guide step meaning "the finished run's latest checkpoint" (the stage resolves it).
LATEST = -1


def pipeline_name(cfg: ExperimentConfig) -> str:
    """cfg.name in the form KFP accepts for pipeline names: [a-z0-9-], starting alnum."""
    return re.sub(r"[^a-z0-9-]", "-", cfg.name.lower())


@dataclass
class Graph:
    """Adds tasks of one (sub-)pipeline: each with its display name and cluster settings."""

    cfg: ExperimentConfig
    ops: Components
    config: PipelineChannel
    local: bool = False

    def _task(self, stage: str, label: str, task: PipelineTask) -> PipelineTask:
        task.set_display_name(label)
        if self.local:  # kfp.local: no Kubernetes, and no cache that would skip a stage
            return task.set_caching_options(enable_caching=False)
        return apply_cluster(task, stage, self.cfg.cluster)

    def prepare(self) -> PipelineTask:
        return self._task("prepare", "warm-up", self.ops.prepare(config=self.config))

    def train(
        self,
        label: str,
        run_id: Any,
        start: Any,
        end: Any,
        phase: str,
        guidance: Any = "",
        fork_from: Any = "",
    ) -> PipelineTask:
        task = self.ops.train_segment(
            config=self.config,
            run_id=run_id,
            start=start,
            end=end,
            guidance=guidance,
            phase=phase,
            fork_from=fork_from,
        )
        return self._task("train", label, task)

    def guidance(
        self,
        label: str,
        cache_id: Any,
        guide: tuple[Any, Any],
        current: tuple[Any, Any],
        span: tuple[Any, Any],
        pool_only: bool,
        kind: str,
        log_step: Any = -1,
    ) -> PipelineTask:
        """Cache the guide's trajectories for the prompts of span, then re-verify them; the
        returned verify task's `cache_id` is what a guided train reads. log_step: where the
        guide statistics are logged (-1: at span's start)."""
        task = self.ops.generate_guidance(
            config=self.config,
            cache_id=cache_id,
            guide_run=guide[0],
            guide_step=guide[1],
            current_run=current[0],
            current_step=current[1],
            start=span[0],
            end=span[1],
            pool_only=pool_only,
            kind=kind,
            log_step=log_step,
        )
        self._task("guidance", f"{label} · guidance", task)
        checked = self.ops.verify(config=self.config, cache_id=task.outputs["cache_id"])
        return self._task("verify", f"{label} · verify", checked)

    def detect(self, label: str, train: PipelineTask, t: int) -> PipelineTask:
        task = self.ops.detect_plateau(
            config=self.config,
            run_id=train.outputs["run_id"],
            t=t,
            global_step=train.outputs["global_step"],
        )
        return self._task("detect", f"{label} · detect", task)

    def rollback(self, label: str, train: PipelineTask, t: int, signals: Any) -> PipelineTask:
        task = self.ops.rollback(
            config=self.config,
            run_id=train.outputs["run_id"],
            t=t,
            global_step=train.outputs["global_step"],
            signals=signals,  # detect's, recorded with the intervention
        )
        return self._task("rollback", f"{label} · rollback", task)

    def keep(self, label: str, run_id: Any) -> PipelineTask:
        return self._task("keep", f"{label} · keep", self.ops.keep(run_id=run_id))

    def finish(self, run_id: Any) -> PipelineTask:
        """Evaluate the final checkpoint, then report."""
        steps = self.cfg.train.steps
        task = self.ops.evaluate(config=self.config, run_id=run_id, step=steps)
        evaluated = self._task("evaluate", "evaluate", task)
        return self._task("report", "report", self.ops.report(config=self.config)).after(evaluated)


# A flow adds the RL phase's tasks after the warm-up and returns the run id to evaluate.
Flow = Callable[[Graph, Any], Any]
SubPipelines = dict[str, Any]


# --------------------------------------------------------------------------- grpo / npo
def schedule_flow(g: Graph, run_id: Any) -> Any:
    """GRPO and NPO's manual schedules: the segments of plan_segments, in order."""
    number = 0
    for segment in plan_segments(g.cfg):
        if segment.guide is None:
            for start, end in chunks(segment.start, segment.end, g.cfg.train.checkpoint_every):
                number += 1
                task = g.train(f"segment {number} · train", run_id, start, end, g.cfg.method)
                run_id = task.outputs["run_id"]
        else:
            number += 1
            run_id = guided_segment(g, segment, run_id)
    return run_id


def guide_label(segment: Segment, cfg: ExperimentConfig) -> str:
    """'early' / 'late', or 'rolling 3' for the third rolling window."""
    guide = segment.guide
    assert guide is not None
    if guide.kind == "rolling":
        return f"rolling {segment.start // cfg.npo.rolling.every + 1}"
    return guide.kind


def guided_segment(g: Graph, segment: Segment, run_id: Any) -> Any:
    """A guided segment, as engine.run_schedule runs it: look ahead on a branch (unless
    Δ=0), cache and verify the guide's trajectories, train the segment with them."""
    guide, name = segment.guide, g.cfg.name
    assert guide is not None
    label = guide_label(segment, g.cfg)
    guide_ref: tuple[Any, int] = (run_id, guide.branch_from)
    if guide.lookahead > 0:
        ahead = g.train(
            f"{label} · look-ahead",
            f"{name}.{guide.branch}",
            guide.branch_from,
            guide.guide_step,
            phase=f"{guide.kind}·ahead",
            fork_from=run_id,  # the main run's channel: forks only once it reached branch_from
        )
        guide_ref = (ahead.outputs["run_id"], guide.guide_step)
    checked = g.guidance(
        label,
        cache_id=f"{name}.{guide.kind}{segment.start:06d}",
        guide=guide_ref,
        current=(run_id, guide.branch_from),
        span=(segment.start, segment.end),
        pool_only=False,
        kind=guide.kind,
    )
    task = g.train(
        f"{label} · train",
        run_id,
        segment.start,
        segment.end,
        phase=f"npo·{guide.kind}",
        guidance=checked.outputs["cache_id"],
    )
    return task.outputs["run_id"]


# --------------------------------------------------------------------------- baselines
def plain_flow(g: Graph, run_id: Any) -> Any:
    """LUFFY and ExGRPO: unguided segments; the train stage picks the method's source."""
    steps, every = g.cfg.train.steps, g.cfg.train.checkpoint_every
    for number, (start, end) in enumerate(chunks(0, steps, every), 1):
        task = g.train(f"segment {number} · train", run_id, start, end, g.cfg.method)
        run_id = task.outputs["run_id"]
    return run_id


def rlep_flow(g: Graph, run_id: Any) -> Any:
    """RLEP: each window replays verified trajectories of the finished run's last checkpoint."""
    base, steps, name = g.cfg.baselines, g.cfg.train.steps, g.cfg.name
    assert base.rlep_run is not None
    for number, (t, end) in enumerate(chunks(0, steps, base.rlep_every), 1):
        label = f"segment {number}"
        checked = g.guidance(
            label,
            cache_id=f"{name}.rlep{t:06d}",
            guide=(base.rlep_run, LATEST),
            current=(run_id, t),
            span=(t, end),
            pool_only=False,
            kind="rlep",
        )
        task = g.train(
            f"{label} · train", run_id, t, end, "rlep", guidance=checked.outputs["cache_id"]
        )
        run_id = task.outputs["run_id"]
    return run_id


# --------------------------------------------------------------------------- autonpo
def autonpo_windows(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    """The (start, end] windows after each of which AutoNPO checks for a plateau."""
    return chunks(0, cfg.train.steps, cfg.autonpo.check_every)


def make_window(
    cfg: ExperimentConfig, ops: Components, number: int, span: tuple[int, int], local: bool
) -> Any:
    """Sub-pipeline of one non-final AutoNPO window (start, t]: train -> detect ->
    If(intervene): rollback -> guidance (mistake pool, current checkpoint as guide) ->
    verify -> replay (t-Δ*, t] on the new lineage; Else: keep. Its output, the OneOf of the
    two branches, is the run id the next window continues from.

    A rollback with no candidate to score (the engine's NoRollbackCandidate) comes back
    `skipped` with rollback_to = t on the same lineage: the guidance, verify and replay
    stages then have an empty span and return at once."""
    label, (start, t) = f"segment {number}", span

    @dsl.pipeline(name=f"segment-{number:03d}", description=f"AutoNPO window ({start}, {t}]")
    def window(config: str, run_id: str) -> str:
        g = Graph(cfg, ops, config, local)
        trained = g.train(f"{label} · train", run_id, start, t, phase="autonpo")
        detected = g.detect(label, trained, t)
        with dsl.If(detected.outputs["intervene"] == True, name="intervene"):  # noqa: E712
            back = g.rollback(label, trained, t, detected.outputs["signals"])
            checked = g.guidance(
                label,
                cache_id=back.outputs["cache_id"],
                guide=(back.outputs["guide_run"], t),
                current=(back.outputs["back_run"], back.outputs["rollback_to"]),
                span=(back.outputs["rollback_to"], t),
                pool_only=True,
                kind="",
                log_step=trained.outputs["global_step"],
            )
            replay = g.train(
                f"{label} · replay",
                back.outputs["lineage_run_id"],
                back.outputs["rollback_to"],
                t,
                phase="autonpo·replay",
                guidance=checked.outputs["cache_id"],
            )
        with dsl.Else(name="continue"):
            kept = g.keep(label, trained.outputs["run_id"])
        return dsl.OneOf(replay.outputs["run_id"], kept.output)

    return window


def autonpo_flow(g: Graph, run_id: Any, windows: list[Any]) -> Any:
    """AutoNPO: the window sub-pipelines in order, then the last window, which only trains
    (no check after it)."""
    for number, window in enumerate(windows, 1):
        task = window(config=g.config, run_id=run_id)
        task.set_display_name(f"segment {number}")
        task.set_caching_options(enable_caching=False)
        run_id = task.output
    spans = autonpo_windows(g.cfg)
    if spans:
        number = len(spans)
        task = g.train(f"segment {number} · train", run_id, *spans[-1], phase="autonpo")
        run_id = task.outputs["run_id"]
    return run_id


FLOWS: dict[str, Flow] = {
    "grpo": schedule_flow,
    "npo": schedule_flow,
    "luffy": plain_flow,
    "exgrpo": plain_flow,
    "rlep": rlep_flow,
}


def flow_for(cfg: ExperimentConfig, ops: Components, local: bool) -> Flow:
    """The method's flow. AutoNPO's sub-pipelines are made here, before the main pipeline:
    KFP traces a pipeline function when it is decorated and refuses to do so inside another."""
    if cfg.method == "autonpo":
        spans = autonpo_windows(cfg)[:-1]
        windows = [make_window(cfg, ops, n, span, local) for n, span in enumerate(spans, 1)]
        return partial(autonpo_flow, windows=windows)
    return FLOWS[cfg.method]


def build_pipeline(cfg: ExperimentConfig, *, local: bool = False) -> Any:
    """The experiment's `@dsl.pipeline`: the same graph for `kfp.compiler` and `kfp.local`.

    local=True leaves out the `cluster:` settings: kfp.local ignores resources and Secrets
    (warning about each task) but honours retries, whose back-off would make a failing
    local stage wait minutes before the run fails."""
    ops = make_components(cfg.cluster.image)
    flow = flow_for(cfg, ops, local)

    @dsl.pipeline(
        name=pipeline_name(cfg),
        display_name=cfg.name,
        description=DESCRIPTIONS[cfg.method],
    )
    def experiment(config: str = json.dumps(public_dump(cfg))) -> None:
        g = Graph(cfg, ops, config, local)
        warm = g.prepare()
        g.finish(flow(g, warm.outputs["run_id"]))

    return experiment
