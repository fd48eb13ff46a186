"""The multi-node train stage's cluster job: the rendered TrainJob and PyTorchJob (fields,
resources, environment, Secrets by reference), the reading of their status, and the wait
loop against an API that answers as the Kubernetes one does."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from npo.config import ExperimentConfig
from npo.pipelines.cluster_job import ClusterJobFailed, render, wait_for_job
from npo.pipelines.trainjob import job_name, job_state, pytorchjob_manifest, trainjob_manifest
from npo.steps.ranks import CONFIG_ENV, PARAMS_ENV

PARAMS = {"run_id": "big", "start": 0, "end": 50, "guidance": "", "phase": "grpo"}


def _cfg(**distributed: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "big",
            "rollout": {"prompts_per_step": 64},
            "distributed": {"nodes": 4, "nproc_per_node": 8, **distributed},
            "cluster": {
                "image": "registry.example/npo:1.2.3-cuda",
                "accelerator_type": "nvidia.com/gpu",
                "accelerator_count": 8,
                "cpu_request": "32",
                "memory_request": "256Gi",
                "memory_limit": "512Gi",
                "env": {"NCCL_DEBUG": "WARN"},
                "node_selector": {"pool": "h200"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        }
    )


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _check_env(env: dict[str, dict], cfg: ExperimentConfig) -> None:
    assert ExperimentConfig.model_validate_json(env[CONFIG_ENV]["value"]) == cfg
    assert json.loads(env[PARAMS_ENV]["value"]) == PARAMS
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "npo-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": False}
    assert env["NPO_METADATA_URL"]["valueFrom"]["secretKeyRef"]["name"] == "npo-metadata-db"
    cm = env["NPO_ARTIFACTS_URI"]["valueFrom"]["configMapKeyRef"]
    assert cm["name"] == "npo-config"
    assert all("value" not in e for e in env.values() if e["name"].startswith("AWS_SECRET"))


def test_trainjob_runs_the_ranks_on_every_node_with_the_steps_resources() -> None:
    cfg = _cfg()
    job = trainjob_manifest(cfg, "train", PARAMS, "team-a")
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["name"] == job_name(cfg, "train", PARAMS)
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/npo:1.2.3-cuda" and trainer["numNodes"] == 4
    assert trainer["command"] == [
        "torchrun",
        "--nproc-per-node=8",
        "-m",
        "npo.steps.ranks",
        "--stage",
        "train",
    ]
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8},
        "limits": {"memory": "512Gi", "nvidia.com/gpu": 8},
    }
    _check_env(_env(trainer), cfg)


def test_pytorchjob_has_a_master_and_workers_as_training_operator_v1_wants() -> None:
    cfg = _cfg(launcher="pytorchjob")
    job = render(cfg, "train", PARAMS, "team-a")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert {r["restartPolicy"] for r in replicas.values()} == {"Never"}
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["serviceAccountName"] == "npo-pipeline" and not pod["automountServiceAccountToken"]
    assert pod["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000}
    assert pod["nodeSelector"] == {"pool": "h200"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    _check_env(_env(container), cfg)
    single = pytorchjob_manifest(_cfg(nodes=1, nproc_per_node=8), "train", PARAMS, "t")
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_the_job_name_is_fixed_by_the_parameters_and_fits_kubernetes() -> None:
    cfg = ExperimentConfig(name="A_" + "x" * 80)
    name = job_name(cfg, "train", PARAMS)
    assert len(name) <= 63 and name == name.lower() and name[0].isalpha()
    assert name == job_name(cfg, "train", dict(reversed(PARAMS.items())))
    assert name != job_name(cfg, "train", {**PARAMS, "end": 51})


@pytest.mark.parametrize(
    ("kind", "conditions", "expected"),
    [
        ("TrainJob", [], (False, False, "Pending")),
        ("TrainJob", [{"type": "Created", "status": "True"}], (False, False, "Created")),
        ("TrainJob", [{"type": "Complete", "status": "True"}], (True, False, "Complete")),
        ("TrainJob", [{"type": "Failed", "status": "False"}], (False, False, "Pending")),
        (
            "PyTorchJob",
            [
                {"type": "Running", "status": "False"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PyTorchJobFailed",
                    "message": "Worker 2 exited 137",
                },
            ],
            (True, True, "Failed: PyTorchJobFailed: Worker 2 exited 137"),
        ),
        ("PyTorchJob", [{"type": "Succeeded", "status": "True"}], (True, False, "Succeeded")),
    ],
)
def test_job_state_reads_the_true_conditions(kind, conditions, expected) -> None:
    state = job_state({"kind": kind, "status": {"conditions": conditions}})
    assert (state.finished, state.failed, state.summary) == expected


class _Api:
    """Answers as CustomObjectsApi does: a stored object per name, 404 for a missing one;
    each get advances the job one status along `statuses`."""

    def __init__(self, statuses: list[list[dict]], existing: dict | None = None) -> None:
        self.statuses, self.jobs, self.calls = statuses, {}, []
        if existing is not None:
            self.jobs[existing["metadata"]["name"]] = existing

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", plural, name))
        if name not in self.jobs:
            raise ApiException(status=404)
        job = self.jobs[name]
        if self.statuses and job.get("created"):
            job["status"] = {"conditions": self.statuses.pop(0)}
        return job

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", plural, body["metadata"]["name"]))
        self.jobs[body["metadata"]["name"]] = {**body, "created": True}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", plural, name))
        del self.jobs[name]


def test_waiting_streams_the_status_and_fails_with_the_jobs_reason() -> None:
    manifest = trainjob_manifest(_cfg(), "train", PARAMS, "team-a")
    failed = [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
    api = _Api([[{"type": "Created", "status": "True"}]] * 2 + [failed])
    lines: list[str] = []
    with pytest.raises(ClusterJobFailed, match=r"TrainJob team-a/npo-big-train-.* DeadlineExc"):
        wait_for_job(api, manifest, 1.0, lines.append, sleep=lambda s: None)
    assert [c[0] for c in api.calls] == ["get", "create", "get", "get", "get"]
    assert [line.split(": ", 1)[1] for line in lines] == [
        "created",
        "Created",
        "Failed: DeadlineExceeded",
    ]  # one line per change of state


def test_a_retry_waits_on_its_job_or_replaces_a_failed_one() -> None:
    manifest = trainjob_manifest(_cfg(), "train", PARAMS, "team-a")
    done = [{"type": "Complete", "status": "True"}]
    running = {**manifest, "created": True, "status": {"conditions": []}}
    api = _Api([done], existing=running)
    wait_for_job(api, manifest, 1.0, lambda line: None, sleep=lambda s: None)
    assert "create" not in [c[0] for c in api.calls]  # the first try's job, waited on
    failed = {**manifest, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    api = _Api([done], existing=failed)
    wait_for_job(api, manifest, 1.0, lambda line: None, sleep=lambda s: None)
    assert [c[0] for c in api.calls][:4] == ["get", "delete", "get", "create"]
