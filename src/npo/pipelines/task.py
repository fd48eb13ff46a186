"""What a generated component's body calls in the pod: run the stage, fill the outputs.

Light at import (the step-server client only): a task must not pay for torch or even the
config models before its stage runs. `run_task` takes the component's arguments, writes the
UI artifacts the stage returned (a Metrics artifact's values, Markdown or HTML text) and
returns the stage's outputs in their declared order and types, all of which the generated
component passes in (npo.pipelines.components).
"""

from __future__ import annotations

from typing import Any


def run_task(
    name: str,
    arguments: dict[str, Any],
    ui: tuple[str, ...],
    outputs: dict[str, type],
    opens_run: bool,
) -> tuple[Any, ...]:
    params = dict(arguments)
    artifacts = {key: params.pop(key) for key in ui}
    if opens_run:
        from npo.stepserver import call_stage

        out = call_stage(name, **params)
    else:  # a pass-through (keep): no run to open, nothing heavy to import
        from npo.stages import STAGES

        out = STAGES[name].fn(**params)
    for key, artifact in artifacts.items():
        if key == "metrics":
            for metric, value in out[key].items():
                artifact.log_metric(metric, float(value))
        else:
            with open(artifact.path, "w", encoding="utf-8") as f:
                f.write(out[key])
    return tuple(kind(out[field]) for field, kind in outputs.items())
