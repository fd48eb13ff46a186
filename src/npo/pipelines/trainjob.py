"""The multi-node train stage as a cluster job: pure renderers of its manifest, and of what
its status says.

`trainjob_manifest` renders a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1,
Trainer >= 2.0; the ClusterTrainingRuntime `distributed.trainer_runtime`, torch-distributed
by default, sets torchrun's PET_* rendezvous variables on every node); `pytorchjob_manifest`
a Training Operator v1 PyTorchJob (kubeflow.org/v1), for clusters that only have v1. Both run
`torchrun -m npo.steps.ranks` on `distributed.nodes` nodes with the pipeline steps' image,
resources, Secrets and ConfigMaps (by name: no credential enters a manifest), security
context and placement; the config and the stage's parameters travel as plain environment
variables. `job_state` reads a job's status conditions. npo.pipelines.cluster_job creates the
job and waits on it. docs/distributed.md says what to install.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npo.config import public_dump
from npo.steps.ranks import CONFIG_ENV, PARAMS_ENV, rank_command

if TYPE_CHECKING:
    from npo.config import ClusterConfig, ExperimentConfig

TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")


def job_name(cfg: ExperimentConfig, stage: str, params: dict[str, Any]) -> str:
    """A DNS-1123 name fixed by (run, stage, parameters): a retried task finds its job.

    >>> from npo.config import ExperimentConfig
    >>> job_name(ExperimentConfig(name="My_Run"), "train", {"start": 0, "end": 50})
    'npo-my-run-train-f45c3051'
    """
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]+", "-", f"npo-{cfg.name}-{stage}".lower()).strip("-")
    return f"{base[: 63 - 9].rstrip('-')}-{digest}"


def _env(cfg: ExperimentConfig, stage: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The step's variables: config and parameters, cluster.env, then Secret and ConfigMap
    keys by reference."""
    cluster = cfg.cluster
    env = [
        # redacted as in the compiled pipeline: credentials come from the Secrets below
        {"name": CONFIG_ENV, "value": json.dumps(public_dump(cfg), sort_keys=True)},
        {"name": PARAMS_ENV, "value": json.dumps(params, sort_keys=True)},
        {"name": "OMP_NUM_THREADS", "value": str(cfg.train.threads)},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(cluster.env.items())]
    for secret in cluster.secrets:
        for key, variable in sorted(secret.env.items()):
            ref = {"name": secret.secret_name, "key": key, "optional": secret.optional}
            env.append({"name": variable, "valueFrom": {"secretKeyRef": ref}})
    for config_map in cluster.config_maps:
        for key, variable in sorted(config_map.env.items()):
            ref = {"name": config_map.config_map_name, "key": key, "optional": config_map.optional}
            env.append({"name": variable, "valueFrom": {"configMapKeyRef": ref}})
    return env


def _resources(cluster: ClusterConfig) -> dict[str, dict[str, Any]]:
    """Per node: the model steps' requests and memory limit, and the accelerators."""
    requests: dict[str, Any] = {"cpu": cluster.cpu_request, "memory": cluster.memory_request}
    limits: dict[str, Any] = {}
    if cluster.memory_limit:
        limits["memory"] = cluster.memory_limit
    if cluster.accelerator_type and "train" in cluster.gpu_steps:
        requests[cluster.accelerator_type] = cluster.accelerator_count
        limits[cluster.accelerator_type] = cluster.accelerator_count
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _metadata(cfg: ExperimentConfig, name: str, namespace: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "npo", "npo/run": cfg.name}
    return {"name": name, "namespace": namespace, "labels": labels}


def trainjob_manifest(
    cfg: ExperimentConfig, stage: str, params: dict[str, Any], namespace: str
) -> dict[str, Any]:
    """A TrainJob running `stage` with `params` on distributed.nodes nodes of
    distributed.nproc_per_node ranks each."""
    group, version, _, kind = TRAINJOB
    d, cluster = cfg.distributed, cfg.cluster
    trainer: dict[str, Any] = {
        "image": cluster.image,
        "command": rank_command(stage, d.nproc_per_node),
        "numNodes": d.nodes,
        "resourcesPerNode": _resources(cluster),
        "env": _env(cfg, stage, params),
    }
    return {
        "apiVersion": f"{group}/{version}",
        "kind": kind,
        "metadata": _metadata(cfg, job_name(cfg, stage, params), namespace),
        "spec": {
            "runtimeRef": {
                "name": d.trainer_runtime,
                "apiGroup": group,
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": trainer,
        },
    }


def _pod_template(cfg: ExperimentConfig, stage: str, params: dict[str, Any]) -> dict[str, Any]:
    cluster = cfg.cluster
    container = {
        "name": "pytorch",  # the name the Training Operator looks for
        "image": cluster.image,
        "command": rank_command(stage, cfg.distributed.nproc_per_node),
        "env": _env(cfg, stage, params),
        "resources": _resources(cluster),
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "serviceAccountName": cluster.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsUser": cluster.run_as_user, "runAsGroup": cluster.run_as_group},
    }
    if cluster.node_selector:
        spec["nodeSelector"] = dict(sorted(cluster.node_selector.items()))
    if cluster.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in cluster.tolerations]
    return {"metadata": {"labels": {"app.kubernetes.io/part-of": "npo"}}, "spec": spec}


def pytorchjob_manifest(
    cfg: ExperimentConfig, stage: str, params: dict[str, Any], namespace: str
) -> dict[str, Any]:
    """A PyTorchJob (Training Operator v1): one Master and nodes-1 Workers, nprocPerNode
    ranks each; restartPolicy Never: a failed rank fails the job, the KFP task's retry
    resumes from the last checkpoint."""
    group, version, _, kind = PYTORCHJOB
    d = cfg.distributed
    template = _pod_template(cfg, stage, params)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if d.nodes > 1:
        replicas["Worker"] = {
            "replicas": d.nodes - 1,
            "restartPolicy": "Never",
            "template": template,
        }
    return {
        "apiVersion": f"{group}/{version}",
        "kind": kind,
        "metadata": _metadata(cfg, job_name(cfg, stage, params), namespace),
        "spec": {"nprocPerNode": str(d.nproc_per_node), "pytorchReplicaSpecs": replicas},
    }


@dataclass(frozen=True)
class JobState:
    """Where a job is: finished (succeeded or failed), and a line for the task log."""

    finished: bool
    failed: bool
    summary: str


_DONE = {"TrainJob": ("Complete", "Failed"), "PyTorchJob": ("Succeeded", "Failed")}


def job_state(job: dict[str, Any]) -> JobState:
    """A TrainJob's or PyTorchJob's state from its status conditions (those whose status
    is "True"; the failure's reason and message when it failed).

    >>> job_state({"kind": "TrainJob", "status": {"conditions": [{"type": "Failed",
    ...     "status": "True", "reason": "TrainingFailed", "message": "node-0 OOMKilled"}]}})
    JobState(finished=True, failed=True, summary='Failed: TrainingFailed: node-0 OOMKilled')
    """
    succeeded, failed = _DONE[job["kind"]]
    conditions = [
        c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    ]
    for c in conditions:
        if c.get("type") in (succeeded, failed):
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            summary = f"{c['type']}: {detail}" if detail else c["type"]
            return JobState(True, c["type"] == failed, summary)
    names = [str(c.get("type")) for c in conditions]
    return JobState(False, False, ", ".join(names) if names else "Pending")
