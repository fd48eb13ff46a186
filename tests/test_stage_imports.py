"""What a pipeline task imports before its stage's first line (a pod's start-up time).

Each stage runs in a fresh interpreter, as in a pod: a light stage (verify, report) must
finish without torch or transformers ever imported; a model stage has torch set up
(`use_compute`) when its body starts, but not transformers' model classes, which are the
stage's own work (building or loading the policy) and take seconds to import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_config

from npo import stages
from npo.config import load_config, public_dump

pytestmark = pytest.mark.slow

HEAVY = ("torch", "transformers", "transformers.modeling_utils")

# Runs stage sys.argv[1] with JSON params sys.argv[3] on config sys.argv[2]; prints which of
# HEAVY were imported when the stage body started and when it returned.
PROBE = """
import dataclasses, json, sys
from npo import stages
heavy = {heavy!r}
name, config, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
seen = {{}}
body = stages.STAGES[name].fn
def watched(ctx, **kw):
    seen["start"] = [m for m in heavy if m in sys.modules]
    return body(ctx, **kw)
stages.STAGES[name] = dataclasses.replace(stages.STAGES[name], fn=watched)
stages.run_stage(name, config, **params)
seen["end"] = [m for m in heavy if m in sys.modules]
if "transformers" in sys.modules:  # quiet in task logs, however it was set
    from transformers.utils import logging
    seen["verbosity"] = logging.get_verbosity()
    seen["bars"] = logging.is_progress_bar_enabled()
print(json.dumps(seen))
"""


def _imported(name: str, config: str, **params: object) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), name, config, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_light_stages_never_import_torch_and_a_model_stage_starts_before_model_classes(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        write_tiny_config(
            tmp_path / "c.yaml", tmp_path / "runs", "imp", 3, tracking={"enabled": False}
        )
    )
    config = json.dumps(public_dump(cfg))
    stages.run_stage("prepare", config)

    train = _imported("train", config, run_id="imp", start=0, end=3)
    assert train["start"] == ["torch"]  # use_compute set torch up; no model classes yet
    assert "transformers.modeling_utils" in train["end"]  # ...which the stage then built
    assert (train["verbosity"], train["bars"]) == (40, False)  # logging.ERROR, no tqdm bars

    assert _imported("verify", config, cache_id="") == {"start": [], "end": []}
    assert _imported("report", config) == {"start": [], "end": []}
    assert (tmp_path / "runs" / "imp" / "summary.json").is_file()  # the report really ran
