"""NPO vs GRPO on the toy: steps to an accuracy threshold, final accuracy, compute, wall time.

For each seed, every method starts from the same warm-up checkpoint (the GRPO run's, shared
through `warmup.init_from`), with the same data order and sampling seeds:

  grpo            on-policy GRPO
  npo-early       early bootstrapping: a scout of S steps guides the window (0, W]
  npo-early-late  early + a late breakthrough: a look-ahead branch from t guides (t, t+Δ]
  npo-rolling     every window (t, t+W] guided by a look-ahead of Δ steps from t
  autonpo         adaptive: plateau trigger, Δ* = argmax Q̂/V̂, rollback + guided replay
  delta0          control: npo-early-late's schedule, guide = the current checkpoint itself
                  (same k tries): separates "near future" from "best of k sampling"
  luffy, exgrpo,  (optional) the paper's baselines: the task's teacher in every group
  rlep            (LUFFY-style shaping); the run's own past successes (ExGRPO); replay
                  from the finished GRPO run (RLEP-style)

The warm-up stops at the toy's default target (40%, `--warmup-target`): below ~20% GRPO
with the toy's learning rate does not move in 150 steps (and neither does a guide trained
like it), so there is nothing for a near future to show. Compute counts every update of the run
(replays included) plus look-ahead steps; guidance sampling is reported in tokens. GRPO trains
`--grpo-extra` steps past the budget (its row reports it at the budget) so that every method
can be set against GRPO at the method's own total compute ("GRPO at equal compute").
The threshold is the seed's warm-up accuracy + 10 points (`--gain`), or fixed (`--threshold`).
Intervals are 95% Student-t intervals over seeds; "− GRPO" and "− Δ0" are paired by seed
(same warm-up, data order and sampling seeds), so they cancel what seeds share. Sampled
tokens count the run's rollouts (replays included), its look-ahead branches' (estimated at
the run's own tokens per update) and the guidance caches'.
A restarted bench reuses the runs it finished (`bench-run.json` in each run folder).

Run:
    .venv/bin/python bench/npo_vs_grpo.py                       # 3 seeds, all methods
    .venv/bin/python bench/npo_vs_grpo.py --seeds 0 --methods grpo npo-early --steps 60
Writes <out>/bench.md, comparison.png and bench.json; prints the table. Asserts nothing.
The last results, and why the toy cannot show NPO's claims: docs/npo-implementation.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npo.config import ExperimentConfig, load_config, public_dump
from npo.experiment import run_experiment
from npo.guidance.cache import list_cache_headers
from npo.report import load_history
from npo.report_compare import RunCurves, accuracy_at, steps_to_threshold, write_comparison
from npo.steps.context import is_branch
from npo.store.artifacts import open_store

METHODS: dict[str, list[str]] = {
    "grpo": [],
    "npo-early": ["method=npo", "npo.early.enabled=true"],
    "npo-early-late": ["method=npo", "npo.early.enabled=true", "npo.late.enabled=true"],
    "npo-rolling": ["method=npo", "npo.rolling.enabled=true"],
    "autonpo": ["method=autonpo"],
    "delta0": [
        "method=npo",
        "npo.early.enabled=true",
        "npo.late.enabled=true",
        "npo.delta0_control=true",
    ],
    # the paper's comparison sources (not in the default set: add with --methods)
    "luffy": ["method=luffy"],
    "exgrpo": ["method=exgrpo"],
    "rlep": ["method=rlep"],  # replays the same seed's finished GRPO run
}
DEFAULT = ["grpo", "npo-early", "npo-early-late", "npo-rolling", "autonpo", "delta0"]


def config(args: argparse.Namespace, method: str, seed: int) -> ExperimentConfig:
    base = args.autonpo_config if method == "autonpo" else args.config
    overrides = [
        f"name=s{seed}-{method}",
        f"seed={seed}",
        f"train.steps={args.steps + (args.grpo_extra if method == 'grpo' else 0)}",
        f"warmup.target_accuracy={args.warmup_target}",
        f"train.eval_every={args.eval_every}",
        f"task.n_eval={args.n_eval}",
        f"train.eval_samples={args.eval_samples}",
        f"store.root={args.out}",
        "tracking.enabled=false",
        "warmup.init_from=null" if method == "grpo" else f"warmup.init_from=s{seed}-grpo",
        *METHODS[method],
        *([f"npo.late.at_step={args.late_at}"] if args.late_at and _late(method) else []),
        *([f"baselines.rlep_run=s{seed}-grpo"] if method == "rlep" else []),
        *args.set,
    ]
    return load_config(base, overrides)


def _late(method: str) -> bool:
    return "npo.late.enabled=true" in METHODS[method]


def run_once(cfg: ExperimentConfig) -> tuple[dict[str, Any], float]:
    """Run `cfg` (summary, wall seconds), or read them back where this bench already ran it.

    A finished run leaves `bench-run.json` in its folder, so a restarted bench picks up where
    it stopped without re-running (or re-timing) what is done.
    """
    record = cfg.store.root / cfg.name / "bench-run.json"
    config = public_dump(cfg)
    if record.exists():
        done = json.loads(record.read_text())
        if done["config"] == config:
            return done["summary"], done["wall_s"]
    started = time.perf_counter()
    summary = run_experiment(cfg)
    wall = time.perf_counter() - started
    record.write_text(json.dumps({"config": config, "summary": summary, "wall_s": wall}))
    return summary, wall


@dataclass(frozen=True)
class Goal:
    """The accuracy a run must reach: fixed, or `gain` over the seed's warm-up accuracy.

    Seeds' warm-ups stop at different accuracies (the target is checked every few steps), and
    how far RL then goes depends on where it starts, so a gain compares seeds fairly.
    """

    fixed: float | None
    gain: float
    metric: str = "eval/accuracy"

    def threshold(self, start: float) -> float:
        return self.fixed if self.fixed is not None else start + self.gain

    def __str__(self) -> str:
        return f"{self.fixed:.0%}" if self.fixed is not None else f"+{100 * self.gain:.0f} pts"


def measure(cfg: ExperimentConfig, goal: Goal, cut: int | None = None) -> dict[str, Any]:
    """One run's figures; `cut` reads a longer run (GRPO's) as if it stopped at that step."""
    summary, wall = run_once(cfg)
    full = load_history(cfg.store.root / cfg.name / "metrics.jsonl")
    rows = full if cut is None else [r for r in full if r["step"] <= cut]
    store = open_store((cfg.store.root.resolve() / "artifacts").as_uri())
    headers = list_cache_headers(store, cfg.name)
    lookahead = [
        (h["policy_step"], h["guide_step"] - h["policy_step"])
        for h in headers
        if is_branch(cfg.name, h["guide_run_id"])
    ]
    start = accuracy_at(full, 0, goal.metric)  # the step-0 eval: where the warm-up left it
    threshold = goal.threshold(start)
    reached = steps_to_threshold(rows, threshold, goal.metric)
    updates = max(r["step"] for r in rows)
    ahead = sum(d for _, d in lookahead)
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    rollout_tokens = sum(r.get("response/length_mean", 0.0) * per_step for r in rows)
    ahead_before = sum(d for at, d in lookahead if reached is not None and at < reached)
    return {
        "history": rows,
        "full_history": full,
        "trained": max(r["step"] for r in full),
        "summary": summary,
        "final": accuracy_at(rows, updates, goal.metric),
        "start": start,
        "threshold": threshold,
        "steps_to_threshold": reached,
        "compute_to_threshold": None if reached is None else reached + ahead_before,
        "updates": updates,
        "lookahead_steps": ahead,
        "guidance_tokens": sum(h["stats"]["sampled_tokens"] for h in headers),
        # is the guide ahead? its greedy accuracy over the guided checkpoint's, and Q̂
        "guide_gap": _mean([h["stats"]["accuracy_gap"] for h in headers] or [None]),
        "q_hat": _mean([h["stats"]["q_hat"] for h in headers] or [None]),
        "total_compute": updates + ahead,
        "sampled_tokens": rollout_tokens * (1 + ahead / max(updates, 1))
        + sum(h["stats"]["sampled_tokens"] for h in headers),
        "wall_s": wall,
    }


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% Student-t interval); half-width nan below 2 values."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, float(half)


def _ci(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "-"
    mean, half = interval([scale * v for v in values])
    return f"{mean:.{digits}f}" + ("" if half != half else f" ± {half:.{digits}f}")


def paired(
    by_seed: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]], key: str
) -> list[float]:
    """Per seed where both have `key`: this method's value minus `other`'s."""
    return [
        r[key] - other[s][key]
        for s, r in by_seed.items()
        if s in other and r[key] is not None and other[s][key] is not None
    ]


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if len(got) == len(values) and got else None


def table(results: dict[str, dict[int, dict[str, Any]]], goal: Goal) -> str:
    grpo, delta0 = results.get("grpo", {}), results.get("delta0", {})
    lines = [
        f"| method | final {goal.metric} (95% CI) | final − GRPO (paired) | GRPO at equal compute "
        f"| steps to {goal} | − Δ0 (paired) | GRPO/method (steps) | GRPO/method (compute) "
        "| updates + look-ahead | sampled tokens | guide − current (pts) | guide Q̂ | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if grpo:  # the paper's "base" row: the warm-up every method starts from
        starts = [r["start"] for r in grpo.values()]
        lines.append(f"| base (warm-up) | {_ci(starts)} |" + " - |" * 11)
    for method, by_seed in results.items():
        seeds = sorted(by_seed)
        rows = [by_seed[s] for s in seeds]
        steps = _mean([r["steps_to_threshold"] for r in rows])
        compute = _mean([r["compute_to_threshold"] for r in rows])
        g_steps = _mean([grpo[s]["steps_to_threshold"] for s in seeds if s in grpo] or [None])
        ratio = f"{g_steps / steps:.2f}" if steps and g_steps else "-"
        c_ratio = f"{g_steps / compute:.2f}" if compute and g_steps else "-"
        reached = sum(r["steps_to_threshold"] is not None for r in rows)
        # GRPO's accuracy after as many updates (+ look-ahead) as this method spent
        par = _mean(
            [
                accuracy_at(grpo[s]["full_history"], r["total_compute"], goal.metric)
                if s in grpo and r["total_compute"] <= grpo[s]["trained"]
                else None
                for s, r in zip(seeds, rows, strict=True)
            ]
        )
        vs_grpo = paired(by_seed, grpo, "final") if method != "grpo" else []
        vs_delta0 = (
            paired(by_seed, delta0, "steps_to_threshold") if method.startswith("npo") else []
        )
        gap, q_hat = _mean([r["guide_gap"] for r in rows]), _mean([r["q_hat"] for r in rows])
        lines.append(
            f"| {method} | {_ci([r['final'] for r in rows])} "
            f"| {_ci(vs_grpo, 100, 1) + ' pts' if vs_grpo else '-'} "
            f"| {'-' if par is None else f'{par:.3f}'} "
            f"| {f'{steps:.1f}' if steps else f'{reached}/{len(rows)} reached'} "
            f"| {_ci(vs_delta0, 1, 1) if vs_delta0 else '-'} | {ratio} "
            f"| {c_ratio} | {statistics.fmean(r['total_compute'] for r in rows):.0f} "
            f"| {statistics.fmean(r['sampled_tokens'] for r in rows):.0f} "
            f"| {'-' if gap is None else f'{100 * gap:+.1f}'} "
            f"| {'-' if q_hat is None else f'{q_hat:.2f}'} "
            f"| {statistics.fmean(r['wall_s'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/toy_grpo.yaml")
    p.add_argument("--autonpo-config", default="configs/toy_autonpo.yaml")
    p.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument(
        "--grpo-extra", type=int, default=60, help="GRPO steps past --steps (equal compute)"
    )
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--gain", type=float, default=0.1, help="threshold = warm-up acc + gain")
    goal.add_argument("--threshold", type=float, help="a fixed accuracy threshold instead")
    p.add_argument("--warmup-target", type=float, default=0.4)
    # finer and larger than make run's eval: steps to threshold are read off this curve, and
    # 256 greedy answers carry about +-3 points of sampling noise
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="k sampled answers per eval prompt (train.eval_samples); with it the table reads "
        "eval/mean_at_k, the sampled pass@1, instead of greedy accuracy",
    )
    p.add_argument(
        "--late-at",
        type=int,
        help="npo.late.at_step of the methods with a late breakthrough (npo-early-late, "
        "delta0): it + the look-ahead must fit in --steps",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    args = p.parse_args()
    metric = "eval/mean_at_k" if args.eval_samples else "eval/accuracy"
    goal = Goal(args.threshold, args.gain, metric)
    methods = ["grpo", *[m for m in args.methods if m != "grpo"]]  # grpo owns the warm-up

    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in methods:
            print(f"seed {seed} · {method} ...", flush=True)
            cut = args.steps if method == "grpo" else None
            results[method][seed] = measure(config(args, method, seed), goal, cut)
            # the table so far, so an interrupted bench still leaves its numbers
            done = {m: r for m, r in results.items() if r}
            (args.out / "bench.md").write_text(table(done, goal) + "\n")
    text = table(results, goal)
    write_comparison(
        args.out,
        [
            RunCurves(
                f"{m} (seed {args.seeds[0]})",
                r[args.seeds[0]]["history"],
                r[args.seeds[0]]["summary"],
            )
            for m, r in results.items()
        ],
        title="NPO vs GRPO (first seed)",
        threshold=results["grpo"][args.seeds[0]]["threshold"],
    )
    (args.out / "bench.md").write_text(text + "\n")
    slim = {
        m: {
            s: {k: v for k, v in r.items() if k not in ("history", "full_history", "summary")}
            for s, r in by.items()
        }
        for m, by in results.items()
    }
    (args.out / "bench.json").write_text(json.dumps(slim, indent=2))
    print(text)
    print(f"\nwritten: {args.out}/bench.md, comparison.png, bench.json")


if __name__ == "__main__":
    main()
