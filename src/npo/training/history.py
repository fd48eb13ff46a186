"""Where step metrics go: the run's history in the metadata DB (for triggers, the KFP UI
outputs and the report) and the tracker (MLflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npo.store.checkpoint import checkpoint_uri, manifest_digest

if TYPE_CHECKING:
    from npo.steps.context import RunContext


def record_metrics(
    ctx: RunContext, metrics: dict[str, float], global_step: int, policy_step: int
) -> None:
    """Store one history row and log it to the tracker at `global_step`."""
    values = {k: float(v) for k, v in metrics.items()}
    ctx.db.record_metrics(ctx.history_id, global_step, policy_step, values)
    ctx.tracker.log_metrics({**values, "policy_step": float(policy_step)}, step=global_step)


def truncate_history(ctx: RunContext, global_step: int) -> None:
    """Drop history rows after `global_step` (work lost with a crash)."""
    ctx.db.truncate_history(ctx.history_id, global_step)


def record_checkpoint(
    ctx: RunContext, step: int, manifest: dict[str, Any], metrics: dict[str, float] | None
) -> None:
    """Index a committed checkpoint in the metadata DB (idempotent)."""
    uri = checkpoint_uri(ctx.store, ctx.run_id, step)
    ctx.db.record_checkpoint(ctx.run_id, step, uri, manifest_digest(manifest), metrics)
