"""Where step metrics go: the run's metrics.jsonl (for the report) and the tracker (MLflow)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from npo.report import append_history, load_history
from npo.store.checkpoint import checkpoint_uri, manifest_digest

if TYPE_CHECKING:
    from npo.steps.context import RunContext


def record_metrics(
    ctx: RunContext, metrics: dict[str, float], global_step: int, policy_step: int
) -> None:
    """Append one row to metrics.jsonl and log it to the tracker at `global_step`."""
    row = {"step": global_step, "policy_step": policy_step, **metrics}
    append_history(ctx.history_path, row)
    ctx.tracker.log_metrics({**metrics, "policy_step": float(policy_step)}, step=global_step)


def truncate_history(ctx: RunContext, global_step: int) -> list[dict[str, Any]]:
    """Drop rows after `global_step` (work lost with a crash) and return what is kept."""
    path = ctx.history_path
    if not path.exists():
        return []
    rows = [r for r in load_history(path) if r["step"] <= global_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


def record_checkpoint(
    ctx: RunContext, step: int, manifest: dict[str, Any], metrics: dict[str, float] | None
) -> None:
    """Index a committed checkpoint in the metadata DB (idempotent)."""
    uri = checkpoint_uri(ctx.store, ctx.run_id, step)
    ctx.db.record_checkpoint(ctx.run_id, step, uri, manifest_digest(manifest), metrics)
