"""Pipeline step: choose AutoNPO's rollback distance Δ* = argmax_Δ Q̂(Δ) / V̂(Δ).

For each candidate Δ with a checkpoint at t − Δ:
- Q̂(Δ): the current policy's pass rate on the mistake-pool prompts recorded in the window
  right after t − Δ, i.e. at the start of the segment a rollback to t − Δ replays (what it
  now solves of what it failed there: what it can teach as a guide);
- V̂(Δ): the mean per-token KL (k3) between the current policy and checkpoint t − Δ on the
  current policy's own samples of those prompts (the off-policy variance cost of a guide
  that far ahead), floored at `autonpo.v_floor`.
"""

from __future__ import annotations

from typing import Any

from npo.algo.autonpo import choose_rollback, mean_token_kl, q_hat_from_pool
from npo.steps.context import RunContext
from npo.steps.pool_rollout import rollout_prompts
from npo.store.checkpoint import list_checkpoints
from npo.training.rl_step import sequence_logprobs
from npo.training.state import load_train_state


class NoRollbackCandidate(ValueError):
    """No Δ can be scored (no checkpoint or no mistake-pool data): skip the intervention."""


Lineage = list[tuple[str, int]]  # (run_id, first policy step) of each checkpoint lineage


def checkpoint_at(ctx: RunContext, chain: Lineage, step: int) -> tuple[str, int] | None:
    """(run_id, step) of the newest lineage holding a checkpoint at `step`."""
    for run_id, first in reversed(chain):
        if first <= step and step in list_checkpoints(ctx.store, run_id):
            return run_id, step
    return None


def choose_rollback_distance(ctx: RunContext, chain: Lineage, t: int) -> dict[str, Any]:
    """{"delta", "rollback_to": (run_id, step), "table": S(Δ) rows}.

    Raises NoRollbackCandidate when no candidate can be scored."""
    acfg, temperature = ctx.cfg.autonpo, ctx.cfg.rollout.temperature
    current = checkpoint_at(ctx, chain, t)
    if current is None:
        raise ValueError(f"no checkpoint at the current step {t}")
    past = {d: checkpoint_at(ctx, chain, t - d) for d in acfg.candidates if t - d >= 0}
    past = {d: ref for d, ref in past.items() if ref is not None}
    pool = ctx.db.mistakes_by_step(ctx.root_id, until_step=t)
    slices: dict[int, list[str]] = {}
    for d in past:
        lo, hi = t - d, min(t - d + acfg.check_every, t)
        ids = dict.fromkeys(pid for s, pids in pool.items() if lo < s <= hi for pid in pids)
        slices[t - d] = list(ids)[: acfg.confirm_prompts]
    union = list(dict.fromkeys(pid for ids in slices.values() for pid in ids))
    if not union:
        raise NoRollbackCandidate(f"step {t}: no mistake-pool prompts after any candidate")
    rollout, rates = rollout_prompts(ctx, current, union, stream=6)
    batch = rollout.batch
    chunk = ctx.cfg.algo.micro_batch_size
    current_lp = sequence_logprobs(rollout.model, batch, temperature, chunk)
    v_hat = {}
    for d, ref in past.items():
        loaded = load_train_state(ctx.store, ref[0], ref[1], ctx.cfg.model.dtype, db=ctx.db)
        past_model = loaded.model
        past_lp = sequence_logprobs(past_model, batch, temperature, chunk)
        v_hat[d] = mean_token_kl(current_lp, past_lp, batch.response_mask)
    q_hat = q_hat_from_pool(rates, slices, t, list(past))
    if not q_hat:
        raise NoRollbackCandidate(f"step {t}: no candidate Δ has a measured Q̂")
    choice = choose_rollback(list(past), q_hat, v_hat, acfg.v_floor)
    return {"delta": choice.delta, "rollback_to": past[choice.delta], "table": choice.table}
