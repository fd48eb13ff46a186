"""S3Store against a real, authenticating S3 server (SeaweedFS, started once per session).

Covers the ArtifactStore contract, the checkpoint commit protocol on S3, multipart uploads,
the one-clear-error promise (wrong keys, closed port, missing bucket; secrets never shown),
recovery from outages and from connections reset mid-upload, and ``open_store`` from env.

    pytest tests/test_s3_store.py -q
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("minio", reason="the S3 store needs the minio SDK (cluster extra)")

from minio import Minio

from npo.store.artifacts import ArtifactNotFound, open_store
from npo.store.checkpoint import (
    CheckpointError,
    checkpoint_uri,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from npo.store.s3 import MiB, S3Settings, S3Store, StoreError

# Small numbers so failing paths finish in well under a second.
FAST = dict(
    connect_timeout=2.0,
    read_timeout=20.0,
    http_retries=0,
    http_backoff=0.05,
    max_attempts=2,
    retry_backoff=0.05,
)


def make_store(server, bucket: str, prefix: str = "exp", **overrides) -> S3Store:
    """A store built from explicit settings only (the machine's env must not leak in)."""
    fields = dict(
        endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key
    )
    settings = S3Settings(**{**fields, **FAST, **overrides})
    return S3Store(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", settings)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of ``exc`` and of every exception chained to it."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return texts


# --------------------------------------------------------------------------- contract
def test_round_trip_bytes_files_and_nested_keys(s3_server, s3_bucket, tmp_path):
    store = make_store(s3_server, s3_bucket)
    store.put_bytes("a.txt", b"hello")
    store.put_bytes("deep/er/b.bin", b"\x00\x01" * 1000)
    store.put_bytes("empty", b"")
    src = random_file(tmp_path / "src.bin", 300_000)
    store.put_file("runs/r1/ckpt/000001/model.bin", src)

    assert store.get_bytes("a.txt") == b"hello"
    assert store.get_bytes("deep/er/b.bin") == b"\x00\x01" * 1000
    assert store.get_bytes("empty") == b""
    dest = tmp_path / "out" / "nested" / "model.bin"  # parent dirs are created
    store.get_file("runs/r1/ckpt/000001/model.bin", dest)
    assert sha256(dest) == sha256(src)
    assert os.listdir(dest.parent) == ["model.bin"]  # no temp file left behind

    store.put_bytes("a.txt", b"replaced")  # overwrite in place
    assert store.get_bytes("a.txt") == b"replaced"
    assert store.uri == f"s3://{s3_bucket}/exp"


def test_list_exists_and_delete_prefix(s3_server, s3_bucket):
    store = make_store(s3_server, s3_bucket)
    other = make_store(s3_server, s3_bucket, prefix="other")  # same bucket, own namespace
    keys = ["runs/r/ckpt/000025/w", "runs/r/ckpt/000025/opt/s", "runs/r/ckpt/000100/w", "z"]
    for k in reversed(keys):
        store.put_bytes(k, k.encode())
    other.put_bytes("runs/r/ckpt/000025/w", b"x")

    assert store.list("") == sorted(keys)
    assert store.list("runs/r/ckpt/00") == sorted(keys[:3])  # plain string prefix, as S3
    assert store.list("runs/r/ckpt/0000") == sorted(keys[:2])
    assert store.list("runs/r/ckpt/000025/") == ["runs/r/ckpt/000025/opt/s", "runs/r/ckpt/000025/w"]
    assert store.list("nothing/") == []
    assert store.exists("z") and store.exists("runs/r/ckpt/000025/opt/s")
    assert not store.exists("runs/r/ckpt/000025")  # a "directory" is not an object
    assert not store.exists("missing")

    store.delete_prefix("runs/r/ckpt/000025/")
    assert store.list("") == ["runs/r/ckpt/000100/w", "z"]
    assert other.list("") == ["runs/r/ckpt/000025/w"]  # the other prefix is untouched
    store.delete_prefix("nothing/")  # deleting nothing is fine
    store.delete_prefix("")
    assert store.list("") == []
    assert other.exists("runs/r/ckpt/000025/w")


def test_missing_key_raises_artifact_not_found(s3_server, s3_bucket, tmp_path):
    store = make_store(s3_server, s3_bucket)
    with pytest.raises(ArtifactNotFound, match="nope"):
        store.get_bytes("nope")
    with pytest.raises(ArtifactNotFound):
        store.get_file("dir/nope", tmp_path / "dl" / "nope")
    assert not (tmp_path / "dl" / "nope").exists()
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_missing_bucket_is_a_clear_error_and_create_bucket_makes_it(s3_server, s3_bucket):
    name = f"{s3_bucket}-new"
    store = make_store(s3_server, name)
    for op in (
        lambda: store.put_bytes("k", b"1"),
        lambda: store.list(""),
        lambda: store.exists("k"),
    ):
        with pytest.raises(StoreError, match=f"bucket '{name}' does not exist") as info:
            op()
        assert s3_server.endpoint in str(info.value)
        assert "create_bucket=True" in str(info.value)

    created = S3Store(f"s3://{name}/exp", store.settings, create_bucket=True)
    created.put_bytes("k", b"1")
    assert store.get_bytes("k") == b"1"
    S3Store(f"s3://{name}", store.settings, create_bucket=True)  # idempotent


# --------------------------------------------------------------------------- checkpoints
def _ckpt_dir(root: Path, seed: int) -> Path:
    random_file(root / "model.safetensors", 50_000 + seed)
    (root / "optim").mkdir(parents=True, exist_ok=True)
    (root / "optim" / "state.pt").write_bytes(bytes([seed]) * 1000)
    return root


class CrashOnManifest:
    """Store wrapper whose manifest write dies, as a pod killed at the commit point would."""

    def __init__(self, inner: S3Store) -> None:
        self.inner, self.uri = inner, inner.uri

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("/manifest.json"):
            raise RuntimeError("killed before the manifest")
        self.inner.put_bytes(key, data)


def test_checkpoint_protocol_on_s3(s3_server, s3_bucket, tmp_path):
    store = make_store(s3_server, s3_bucket)
    src = _ckpt_dir(tmp_path / "c10", 10)
    save_checkpoint(store, "run-1", 10, src, {"policy_step": 10})
    save_checkpoint(store, "run-1", 20, _ckpt_dir(tmp_path / "c20", 20), {"policy_step": 20})
    assert list_checkpoints(store, "run-1") == [10, 20]
    assert checkpoint_uri(store, "run-1", 10) == f"s3://{s3_bucket}/exp/runs/run-1/ckpt/000010"

    manifest = load_checkpoint(store, "run-1", 10, tmp_path / "loaded")
    assert manifest["meta"] == {"policy_step": 10}
    assert sha256(tmp_path / "loaded" / "optim" / "state.pt") == sha256(src / "optim" / "state.pt")
    assert sha256(tmp_path / "loaded" / "model.safetensors") == sha256(src / "model.safetensors")

    # A crash before the manifest: files uploaded, step invisible; a retry commits it.
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(CrashOnManifest(store), "run-1", 30, _ckpt_dir(tmp_path / "c30", 30), {})
    assert store.exists("runs/run-1/ckpt/000030/model.safetensors")
    assert list_checkpoints(store, "run-1") == [10, 20]
    assert latest_checkpoint(store, "run-1") == 20
    with pytest.raises(CheckpointError, match="never committed"):
        load_checkpoint(store, "run-1", 30, tmp_path / "l30")
    save_checkpoint(store, "run-1", 30, tmp_path / "c30", {})
    assert latest_checkpoint(store, "run-1") == 30


def test_checkpoint_corruption_is_detected_on_s3(s3_server, s3_bucket, tmp_path):
    store = make_store(s3_server, s3_bucket)
    save_checkpoint(store, "run-c", 5, _ckpt_dir(tmp_path / "c", 5), {})
    key = "runs/run-c/ckpt/000005/optim/state.pt"
    good = store.get_bytes(key)

    store.put_bytes(key, bytes([good[0] ^ 0xFF]) + good[1:])  # same size, other bytes
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(store, "run-c", 5, tmp_path / "l1")
    store.put_bytes(key, good[:-10])  # truncated
    with pytest.raises(CheckpointError, match="bytes"):
        load_checkpoint(store, "run-c", 5, tmp_path / "l2")
    store.delete_prefix(key)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(store, "run-c", 5, tmp_path / "l3")


# --------------------------------------------------------------------------- multipart
def test_multipart_upload_round_trips(s3_server, s3_bucket, tmp_path):
    store = make_store(s3_server, s3_bucket, part_size=5 * MiB)
    src = random_file(tmp_path / "big.bin", 12 * MiB)
    store.put_file("big/model.safetensors", src)

    client = Minio(s3_server.netloc, s3_server.access_key, s3_server.secret_key, secure=False)
    stat = client.stat_object(s3_bucket, "exp/big/model.safetensors")
    assert stat.size == 12 * MiB
    assert stat.etag.endswith("-3")  # S3's multipart ETag: md5-of-parts "-" part count
    store.get_file("big/model.safetensors", tmp_path / "dl" / "big.bin")
    assert sha256(tmp_path / "dl" / "big.bin") == sha256(src)


# --------------------------------------------------------------------------- clear errors
@pytest.mark.timeout(10)  # auth failures are not retried: would take ~15 s with retries
@pytest.mark.parametrize("wrong", ["secret", "access"])
def test_wrong_credentials_give_one_clear_scrubbed_error(s3_server, s3_bucket, wrong):
    secret = "npo-wrong-secret-" + os.urandom(6).hex()
    access = (
        s3_server.access_key if wrong == "secret" else "npo-wrong-access-" + os.urandom(6).hex()
    )
    key = secret if wrong == "secret" else s3_server.secret_key
    store = S3Store(
        f"s3://{s3_bucket}/exp",
        endpoint=s3_server.endpoint,
        access_key=access,
        secret_key=key,
        max_attempts=5,
        retry_backoff=1.0,
    )
    with pytest.raises(StoreError) as info:
        store.put_bytes("k", b"1")
    exc = info.value
    msg = str(exc)
    assert "access denied" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert s3_server.endpoint in msg and repr(s3_bucket) in msg
    assert exc.__cause__ is None and exc.__context__ is None  # one error, no retry stack
    shown = [*exception_texts(exc), repr(store), store.uri, repr(store.settings)]
    for text in shown:
        assert key not in text
        assert access not in text


@pytest.mark.timeout(10)
def test_unreachable_endpoint_fails_fast_and_clearly(s3_bucket):
    port = closed_port()
    store = S3Store(
        f"s3://{s3_bucket}/exp",
        endpoint=f"http://127.0.0.1:{port}",
        access_key="a-key",
        secret_key="a-secret-value",
        **FAST,
    )
    with pytest.raises(StoreError) as info:
        store.get_bytes("k")
    msg = str(info.value)
    assert f"cannot reach http://127.0.0.1:{port} (connection refused)" in msg
    assert repr(s3_bucket) in msg and "gave up after 2 attempts" in msg
    assert all("a-secret-value" not in t for t in exception_texts(info.value))


# --------------------------------------------------------------------------- outages
@pytest.mark.timeout(60)
@pytest.mark.slow  # stops and restarts the server
def test_upload_survives_a_server_outage(s3_server, s3_bucket, tmp_path):
    # Retries span ~8 s (0.2, 0.4, 0.8, then 1 s each); the server is back after ~3 s.
    store = make_store(
        s3_server, s3_bucket, part_size=5 * MiB, max_attempts=12, retry_backoff=0.2,
        retry_backoff_max=1.0,
    )  # fmt: skip
    store.put_bytes("before", b"kept")
    src = random_file(tmp_path / "ckpt.bin", 6 * MiB)  # multipart
    result: list[BaseException | None] = []

    def upload() -> None:
        try:
            store.put_file("ckpt.bin", src)
            result.append(None)
        except BaseException as e:
            result.append(e)

    s3_server.stop(grace=0)  # crash: SIGKILL
    try:
        worker = threading.Thread(target=upload)
        worker.start()
        time.sleep(2.0)
        assert worker.is_alive(), f"upload ended while the server was down: {result}"
    finally:
        s3_server.start()
    worker.join(30)
    assert result == [None]
    store.get_file("ckpt.bin", tmp_path / "dl.bin")
    assert sha256(tmp_path / "dl.bin") == sha256(src)
    assert store.get_bytes("before") == b"kept"  # data written before the crash survived


@pytest.mark.timeout(60)
@pytest.mark.slow  # stops and restarts the server
def test_outage_longer_than_retries_fails_cleanly_then_rerun_completes(
    s3_server, s3_bucket, tmp_path
):
    store = make_store(s3_server, s3_bucket, part_size=5 * MiB)
    src = random_file(tmp_path / "ckpt.bin", 6 * MiB)
    s3_server.stop(grace=0)
    try:
        with pytest.raises(StoreError, match=r"cannot reach .*gave up after 2 attempts"):
            store.put_file("runs/r/ckpt.bin", src)
    finally:
        s3_server.start()
    assert store.list("runs/") == []  # nothing partial under the final key
    store.put_file("runs/r/ckpt.bin", src)  # the KFP retry
    store.get_file("runs/r/ckpt.bin", tmp_path / "dl.bin")
    assert sha256(tmp_path / "dl.bin") == sha256(src)


class ResetProxy:
    """TCP proxy to the S3 server that RSTs connections once they carry ``after`` request
    bytes, ``resets_left`` times: a connection reset in the middle of an upload."""

    def __init__(self, upstream_port: int, after: int, resets_left: int) -> None:
        self.upstream_port, self.after, self.resets_left = upstream_port, after, resets_left
        self.resets = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_reset(self) -> bool:
        with self._lock:
            if self.resets_left <= 0:
                return False
            self.resets_left -= 1
            self.resets += 1
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        back.start()
        sent = 0
        try:
            while data := client.recv(1 << 16):
                sent += len(data)
                if sent > self.after and self._take_reset():
                    for s in (client, upstream):  # linger 0: close sends RST, not FIN
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                upstream.sendall(data)
            else:
                upstream.shutdown(socket.SHUT_WR)
                back.join(10)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def reset_proxy(s3_server):
    proxy = ResetProxy(s3_server.ports["s3.port"], after=1 * MiB, resets_left=0)
    yield proxy
    proxy.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [3 * MiB, 7 * MiB], ids=["single-put", "multipart"])
def test_connection_reset_mid_upload_is_retried(s3_server, s3_bucket, tmp_path, reset_proxy, size):
    reset_proxy.resets_left = 1
    # http_retries=0: the operation-level loop alone has to redo the upload.
    store = make_store(
        s3_server, s3_bucket, endpoint=reset_proxy.endpoint, part_size=5 * MiB,
        max_attempts=3, parallel_uploads=1,
    )  # fmt: skip
    src = random_file(tmp_path / "w.bin", size)
    store.put_file("w.bin", src)
    assert reset_proxy.resets == 1
    store.get_file("w.bin", tmp_path / "dl.bin")
    assert sha256(tmp_path / "dl.bin") == sha256(src)


@pytest.mark.timeout(60)
def test_resets_outlasting_retries_leave_nothing_partial(
    s3_server, s3_bucket, tmp_path, reset_proxy
):
    reset_proxy.resets_left = 10**6  # every large request dies mid-body
    store = make_store(
        s3_server, s3_bucket, endpoint=reset_proxy.endpoint, part_size=5 * MiB,
        parallel_uploads=1,
    )  # fmt: skip
    src = random_file(tmp_path / "w.bin", 7 * MiB)
    with pytest.raises(StoreError, match=r"\(connection (reset|dropped)\).*gave up after 2"):
        store.put_file("ckpt/w.bin", src)
    assert not store.exists("ckpt/w.bin")
    assert store.list("ckpt/") == []
    reset_proxy.resets_left = 0  # the network heals; the retry completes
    store.put_file("ckpt/w.bin", src)
    assert store.get_bytes("ckpt/w.bin") == src.read_bytes()


# --------------------------------------------------------------------------- settings
def test_settings_from_env_precedence():
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "https://s3-specific:9000",
        "S3_ENDPOINT_URL": "http://other:2",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "us-west-2",
        "NPO_S3_MAX_ATTEMPTS": "7",
        "NPO_S3_CONNECT_TIMEOUT": "1.5",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint, s.secure, s.netloc) == (
        "https://s3-specific:9000",
        True,
        "s3-specific:9000",
    )
    assert (s.access_key, s.secret_key, s.region) == ("AK", "SK", "us-west-2")
    assert (s.max_attempts, s.connect_timeout) == (7, 1.5)
    assert "SK" not in repr(s) and "AK" not in repr(s)

    del env["AWS_ENDPOINT_URL_S3"], env["AWS_ENDPOINT_URL"], env["AWS_REGION"]
    s = S3Settings.from_env(env, max_attempts=2, secret_key="override")
    assert (s.endpoint, s.secure, s.region) == ("http://other:2", False, "eu-west-1")
    assert (s.max_attempts, s.secret_key) == (2, "override")
    only_mlflow = {"MLFLOW_S3_ENDPOINT_URL": "http://mlflow-minio:9000"}
    assert S3Settings.from_env(only_mlflow).endpoint == "http://mlflow-minio:9000"
    assert S3Settings.from_env({}).endpoint == "https://s3.amazonaws.com"
    assert S3Settings.from_env({"NPO_S3_INSECURE": "1"}).insecure

    for bad in ("minio:9000", "ftp://x", "http://u:p@host:1", "http://host/path"):
        with pytest.raises(ValueError):
            S3Settings.from_env({}, endpoint=bad)
    with pytest.raises(ValueError, match="both"):
        S3Settings.from_env({"AWS_ACCESS_KEY_ID": "AK"})
    with pytest.raises(ValueError, match="part_size"):
        S3Settings.from_env({}, part_size=1 * MiB)


def test_open_store_builds_s3_store_from_env(s3_server, s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("NPO_S3_MAX_ATTEMPTS", "2")

    store = open_store(f"s3://{s3_bucket}/exp1/")
    assert isinstance(store, S3Store)
    assert store.uri == f"s3://{s3_bucket}/exp1"
    assert store.settings.endpoint == s3_server.endpoint and store.settings.max_attempts == 2
    assert s3_server.secret_key not in repr(store)
    save_checkpoint(store, "r", 1, _ckpt_dir(tmp_path / "c", 1), {})
    assert list_checkpoints(open_store(f"s3://{s3_bucket}/exp1"), "r") == [1]
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("s3:///no-bucket")
