"""Kubernetes settings in the compiled pipeline YAML, from the config's `cluster:` section.

Checks every task of the compiled graph (sub-pipelines and condition branches included):
Secrets as environment variables by name only, the accelerator on the train and guidance
stages alone, node selector and tolerations when configured, retries on the stateful
stages, caching off everywhere, and no credential anywhere in the YAML.

Run: .venv/bin/python -m pytest tests/test_pipelines_kubernetes.py -q
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kfp")

from kfp import compiler

from npo.config import ConfigError, ExperimentConfig, load_config
from npo.pipelines.build import build_pipeline
from npo.pipelines.compile import pipeline_yaml
from npo.stages import STAGES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The stages that write state and resume when re-run (components/README.md).
STATEFUL = {"prepare", "train", "guidance", "rollback", "schedule"}
PASSWORD = "hunter2"


@functools.cache
def compile_text(name: str, *overrides: str, local: bool = False) -> str:
    """The YAML of configs/<name>.yaml with overrides (local: as `npo run` builds it),
    compiled once per session."""
    cfg = load_config(CONFIGS / f"{name}.yaml", list(overrides))
    if not local:
        return pipeline_yaml(cfg, "test")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        compiler.Compiler().compile(build_pipeline(cfg, local=True), str(path))
        return path.read_text()


class Compiled:
    """A compiled pipeline: its tasks, each with its stage, executor and platform config."""

    def __init__(self, text: str) -> None:
        self.text = text
        docs = list(yaml.safe_load_all(text))
        self.spec = docs[0]
        platform = docs[1] if len(docs) > 1 else {}
        self.platform = platform.get("platforms", {}).get("kubernetes", {})

    def _walk(self, dag: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for task in dag.get("tasks", {}).values():
            yield task
            component = self.spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                yield from self._walk(component["dag"])

    def all_tasks(self) -> list[dict[str, Any]]:
        """Every task, container or DAG (sub-pipelines, condition branches)."""
        return list(self._walk(self.spec["root"]["dag"]))

    def stage_tasks(self) -> Iterator[tuple[str, dict[str, Any], str]]:
        """(stage, task, executor label) of every container task."""
        for task in self.all_tasks():
            component = self.spec["components"][task["componentRef"]["name"]]
            label = component.get("executorLabel")
            if label is None:
                continue
            args = self.spec["deploymentSpec"]["executors"][label]["container"]["args"]
            # a component's function is named after its stage
            yield args[args.index("--function_to_execute") + 1], task, label

    def container(self, label: str) -> dict[str, Any]:
        return self.spec["deploymentSpec"]["executors"][label]["container"]

    def k8s(self, label: str) -> dict[str, Any]:
        return self.platform.get("deploymentSpec", {}).get("executors", {}).get(label, {})


def secrets_of(k8s: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{secret name: {key: env var}} of one executor's platform config."""
    return {
        s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]}
        for s in k8s.get("secretAsEnv", [])
    }


@pytest.fixture(scope="module")
def autonpo_default() -> Compiled:
    return Compiled(compile_text("toy_autonpo", "train.steps=30"))


# --------------------------------------------------------------------------- defaults
def test_every_stage_gets_the_credential_secrets_by_name(autonpo_default):
    stages = set()
    for stage, _, label in autonpo_default.stage_tasks():
        stages.add(stage)
        if stage in ("keep", "configure"):  # values in, values out: no credentials
            assert "secretAsEnv" not in autonpo_default.k8s(label)
            continue
        assert secrets_of(autonpo_default.k8s(label)) == {
            "npo-s3": {
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
            "npo-metadata-db": {"NPO_METADATA_URL": "NPO_METADATA_URL"},
            "npo-mlflow": {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
        }
        resources = autonpo_default.container(label)["resources"]
        light = not STAGES[stage].runs_model  # verify, report: small requests
        assert resources["resourceCpuRequest"] == ("250m" if light else "1")
        assert resources["resourceMemoryRequest"] == ("1Gi" if light else "4Gi")
        assert "accelerator" not in resources  # CPU by default
    # every stage an AutoNPO run uses (detect runs inside train; schedule is NPO's)
    assert stages == set(STAGES) - {"detect", "schedule"}


def test_caching_is_off_for_every_task(autonpo_default):
    tasks = autonpo_default.all_tasks()
    assert len(tasks) > 20
    for task in tasks:
        assert not task.get("cachingOptions", {}).get("enableCache", False), task["taskInfo"]
    assert "enableCache: true" not in autonpo_default.text


def test_stateful_stages_retry_with_backoff_and_the_others_do_not(autonpo_default):
    seen = set()
    for stage, task, _ in autonpo_default.stage_tasks():
        seen.add(stage)
        if stage in STATEFUL:
            assert task["retryPolicy"] == {
                "maxRetryCount": 2,
                "backoffDuration": "60s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "3600s",
            }
        else:
            assert "retryPolicy" not in task, (stage, task["taskInfo"])
    assert seen >= STATEFUL - {"schedule"}


def test_retry_settings_follow_the_config():
    compiled = Compiled(
        compile_text(
            "toy_grpo",
            "cluster.retry.count=5",
            "cluster.retry.backoff=10s",
            "cluster.retry.factor=3",
        )
    )
    policies = [t["retryPolicy"] for s, t, _ in compiled.stage_tasks() if s in STATEFUL]
    assert policies and all(p["maxRetryCount"] == 5 for p in policies)
    assert all(p["backoffDuration"] == "10s" and p["backoffFactor"] == 3.0 for p in policies)
    none = Compiled(compile_text("toy_grpo", "cluster.retry.count=0"))
    assert not [t for _, t, _ in none.stage_tasks() if "retryPolicy" in t]


# --------------------------------------------------------------------------- configured
def test_accelerator_node_selector_tolerations_and_env_when_configured():
    compiled = Compiled(
        compile_text(
            "toy_npo",
            "cluster.accelerator_type=nvidia.com/gpu",
            "cluster.accelerator_count=2",
            "cluster.node_selector={pool: gpu, zone: a}",
            "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
            "cluster.env={NPO_S3_INSECURE: '1'}",
            "cluster.cpu_request=4",
            "cluster.memory_request=16Gi",
            "cluster.memory_limit=24Gi",
        )
    )
    stages = set()
    for stage, _, label in compiled.stage_tasks():
        stages.add(stage)
        k8s = compiled.k8s(label)
        resources = compiled.container(label)["resources"]
        if stage in ("keep", "configure"):  # placed, labelled and sized like the others
            assert set(k8s) == {
                "nodeSelector",
                "tolerations",
                "podMetadata",
                "securityContext",
                "activeDeadlineSeconds",
            }
            continue
        if stage in {"train", "guidance"}:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "2"
        else:
            assert "accelerator" not in resources, stage
        if STAGES[stage].runs_model:
            assert resources["resourceCpuRequest"] == "4"
            assert resources["resourceMemoryRequest"] == "16Gi"
            assert resources["resourceMemoryLimit"] == "24Gi"
        else:  # verify, report: cluster.light's defaults whatever the model steps ask
            assert resources["resourceCpuRequest"] == "250m"
            assert resources["resourceMemoryLimit"] == "4Gi"
        assert k8s["nodeSelector"] == {"labels": {"pool": "gpu", "zone": "a"}}
        assert k8s["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert compiled.container(label)["env"] == [{"name": "NPO_S3_INSECURE", "value": "1"}]
    assert {"train", "guidance", "verify"} <= stages


def test_gpu_steps_choose_which_stages_get_the_accelerator():
    compiled = Compiled(
        compile_text(
            "toy_autonpo",
            "train.steps=20",
            "cluster.accelerator_type=nvidia.com/gpu",
            "cluster.gpu_steps=[train, guidance, rollback, evaluate]",
        )
    )
    with_gpu = {
        stage
        for stage, _, label in compiled.stage_tasks()
        if "accelerator" in compiled.container(label).get("resources", {})
    }
    assert with_gpu == {"train", "guidance", "rollback", "evaluate"}


def test_a_multi_node_train_task_waits_on_its_job_without_a_gpu_of_its_own():
    def gpu_stages(*overrides: str) -> set[str]:
        compiled = Compiled(
            compile_text("toy_grpo", "cluster.accelerator_type=nvidia.com/gpu", *overrides)
        )
        return {
            stage
            for stage, _, label in compiled.stage_tasks()
            if "accelerator" in compiled.container(label).get("resources", {})
        }

    one_node = ("cluster.accelerator_count=8", "distributed.nproc_per_node=8")
    assert "train" in gpu_stages(*one_node)  # torchrun in the task's own pod, on its 8 GPUs
    assert "train" not in gpu_stages(*one_node, "distributed.nodes=2")  # a TrainJob's pods


def test_the_real_model_config_runs_every_model_stage_on_a_gpu_of_the_cuda_image():
    compiled = Compiled(compile_text("math_autonpo"))
    stages = {stage: compiled.container(label) for stage, _, label in compiled.stage_tasks()}
    model = {s for s in stages if STAGES[s].runs_model}
    assert {stages[s]["image"] for s in model} == {"ghcr.io/npo-project/npo:0.1.0-cuda"}
    # the stages that never load the model pull the CPU image and ask for little
    assert set(stages) - model == {"configure", "verify", "keep", "report"}
    for s in set(stages) - model:
        assert stages[s]["image"] == "ghcr.io/npo-project/npo:0.1.0-cpu", s
        assert stages[s]["resources"]["resourceMemoryRequest"] == "1Gi", s
        assert "accelerator" not in stages[s]["resources"], s
    assert stages["train"]["resources"]["resourceMemoryRequest"] == "64Gi"
    with_gpu = {s for s, c in stages.items() if "accelerator" in c.get("resources", {})}
    # what the config lists (detect is not in its DAG: the train task checks online)
    assert with_gpu == {"prepare", "train", "guidance", "rollback", "evaluate"}
    accelerator = stages["train"]["resources"]["accelerator"]
    assert accelerator.get("resourceType", accelerator.get("type")) == "nvidia.com/gpu"


def test_every_pod_is_labelled_for_the_network_policies_and_runs_as_non_root(autonpo_default):
    """Pod Security `restricted` needs runAsNonRoot (KFP's compiler adds the rest); the
    chart's NetworkPolicies admit pods with POD_LABELS to S3, PostgreSQL and MLflow."""
    from npo.pipelines.kubernetes import POD_LABELS

    stages = set()
    for stage, _, label in autonpo_default.stage_tasks():
        k8s = autonpo_default.k8s(label)
        assert k8s["podMetadata"]["labels"] == POD_LABELS, stage
        assert k8s["securityContext"] == {
            "runAsUser": "1000",
            "runAsGroup": "1000",
            "runAsNonRoot": True,
        }, stage
        stages.add(stage)
    assert {"configure", "keep", "train", "report"} <= stages


def test_requests_and_deadlines_are_sized_by_whether_a_stage_runs_the_model():
    compiled = Compiled(
        compile_text(
            "toy_autonpo",
            "train.steps=30",
            "cluster.memory_request=32Gi",
            "cluster.timeout=7200",
            "cluster.timeouts={train: 86400, verify: 0}",
            "cluster.light={cpu_request: 100m, memory_request: 512Mi, timeout: 600}",
        )
    )
    seen = set()
    for stage, _, label in compiled.stage_tasks():
        resources = compiled.container(label).get("resources", {})
        deadline = compiled.k8s(label).get("activeDeadlineSeconds")
        if STAGES[stage].runs_model:
            assert resources["resourceMemoryRequest"] == "32Gi", stage
            assert deadline == ("86400" if stage == "train" else "7200"), stage
        else:
            assert resources["resourceCpuRequest"] == "100m", stage
            assert resources["resourceMemoryRequest"] == "512Mi", stage
            assert resources["resourceMemoryLimit"] == "4Gi", stage  # the light default
            assert deadline == (None if stage == "verify" else "600"), stage
        seen.add(stage)
    assert {"train", "rollback", "verify", "keep", "configure"} <= seen


def test_no_credential_reaches_the_yaml():
    text = compile_text(
        "toy_grpo",
        f"store.metadata_url=postgresql+psycopg://npo:{PASSWORD}@db:5432/npo",
        f"tracking.tracking_uri=https://mlflow:{PASSWORD}@mlflow.example:5000",
        "store.artifacts_uri=s3://bucket/prefix",
    )
    assert PASSWORD not in text
    assert "postgresql+psycopg://npo:***@db:5432/npo" in text  # redacted, not dropped
    compiled = Compiled(text)
    for _, _, label in compiled.stage_tasks():
        for secret in compiled.k8s(label).get("secretAsEnv", []):
            assert set(secret) <= {"secretName", "secretNameParameter", "keyToEnv", "optional"}


def test_local_pipeline_has_no_kubernetes_settings():
    compiled = Compiled(compile_text("toy_autonpo", "train.steps=30", local=True))
    assert compiled.platform == {}
    for _, task, label in compiled.stage_tasks():
        assert "retryPolicy" not in task
        assert "resources" not in compiled.container(label)
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in compiled.all_tasks())


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("cluster.image=ghcr.io/npo-project/npo:latest", "cluster.image"),
        ("cluster.image=npo", "cluster.image"),
        ("cluster.cpu_request=two", "cluster.cpu_request"),
        ("cluster.memory_request=4GB", "cluster.memory_request"),
        ("cluster.retry.backoff=1m", "cluster.retry.backoff"),
        ("cluster.gpu_steps=[train, keep]", "cluster.gpu_steps"),
        ("cluster.tolerations=[{operator: Sometimes}]", "cluster.tolerations"),
        ("cluster.secrets=[{env: {a: B}}]", "cluster.secrets"),
        ("cluster.light.image=npo:latest", "cluster.light.image"),
        ("cluster.timeouts={trian: 60}", "cluster.timeouts"),
        ("cluster.timeouts={train: -1}", "cluster.timeouts"),
        ("cluster.run_as_user=0", "cluster.run_as_user"),
        ("cluster.service_account=Not_A_Name", "cluster.service_account"),
    ],
)
def test_bad_cluster_settings_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert field in str(info.value)


def test_cluster_defaults_are_valid_and_documented():
    cluster = ExperimentConfig().cluster
    assert ":" in cluster.image and not cluster.image.endswith(":latest")
    assert cluster.accelerator_type is None
    for name, field in type(cluster).model_fields.items():
        assert field.description, f"cluster.{name} has no description"


def test_config_maps_are_env_by_name_and_a_variable_has_one_source():
    compiled = Compiled(compile_text("toy_grpo"))
    for stage, _, label in compiled.stage_tasks():
        if stage in ("keep", "configure"):
            continue
        (entry,) = compiled.k8s(label)["configMapAsEnv"]
        assert entry["configMapName"] == "npo-config"
        assert {p["envVar"] for p in entry["keyToEnv"]} == {
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "NPO_ARTIFACTS_URI",
        }
    with pytest.raises(ConfigError, match=r"AWS_ENDPOINT_URL is set by both cluster\.config_maps"):
        load_config(CONFIGS / "toy_grpo.yaml", ["cluster.env.AWS_ENDPOINT_URL=http://s3:8333"])
