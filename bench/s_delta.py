"""The S(Δ) curve: how good and how far off-policy a guide Δ steps in the future is.

NPO's premise (docs/algorithm.md): a guide π_{t+Δ} helps the policy π_t in proportion to
S(Δ) = Q(Δ) / V(Δ), where Q grows with Δ (a later policy solves more of what π_t fails) and
V too (its trajectories are further off π_t's distribution), so S has an interior optimum.
This script measures both on a finished run with a checkpoint at every t and t + Δ asked for:

For each point t in --at, the prompts of the steps (t, t + --window] (what a guide at t
serves); π_t samples --tries responses for each, and the prompts with no correct one are the
failures F. For each Δ in --deltas, the guide π_{t+Δ} samples --tries for each prompt of F:
- Q̂(Δ): the share of F it solves (at least one verified response: what the guidance cache
  keeps). Δ = 0 is π_t itself, drawn afresh: best-of-k without any future (NPO's Δ=0 control).
- V̂(Δ): the mean per-token KL (k3) between π_{t+Δ} and π_t on the guide's own samples of
  F, the estimator AutoNPO's Δ* rule uses (npo.algo.autonpo.mean_token_kl);
- the importance-ratio spread: the standard deviation, over the guide's correct responses
  (the ones NPO injects), of log π_t(y) − log π_{t+Δ}(y) per token: how unevenly the IS
  correction weighs them;
- Ŝ(Δ) = Q̂ / V̂ for Δ > 0, and (Q̂(Δ) − Q̂(0)) / V̂: what the future adds over resampling
  the present, per unit of divergence (with --deltas including 0);
- the Δ AutoNPO's rule would choose from these numbers
  (npo.algo.autonpo.choose_rollback with the config's floor), beside the one a floor of
  1e-3 (the old default) would choose.

Everything is seeded (--seed). Writes <out>/s_delta.json, s_delta.md and s_delta.png; prints
the table. Measures only; asserts nothing.

Run (a GRPO run with a checkpoint every 5 steps up to max(at) + max(deltas)):
    .venv/bin/python bench/s_delta.py --config configs/toy_grpo.yaml --run sdelta-grpo \\
        --store runs --at 20 60 --deltas 0 5 10 20 40 80
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from npo.algo.autonpo import choose_rollback, mean_token_kl
from npo.algo.npo import pass_rates
from npo.config import load_config
from npo.rollout import RolloutBatch, sample
from npo.stages import use_compute
from npo.store.artifacts import open_store
from npo.tasks import Problem, make_task
from npo.training.rl_step import sequence_logprobs
from npo.training.seeding import derive_seed, segment_indices
from npo.training.state import load_train_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the run's experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run", required=True, help="run name whose checkpoints are read")
    p.add_argument("--store", type=Path, default=Path("runs"), help="its store.root")
    p.add_argument("--at", nargs="+", type=int, default=[20, 60])
    p.add_argument("--deltas", nargs="+", type=int, default=[0, 5, 10, 20, 40, 80])
    p.add_argument("--window", type=int, default=10, help="steps of prompts a guide serves")
    p.add_argument("--tries", type=int, default=8, help="samples per prompt (k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/s-delta"))
    return p.parse_args(argv)


def window_problems(cfg: Any, train: list[Problem], t: int, window: int) -> list[Problem]:
    """The distinct prompts of policy steps (t, t + window], as the run drew them."""
    per = cfg.rollout.prompts_per_step
    return [train[i] for i in segment_indices(len(train), per, t, t + window, cfg.seed)]


def draw(cfg: Any, task: Any, model: Any, tokenizer: Any, problems: list[Problem], k: int,
         seed: int) -> tuple[RolloutBatch, list[float]]:  # fmt: skip
    """k samples per problem at the rollout temperature, and each sample's reward."""
    seeds = [derive_seed(seed, i) for i in range(len(problems))]
    batch = sample(model, tokenizer, [p.prompt for p in problems], n=k,
                   temperature=cfg.rollout.temperature,
                   max_new_tokens=cfg.rollout.max_new_tokens, seeds=seeds)  # fmt: skip
    owners = [problems[i] for i in batch.prompt_index.tolist()]
    return batch, [v.reward for v in task.verify_batch(owners, batch.texts)]


def solved(rewards: list[float], k: int) -> list[bool]:
    """Per prompt (rows grouped k at a time): at least one correct response."""
    return (pass_rates(torch.tensor(rewards).view(-1, k)) > 0).tolist()


def measure_point(cfg: Any, task: Any, store: Any, run: str, t: int,
                  args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """One row per Δ at point t (module docstring)."""
    k, temperature = args.tries, cfg.rollout.temperature
    chunk = cfg.algo.micro_batch_size
    current = load_train_state(store, run, t, cfg.model.dtype)
    problems = window_problems(cfg, task.train_problems(), t, args.window)
    _, rewards = draw(cfg, task, current.model, current.tokenizer, problems, k,
                      derive_seed(args.seed, t, 0))  # fmt: skip
    failures = [p for p, ok in zip(problems, solved(rewards, k), strict=True) if not ok]
    rows = []
    for delta in args.deltas:
        row: dict[str, Any] = {"t": t, "delta": delta, "prompts": len(problems),
                               "failures": len(failures)}  # fmt: skip
        if not failures:
            rows.append({**row, "q": float("nan"), "v": float("nan"), "is_spread": float("nan")})
            continue
        guide = current if delta == 0 else load_train_state(store, run, t + delta, cfg.model.dtype)
        batch, g_rewards = draw(cfg, task, guide.model, guide.tokenizer, failures, k,
                                derive_seed(args.seed, t, 1 + delta))  # fmt: skip
        guide_lp = sequence_logprobs(guide.model, batch, temperature, chunk)
        current_lp = sequence_logprobs(current.model, batch, temperature, chunk)
        mask = batch.response_mask
        # KL(guide || current) on the guide's samples: the guide plays "current" in the
        # estimator's argument order (tokens drawn from its first argument)
        v = mean_token_kl(guide_lp, current_lp, mask)
        correct = torch.tensor([r > 0 for r in g_rewards])
        per_token = ((current_lp - guide_lp) * mask).sum(1) / mask.sum(1).clamp(min=1)
        spread = per_token[correct].tolist()
        rows.append({
            **row,
            "q": sum(solved(g_rewards, k)) / len(failures),
            "guide_pass_rate": sum(r > 0 for r in g_rewards) / len(g_rewards),
            "v": v,
            "is_spread": statistics.pstdev(spread) if len(spread) > 1 else float("nan"),
            "is_mean": statistics.fmean(spread) if spread else float("nan"),
        })  # fmt: skip
    q0 = next((r["q"] for r in rows if r["delta"] == 0), float("nan"))
    for row in rows:
        scored = row["delta"] > 0 and row["v"] > 0
        row["s"] = row["q"] / row["v"] if scored else float("nan")
        # what the future adds over best-of-k from the present (Δ = 0), per unit of V̂
        row["s_excess"] = (row["q"] - q0) / row["v"] if scored else float("nan")
    return rows


def choices(rows: list[dict[str, Any]], floor: float) -> dict[str, int | None]:
    """argmax Ŝ over Δ > 0, and what AutoNPO's rule picks from the same Q̂, V̂ with the
    configured floor and with the old 1e-3."""
    ahead = [r for r in rows if r["delta"] > 0 and not math.isnan(r["q"])]
    if not ahead:
        return {"argmax_s": None, "argmax_s_excess": None, "autonpo": None,
                "autonpo_old_floor": None}  # fmt: skip
    q = {r["delta"]: r["q"] for r in ahead}
    v = {r["delta"]: r["v"] for r in ahead}
    best = max(ahead, key=lambda r: (r["s"], -r["delta"]))
    return {
        "argmax_s": best["delta"],
        "argmax_s_excess": max(ahead, key=lambda r: (r["s_excess"], -r["delta"]))["delta"],
        "autonpo": choose_rollback(list(q), q, v, floor).delta,
        "autonpo_old_floor": choose_rollback(list(q), q, v, 1e-3).delta,
    }


def markdown(points: dict[int, list[dict[str, Any]]], picks: dict[int, dict]) -> str:
    lines = [
        "| t | Δ | failing prompts | Q̂(Δ) | guide pass rate | V̂(Δ) (KL) | IS spread "
        "| Ŝ = Q̂/V̂ | (Q̂ − Q̂(0))/V̂ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rows in points.items():
        for r in rows:
            lines.append(
                f"| {t} | {r['delta']} | {r['failures']}/{r['prompts']} | {r['q']:.3f} "
                f"| {r.get('guide_pass_rate', float('nan')):.3f} | {r['v']:.2e} "
                f"| {r['is_spread']:.3f} | {r['s']:.1f} | {r['s_excess']:.1f} |"
            )
    lines.append("")
    for t, pick in picks.items():
        lines.append(
            f"- t = {t}: argmax Ŝ at Δ = {pick['argmax_s']}, argmax of the excess at "
            f"Δ = {pick['argmax_s_excess']}; AutoNPO's rule picks "
            f"Δ = {pick['autonpo']} (with the old 1e-3 floor: Δ = {pick['autonpo_old_floor']})"
        )
    return "\n".join(lines) + "\n"


def plot(points: dict[int, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for t, rows in points.items():
        d = [r["delta"] for r in rows]
        axes[0].plot(d, [r["q"] for r in rows], marker="o", label=f"t = {t}")
        axes[1].plot(d, [r["v"] for r in rows], marker="o", label=f"t = {t}")
        ahead = [r for r in rows if r["delta"] > 0]
        line = axes[2].plot([r["delta"] for r in ahead], [r["s"] for r in ahead],
                            marker="o", label=f"Q̂/V̂, t = {t}")[0]  # fmt: skip
        axes[2].plot([r["delta"] for r in ahead], [r["s_excess"] for r in ahead], marker="x",
                     linestyle="--", color=line.get_color(),
                     label=f"(Q̂−Q̂(0))/V̂, t = {t}")  # fmt: skip
    for ax, title in zip(axes, ["Q̂(Δ): failures the guide solves", "V̂(Δ): per-token KL",
                                "Ŝ(Δ)"], strict=True):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("Δ (steps ahead)")
        ax.set_xscale("symlog", linthresh=5)
        ax.legend(fontsize=7)
    axes[2].set_yscale("symlog", linthresh=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = load_config(args.config, [f"store.root={args.store}", *args.overrides])
    use_compute(cfg)
    task = make_task(cfg.task)
    store = open_store((args.store.resolve() / "artifacts").as_uri())
    points = {t: measure_point(cfg, task, store, args.run, t, args) for t in args.at}
    picks = {t: choices(rows, cfg.autonpo.v_floor) for t, rows in points.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"run": args.run, "tries": args.tries, "window": args.window,
              "points": {str(t): rows for t, rows in points.items()},
              "choices": {str(t): p for t, p in picks.items()}}  # fmt: skip
    (args.out / "s_delta.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(points, picks)
    (args.out / "s_delta.md").write_text(text)
    plot(points, args.out / "s_delta.png")
    print(text, end="")
    print(f"wrote {args.out}/s_delta.md, s_delta.json, s_delta.png")
    return result


if __name__ == "__main__":
    main()
