"""What a task shows in the Kubeflow Pipelines UI: its last metrics (a Metrics artifact),
the eval table and interventions so far (Markdown) and the curves (HTML with an SVG chart).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npo.report_html import curves_html

if TYPE_CHECKING:
    from npo.steps.context import RunContext


def events_of(ivs: list[Any]) -> list[dict[str, Any]]:
    """Intervention rows as report events ({"step": global step, "label", "kind"})."""
    return [
        {
            "step": int(iv.signals.get("global_step", iv.at_step)),
            "label": f"Δ={iv.delta}, from {iv.rollback_to}",
            "kind": iv.kind,
        }
        for iv in ivs
    ]


def latest_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last value of every metric in `rows` (the newest eval carried forward)."""
    out: dict[str, float] = {}
    for row in rows:  # later rows overwrite
        out.update({k: float(v) for k, v in row.items() if isinstance(v, int | float)})
    return out


def curves_markdown(title: str, rows: list[dict[str, Any]], ivs: list[Any]) -> str:
    """The eval table of `rows` and the interventions `ivs`, as Markdown."""
    lines = [f"### {title}", ""]
    lines += ["| global step | policy step | eval accuracy | train reward |", "|---|---|---|---|"]
    for r in rows:
        if "eval/accuracy" not in r:
            continue
        reward = r.get("reward/mean")
        lines.append(
            f"| {r['step']} | {r['policy_step']} | {r['eval/accuracy']:.3f} | "
            + (f"{reward:.3f} |" if reward is not None else "– |")
        )
    if ivs:
        lines += [
            "",
            "| intervention | at | Δ | rolled back to | guide step |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {iv.kind} | {iv.at_step} | {iv.delta} | {iv.rollback_to} | {iv.guide_step} |"
            for iv in ivs
        ]
    return "\n".join(lines) + "\n"


def train_outputs(run: RunContext, global_step: int) -> dict[str, Any]:
    """A train task's UI outputs, from one read of the history up to `global_step`."""
    rows = run.history(until_step=global_step)
    ivs = run.db.interventions(run.root_id)
    events = [e for e in events_of(ivs) if e["step"] <= global_step]
    title = f"{run.cfg.method} · {run.run_id} · global step {global_step}"
    return {
        "metrics": latest_values(rows),
        "markdown": curves_markdown(title, rows, ivs),
        "html": curves_html(title, rows, events),
    }
