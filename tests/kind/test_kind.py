"""End to end on a throwaway kind cluster: image, Kubeflow Pipelines, the chart, a run.

    make kind-test        # NPO_KIND_E2E=1 pytest tests/kind; needs kind and a Docker engine

Steps: create the cluster (pinned node image) -> `make images IMAGE_FLAVORS=cpu` and `kind
load` the CPU image -> `make kfp-install` -> `make deploy VALUES=tests/kind/values-kind.yaml`
-> port-forward the KFP API -> `npo submit configs/toy_autonpo.yaml --wait` with a short
budget and nothing about the release (the steps read its ConfigMap npo-config) ->
checkpoints in the object store (minio SDK), rows in PostgreSQL, metrics in MLflow (each
through a port-forward) -> `npo stage` a Qwen2-shaped model and math datasets into the
chart's S3 and submit configs/math_autonpo.yaml at CPU size (its URIs, the CPU image) ->
its checkpoints -> delete the cluster.

Skipped unless NPO_KIND_E2E=1 (`make test` never runs it), and skipped, saying why, when
`kind`, `docker` or a reachable Docker daemon is missing. NPO_KIND_KEEP=1 keeps the
cluster afterwards (delete it with `kind delete cluster --name npo-e2e`);
NPO_KIND_NODE_IMAGE picks another node image.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("NPO_KIND_CLUSTER", "npo-e2e")
# Kubernetes 1.31, the version tests/test_chart.py validates the chart against.
NODE_IMAGE = os.environ.get("NPO_KIND_NODE_IMAGE", "kindest/node:v1.31.4")
NAMESPACE = "kubeflow"
RUN_NAME = "kind-e2e"
# A few minutes of CPU on one node: warm-up, two AutoNPO windows, checkpoints every 10 steps.
SMALL_BUDGET = [
    f"name={RUN_NAME}",
    "warmup.steps=40",
    "warmup.check_every=20",
    "task.n_eval=64",
    "train.steps=20",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "autonpo.check_every=10",
    "autonpo.window=10",
    "autonpo.candidates=[5,10]",
    "autonpo.cooldown=10",
    "autonpo.confirm_prompts=8",
    "cluster.cpu_request=500m",
    "cluster.memory_request=1Gi",
    "cluster.retry.count=1",
]
# configs/math_autonpo.yaml made CPU-sized: the CPU image, HF rollouts, no accelerator.
REAL_RUN = "kind-real"
REAL = {
    "model.source": "s3://npo/models/kind-tiny-qwen",
    "task.train_path": "s3://npo/datasets/kind/sums.jsonl",
    "task.eval_path": "s3://npo/datasets/kind/sums.jsonl",
}
REAL_BUDGET = [
    f"name={REAL_RUN}",
    "model.device=cpu",
    "model.compute_dtype=null",
    "rollout.backend=hf",
    "rollout.prompts_per_step=4",
    "rollout.max_new_tokens=12",
    "algo.minibatches=2",
    "algo.micro_batch_size=4",
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.threads=1",
    "autonpo.check_every=2",
    "autonpo.window=2",
    "autonpo.candidates=[2]",
    "autonpo.confirm_prompts=4",
    "cluster.image=ghcr.io/npo-project/npo:0.1.0-cpu",
    "cluster.accelerator_type=null",
    "cluster.cpu_request=500m",
    "cluster.memory_request=1Gi",
    "cluster.retry.count=1",
]


def _why_not() -> str | None:
    if os.environ.get("NPO_KIND_E2E") != "1":
        return "end-to-end test on a kind cluster: run it with `make kind-test` (NPO_KIND_E2E=1)"
    for tool in ("kind", "docker"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH: the kind test needs kind and a Docker engine"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed: {e}"
    if info.returncode != 0:
        return f"no reachable Docker daemon: {(info.stderr or info.stdout).strip()[:200]}"
    return None


_SKIP = _why_not()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.timeout(2 * 3600),
]


def sh(
    cmd: list[str], env: dict[str, str], timeout: float = 1800, check: bool = True
) -> subprocess.CompletedProcess[str]:
    print("$", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
    if check and done.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def kubectl() -> str:
    path = ROOT / ".tools" / "bin" / "kubectl"
    if not path.is_file():
        pytest.fail(".tools/bin/kubectl is missing: run `make helm` (make kind-test does)")
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A fresh kind cluster; yields the environment (KUBECONFIG) that reaches it."""
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    sh(["kind", "delete", "cluster", "--name", CLUSTER], env, check=False)
    sh(
        ["kind", "create", "cluster", "--name", CLUSTER, "--image", NODE_IMAGE,
         "--kubeconfig", str(kubeconfig), "--wait", "300s"],
        env, timeout=900,
    )  # fmt: skip
    try:
        yield env
    finally:
        _diagnose(env)
        if os.environ.get("NPO_KIND_KEEP") == "1":
            print(f"kept: kind cluster {CLUSTER}, KUBECONFIG={kubeconfig}")
        else:
            sh(["kind", "delete", "cluster", "--name", CLUSTER], env, timeout=600, check=False)


def _diagnose(env: dict[str, str]) -> None:
    """State of the cluster, printed (pytest shows it when the test failed)."""
    with contextlib.suppress(Exception):
        k = kubectl()
        sh([k, "get", "pods,pvc,jobs", "-A", "-o", "wide"], env, timeout=60, check=False)
        sh([k, "-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"], env, 60, False)
        for selector in ("app.kubernetes.io/instance=npo", "pipelines.kubeflow.org/v2_component"):
            sh([k, "-n", NAMESPACE, "logs", "-l", selector, "--all-containers", "--tail=60",
                "--prefix", "--max-log-requests=20"], env, 120, False)  # fmt: skip


@contextlib.contextmanager
def port_forward(env: dict[str, str], target: str, remote: int) -> Iterator[int]:
    """`kubectl port-forward` of svc/<target>:<remote> to a free port of 127.0.0.1."""
    from npo.devservices._proc import free_port

    local = free_port()
    proc = subprocess.Popen(
        [kubectl(), "-n", NAMESPACE, "port-forward", "--address", "127.0.0.1",
         f"svc/{target}", f"{local}:{remote}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"port-forward {target} exited: {proc.stdout.read().decode()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", local), timeout=2).close()
                break
            time.sleep(0.5)
        yield local
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def secret(env: dict[str, str], name: str, key: str) -> str:
    out = sh(
        [kubectl(), "-n", NAMESPACE, "get", "secret", name, "-o", f"jsonpath={{.data.{key}}}"],
        env, timeout=60,
    ).stdout  # fmt: skip
    return base64.b64decode(out).decode()


def test_pipeline_run_on_kind_uses_the_charts_services(cluster: dict[str, str]) -> None:
    from npo.config import ClusterConfig

    env = cluster
    image = ClusterConfig().image

    # 1. the CPU image, built here and loaded into the node (nothing is pulled for it)
    if sh(["make", "-n", "images"], env, timeout=60, check=False).returncode != 0:
        pytest.fail("no `make images` target: the kind test needs the project image built")
    sh(["make", "images", "IMAGE_FLAVORS=cpu"], env, timeout=3600)
    sh(["kind", "load", "docker-image", image, "--name", CLUSTER], env, timeout=1800)

    # 2. Kubeflow Pipelines (pinned release, standalone)
    sh(["make", "kfp-install"], env, timeout=3600)

    # 3. the chart
    sh(["make", "deploy", f"NAMESPACE={NAMESPACE}", "VALUES=tests/kind/values-kind.yaml"],
       env, timeout=1200)  # fmt: skip

    # 4. a short AutoNPO run through the KFP API
    with port_forward(env, "ml-pipeline", 8888) as api:
        host = f"http://127.0.0.1:{api}"
        overrides = [a for s in SMALL_BUDGET for a in ("--set", s)]
        done = sh(
            [str(Path(sys.executable).with_name("npo")), "submit",
             "configs/toy_autonpo.yaml", "--host", host, "--experiment", "npo-kind-e2e",
             "--wait", "--timeout", "3600", *overrides],
            env, timeout=4000, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"npo submit --wait failed:\n{done.stdout}\n{done.stderr}"
        assert "succeeded" in done.stdout
        # the chart's settings leave no state on a pod's own disk: no cluster warnings
        assert not [line for line in done.stderr.splitlines() if line.startswith("warning: ")]

    # 5. checkpoints in the object store
    from minio import Minio

    access = secret(env, "npo-s3", "AWS_ACCESS_KEY_ID")
    secret_key = secret(env, "npo-s3", "AWS_SECRET_ACCESS_KEY")
    with port_forward(env, "npo-seaweedfs", 8333) as s3:
        client = Minio(f"127.0.0.1:{s3}", access, secret_key, secure=False)
        keys = [
            o.object_name
            for o in client.list_objects(
                "npo", prefix=f"experiments/runs/{RUN_NAME}", recursive=True
            )
        ]
        manifests = [key for key in keys if "/ckpt/" in key and key.endswith("manifest.json")]
        assert len(manifests) >= 2, keys[:50]  # warm-up checkpoint 0 and later ones

    # 6. rows in PostgreSQL
    import sqlalchemy as sa

    url = sa.make_url(secret(env, "npo-metadata-db", "NPO_METADATA_URL"))
    with port_forward(env, "npo-postgresql", 5432) as pg:
        engine = sa.create_engine(url.set(host="127.0.0.1", port=pg))
        try:
            with engine.connect() as conn:
                runs = conn.execute(
                    sa.text("SELECT count(*) FROM runs WHERE id LIKE :p"), {"p": f"{RUN_NAME}%"}
                ).scalar_one()
                checkpoints = conn.execute(
                    sa.text("SELECT count(*) FROM checkpoints WHERE run_id LIKE :p"),
                    {"p": f"{RUN_NAME}%"},
                ).scalar_one()
        finally:
            engine.dispose()
    assert runs >= 1 and checkpoints >= 2

    # 7. metrics in MLflow
    import mlflow

    with port_forward(env, "npo-mlflow", 5000) as port:
        tracking = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = tracking.get_experiment_by_name("npo")
        assert experiment is not None
        found = tracking.search_runs([experiment.experiment_id], max_results=50)
        assert any(r.data.metrics for r in found), [r.info.run_name for r in found]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200

    # 8. the real-model config, at CPU size: a Qwen2-shaped model and math datasets staged
    # into the chart's object store with `npo stage`, named by URI only
    from helpers import CHAT_TEMPLATE, write_tiny_hf_model

    work = ROOT / ".tools" / "kind-real"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lines = [{"prompt": f"What is {a} + {7 - a}?", "answer": 7} for a in range(8)]
    (work / "sums.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_tiny_hf_model(work / "model", [CHAT_TEMPLATE, *(d["prompt"] for d in lines)])
    npo = str(Path(sys.executable).with_name("npo"))
    with port_forward(env, "npo-seaweedfs", 8333) as s3:
        s3_env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
                  "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret_key}  # fmt: skip
        sources = {"model.source": "model", "task.train_path": "sums.jsonl",
                   "task.eval_path": "sums.jsonl"}  # fmt: skip
        for field, source in sources.items():
            sh([npo, "stage", str(work / source), REAL[field]], s3_env, timeout=300)
    with port_forward(env, "ml-pipeline", 8888) as api:
        overrides = [a for s in [*REAL_BUDGET, *(f"{k}={v}" for k, v in REAL.items())]
                     for a in ("--set", s)]  # fmt: skip
        done = sh(
            [npo, "submit", "configs/math_autonpo.yaml", "--host", f"http://127.0.0.1:{api}",
             "--experiment", "npo-kind-e2e", "--wait", "--timeout", "3600", *overrides],
            env, timeout=4000, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"npo submit --wait failed:\n{done.stdout}\n{done.stderr}"
        assert not [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    with port_forward(env, "npo-seaweedfs", 8333) as s3:
        client = Minio(f"127.0.0.1:{s3}", access, secret_key, secure=False)
        prefix = f"experiments/runs/{REAL_RUN}/ckpt/"
        keys = [o.object_name for o in client.list_objects("npo", prefix=prefix, recursive=True)]
        assert sum(key.endswith("manifest.json") for key in keys) >= 2, keys[:50]
