"""What a generated component's body calls in the pod: run the stage, fill the outputs.

Stdlib only at import (plus npo.stepserver's client): a task must not pay for torch before
its stage runs. `run_task(name, locals())` takes the component's arguments, writes the UI
artifacts the stage returned (a Metrics artifact's values, Markdown or HTML text) and
returns the stage's outputs in the order of its declared NamedTuple.
"""

from __future__ import annotations

from typing import Any


def run_task(name: str, arguments: dict[str, Any]) -> tuple[Any, ...]:
    from npo.stages import STAGES
    from npo.stepserver import call_stage

    stage = STAGES[name]
    params = dict(arguments)
    artifacts = {key: params.pop(key) for key in stage.ui}
    out = call_stage(name, **params) if stage.opens_run else stage.fn(**params)
    for key, artifact in artifacts.items():
        if key == "metrics":
            for metric, value in out[key].items():
                artifact.log_metric(metric, float(value))
        else:
            with open(artifact.path, "w", encoding="utf-8") as f:
                f.write(out[key])
    types = stage.output_types()
    return tuple(types[field](out[field]) for field in types)
