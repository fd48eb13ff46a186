"""A self-contained HTML page of a run's curves so far, for the KFP UI (an HTML artifact of
every train task): eval accuracy and train reward by global step as inline SVG, the
interventions as dashed lines, and the eval table. No JavaScript, no external files, no
plotting library: a task writes it in microseconds.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

WIDTH, HEIGHT, PAD = 640, 260, 40
SERIES = (("eval/accuracy", "eval accuracy", "#1f77b4"), ("reward/mean", "train reward", "#ff7f0e"))


def _polyline(points: list[tuple[float, float]], x_max: float, color: str) -> str:
    def xy(step: float, value: float) -> str:
        x = PAD + (WIDTH - 2 * PAD) * (step / x_max if x_max else 0.0)
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * min(max(value, 0.0), 1.0)
        return f"{x:.1f},{y:.1f}"

    coords = " ".join(xy(s, v) for s, v in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'


def curves_svg(rows: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]] = ()) -> str:
    """SVG of eval accuracy and train reward (0..1) against global step; `events`
    ({"step", "label"}) as dashed vertical lines."""
    x_max = float(max((r["step"] for r in rows), default=0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" '
        'fill="none" stroke="#ccc"/>',
    ]
    for tick in (0.0, 0.5, 1.0):
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * tick
        parts.append(f'<text x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    parts.append(f'<text x="{PAD}" y="{HEIGHT - PAD + 16}">0</text>')
    parts.append(
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 16}" text-anchor="end">'
        f"global step {int(x_max)}</text>"
    )
    for event in events:
        x = PAD + (WIDTH - 2 * PAD) * (event["step"] / x_max if x_max else 0.0)
        label = html.escape(str(event.get("label", "")))
        parts.append(
            f'<line x1="{x:.1f}" y1="{PAD}" x2="{x:.1f}" y2="{HEIGHT - PAD}" '
            f'stroke="#2ca02c" stroke-dasharray="4 3"><title>{label}</title></line>'
        )
    for i, (key, name, color) in enumerate(SERIES):
        points = [(float(r["step"]), float(r[key])) for r in rows if key in r]
        if points:
            parts.append(_polyline(points, x_max, color))
        parts.append(f'<text x="{PAD + 10 + 130 * i}" y="{PAD - 10}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def curves_html(
    title: str, rows: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]] = ()
) -> str:
    """The whole page: title, the SVG chart, the eval table and the interventions."""
    evals = [r for r in rows if "eval/accuracy" in r]
    table = "".join(
        f"<tr><td>{r['step']}</td><td>{r['policy_step']}</td><td>{r['eval/accuracy']:.3f}</td></tr>"
        for r in evals
    )
    marks = "".join(
        f"<li>{html.escape(str(e.get('label', '')))} at {e['step']}</li>" for e in events
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h3>{html.escape(title)}</h3>{curves_svg(rows, events)}"
        + (f"<p>interventions:</p><ul>{marks}</ul>" if marks else "")
        + "<table border='1' cellpadding='3'><tr><th>global step</th><th>policy step</th>"
        f"<th>eval accuracy</th></tr>{table}</table></body></html>"
    )
