"""AutoNPO: train until the online trigger fires, roll back Δ*, replay with guidance.

The DAG unrolls over decisions, not steps: `autonpo.max_interventions` rounds of
train (watching the trigger; it stops where it fires) -> when(triggered): rollback (Δ*)
-> guidance from the current checkpoint on the mistake-pool prompts -> verify -> replay
(t − Δ*, t] on a new lineage; otherwise keep. The round's outcome (lineage, policy step)
is where the next round continues; a last round trains to the end without watching. A run
whose trigger never fires trains to the end in round 1; later rounds then have nothing
left to train and return at once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from npo import stages
from npo.flow import Flow, Outputs
from npo.methods.common import guide_and_verify


def autonpo_flow(f: Flow, run_id: Any) -> Any:
    """The RL phase (module docstring); returns the run id (lineage) to evaluate."""
    rounds = f.cfg.autonpo.max_interventions
    at: Outputs = {"run_id": run_id, "policy_step": 0}
    for k in range(1, rounds + 1):
        label = f"round {k}"
        trained = _train_on(f, f"{label} · train", at, watch=True)
        at = f.when(
            trained["triggered"],
            partial(_intervene, f, label, trained),
            partial(_carry_on, f, label, trained),
            name=f"{label} · intervene",
        )
    return _train_on(f, f"round {rounds + 1} · train", at)["run_id"]


def _train_on(f: Flow, label: str, at: Outputs, **extra: Any) -> Outputs:
    """Train from where the run is (`at`: run id, policy step) to the end of the budget."""
    return f.call(
        stages.train,
        label,
        run_id=at["run_id"],
        start=at["policy_step"],
        end=f.cfg.train.steps,
        phase="autonpo",
        **extra,
    )


def _intervene(f: Flow, label: str, trained: Outputs) -> Outputs:
    """Roll back Δ* from where the trigger fired and replay that segment with guidance."""
    t = trained["policy_step"]
    back = f.call(
        stages.rollback,
        f"{label} · rollback",
        run_id=trained["run_id"],
        t=t,
        global_step=trained["global_step"],
        signals=trained["signals"],
    )
    checked = guide_and_verify(
        f,
        label,
        cache_id=back["cache_id"],
        guide_run=back["guide_run"],
        guide_step=t,
        current_run=back["back_run"],
        current_step=back["rollback_to"],
        start=back["rollback_to"],
        end=t,
        pool_only=True,
        log_step=trained["global_step"],
    )
    replay = f.call(
        stages.train,
        f"{label} · replay",
        run_id=back["lineage_run_id"],
        start=back["rollback_to"],
        end=t,
        guidance=checked["cache_id"],
        phase="autonpo·replay",
    )
    return {"run_id": replay["run_id"], "policy_step": replay["policy_step"]}


def _carry_on(f: Flow, label: str, trained: Outputs) -> Outputs:
    kept = f.call(
        stages.keep,
        f"{label} · keep",
        run_id=trained["run_id"],
        policy_step=trained["policy_step"],
    )
    return {"run_id": kept["run_id"], "policy_step": kept["policy_step"]}
