"""KFP lightweight components: one thin wrapper per stage of docs/stages-api.md.

Each body imports inside the function (KFP ships only the function's source to the pod) and
hands its parameters to `npo.stepserver.call_stage`; the stage does the work, is idempotent
and returns small values, which the wrapper returns as typed outputs (plus the Metrics and
Markdown artifacts the KFP UI shows). No logic lives here.

The functions are plain at import time; `make_components(image)` turns them into components
for one image (which already has npo and kfp: nothing is pip-installed at run time).

This module deliberately has no `from __future__ import annotations`: KFP reads the
annotations at decoration time and must see the real types, not strings.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

# Task names in pipeline YAML come from these function names; the stage each one runs is
# in its body (`call_stage("<stage>", ...)`).


def prepare(config: str) -> NamedTuple(
    "PrepareOutputs", [("run_id", str), ("eval_accuracy", float)]
):
    """Warm-up: the supervised start of the run, saved as checkpoint 0."""
    from npo.stepserver import call_stage

    out = call_stage("prepare", config=config)
    return (out["run_id"], float(out["eval_accuracy"]))


def train_segment(
    config: str,
    run_id: str,
    start: int,
    end: int,
    guidance: str,
    phase: str,
    fork_from: str,
    metrics: Output[Metrics],
    curves: Output[Markdown],
    plot: Output[HTML],
) -> NamedTuple("TrainOutputs", [("run_id", str), ("policy_step", int), ("global_step", int)]):
    """RL policy steps (start, end] of `run_id`, optionally guided by a verified cache."""
    from npo.stepserver import call_stage

    out = call_stage(
        "train",
        config=config,
        run_id=run_id,
        start=start,
        end=end,
        guidance=guidance,
        phase=phase,
        fork_from=fork_from,
    )
    for key, value in out["metrics"].items():
        metrics.log_metric(key, float(value))
    with open(curves.path, "w") as f:
        f.write(out["markdown"])
    with open(plot.path, "w") as f:
        f.write(out["html"])
    return (out["run_id"], int(out["policy_step"]), int(out["global_step"]))


def generate_guidance(
    config: str,
    cache_id: str,
    guide_run: str,
    guide_step: int,
    current_run: str,
    current_step: int,
    start: int,
    end: int,
    pool_only: bool,
    kind: str,
    log_step: int = -1,
) -> NamedTuple(
    "GuidanceOutputs",
    [
        ("cache_id", str),
        ("entries", int),
        ("q_hat", float),
        ("gap", float),
        ("guide_accuracy", float),
        ("current_accuracy", float),
    ],
):
    """Cache the guide checkpoint's verified trajectories for the prompts of (start, end]
    (guide_step -1: the guide run's latest checkpoint); guide statistics logged at log_step
    (-1: at start)."""
    from npo.stepserver import call_stage

    out = call_stage(
        "guidance",
        config=config,
        cache_id=cache_id,
        guide_run=guide_run,
        guide_step=guide_step,
        current_run=current_run,
        current_step=current_step,
        start=start,
        end=end,
        pool_only=pool_only,
        kind=kind,
        log_step=log_step,
    )
    # An empty span (a skipped rollback) returns no accuracies: nothing was sampled.
    return (
        out["cache_id"],
        int(out["entries"]),
        float(out["q_hat"]),
        float(out["gap"]),
        float(out.get("guide_accuracy", 0.0)),
        float(out.get("current_accuracy", 0.0)),
    )


def verify(config: str, cache_id: str) -> NamedTuple(
    "VerifyOutputs", [("cache_id", str), ("entries", int), ("verified", int)]
):
    """Re-verify every cached trajectory with the task's verifier (fails on a wrong one)."""
    from npo.stepserver import call_stage

    out = call_stage("verify", config=config, cache_id=cache_id)
    return (out["cache_id"], int(out["entries"]), int(out["verified"]))


def detect_plateau(config: str, run_id: str, t: int, global_step: int) -> NamedTuple(
    "DetectOutputs",
    [("intervene", bool), ("triggered", bool), ("confirmed", bool), ("signals", str)],
):
    """AutoNPO's trigger: stagnating reward with collapsing entropy, confirmed on the pool."""
    from npo.stepserver import call_stage

    out = call_stage("detect", config=config, run_id=run_id, t=t, global_step=global_step)
    return (
        bool(out["intervene"]),
        bool(out["triggered"]),
        bool(out["confirmed"]),
        str(out["signals"]),
    )


def rollback(config: str, run_id: str, t: int, global_step: int, signals: str = "{}") -> NamedTuple(
    "RollbackOutputs",
    [
        ("lineage_run_id", str),
        ("guide_run", str),
        ("back_run", str),
        ("rollback_to", int),
        ("delta", int),
        ("cache_id", str),
        ("skipped", bool),
    ],
):
    """Choose Δ*, record the intervention with detect's signals and fork a new lineage at
    t - Δ* (skipped: no candidate to score yet; the lineage stays, rollback_to = t)."""
    from npo.stepserver import call_stage

    out = call_stage(
        "rollback", config=config, run_id=run_id, t=t, global_step=global_step, signals=signals
    )
    return (
        out["lineage_run_id"],
        out["guide_run"],
        out["back_run"],
        int(out["rollback_to"]),
        int(out["delta"]),
        out["cache_id"],
        bool(out["skipped"]),
    )


def evaluate(config: str, run_id: str, step: int, metrics: Output[Metrics]) -> NamedTuple(
    "EvaluateOutputs", [("accuracy", float)]
):
    """Greedy pass@1 of checkpoint `step` of `run_id` on the held-out problems."""
    from npo.stepserver import call_stage

    out = call_stage("evaluate", config=config, run_id=run_id, step=step)
    for key, value in out["metrics"].items():
        metrics.log_metric(key, float(value))
    return (float(out["accuracy"]),)


def report(config: str, markdown: Output[Markdown]) -> NamedTuple(
    "ReportOutputs", [("summary", dict)]
):
    """The run's report: summary table, curves and interventions."""
    from npo.stepserver import call_stage

    out = call_stage("report", config=config)
    with open(markdown.path, "w") as f:
        f.write(out["markdown"])
    return (out["summary"],)


def keep(run_id: str) -> str:
    """Pass a run id through: the no-intervention branch's value for dsl.OneOf."""
    return run_id


STAGE_FUNCTIONS = (
    prepare,
    train_segment,
    generate_guidance,
    verify,
    detect_plateau,
    rollback,
    evaluate,
    report,
    keep,
)


class Components(NamedTuple):
    """The components of one image, by stage."""

    prepare: dsl.base_component.BaseComponent
    train_segment: dsl.base_component.BaseComponent
    generate_guidance: dsl.base_component.BaseComponent
    verify: dsl.base_component.BaseComponent
    detect_plateau: dsl.base_component.BaseComponent
    rollback: dsl.base_component.BaseComponent
    evaluate: dsl.base_component.BaseComponent
    report: dsl.base_component.BaseComponent
    keep: dsl.base_component.BaseComponent


def make_components(image: str) -> Components:
    """Every stage as a lightweight component on `image` (kfp and npo preinstalled)."""
    made = [
        dsl.component(func, base_image=image, install_kfp_package=False) for func in STAGE_FUNCTIONS
    ]
    return Components(*made)
