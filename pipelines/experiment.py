"""The experiment pipelines' entry point: one Kubeflow pipeline per experiment config.

    python pipelines/experiment.py configs/toy_autonpo.yaml --out /tmp/p   # one YAML
    make compile                                   # every configs/*.yaml -> compiled/

or, from Python (e.g. to run it with kfp.local, or submit it with your own client):

    from pipelines.experiment import pipeline_for
    pipeline = pipeline_for("configs/toy_grpo.yaml", "algo.lr=1e-4")

The definitions live in the npo package: each method's flow (npo.methods), executed as a
DAG by npo.pipelines.build; this file only names them. The compiled YAML of every shipped
config is in compiled/, committed and kept current by the test suite.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from npo.config import load_config


def pipeline_for(config: str | Path, *overrides: str) -> Any:
    """The `@dsl.pipeline` of the experiment config at `config` (with `key=value` overrides)."""
    from npo.pipelines.build import build_pipeline

    return build_pipeline(load_config(config, list(overrides)))


if __name__ == "__main__":
    from npo.cli import app

    app(["compile", *sys.argv[1:]])
