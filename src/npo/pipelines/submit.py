"""Submit an experiment to a Kubeflow Pipelines API server.

    npo submit configs/toy_autonpo.yaml --host http://localhost:8080 [--experiment NAME]
                                        [--wait] [--timeout 7200]

The config is compiled afresh, uploaded as a pipeline named after the config (or as a new
version of it; a version is named by the YAML's hash, so resubmitting unchanged YAML reuses
it), and run in the named KFP experiment. Credentials never travel with it: the pods read
them from the Kubernetes Secrets named in the config's `cluster:` section.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from npo.config import ExperimentConfig
from npo.methods import METHODS
from npo.pipelines.build import pipeline_name
from npo.pipelines.compile import pipeline_yaml

HEALTHZ = "/apis/v2beta1/healthz"
# Run states after which nothing changes (KFP v2beta1 RuntimeState).
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})
POLL_S = 10.0  # seconds between run-state checks of --wait


class HostUnreachable(RuntimeError):
    """The KFP API server cannot be reached or refused the request; names the host."""


@dataclass(frozen=True)
class Submission:
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str
    url: str


def run_url(host: str, run_id: str) -> str:
    """The run's page in the KFP UI."""
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def check_reachable(host: str, timeout: float = 10.0) -> None:
    """Fail fast with HostUnreachable when nothing answers at `host` (kfp.Client itself
    would retry its health check for ~25 s before a less direct error)."""
    if not host.startswith(("http://", "https://")):
        raise HostUnreachable(f"--host {host!r}: expected http(s)://host[:port]")
    try:
        with urllib.request.urlopen(host.rstrip("/") + HEALTHZ, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # something answers (an auth proxy, perhaps): let the client talk to it
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise HostUnreachable(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def _version_filter(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )


def ensure_pipeline(
    client: Any, package: Path, name: str, version: str, about: str
) -> tuple[str, str]:
    """(pipeline_id, version_id) of `package` under pipeline `name`: upload the pipeline, or
    a new version of it unless one named `version` exists already."""
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=name, description=about)
        listed = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1)
        return pipeline.pipeline_id, listed.pipeline_versions[0].pipeline_version_id
    listed = client.list_pipeline_versions(pipeline_id, filter=_version_filter(version))
    if listed.pipeline_versions:
        return pipeline_id, listed.pipeline_versions[0].pipeline_version_id
    made = client.upload_pipeline_version(
        str(package), pipeline_version_name=version, pipeline_id=pipeline_id, description=about
    )
    return pipeline_id, made.pipeline_version_id


def connect(host: str) -> Any:
    """A kfp.Client for `host`, after checking that something answers there."""
    import kfp

    check_reachable(host)
    with refused(host):
        return kfp.Client(host=host)


@contextmanager
def refused(host: str) -> Iterator[None]:
    """Turn the API server's error answers into HostUnreachable naming the host."""
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        raise HostUnreachable(
            f"Kubeflow Pipelines at {host} refused the request: {e.status} {e.reason}"
        ) from None


def submit_experiment(client: Any, cfg: ExperimentConfig, host: str, experiment: str) -> Submission:
    """Compile `cfg`, upload it, start a run in `experiment`; return where to find it."""
    text = pipeline_yaml(cfg, f"{cfg.name} (npo submit)")
    name = pipeline_name(cfg)
    version = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    with refused(host), tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / f"{name}.yaml"
        package.write_text(text)
        pipeline_id, version_id = ensure_pipeline(
            client, package, name, version, METHODS[cfg.method].description
        )
        exp = client.create_experiment(experiment)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=f"{name}-{stamp}",
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.cluster.service_account,  # the chart's: no API rights
        )
    return Submission(
        pipeline_id, version_id, exp.experiment_id, run.run_id, run_url(host, run.run_id)
    )


def wait_for_run(client: Any, host: str, run_id: str, timeout: float) -> str:
    """Poll until the run reaches a final state (returned, e.g. 'SUCCEEDED') or `timeout`
    seconds pass (returns the last state seen). Unlike kfp's wait_for_run_completion this
    also stops on CANCELED."""
    deadline = time.monotonic() + timeout
    while True:
        with refused(host):
            state = str(client.get_run(run_id).state or "PENDING").upper()
        if state in FINAL_STATES or time.monotonic() >= deadline:
            return state
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def cluster_warnings(cfg: ExperimentConfig) -> list[str]:
    """Storage a cluster run cannot share between pods (each task is its own pod, with its
    own disk): local artifact folders and SQLite, unless the environment overrides them, and
    inputs (model, datasets) on local paths."""
    found = []
    supplies = cfg.cluster.supplies
    if not (cfg.store.artifacts_uri or "").startswith("s3://") and not supplies(
        "NPO_ARTIFACTS_URI"
    ):
        found.append(
            "store.artifacts_uri is not s3://... and no NPO_ARTIFACTS_URI reaches the pods "
            "(cluster.config_maps, cluster.secrets or cluster.env): checkpoints would stay "
            "on each pod's disk"
        )
    metadata = cfg.store.metadata_url or "sqlite"
    if not supplies("NPO_METADATA_URL") and metadata.startswith("sqlite"):
        found.append(
            "the metadata DB is SQLite and no NPO_METADATA_URL reaches the pods: each task "
            "would see its own empty database"
        )
    inputs = {"model.source": cfg.model.source} if cfg.model.source != "tiny" else {}
    if cfg.task.kind == "math":
        inputs |= {"task.train_path": cfg.task.train_path, "task.eval_path": cfg.task.eval_path}
    for field, ref in inputs.items():
        if not ref.startswith("s3://"):
            found.append(
                f"{field} {ref!r} is a local path: the pods see it only if their image has "
                f"it; put it in the object store with `npo stage {ref} s3://BUCKET/...` and "
                "name that URI"
            )
    return found
