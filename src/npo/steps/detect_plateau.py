"""AutoNPO's trigger: should it intervene at policy step t? The train stage asks online,
every `autonpo.check_every` steps, of the policy it trains (the detect stage asks of a
checkpoint).

Trigger = the EMA of the training reward stagnates over a window AND the policy entropy
declines (exploration collapse), outside the cooldown and within the intervention budget;
`autonpo.force_at` triggers regardless (demos, tests). A trigger is confirmed by rolling
out the current checkpoint on recent mistake-pool prompts: the policy must still fail them
(pass rate below `autonpo.confirm_below`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from npo.algo.autonpo import cooldown_ok, detect_stagnation
from npo.steps.context import RunContext
from npo.steps.pool_rollout import Policy, pool_pass_rates


@dataclass
class PlateauDecision:
    triggered: bool
    confirmed: bool
    forced: bool
    signals: dict[str, Any] = field(default_factory=dict)

    @property
    def intervene(self) -> bool:
        return self.triggered and self.confirmed


def detect_plateau(
    ctx: RunContext,
    policy: Policy,
    t: int,
    global_step: int,
    last_intervention: int | None,
    interventions: int,
) -> PlateauDecision:
    """Decide at policy step t, where `policy` (model, tokenizer) is, from the history up to
    global_step; a trigger is confirmed by rolling `policy` out on the mistake pool."""
    acfg = ctx.cfg.autonpo
    rows = [r for r in ctx.history(until_step=global_step) if r["step"] > 0]
    rows = [r for r in rows if "reward/mean" in r and "actor/entropy" in r]
    stag = detect_stagnation(
        [r["reward/mean"] for r in rows],
        [r["actor/entropy"] for r in rows],
        window=acfg.window,
        ema_alpha=acfg.ema_alpha,
        min_reward_gain=acfg.min_reward_gain,
        min_entropy_drop=acfg.min_entropy_drop,
    )
    forced = t in acfg.force_at
    signals: dict[str, Any] = {**asdict(stag), "policy_step": t, "global_step": global_step}
    allowed = cooldown_ok(last_intervention, global_step, acfg.cooldown) and (
        interventions < acfg.max_interventions
    )
    signals["allowed"] = allowed
    signals["forced"] = forced
    triggered = allowed and (stag.triggered or forced)
    if not triggered:
        return PlateauDecision(False, False, forced, signals)
    pool = ctx.db.mistakes_by_step(ctx.root_id, until_step=t)
    recent = list(dict.fromkeys(pid for s in sorted(pool, reverse=True) for pid in pool[s]))
    recent = recent[: acfg.confirm_prompts]
    rates = pool_pass_rates(ctx, policy, t, recent, stream=5) if recent else {}
    pool_pass = sum(rates.values()) / len(rates) if rates else None
    signals["pool_prompts"] = len(recent)
    signals["pool_pass_rate"] = pool_pass
    confirmed = forced or (pool_pass is not None and pool_pass < acfg.confirm_below)
    return PlateauDecision(True, confirmed, forced, signals)
