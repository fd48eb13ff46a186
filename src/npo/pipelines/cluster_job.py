"""Run a multi-node stage as a cluster job from its KFP task: create the TrainJob (or
PyTorchJob) npo.pipelines.trainjob renders, poll it, print each change of its status to the
task log, and fail with the job's reason.

The job's name is fixed by the run and the stage's parameters: a retried task finds its job
and waits on it, and a job that failed before is deleted and created again (the stage
resumes from its last checkpoint). The pipeline's ServiceAccount needs create, get and
delete on the job kind (the chart's `pipeline.serviceAccount.trainJobs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npo.pipelines.trainjob import (
    PYTORCHJOB,
    TRAINJOB,
    job_state,
    pytorchjob_manifest,
    trainjob_manifest,
)

if TYPE_CHECKING:
    from npo.config import ExperimentConfig

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterJobFailed(RuntimeError):
    """The stage's cluster job failed (the message carries the job's reason)."""


def render(cfg: ExperimentConfig, stage: str, params: dict[str, Any], namespace: str) -> dict:
    """The manifest of the job kind distributed.launcher names."""
    make = trainjob_manifest if cfg.distributed.launcher == "trainjob" else pytorchjob_manifest
    return make(cfg, stage, params, namespace)


def wait_for_job(
    api: Any,
    manifest: dict[str, Any],
    poll_seconds: float,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Create `manifest`'s job through `api` (a kubernetes CustomObjectsApi), or find the
    one a previous try created (deleting it first when it had failed), and poll it until it
    finishes; ClusterJobFailed when it failed."""
    group, version, plural, _ = TRAINJOB if manifest["kind"] == "TrainJob" else PYTORCHJOB
    meta = manifest["metadata"]
    where = {"group": group, "version": version, "namespace": meta["namespace"], "plural": plural}
    what = f"{manifest['kind']} {meta['namespace']}/{meta['name']}"
    existing = _get(api, where, meta["name"])
    if existing is not None and job_state(existing).failed:
        log(f"{what}: failed before ({job_state(existing).summary}); deleting it to retry")
        api.delete_namespaced_custom_object(**where, name=meta["name"])
        while _get(api, where, meta["name"]) is not None:
            sleep(poll_seconds)
        existing = None
    if existing is None:
        api.create_namespaced_custom_object(**where, body=manifest)
        log(f"{what}: created")
    last = None
    while True:
        job = _get(api, where, meta["name"])
        if job is None:
            raise ClusterJobFailed(f"{what} was deleted while the stage waited on it")
        state = job_state(job)
        if state.summary != last:
            log(f"{what}: {state.summary}")
            last = state.summary
        if state.finished:
            if state.failed:
                raise ClusterJobFailed(f"{what} {state.summary}")
            return
        sleep(poll_seconds)


def _get(api: Any, where: dict[str, str], name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(**where, name=name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def run_train_job(cfg: ExperimentConfig, stage: str, params: dict[str, Any]) -> None:
    """From inside the KFP task's pod: run `stage` as the configured job in the pod's own
    namespace and wait for it."""
    from kubernetes import client, config

    config.load_incluster_config()
    namespace = NAMESPACE_FILE.read_text().strip()
    manifest = render(cfg, stage, params, namespace)
    wait_for_job(client.CustomObjectsApi(), manifest, cfg.distributed.poll_seconds)
