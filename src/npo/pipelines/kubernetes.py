"""Kubernetes settings of the pipeline's tasks, from the config's `cluster:` section.

One entry point, `apply_cluster(task, stage, cluster)`, called by the pipeline builder on every
task it creates. The compiled YAML carries only names (Secret names and keys, node labels,
resource quantities), never a credential: the stages read credentials from the environment
variables these Secrets fill. `kfp.local` ignores all of this, so `npo run` is unaffected.
"""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from npo.config import ClusterConfig
from npo.stages import Stage

# What a step reads from its environment on a cluster, never from the compiled YAML: the S3
# keys and endpoint, where the run's artifacts go, the metadata DB and MLflow URLs. The
# config's default Secrets and ConfigMap supply them, and the chart creates those
# (tests/test_chart.py checks both).
STEP_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "NPO_ARTIFACTS_URI",
    "NPO_METADATA_URL",
    "MLFLOW_TRACKING_URI",
)


# Labels of every step's pod: the chart's NetworkPolicies let pods carrying them reach S3,
# PostgreSQL and MLflow (helm/npo/templates/networkpolicy.yaml selects exactly these).
POD_LABELS = {
    "app.kubernetes.io/part-of": "npo",
    "app.kubernetes.io/component": "pipeline-step",
}


def image_of(stage: Stage, cluster: ClusterConfig) -> str:
    """The image `stage` runs: the stages that never load the model may take a smaller one."""
    if not stage.runs_model and cluster.light.image:
        return cluster.light.image
    return cluster.image


def apply_cluster(
    task: PipelineTask, stage: Stage, cluster: ClusterConfig, as_job: bool = False
) -> PipelineTask:
    """Configure `task` (running `stage`) for the cluster and return it. `as_job`: the stage's
    work runs in a cluster job of its own (a multi-node train stage: npo.pipelines.trainjob),
    so its task's pod needs no accelerator.

    Caching is off for every task: stages are idempotent through the store and must run
    again when a run is resumed or repeated, which KFP's cache would skip. Every task gets
    the node selector and tolerations, the pod labels, a non-root security context (Pod
    Security `restricted`: KFP's compiler adds no privilege escalation, no capabilities and
    the runtime's seccomp profile), requests and a deadline sized by whether it runs the
    model; a stage that does not open the run (it only handles values) nothing else; one
    that writes state and resumes when re-run (`stage.retried`) is retried.
    """
    task.set_caching_options(enable_caching=False)
    _placement(task, cluster)  # every pod must be schedulable (tainted nodes, pools)
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    kubernetes.set_security_context(
        task,
        run_as_user=cluster.run_as_user,
        run_as_group=cluster.run_as_group,
        run_as_non_root=True,
    )
    _resources(task, stage, cluster, as_job)
    if not stage.opens_run:
        return task
    if stage.retried and cluster.retry.count > 0:
        retry = cluster.retry
        task.set_retry(
            num_retries=retry.count,
            backoff_duration=retry.backoff,
            backoff_factor=retry.factor,
            backoff_max_duration=retry.max_duration,
        )
    _environment(task, cluster)
    return task


def _resources(task: PipelineTask, stage: Stage, cluster: ClusterConfig, as_job: bool) -> None:
    """Requests, limit and deadline: the model steps' or the light ones'; the accelerator
    only on the GPU stages that compute in their own pod."""
    sized = cluster if stage.runs_model else cluster.light
    task.set_cpu_request(sized.cpu_request)
    task.set_memory_request(sized.memory_request)
    if sized.memory_limit:
        task.set_memory_limit(sized.memory_limit)
    timeout = cluster.timeouts.get(stage.name, sized.timeout)
    if timeout:
        kubernetes.set_timeout(task, timeout)
    if cluster.accelerator_type and stage.name in cluster.gpu_steps and not as_job:
        task.set_accelerator_type(cluster.accelerator_type)
        task.set_accelerator_limit(cluster.accelerator_count)


def _environment(task: PipelineTask, cluster: ClusterConfig) -> None:
    """Secrets and ConfigMaps as environment variables (by name only), the plain ones."""
    for secret in cluster.secrets:
        kubernetes.use_secret_as_env(
            task,
            secret_name=secret.secret_name,
            secret_key_to_env=dict(sorted(secret.env.items())),
            optional=secret.optional,
        )
    for config_map in cluster.config_maps:
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=config_map.config_map_name,
            config_map_key_to_env=dict(sorted(config_map.env.items())),
            optional=config_map.optional,
        )
    for name, value in sorted(cluster.env.items()):
        task.set_env_variable(name, value)


def _placement(task: PipelineTask, cluster: ClusterConfig) -> None:
    """Node selector and tolerations, in a stable order (byte-identical compiles)."""
    for key, value in sorted(cluster.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in cluster.tolerations:
        kubernetes.add_toleration(
            task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
        )
