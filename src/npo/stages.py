"""The stages of an experiment: one function per pipeline task, each declared once.

A stage takes the open run (`RunContext`) and small typed parameters (ids, steps, flags) and
returns a dict of JSON values: the fields of its `outputs` NamedTuple, plus the KFP UI
artifacts it names in `ui` ("metrics", "markdown", "html"). Heavy data stays in the artifact
store. Its signature and docstring are its API: the KFP component (npo.pipelines.components)
and components/<stage>/ are generated from them, and both the KFP pipeline and the in-process
engine call the stages through the same flows (npo.methods).

`run_stage(name, config_json, **params)` opens the run from the config, runs one stage and
closes it: that is what a pipeline task runs (through `npo.stepserver.call_stage`).

Stages are idempotent: a retried task resumes from the last committed checkpoint or returns
the recorded result. AutoNPO's loop state (interventions done, the checkpoint lineages) is
read back from the metadata DB, never passed between tasks.

Importing this module is cheap (no torch): the pipeline compiler reads the declarations;
each stage imports what it computes with when it runs.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from npo.config import ExperimentConfig, public_dump
from npo.steps.context import HISTORY, ProgressFn, RunConflict, RunContext, open_run

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from npo.guidance.cache import GuidanceCache
    from npo.guidance.sources import TrajectorySource
    from npo.steps.rollback import Lineage
    from npo.store.metadata import InterventionRow
    from npo.tasks import Problem

Result = dict[str, Any]
MANUAL_KINDS = ("early", "late", "rolling")
# KFP UI artifacts a stage may write: the result key and the artifact type of each.
UI_ARTIFACTS = {"metrics": "Metrics", "markdown": "Markdown", "html": "HTML"}


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Stage:
    """A stage's declaration. `fn(ctx, **params)` (or `fn(**params)` when it does not open
    the run) returns its result; `outputs` names and types the result's fields; `ui` the KFP
    UI artifacts it writes; `retried`: it writes state and resumes when re-run, so KFP
    retries it on a cluster; `runs_model`: it loads the policy (on a cluster it gets the
    model steps' image, requests and deadline, the others small ones)."""

    fn: Callable[..., Result]
    outputs: type[tuple[Any, ...]]
    ui: tuple[str, ...] = ()
    retried: bool = False
    opens_run: bool = True
    runs_model: bool = True

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def description(self) -> str:
        """The docstring's first paragraph, on one line."""
        text = inspect.getdoc(self.fn) or ""
        return " ".join(text.split("\n\n", 1)[0].split())

    def parameters(self) -> list[tuple[str, type, Any]]:
        """(name, type, default or inspect.Parameter.empty) of each parameter after ctx."""
        hints = typing.get_type_hints(self.fn)
        params = list(inspect.signature(self.fn).parameters.values())
        if self.opens_run:
            params = params[1:]
        return [(p.name, hints[p.name], p.default) for p in params]

    def output_types(self) -> dict[str, type]:
        return typing.get_type_hints(self.outputs)


STAGES: dict[str, Stage] = {}


def stage(
    outputs: type[tuple[Any, ...]],
    ui: tuple[str, ...] = (),
    retried: bool = False,
    opens_run: bool = True,
    runs_model: bool = True,
) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Declare a stage (see `Stage`)."""

    def register(fn: Callable[..., Result]) -> Callable[..., Result]:
        STAGES[fn.__name__] = Stage(fn, outputs, ui, retried, opens_run, runs_model)
        return fn

    return register


def _result(outputs: tuple[Any, ...], **ui: Any) -> Result:
    return {**outputs._asdict(), **ui}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- helpers
def context_for(ctx: RunContext, run_id: str) -> RunContext:
    """The context of `run_id`: the run, one of its rollback lineages or a branch."""
    root = ctx.root_id
    if run_id == root:
        return ctx
    m = re.fullmatch(rf"{re.escape(root)}\.r(\d+)", run_id)
    if m:
        return ctx.lineage(int(m.group(1)))
    if run_id.startswith(f"{root}."):
        return ctx.branch(run_id.removeprefix(f"{root}."))
    raise ValueError(f"run id {run_id!r} is not {root!r}, a lineage or a branch of it")


def segment_problems(ctx: RunContext, start: int, end: int) -> list[Problem]:
    """The training prompts of policy steps (start, end], each once, in order of use."""
    from npo.training.seeding import segment_indices

    pool, per_step = ctx.task.train_problems(), ctx.cfg.rollout.prompts_per_step
    return [pool[i] for i in segment_indices(len(pool), per_step, start, end, ctx.cfg.seed)]


def auto_interventions(ctx: RunContext) -> list[InterventionRow]:
    """AutoNPO's interventions of the run, in order (at_step is a global step)."""
    return [iv for iv in ctx.db.interventions(ctx.root_id) if iv.kind == "auto"]


def lineage_chain(ivs: list[InterventionRow], root: str) -> Lineage:
    """(run_id, first policy step) of each checkpoint lineage after interventions `ivs`."""
    return [(root, 0)] + [(f"{root}.r{k}", iv.rollback_to) for k, iv in enumerate(ivs, 1)]


def _source(ctx: RunContext, guidance: str) -> TrajectorySource | None:
    """What fills slot G: a guidance cache (gated by the method's gate), or the method's
    own source (LUFFY's teacher, ExGRPO's replay), or nothing."""
    from npo.guidance.cache import load_cache
    from npo.guidance.sources import CachedGuidance
    from npo.methods import METHODS

    method = METHODS[ctx.cfg.method]
    if guidance:
        return CachedGuidance(load_cache(ctx.store, ctx.root_id, guidance), method.gate(ctx.cfg))
    return method.source(ctx) if method.source else None


@dataclass
class PlateauWatch:
    """AutoNPO's online trigger, asked by a train task every `autonpo.check_every` steps:
    the signals to stop with when it should intervene there (detect_plateau), else None."""

    ctx: RunContext
    every: int

    def __call__(
        self, model: PreTrainedModel, tokenizer: Any, step: int, global_step: int
    ) -> dict[str, Any] | None:
        decision = _plateau(self.ctx, (model, tokenizer), step, global_step)
        return decision.signals if decision.intervene else None


def _plateau(ctx: RunContext, policy: Any, t: int, global_step: int) -> Any:
    from npo.steps.detect_plateau import detect_plateau

    prior = [iv for iv in auto_interventions(ctx) if iv.at_step < global_step]
    last = prior[-1].at_step if prior else None
    return detect_plateau(ctx, policy, t, global_step, last, len(prior))


# --------------------------------------------------------------------------- stages
class ConfigureOut(NamedTuple):
    config: str


@stage(ConfigureOut, opens_run=False, runs_model=False)
def configure(config: str, overrides: dict) -> Result:
    """The run's config: the compiled config with the KFP UI's pipeline parameters
    (`overrides`: field -> value) written in and validated, so a bad value fails the run
    here, naming the parameter; every later task gets this config."""
    from npo.pipelines.parameters import apply_parameters

    return _result(ConfigureOut(apply_parameters(config, overrides)))


class PrepareOut(NamedTuple):
    run_id: str
    eval_accuracy: float


@stage(PrepareOut, retried=True)
def prepare(ctx: RunContext) -> Result:
    """Warm-up: the supervised start of the run (or a reused one), saved as checkpoint 0."""
    from npo.steps.warmup import warmup

    if ctx.run_row().started_at is None:  # wall time of the whole experiment, for the report
        ctx.db.set_run_info(ctx.run_id, started_at=datetime.now(UTC))
    ctx.tracker.log_params(public_dump(ctx.cfg))
    warmup(ctx)
    first = next(iter(ctx.history(until_step=0)), {})
    return _result(PrepareOut(ctx.run_id, float(first.get("eval/accuracy", "nan"))))


class TrainOut(NamedTuple):
    run_id: str
    policy_step: int
    global_step: int
    triggered: bool
    signals: str


@stage(TrainOut, ui=("metrics", "markdown", "html"), retried=True)
def train(
    ctx: RunContext,
    run_id: str,
    start: int,
    end: int,
    guidance: str = "",
    phase: str = "",
    fork_from: str = "",
    watch: bool = False,
) -> Result:
    """RL policy steps (start, end] of `run_id`, slot G from the verified cache `guidance`
    if given; `fork_from` seeds `run_id` (a look-ahead branch) with that run's checkpoint
    `start`; `watch`: stop early where AutoNPO's trigger fires (triggered, with its signals).

    The trigger (reward-EMA stagnation with declining entropy, confirmed on the mistake
    pool) is checked every `autonpo.check_every` steps, each of which is checkpointed."""
    from npo.report_ui import train_outputs
    from npo.steps.ranks import RanksFailed, needs_ranks, run_on_ranks
    from npo.steps.train_segment import finished_state, train_segment
    from npo.training.state import fork_checkpoint

    run = context_for(ctx, run_id)
    if fork_from:  # a no-op once the copy is in the store and recorded in the DB
        fork_checkpoint(ctx.store, fork_from, run_id, start, db=ctx.db)
    if needs_ranks(ctx.cfg):  # N ranks train; the segment's end is then read back below
        params = dict(run_id=run_id, start=start, end=end, guidance=guidance, phase=phase)
        run_on_ranks(ctx.cfg, "train", {**params, "fork_from": fork_from, "watch": watch})
        if finished_state(run, start, end) is None:
            raise RanksFailed(f"train {run_id} ({start}, {end}]: the ranks stopped early")
    state = train_segment(
        run,
        start,
        end,
        lambda: _source(ctx, guidance),
        phase or ctx.cfg.method,
        PlateauWatch(run, ctx.cfg.autonpo.check_every) if watch else None,
    )
    global_step = int(state["global_step"])
    trigger = state.get("trigger")
    out = TrainOut(
        run_id,
        int(state["policy_step"]),
        global_step,
        trigger is not None,
        json.dumps(trigger or {}, default=float, sort_keys=True),  # the same on a retry
    )
    return _result(out, **train_outputs(run, global_step))


class GuidanceOut(NamedTuple):
    cache_id: str
    entries: int
    q_hat: float
    gap: float
    guide_accuracy: float
    current_accuracy: float


@stage(GuidanceOut, retried=True)
def guidance(
    ctx: RunContext,
    cache_id: str,
    guide_run: str,
    guide_step: int,
    current_run: str,
    current_step: int,
    start: int,
    end: int,
    pool_only: bool = False,
    kind: str = "",
    log_step: int = -1,
) -> Result:
    """Cache one verified guide trajectory per prompt of policy steps (start, end] from
    checkpoint `guide_step` of `guide_run` (-1: its latest), compared with the current
    checkpoint; an empty span returns an empty cache id.

    pool_only: only the mistake-pool prompts (AutoNPO). kind early/late/rolling: record the
    manual intervention. Guide statistics are logged at `log_step` (-1: at `start`)."""
    from npo.steps.generate_guidance import generate_guidance
    from npo.store.checkpoint import latest_checkpoint

    if end <= start:  # an intervention that was skipped: nothing to replay
        return _result(GuidanceOut("", 0, 0.0, 0.0, 0.0, 0.0))
    if guide_step < 0:
        latest = latest_checkpoint(ctx.store, guide_run)
        if latest is None:
            raise RunConflict(f"guide run {guide_run!r}: no checkpoint in the store")
        guide_step = latest
    problems = segment_problems(ctx, start, end)
    if pool_only:
        pool = ctx.db.mistakes_by_step(ctx.root_id, until_step=end)
        pooled = {pid for pids in pool.values() for pid in pids}
        problems = [p for p in problems if p.id in pooled]
    cache = generate_guidance(
        ctx,
        cache_id,
        guide=(guide_run, guide_step),
        current=(current_run, current_step),
        problems=problems,
        policy_step=start,
    )
    if kind in MANUAL_KINDS:
        ctx.db.record_intervention(
            ctx.root_id,
            kind,
            at_step=start,
            delta=guide_step - current_step,
            rollback_to=start,
            guide_step=guide_step,
            signals={},
            s_table=[],
        )
    stats = {f"guide/{k}": v for k, v in cache.stats.items() if k != "seconds"}
    ctx.tracker.log_metrics(stats, step=log_step if log_step >= 0 else start)
    return _result(_cache_outputs(cache))


def _cache_outputs(cache: GuidanceCache) -> GuidanceOut:
    s = cache.stats
    return GuidanceOut(
        cache.cache_id,
        len(cache.entries),
        float(s["q_hat"]),
        float(s["accuracy_gap"]),
        float(s["guide_accuracy"]),
        float(s["current_accuracy"]),
    )


class GuidanceInvalid(ValueError):
    """A cached guide trajectory does not verify: it must not be trained on."""


class VerifyOut(NamedTuple):
    cache_id: str
    entries: int
    verified: int


@stage(VerifyOut, runs_model=False)
def verify(ctx: RunContext, cache_id: str) -> Result:
    """Re-verify every cached trajectory with the task's verifier before it is trained on
    (fails on a wrong one); an empty cache id passes through."""
    from npo.guidance.cache import load_cache

    if not cache_id:
        return _result(VerifyOut("", 0, 0))
    cache = load_cache(ctx.store, ctx.root_id, cache_id)
    problems = {p.id: p for p in ctx.task.train_problems()}
    bad: list[str] = []
    for pid, traj in cache.entries.items():
        problem = problems.get(pid)
        ok = (
            problem is not None
            and len(traj.logprobs) == len(traj.response_ids)
            and ctx.task.verify(problem, traj.text).reward > 0
        )
        if not ok:
            bad.append(pid)
    if bad:
        raise GuidanceInvalid(
            f"guidance cache {cache_id}: {len(bad)} of {len(cache.entries)} trajectories do "
            f"not verify (first: {bad[:3]}); delete the cache to rebuild it"
        )
    return _result(VerifyOut(cache_id, len(cache.entries), len(cache.entries)))


class DetectOut(NamedTuple):
    intervene: bool
    triggered: bool
    confirmed: bool
    signals: str


@stage(DetectOut)
def detect(ctx: RunContext, run_id: str, t: int, global_step: int) -> Result:
    """AutoNPO's plateau check at checkpoint t of lineage `run_id`: the check a watching
    train task runs online, as a task of its own (a decision already recorded is returned)."""
    from npo.training.state import load_train_state

    made = [iv for iv in auto_interventions(ctx) if iv.at_step == global_step]
    if made:  # decided (and acted on) before: the same decision again
        return _decision(True, True, True, made[0].signals)
    loaded = load_train_state(ctx.store, run_id, t, ctx.cfg.model.dtype, db=ctx.db)
    d = _plateau(context_for(ctx, run_id), (loaded.model, loaded.tokenizer), t, global_step)
    return _decision(d.intervene, d.triggered, d.confirmed, d.signals)


def _decision(intervene: bool, triggered: bool, confirmed: bool, signals: Any) -> Result:
    return _result(DetectOut(intervene, triggered, confirmed, json.dumps(signals, default=float)))


class RollbackOut(NamedTuple):
    lineage_run_id: str
    guide_run: str
    back_run: str
    rollback_to: int
    delta: int
    cache_id: str
    skipped: bool


@stage(RollbackOut, retried=True)
def rollback(ctx: RunContext, run_id: str, t: int, global_step: int, signals: str = "{}") -> Result:
    """Choose Δ* = argmax Q̂/V̂, record the intervention with the trigger's `signals` and
    fork lineage k at t − Δ*; skipped (nothing to score yet): the lineage stays and
    rollback_to = t, so the replay that follows is empty."""
    from npo.steps.rollback import NoRollbackCandidate, checkpoint_at, choose_rollback_distance
    from npo.training.state import fork_checkpoint

    root = ctx.root_id
    ivs = auto_interventions(ctx)
    prior = [iv for iv in ivs if iv.at_step < global_step]
    chain = lineage_chain(prior, root)
    lineage = f"{root}.r{len(prior) + 1}"
    cache_id = f"{root}.auto{global_step:06d}"
    made = [iv for iv in ivs if iv.at_step == global_step]
    if made:
        delta, back_step = made[0].delta, made[0].rollback_to
        back = checkpoint_at(ctx, chain, back_step)
        assert back is not None, f"checkpoint {back_step} of a recorded rollback is gone"
    else:
        try:
            choice = choose_rollback_distance(ctx, chain, t)
        except NoRollbackCandidate as e:  # nothing to score yet: keep training
            ctx.tracker.set_tags({f"autonpo.skipped.{t}": str(e)})
            return _result(RollbackOut(run_id, run_id, run_id, t, 0, "", True))
        delta, back = choice["delta"], choice["rollback_to"]
        ctx.db.record_intervention(
            root,
            "auto",
            at_step=global_step,  # unique even when a later rollback revisits policy step t
            delta=delta,
            rollback_to=t - delta,
            guide_step=t,
            signals=json.loads(signals),
            s_table=choice["table"],
        )
        ctx.tracker.log_metrics(
            {"autonpo/delta": float(delta), "autonpo/rollback_to": float(t - delta)},
            step=global_step,
        )
    context_for(ctx, lineage)  # registers the lineage run, which the fork is recorded to
    fork_checkpoint(ctx.store, back[0], lineage, back[1], {"global_step": global_step}, ctx.db)
    return _result(RollbackOut(lineage, run_id, back[0], back[1], delta, cache_id, False))


class KeepOut(NamedTuple):
    run_id: str
    policy_step: int


@stage(KeepOut, opens_run=False, runs_model=False)
def keep(run_id: str, policy_step: int) -> Result:
    """Pass where the run is through: the no-intervention branch's values for dsl.OneOf."""
    return _result(KeepOut(run_id, policy_step))


class ScheduleOut(NamedTuple):
    run_id: str
    policy_step: int
    global_step: int


@stage(ScheduleOut, retried=True)
def schedule(ctx: RunContext, run_id: str, start: int, end: int) -> Result:
    """NPO's rolling schedule over policy steps (start, end] in one task: each window's
    look-ahead, guidance, verification and guided training, by the same flow a pipeline
    runs as tasks (a DAG of one task per window would grow with the budget)."""
    from npo.flow import InProcess
    from npo.methods.schedule import run_segments

    last = run_segments(InProcess(ctx), run_id, start, end)
    return _result(ScheduleOut(last["run_id"], last["policy_step"], last["global_step"]))


class EvaluateOut(NamedTuple):
    accuracy: float


@stage(EvaluateOut, ui=("metrics",))
def evaluate(ctx: RunContext, run_id: str, step: int) -> Result:
    """Greedy pass@1 of checkpoint `step` of `run_id` on the whole eval set."""
    from npo.steps.evaluate import eval_settings, evaluate_policy
    from npo.training.state import load_train_state

    cfg = ctx.cfg
    loaded = load_train_state(ctx.store, run_id, step, cfg.model.dtype, db=ctx.db)
    metrics = evaluate_policy(
        loaded.model, loaded.tokenizer, ctx.task, ctx.task.eval_problems(), **eval_settings(cfg)
    )
    final = {f"final/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}
    ctx.tracker.log_metrics(final, step=int(loaded.state["global_step"]))
    return _result(EvaluateOut(metrics["eval/accuracy"]), metrics=final)


class ReportOut(NamedTuple):
    summary: dict


@stage(ReportOut, ui=("markdown",), runs_model=False)
def report(ctx: RunContext) -> Result:
    """The run's report (summary, curves, interventions): to the run's output folder, the
    artifact store (`runs/<run>/report/`) and MLflow; marks the run completed."""
    from npo.experiment import summarize
    from npo.report import write_report
    from npo.report_ui import events_of

    started = ctx.run_row().started_at
    wall = (datetime.now(UTC) - started).total_seconds() if started else float("nan")
    summary = summarize(ctx, wall)
    history = ctx.history()
    png, md = write_report(
        ctx.run_dir,
        history,
        summary,
        title=f"{ctx.cfg.method} · {ctx.run_id}",
        events=events_of(ctx.db.interventions(ctx.run_id)),
    )
    summary["report"] = str(md)
    summary_path = ctx.run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    history_path = ctx.run_dir / HISTORY
    history_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    for path in (png, md, summary_path, history_path):
        ctx.store.put_file(f"{report_prefix(ctx.run_id)}{path.name}", path)
        ctx.tracker.log_artifact(path, "report")
    ctx.db.set_run_status(ctx.run_id, "completed")
    ctx.tracker.finish("FINISHED")
    return _result(ReportOut(_json_values(summary)), markdown=md.read_text())


def _json_values(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as strict JSON values (a KFP output): NaN/inf as None."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()
    }


def report_prefix(run_id: str) -> str:
    """Where the report stage puts a run's report files in the artifact store."""
    return f"runs/{run_id}/report/"


# --------------------------------------------------------------------------- running one
def config_from_json(config: str) -> ExperimentConfig:
    """The experiment config a task got as its `config` parameter."""
    return ExperimentConfig.model_validate(json.loads(config))


def use_compute(cfg: ExperimentConfig) -> None:
    """Where and how this process computes for a run: torch threads, the policy device,
    the forward passes' dtype and attention kernels (every entry point that trains calls
    this: a stage, the in-process engine)."""
    import torch

    from npo.policy.compute import use_attention, use_compute_dtype, use_device

    torch.set_num_threads(cfg.train.threads)
    use_device(cfg.model.device)
    use_compute_dtype(cfg.model.compute_dtype)
    use_attention(cfg.model.attn_implementation())


def quiet_transformers() -> None:
    """No tqdm bars and only errors from transformers in task logs (and none of the
    multiprocessing lock tqdm creates per process, which the long-lived step-server worker
    would keep). Through its environment variables while it is not imported (a user's own
    setting wins): importing it for its logging alone would add a second to a pod's start."""
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_stage(name: str, config: str, progress: ProgressFn | None = None, **params: Any) -> Result:
    """Open the run of `config`, run stage `name` with `params`, close the run.

    The MLflow run stays open between stages (the report stage finishes it); a failing
    stage marks the run failed so a dead pipeline is visible, and a retry reopens it."""
    if name not in STAGES or not STAGES[name].opens_run:
        raise ValueError(f"unknown stage {name!r}; one of {sorted(STAGES)}")
    cfg = config_from_json(config)
    if STAGES[name].runs_model:  # a light stage's pod imports neither torch nor transformers
        quiet_transformers()
        use_compute(cfg)
    ctx = open_run(cfg, progress=progress, lazy_tracking=True)
    try:
        ctx.db.set_run_status(ctx.run_id, "running")
        result = STAGES[name].fn(ctx, **params)
        ctx.tracker.flush()
        return result
    except BaseException:
        ctx.db.set_run_status(ctx.run_id, "failed")
        ctx.tracker.finish("FAILED")
        raise
    finally:
        ctx.db.close()
        close = getattr(ctx.task, "close", None)
        if close:
            close()
