"""The local experiment: warm-up, then GRPO, then the report — resumable end to end.

    summary = run_experiment(load_config("configs/toy_grpo.yaml"))

Each stage is a pipeline step (npo.steps) and is idempotent, so calling this again after a
crash picks up from the last committed checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from npo.config import ExperimentConfig, public_dump
from npo.engine import train
from npo.guidance.cache import list_cache_headers
from npo.report import load_history, write_report
from npo.steps.context import ProgressFn, RunContext, is_branch, open_run
from npo.steps.warmup import warmup
from npo.store.metadata import MetadataDB


def intervention_events(db: MetadataDB, run_id: str) -> list[dict[str, Any]]:
    """The run's interventions as report events at their global step."""
    return [
        {
            "step": int(iv.signals.get("global_step", iv.at_step)),
            "label": f"Δ={iv.delta}, from {iv.rollback_to}",
            "kind": iv.kind,
        }
        for iv in db.interventions(run_id)
    ]


def summarize(ctx: RunContext, wall_s: float) -> dict[str, Any]:
    """Headline numbers of a finished run, from its metrics history."""
    rows = load_history(ctx.history_path)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    start = evals[0][1] if evals else float("nan")
    final = evals[-1][1] if evals else float("nan")
    train_rows = [r for r in rows if "perf/step_time_s" in r]

    def mean(key: str) -> float:
        vals = [r[key] for r in train_rows if key in r]
        if not vals:
            return float("nan")
        return sum(vals) / len(vals)

    guides = list_cache_headers(ctx.store, ctx.run_id)
    # Look-ahead branches are extra compute; AutoNPO's replays are already in the updates,
    # and another finished run (RLEP's source) is not this run's compute.
    lookahead = sum(
        g["guide_step"] - g["policy_step"]
        for g in guides
        if is_branch(ctx.run_id, g["guide_run_id"])
    )
    npo_rows: dict[str, Any] = {}
    if guides:
        stats = [g["stats"] for g in guides]
        npo_rows = {
            "guidance caches": len(guides),
            "look-ahead policy steps": lookahead,
            "replayed policy steps": max((r["step"] for r in rows), default=0)
            - max((r["policy_step"] for r in rows), default=0),
            "guide Q̂ (mean)": sum(s["q_hat"] for s in stats) / len(stats),
            "guide - current accuracy (points, mean)": 100.0
            * sum(s["accuracy_gap"] for s in stats)
            / len(stats),
            "guidance sampled tokens": sum(s["sampled_tokens"] for s in stats),
            "guided groups (mean frac)": mean("npo/guided_frac"),
        }
    return {
        "run": ctx.run_id,
        "policy steps": max((r["policy_step"] for r in rows), default=0),
        "warm-up steps": int(rows[0].get("warmup/steps", 0)) if rows else 0,
        "warm-up accuracy": start,
        "final accuracy": final,
        "best accuracy": max((a for _, a in evals), default=float("nan")),
        "gain (points)": 100.0 * (final - start),
        "mean train reward (last 10 steps)": (
            sum(r["reward/mean"] for r in train_rows[-10:]) / max(len(train_rows[-10:]), 1)
        ),
        "rollout tokens/s": mean("perf/rollout_tokens_per_s"),
        "train tokens/s": mean("perf/train_tokens_per_s"),
        **npo_rows,
        "wall time (s)": wall_s,
        "mlflow run": ctx.tracker.run_id or "-",
    }


def run_experiment(
    cfg: ExperimentConfig, fresh: bool = False, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run (or resume) the experiment `cfg`; returns the summary and writes the report."""
    ctx = open_run(cfg, fresh=fresh, progress=progress)
    status = "FAILED"
    torch.set_num_threads(cfg.train.threads)
    started = time.perf_counter()
    try:
        ctx.db.set_run_status(ctx.run_id, "running")
        ctx.tracker.log_params(public_dump(cfg))
        warmup(ctx)
        train(ctx)
        summary = summarize(ctx, time.perf_counter() - started)
        png, md = write_report(
            ctx.run_dir,
            load_history(ctx.history_path),
            summary,
            title=f"{cfg.method} · {cfg.name}",
            events=intervention_events(ctx.db, ctx.run_id),
        )
        for path in (png, md):
            ctx.tracker.log_artifact(path, "report")
        summary["report"] = str(md)
        ctx.db.set_run_status(ctx.run_id, "completed")
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            ctx.db.set_run_status(ctx.run_id, "failed")
        ctx.close(status)
