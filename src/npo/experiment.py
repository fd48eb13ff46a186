"""The experiment: warm-up, the method's RL phase, final evaluation, report — resumable.

    summary = run_experiment(load_config("configs/toy_grpo.yaml"), engine="pipeline")

Each stage (npo.stages) is idempotent, so calling this again after a crash picks up from
the last committed checkpoint. torch and the stages are imported only where they run: with
the pipeline engine, this process only orchestrates (the step server's workers train).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

from npo.config import ExperimentConfig

if TYPE_CHECKING:  # the CLI imports ENGINES from here: nothing heavy at import time
    from npo.steps.context import NoticeFn, ProgressFn, RunContext


def summarize(ctx: RunContext, wall_s: float) -> dict[str, Any]:
    """Headline numbers of a finished run, from its metrics history."""
    rows = ctx.history()
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    start = evals[0][1] if evals else float("nan")
    final = evals[-1][1] if evals else float("nan")
    train_rows = [r for r in rows if "perf/step_time_s" in r]
    # the sampled eval (train.eval_samples), which RL moves before the greedy answer
    sampled = [r["eval/mean_at_k"] for r in rows if "eval/mean_at_k" in r]
    sampled_rows = (
        {
            "start mean@k (sampled pass@1)": sampled[0],
            "final mean@k (sampled pass@1)": sampled[-1],
            "mean@k gain (points)": 100.0 * (sampled[-1] - sampled[0]),
        }
        if sampled
        else {}
    )

    def mean(key: str) -> float:
        vals = [r[key] for r in train_rows if key in r]
        if not vals:
            return float("nan")
        return sum(vals) / len(vals)

    from npo.guidance.cache import list_cache_headers
    from npo.steps.context import is_branch

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
    target = ctx.cfg.warmup.target_accuracy
    warmup_steps = int(rows[0].get("warmup/steps", 0)) if rows else 0
    from npo.learning_signal import memorised_warning, no_signal_warning

    # A memorised warm-up also stops at its cap, but more steps would not help it.
    warnings = [memorised_warning(rows[0])] if rows else []
    # The warm-up hit its step cap first (warmup.steps 0 skips it on purpose: no warning).
    if target is not None and start < target and ctx.cfg.warmup.steps > 0 and not any(warnings):
        warnings.append(
            f"the warm-up stopped at its cap ({warmup_steps} steps) at {start:.1%}, below "
            f"warmup.target_accuracy {target:.0%}: RL started from a policy that rarely "
            "solves the task (raise warmup.steps or lower warmup.lr)"
        )
    warnings.append(no_signal_warning(rows, ctx.cfg.train.no_signal_steps))
    warning = {"warning": "; also ".join(w for w in warnings if w)} if any(warnings) else {}
    return {
        **warning,
        "run": ctx.run_id,
        "policy steps": max((r["policy_step"] for r in rows), default=0),
        "warm-up steps": warmup_steps,
        "warm-up accuracy": start,
        "final accuracy": final,
        "best accuracy": max((a for _, a in evals), default=float("nan")),
        "gain (points)": 100.0 * (final - start),
        **sampled_rows,
        "mean train reward (last 10 steps)": (
            sum(r["reward/mean"] for r in train_rows[-10:]) / max(len(train_rows[-10:]), 1)
        ),
        "rollout tokens/s": mean("perf/rollout_tokens_per_s"),
        "train tokens/s": mean("perf/train_tokens_per_s"),
        **npo_rows,
        "wall time (s)": wall_s,
        "mlflow run": ctx.tracker.run_id or "-",
    }


Engine = Literal["pipeline", "direct"]  # what run_experiment(engine=...) and `--engine` take
ENGINES: tuple[str, ...] = get_args(Engine)


def run_experiment(
    cfg: ExperimentConfig,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    engine: str = "direct",
    notify: NoticeFn | None = None,
    runner: str = "subprocess",
) -> dict[str, Any]:
    """Run (or resume) the experiment `cfg`; returns the summary and writes the report.

    engine "pipeline": its Kubeflow pipeline through kfp.local (what `npo run` does), on
    kfp.local's `runner` ("subprocess" or "docker": npo.pipelines.local); "direct": the
    same flow (npo.methods.experiment) calling the stages in this process (no
    orchestration: the baseline of bench/pipeline_overhead.py, and what most tests use).
    `notify` gets one-off lines (e.g. which checkpoint a resumed run starts from). A run
    that does not finish is marked `interrupted` (KeyboardInterrupt, npo.interrupts'
    SIGTERM) or `failed`, and the exception carries a note saying so."""
    if engine == "pipeline":
        from npo.pipelines.local import run_pipeline

        return run_pipeline(cfg, fresh=fresh, progress=progress, runner=runner, notify=notify)
    if engine != "direct":
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    from npo.flow import InProcess
    from npo.methods import experiment
    from npo.stages import use_compute
    from npo.steps.context import mark_stopped, open_run
    from npo.store.metadata import RunStatus

    ctx = open_run(cfg, fresh=fresh, progress=progress)
    if ctx.resume_note and notify:
        notify(ctx.resume_note)
    use_compute(cfg)
    try:
        ctx.db.set_run_status(ctx.run_id, "running")
        summary = dict(experiment(InProcess(ctx))["summary"])
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        ctx.close("KILLED" if interrupted else "FAILED")
        e.add_note(mark_stopped(cfg, RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED))
        raise
    ctx.close("FINISHED")
    return summary
