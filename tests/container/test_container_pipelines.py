"""Every pipeline task in the project's image: kfp.local's DockerRunner (`npo run --runner
docker`) against the dev services (SeaweedFS S3, PostgreSQL, MLflow: `make services`), on
the tiny toy, compared metric for metric with the SubprocessRunner run of the same config.

Runs only with NPO_CONTAINER_E2E=1 (what `make container-test`, and so .ci/run, sets; it
skips otherwise, so `make test` does not pay for it); then it needs a Docker engine and the
CPU image (`make images IMAGE_FLAVORS=cpu`) and fails without them.
Also measures a task container's start-up: from `docker run` to the moment a stage could
start its work (everything a task imports before the stage's first line, imported).

Run: make container-test    (builds or reuses the image, then this folder)
     NPO_CONTAINER_E2E=1 .venv/bin/python -m pytest -q -s tests/container
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import FORCED_AUTONPO, write_tiny_config

from npo.config import ClusterConfig, load_config
from npo.report import load_history

pytestmark = pytest.mark.slow

IMAGE = os.environ.get("NPO_CONTAINER_IMAGE") or ClusterConfig().image
REQUIRED = os.environ.get("NPO_CONTAINER_E2E") == "1"
# What `make container-test` leaves for the closing figures (wall times, start-up).
REPORT = Path(__file__).resolve().parents[2] / "build" / "container-test" / "figures.json"

AUTO = FORCED_AUTONPO


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (NPO_CONTAINER_E2E=1: the container tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    """The Docker engine, with the image the tasks run in."""
    if not REQUIRED:  # minutes of image runs: not part of `make test`
        pytest.skip("container tests run under `make container-test` (NPO_CONTAINER_E2E=1)")
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as e:
        _unavailable(f"no Docker engine: {type(e).__name__}: {e}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"image {IMAGE} is not built: make images IMAGE_FLAVORS=cpu")
    yield client
    client.close()


@pytest.fixture(scope="module")
def services(engine, tmp_path_factory):
    """`make services`' stack (S3, PostgreSQL, MLflow on 127.0.0.1), its env in os.environ."""
    from npo.devservices import DevStack

    stack = DevStack(tmp_path_factory.mktemp("services"))
    try:
        stack.start()
    except Exception as e:
        stack.stop()
        _unavailable(f"the dev services did not start: {type(e).__name__}: {e}")
    saved = dict(os.environ)
    os.environ.update(stack.env())
    try:
        yield stack.env()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.stop()


@pytest.fixture(scope="module")
def figures():
    found: dict[str, object] = {}
    yield found
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    REPORT.write_text(json.dumps(old | found, indent=2) + "\n")
    print(f"\ncontainer-test figures ({REPORT}):\n{json.dumps(found, indent=2)}")


# --------------------------------------------------------------------------- helpers
def _config(tmp_path: Path, name: str, steps: int, prefix: str, **extra: object) -> Path:
    store = {"artifacts_uri": f"s3://npo/{prefix}"}  # the metadata URL: NPO_METADATA_URL
    return write_tiny_config(tmp_path / f"{name}.yaml", tmp_path / "runs", name, steps,
                             store=store, **extra)  # fmt: skip


def _run(path: Path, runner: str) -> tuple[dict, float]:
    from npo.experiment import run_experiment

    start = time.monotonic()
    summary = run_experiment(load_config(path), engine="pipeline", runner=runner)
    return summary, time.monotonic() - start


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _mlflow_metrics(run_name: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history (step, value) of the MLflow run named `run_name`."""
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("npo")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if not key.startswith("perf/")
    }


def _check_backends(name: str, prefix: str, steps: list[int]) -> None:
    """The run's checkpoints committed in S3 (manifests) and indexed in PostgreSQL."""
    from npo.store.artifacts import open_store
    from npo.store.checkpoint import list_checkpoints
    from npo.store.metadata import MetadataDB

    store = open_store(f"s3://npo/{prefix}")
    assert list_checkpoints(store, name) == steps
    for step in steps:
        assert store.exists(f"runs/{name}/ckpt/{step:06d}/manifest.json")
    with MetadataDB(os.environ["NPO_METADATA_URL"]) as db:
        assert [r.step for r in db.checkpoints(name) if r.step in steps] == steps
        assert db.get_run(name).status == "completed"


def _containers_ran(run_dir: Path) -> int:
    """How many tasks kfp.local started in a container (it logs the image before each)."""
    return (run_dir / "pipeline.log").read_text().count(f"Found image '{IMAGE}'")


def _compare(tmp_path: Path, name: str, steps: int, figures: dict, **extra: object) -> tuple:
    prefix = uuid.uuid4().hex[:8]
    sub, ctr = f"{name}-subprocess", f"{name}-docker"
    sub_summary, sub_s = _run(_config(tmp_path, sub, steps, prefix, **extra), "subprocess")
    ctr_summary, ctr_s = _run(_config(tmp_path, ctr, steps, prefix, **extra), "docker")
    figures[f"{name}: wall s, subprocess runner"] = round(sub_s, 1)
    figures[f"{name}: wall s, docker runner"] = round(ctr_s, 1)

    root = tmp_path / "runs"
    assert _containers_ran(root / ctr) >= 5
    assert _containers_ran(root / sub) == 0
    rows = load_history(root / ctr / "metrics.jsonl")
    assert rows and _comparable(rows) == _comparable(load_history(root / sub / "metrics.jsonl"))
    assert _mlflow_metrics(ctr) == _mlflow_metrics(sub)
    assert ctr_summary["final accuracy"] == sub_summary["final accuracy"]
    # Run as this process's uid: what the tasks wrote belongs to the user who ran them.
    assert {p.stat().st_uid for p in (root / ctr).rglob("*")} == {os.getuid()}
    return prefix, ctr, rows


# --------------------------------------------------------------------------- tests
def test_grpo_pipeline_in_containers_matches_the_subprocess_runner(tmp_path, services, figures):
    prefix, name, rows = _compare(tmp_path, "grpo", 6, figures)
    assert [r["step"] for r in rows] == list(range(7))
    _check_backends(name, prefix, [0, 3, 6])


def test_autonpo_intervention_in_containers_matches_the_subprocess_runner(
    tmp_path, services, figures
):
    from npo.store.metadata import MetadataDB

    prefix, name, rows = _compare(tmp_path, "autonpo", 9, figures, **AUTO)
    with MetadataDB(os.environ["NPO_METADATA_URL"]) as db:
        (intervention,) = db.interventions(name)
    assert intervention.at_step == 6
    assert max(r["step"] for r in rows) > 9  # the replayed segment counts on (global step)
    _check_backends(name, prefix, [0, 3, 6])


def test_a_task_container_imports_what_a_stage_starts_with(engine, figures):
    """A container of the image, without network, imports what a KFP task has before
    `STAGES[name].fn` runs: the executor, the task body and the stage runner (the stage's
    own libraries are the stage's work and come after). Also records the time from
    `docker run` to that point (best of 3, after one run that warms the page cache) in
    figures.json: a figure for the record, not asserted (the 5 s target is a speed target,
    not a behaviour)."""
    probe = (
        "import kfp.dsl.executor_main, npo.pipelines.task, npo.stepserver.client as c; "
        "c.resolve_runner(c.DEFAULT_RUNNER); import npo.steps.context"
    )
    # _KFP_RUNTIME=true: what a component's command sets (kfp.dsl.component_factory), so
    # that `import kfp` skips the client side (kfp.client, the Kubernetes client: ~1 s).
    command = ["docker", "run", "--rm", "--network", "none", "-e", "_KFP_RUNTIME=true", IMAGE,
               "python3", "-c"]  # fmt: skip
    times = _timed([*command, probe], 4)
    figures["task start-up s (docker run to stage start, best of 3 warm)"] = round(
        min(times[1:]), 2
    )
    figures["task start-up s (first, page cache as found)"] = round(times[0], 2)
    # A model stage also runs what run_stage does for it before its first line:
    # quiet_transformers and use_compute (torch; transformers' model classes come later, with
    # the policy the stage builds or loads). The narrower figure (torch only) and the time
    # until the model classes are imported too are kept beside it.
    narrow = f"{probe}; import torch"
    figures["model-stage start-up s (with torch, best of 3)"] = round(
        min(_timed([*command, narrow], 3)), 2
    )
    model = (
        f"{probe}; from npo.config import ExperimentConfig; "
        "from npo.stages import quiet_transformers, use_compute; "
        "quiet_transformers(); use_compute(ExperimentConfig())"
    )
    figures["model-stage start-up s (run_stage's set-up: torch, best of 3)"] = round(
        min(_timed([*command, model], 3)), 2
    )
    classes = f"{model}; import npo.policy.model"
    figures["model-stage start-up + transformers' model classes s (best of 3)"] = round(
        min(_timed([*command, classes], 3)), 2
    )


def _timed(command: list[str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.monotonic()
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        times.append(time.monotonic() - start)
    return times
