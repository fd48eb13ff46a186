"""AutoNPO's decisions: when to intervene, and how far to roll back.

AutoNPO (arXiv 2604.20733) keeps a mistake pool M of prompts the policy failed, tagged with
the step of the failure. It intervenes when the training reward stagnates AND the policy
entropy declines, then rolls back to checkpoint t - Δ* and re-trains that segment with
guidance cached from the current checkpoint, choosing

    Δ* = argmax_Δ  S(Δ) = Q̂(Δ) / V̂(Δ)

- `ema`, `detect_stagnation`: the trigger (the paper's confirming rollout on a subset of M
  is left to the caller).
- `q_hat_from_pool`: Q̂(Δ), the current pass rate on the slice of M recorded at step t - Δ.
- `mean_token_kl`: V̂(Δ), the masked mean per-token k3 KL between the current policy and
  checkpoint t - Δ.
- `choose_rollback`: Δ* with a per-candidate table for the run's logs.
- `cooldown_ok`: spacing between interventions.

Where the paper leaves a detail open, this file decides it and says so at the function
(relative entropy drop, V̂ floor, tie-break towards the nearer checkpoint).
Pure functions of values and tensors, no state.
Tests: .venv/bin/python -m pytest tests/test_autonpo.py -q
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from npo.algo.losses import agg_loss, kl_penalty
from npo.config import KLEstimator


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average: e_0 = v_0, e_k = α·v_k + (1 - α)·e_{k-1}.

    alpha in (0, 1] (1 = no smoothing). Returns one value per input; [] for no input.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema alpha must be in (0, 1], got {alpha}")
    out: list[float] = []
    for v in values:
        out.append(float(v) if not out else alpha * float(v) + (1.0 - alpha) * out[-1])
    return out


@dataclass(frozen=True)
class TriggerSignals:
    """What `detect_stagnation` measured, and whether it fires."""

    triggered: bool
    """Reward stagnates AND entropy declines."""
    reward_ema_gain: float
    """EMA(reward) at the last step minus EMA(reward) `window` steps earlier (nan if too short)."""
    entropy_change: float
    """Relative change of the mean entropy, last window vs the one before (-0.1 = 10% drop;
    nan if the history is too short, 0.0 if the earlier mean is 0)."""
    window: int
    """Steps per window."""
    reason: str
    """The numbers above and the verdict, in words (for logs)."""


def detect_stagnation(
    rewards: Sequence[float],
    entropies: Sequence[float],
    window: int,
    ema_alpha: float,
    min_reward_gain: float,
    min_entropy_drop: float,
) -> TriggerSignals:
    """AutoNPO's trigger: the reward EMA stagnates and the policy entropy declines.

    rewards, entropies: one value per training step, oldest first, the same length (the
    mean training reward and mean token entropy of each step); the EMA is seeded with the
    first value passed. Needs at least 2·window points, else not triggered.
    - stagnation: EMA[-1] - EMA[-1 - window] < min_reward_gain;
    - decline: mean(entropy over the last window) is lower than the mean over the window
      before it by at least `min_entropy_drop`, relative (0.05 = 5%): change <= -min_drop.
      Relative, because entropy scales with the vocabulary and temperature while a collapse
      looks the same in proportion.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(rewards) != len(entropies):
        raise ValueError(
            f"rewards and entropies must have one value per step, got {len(rewards)} "
            f"and {len(entropies)}"
        )
    if len(rewards) < 2 * window:
        return TriggerSignals(
            triggered=False,
            reward_ema_gain=math.nan,
            entropy_change=math.nan,
            window=window,
            reason=f"not enough history: {len(rewards)} steps < 2 x window = {2 * window}",
        )
    smoothed = ema(rewards, ema_alpha)
    gain = smoothed[-1] - smoothed[-1 - window]
    last = sum(entropies[-window:]) / window
    before = sum(entropies[-2 * window : -window]) / window
    change = (last - before) / abs(before) if before != 0 else 0.0

    stagnant = gain < min_reward_gain
    declining = change <= -min_entropy_drop
    triggered = stagnant and declining
    reason = (
        f"reward EMA gain {gain:.4g} over {window} steps "
        f"{'<' if stagnant else '>='} {min_reward_gain:.4g} "
        f"({'stagnant' if stagnant else 'improving'}); "
        f"entropy {before:.4g} -> {last:.4g} ({change:+.1%}, "
        f"{'declining' if declining else 'not declining'} at a {min_entropy_drop:.1%} drop); "
        f"{'triggered' if triggered else 'not triggered'}"
    )
    return TriggerSignals(triggered, gain, change, window, reason)


@dataclass(frozen=True)
class RollbackChoice:
    """The chosen rollback distance and how every candidate scored."""

    delta: int
    """Δ*: roll back to checkpoint t - Δ*."""
    table: list[dict[str, float | str]]
    """One row per candidate, by Δ ascending: delta, q, v (as measured), s (= q / max(v,
    floor)), reason ("chosen", "ok", "floored": V̂ under the floor, or "no data" with q, v,
    s = nan)."""


def choose_rollback(
    candidates: Sequence[int],
    q_hat: Mapping[int, float],
    v_hat: Mapping[int, float],
    v_floor: float = 1e-6,
) -> RollbackChoice:
    """Δ* = argmax over candidates of S(Δ) = Q̂(Δ) / max(V̂(Δ), v_floor).

    candidates: rollback distances Δ >= 1 (duplicates count once). q_hat, v_hat: Δ -> value,
    e.g. from `q_hat_from_pool` and `mean_token_kl`. A candidate missing from either (or with
    a nan value) is skipped and listed with reason "no data". The floor only keeps S finite
    when checkpoint t - Δ is (numerically) the current policy: it is far below the V̂ of
    checkpoints that trained apart (0.1 on the toy), because a floor above them would rank
    every floored candidate by Q̂ alone; a floored row says so ("floored"), and a "chosen"
    row that was floored is listed as "chosen (floored)". Ties go to the smaller Δ: the
    nearer checkpoint is cheaper to replay and closer to the current policy.
    Raises ValueError when no candidate has data.
    """
    if v_floor <= 0:
        raise ValueError(f"v_floor must be > 0, got {v_floor}")
    deltas = sorted(set(candidates))
    if any(d < 1 for d in deltas):
        raise ValueError(f"rollback distances must be >= 1, got {deltas}")
    table: list[dict[str, float | str]] = []
    best: tuple[float, int] | None = None  # (S, index into table)
    for d in deltas:
        q, v = q_hat.get(d), v_hat.get(d)
        if q is None or v is None or math.isnan(q) or math.isnan(v):
            nan = math.nan
            table.append({"delta": d, "q": nan, "v": nan, "s": nan, "reason": "no data"})
            continue
        s = q / max(v, v_floor)
        table.append(
            {"delta": d, "q": q, "v": v, "s": s, "reason": "ok" if v >= v_floor else "floored"}
        )
        if best is None or s > best[0]:  # strict: an equal S keeps the smaller Δ
            best = (s, len(table) - 1)
    if best is None:
        raise ValueError(
            f"no rollback candidate has both Q̂ and V̂: candidates {deltas}, "
            f"Q̂ for {sorted(q_hat)}, V̂ for {sorted(v_hat)}"
        )
    chosen = table[best[1]]
    chosen["reason"] = "chosen" if chosen["reason"] == "ok" else "chosen (floored)"
    return RollbackChoice(delta=int(table[best[1]]["delta"]), table=table)


def mean_token_kl(logp_current: Tensor, logp_past: Tensor, mask: Tensor) -> float:
    """V̂: masked mean per-token KL(π_current || π_past) on tokens sampled from π_current.

    logp_current, logp_past: [B, T] log-probs of the same sampled tokens under the current
    policy and checkpoint t - Δ; mask: [B, T] -> python float >= 0 (0.0 for an empty mask).
    Uses k3 = exp(x) - x - 1 with x = logp_past - logp_current, x clamped to [-20, 20]:
    unbiased for tokens drawn from π_current and never negative per token (k1 can be), so a
    small sample cannot give a negative "variance". Same estimator as `kl_penalty(·, "k3")`.
    """
    if tuple(mask.shape) != tuple(logp_current.shape):
        raise ValueError(
            f"mask must match the log-probs [B, T] = {tuple(logp_current.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    with torch.no_grad():
        k3 = kl_penalty(logp_current.float(), logp_past.float(), KLEstimator.k3)
        return agg_loss(k3, mask).item()


def q_hat_from_pool(
    current_pass: Mapping[str, float],
    pool_by_step: Mapping[int, Sequence[str]],
    t: int,
    candidates: Sequence[int],
) -> dict[int, float]:
    """Q̂(Δ): the current policy's mean pass rate on the mistake-pool prompts of step t - Δ.

    current_pass: prompt id -> pass rate of the current policy (e.g. from the confirming
    rollout). pool_by_step: step -> ids of the prompts failed at that step. t: current step.
    -> {Δ: mean pass rate} over the prompts of step t - Δ that have a current measurement
    (each id once); Δ with no such prompt is omitted.
    Q̂(Δ) measures how much of what the policy failed Δ steps ago it solves now, i.e. what
    the current checkpoint, a guide Δ steps ahead of t - Δ, can teach on that segment.
    """
    out: dict[int, float] = {}
    for d in candidates:
        ids = dict.fromkeys(pool_by_step.get(t - d, ()))
        rates = [current_pass[i] for i in ids if i in current_pass]
        if rates:
            out[d] = sum(rates) / len(rates)
    return out


def cooldown_ok(last_intervention_step: int | None, step: int, cooldown: int) -> bool:
    """True when no intervention happened yet or at least `cooldown` steps have passed.

    With a monotonic counter (total updates) this spaces interventions in time; with the
    policy's step index, which rewinds on rollback, it also blocks a new intervention until
    the re-trained segment is `cooldown` steps past the last one (step - last < 0 there).
    """
    if cooldown < 0:
        raise ValueError(f"cooldown must be >= 0, got {cooldown}")
    return last_intervention_step is None or step - last_intervention_step >= cooldown


__all__ = [
    "RollbackChoice",
    "TriggerSignals",
    "choose_rollback",
    "cooldown_ok",
    "detect_stagnation",
    "ema",
    "mean_token_kl",
    "q_hat_from_pool",
]
