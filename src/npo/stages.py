"""The stages a pipeline task runs: one entry point per Kubeflow component.

Each stage takes the open run (`RunContext` of the experiment) and small parameters (ids,
steps, flags) and returns a dict of JSON values; heavy data stays in the artifact store.
`run_stage(name, config_json, **params)` opens the run from the config, runs one stage and
closes it: that is what a component calls (through `npo.stepserver.call_stage`). The local
engine (`npo.engine`) calls the same functions on one open run, in the same order.

Stages are idempotent: a retried task resumes from the last committed checkpoint or returns
the recorded result. AutoNPO's loop state (interventions done, the last one's global step,
the checkpoint lineages) is read back from the metadata DB, never passed between tasks.
See docs/stages-api.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from npo.config import ExperimentConfig, public_dump
from npo.guidance.cache import GuidanceCache, load_cache
from npo.guidance.sources import (
    CachedGuidance,
    ExperienceReplay,
    GoldTeacher,
    TrajectorySource,
)
from npo.policy.model import use_compute_dtype, use_device
from npo.report import write_report
from npo.report_html import curves_html
from npo.steps.context import HISTORY, ProgressFn, RunConflict, RunContext, open_run
from npo.steps.detect_plateau import detect_plateau
from npo.steps.evaluate import eval_settings, evaluate_policy
from npo.steps.generate_guidance import generate_guidance
from npo.steps.rollback import (
    Lineage,
    NoRollbackCandidate,
    checkpoint_at,
    choose_rollback_distance,
)
from npo.steps.train_segment import train_segment
from npo.steps.warmup import warmup
from npo.store.checkpoint import latest_checkpoint, list_checkpoints
from npo.store.metadata import InterventionRow
from npo.tasks import Problem
from npo.training.seeding import batch_indices
from npo.training.state import fork_checkpoint, load_train_state

Result = dict[str, Any]
MANUAL_KINDS = ("early", "late", "rolling")


class GuidanceInvalid(ValueError):
    """A cached guide trajectory does not verify: it must not be trained on."""


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
    pool, per_step = ctx.task.train_problems(), ctx.cfg.rollout.prompts_per_step
    seen: dict[int, None] = {}
    for step in range(start, end):
        seen.update(dict.fromkeys(batch_indices(len(pool), per_step, step, ctx.cfg.seed)))
    return [pool[i] for i in seen]


def auto_interventions(ctx: RunContext) -> list[InterventionRow]:
    """AutoNPO's interventions of the run, in order (at_step is a global step)."""
    return [iv for iv in ctx.db.interventions(ctx.root_id) if iv.kind == "auto"]


def lineage_chain(ivs: list[InterventionRow], root: str) -> Lineage:
    """(run_id, first policy step) of each checkpoint lineage after interventions `ivs`."""
    return [(root, 0)] + [(f"{root}.r{k}", iv.rollback_to) for k, iv in enumerate(ivs, 1)]


def final_checkpoint(ctx: RunContext) -> tuple[str, int]:
    """(run_id, step) of the run's last checkpoint on its newest lineage."""
    chain = lineage_chain(auto_interventions(ctx), ctx.root_id)
    found = checkpoint_at(ctx, chain, ctx.cfg.train.steps)
    if found is None:
        raise RunConflict(f"run {ctx.root_id}: no checkpoint at step {ctx.cfg.train.steps}")
    return found


def _latest_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last value of every metric in `rows` (the newest eval carried forward)."""
    out: dict[str, float] = {}
    for row in rows:  # later rows overwrite
        out.update({k: float(v) for k, v in row.items() if isinstance(v, int | float)})
    return out


def _source(ctx: RunContext, guidance: str) -> TrajectorySource | None:
    """What fills slot G: a guidance cache, or the method's own source (LUFFY, ExGRPO)."""
    cfg = ctx.cfg
    if guidance:
        gate = cfg.baselines.rlep_gate if cfg.method == "rlep" else cfg.npo.guidance.gate
        return CachedGuidance(load_cache(ctx.store, ctx.root_id, guidance), gate)
    if cfg.method == "luffy":
        tokenizer = load_train_state(ctx.store, ctx.root_id, 0, cfg.model.dtype).tokenizer
        return GoldTeacher(tokenizer)
    if cfg.method == "exgrpo":
        problems = {p.id: p for p in ctx.task.train_problems()}
        return ExperienceReplay(problems, cfg.seed, cfg.baselines.exgrpo_fraction)
    return None


def curves_markdown(ctx: RunContext, rows: list[dict[str, Any]], ivs: list[Any]) -> str:
    """The eval table of `rows` and the interventions `ivs`, as Markdown for the KFP UI."""
    upto = rows[-1]["step"] if rows else 0
    lines = [f"### {ctx.cfg.method} · {ctx.root_id} · global step {upto}", ""]
    lines += ["| global step | policy step | eval accuracy | train reward |", "|---|---|---|---|"]
    for r in rows:
        if "eval/accuracy" not in r:
            continue
        reward = r.get("reward/mean")
        lines.append(
            f"| {r['step']} | {r['policy_step']} | {r['eval/accuracy']:.3f} | "
            + (f"{reward:.3f} |" if reward is not None else "– |")
        )
    if ivs:
        lines += [
            "",
            "| intervention | at | Δ | rolled back to | guide step |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {iv.kind} | {iv.at_step} | {iv.delta} | {iv.rollback_to} | {iv.guide_step} |"
            for iv in ivs
        ]
    return "\n".join(lines) + "\n"


def train_outputs(run: RunContext, global_step: int) -> dict[str, Any]:
    """What a train task shows in the KFP UI, from one read of the history: the last
    metrics, the eval table (Markdown) and the curves so far (HTML with an SVG chart)."""
    from npo.experiment import events_of

    rows = run.history(until_step=global_step)
    ivs = run.db.interventions(run.root_id)
    events = [e for e in events_of(ivs) if e["step"] <= global_step]
    title = f"{run.cfg.method} · {run.run_id} · global step {global_step}"
    return {
        "metrics": _latest_values(rows),
        "markdown": curves_markdown(run, rows, ivs),
        "html": curves_html(title, rows, events),
    }


# --------------------------------------------------------------------------- stages
def prepare(ctx: RunContext) -> Result:
    """Register the run and warm the policy up -> checkpoint 0."""
    if ctx.run_row().started_at is None:  # wall time of the whole experiment, for the report
        ctx.db.set_run_info(ctx.run_id, started_at=datetime.now(UTC))
    ctx.tracker.log_params(public_dump(ctx.cfg))
    warmup(ctx)
    first = next(iter(ctx.history(until_step=0)), {})
    return {"run_id": ctx.run_id, "eval_accuracy": float(first.get("eval/accuracy", "nan"))}


def train(
    ctx: RunContext,
    run_id: str,
    start: int,
    end: int,
    guidance: str = "",
    phase: str = "",
    fork_from: str = "",
) -> Result:
    """Train policy steps start+1..end of `run_id` (slot G from `guidance` if given)."""
    run = context_for(ctx, run_id)
    if fork_from and start not in list_checkpoints(ctx.store, run_id):
        fork_checkpoint(ctx.store, fork_from, run_id, start)
    state = train_segment(run, start, end, _source(ctx, guidance), phase or ctx.cfg.method)
    global_step = int(state["global_step"])
    return {
        "run_id": run_id,
        "policy_step": end,
        "global_step": global_step,
        **train_outputs(run, global_step),
    }


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
    """Cache one verified guide trajectory per prompt of policy steps (start, end].

    guide_step < 0: the guide run's latest checkpoint (RLEP's finished run). pool_only:
    only the mistake-pool prompts (AutoNPO). kind early/late/rolling: record the manual
    intervention. Guide statistics are logged at `log_step` (default: `start`)."""
    if end <= start:  # an intervention that was skipped: nothing to replay
        return {
            "cache_id": "",
            "entries": 0,
            "q_hat": 0.0,
            "gap": 0.0,
            "guide_accuracy": 0.0,
            "current_accuracy": 0.0,
        }
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
    return _cache_result(cache)


def _cache_result(cache: GuidanceCache) -> Result:
    s = cache.stats
    return {
        "cache_id": cache.cache_id,
        "entries": len(cache.entries),
        "q_hat": float(s["q_hat"]),
        "gap": float(s["accuracy_gap"]),
        "guide_accuracy": float(s["guide_accuracy"]),
        "current_accuracy": float(s["current_accuracy"]),
    }


def verify(ctx: RunContext, cache_id: str) -> Result:
    """Re-verify every cached trajectory with the task's verifier before it is trained on."""
    if not cache_id:
        return {"cache_id": "", "entries": 0, "verified": 0}
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
    return {"cache_id": cache_id, "entries": len(cache.entries), "verified": len(cache.entries)}


def detect(ctx: RunContext, run_id: str, t: int, global_step: int) -> Result:
    """AutoNPO's plateau check at policy step t of lineage `run_id`."""
    ivs = auto_interventions(ctx)
    made = [iv for iv in ivs if iv.at_step == global_step]
    if made:  # decided (and acted on) before a crash: the same decision again
        return _decision(True, True, True, made[0].signals)
    prior = [iv for iv in ivs if iv.at_step < global_step]
    last = prior[-1].at_step if prior else None
    d = detect_plateau(ctx, (run_id, t), global_step, last, len(prior))
    return _decision(d.intervene, d.triggered, d.confirmed, d.signals)


def _decision(intervene: bool, triggered: bool, confirmed: bool, signals: Any) -> Result:
    return {
        "intervene": intervene,
        "triggered": triggered,
        "confirmed": confirmed,
        "signals": json.dumps(signals, default=float),
    }


def rollback(ctx: RunContext, run_id: str, t: int, global_step: int, signals: str = "{}") -> Result:
    """Choose Δ*, record the intervention (with `signals`, detect's JSON) and fork lineage k
    at t − Δ* (idempotent)."""
    root = ctx.root_id
    ivs = auto_interventions(ctx)
    prior = [iv for iv in ivs if iv.at_step < global_step]
    chain = lineage_chain(prior, root)
    k = len(prior) + 1
    lineage = f"{root}.r{k}"
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
            return _rollback_result(run_id, run_id, run_id, t, 0, "", skipped=True)
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
    fork_checkpoint(ctx.store, back[0], lineage, back[1], {"global_step": global_step})
    context_for(ctx, lineage)  # registers the lineage run
    return _rollback_result(lineage, run_id, back[0], back[1], delta, cache_id)


def _rollback_result(
    lineage: str,
    guide_run: str,
    back_run: str,
    back_step: int,
    delta: int,
    cache_id: str,
    skipped: bool = False,
) -> Result:
    return {
        "lineage_run_id": lineage,
        "guide_run": guide_run,
        "back_run": back_run,
        "rollback_to": back_step,
        "delta": delta,
        "cache_id": cache_id,
        "skipped": skipped,
    }


def evaluate(ctx: RunContext, run_id: str, step: int) -> Result:
    """Greedy pass@1 of checkpoint `step` of `run_id` on the whole eval set."""
    cfg = ctx.cfg
    loaded = load_train_state(ctx.store, run_id, step, cfg.model.dtype)
    metrics = evaluate_policy(
        loaded.model, loaded.tokenizer, ctx.task, ctx.task.eval_problems(), **eval_settings(cfg)
    )
    final = {f"final/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}
    ctx.tracker.log_metrics(final, step=int(loaded.state["global_step"]))
    return {"accuracy": metrics["eval/accuracy"], "metrics": final}


def report(ctx: RunContext) -> Result:
    """Summary, plot and Markdown report of the run; marks it completed.

    The files go to the run's output folder (report.md, report.png, summary.json and
    metrics.jsonl, the history's export), to the artifact store under
    `runs/<run>/report/` and to MLflow: on a cluster the task's own disk is gone after it."""
    from npo.experiment import intervention_events, summarize

    started = ctx.run_row().started_at
    wall = (datetime.now(UTC) - started).total_seconds() if started else float("nan")
    summary = summarize(ctx, wall)
    history = ctx.history()
    png, md = write_report(
        ctx.run_dir,
        history,
        summary,
        title=f"{ctx.cfg.method} · {ctx.run_id}",
        events=intervention_events(ctx.db, ctx.run_id),
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
    return {"summary": summary, "markdown": md.read_text()}


def report_prefix(run_id: str) -> str:
    """Where the report stage puts a run's report files in the artifact store."""
    return f"runs/{run_id}/report/"


STAGES: dict[str, Callable[..., Result]] = {
    "prepare": prepare,
    "train": train,
    "guidance": guidance,
    "verify": verify,
    "detect": detect,
    "rollback": rollback,
    "evaluate": evaluate,
    "report": report,
}


def config_from_json(config: str) -> ExperimentConfig:
    """The experiment config a task got as its `config` parameter."""
    return ExperimentConfig.model_validate(json.loads(config))


def use_compute(cfg: ExperimentConfig) -> None:
    """Where and how this process computes for a run: torch threads, the policy device and
    the forward passes' dtype (every entry point that trains calls this: a stage, the
    in-process engine)."""
    torch.set_num_threads(cfg.train.threads)
    use_device(cfg.model.device)
    use_compute_dtype(cfg.model.compute_dtype)


def run_stage(name: str, config: str, progress: ProgressFn | None = None, **params: Any) -> Result:
    """Open the run of `config`, run stage `name` with `params`, close the run.

    The MLflow run stays open between stages (the report stage finishes it); a failing
    stage marks the run failed so a dead pipeline is visible, and a retry reopens it."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; one of {sorted(STAGES)}")
    cfg = config_from_json(config)
    use_compute(cfg)
    # No tqdm bars from transformers in task logs (and none of the multiprocessing lock
    # tqdm creates per process, which a forked step-server worker would leak).
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ctx = open_run(cfg, progress=progress, lazy_tracking=True)
    try:
        ctx.db.set_run_status(ctx.run_id, "running")
        result = STAGES[name](ctx, **params)
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
