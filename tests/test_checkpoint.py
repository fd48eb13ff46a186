"""Checkpoint commit protocol: manifest last, crash safety, and verification on load."""

import json
from pathlib import Path

import pytest

from npo.store.artifacts import LocalStore
from npo.store.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_prefix,
    checkpoint_uri,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    manifest_digest,
    read_manifest,
    save_checkpoint,
)


def make_ckpt(root: Path, tag: str) -> Path:
    """A small checkpoint folder with a nested file, contents tagged so saves differ."""
    (root / "optim").mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(f"weights-{tag}".encode() * 100)
    (root / "config.json").write_text(json.dumps({"tag": tag}))
    (root / "optim" / "state.pt").write_bytes(f"adam-{tag}".encode())
    return root


class CrashBeforeManifest(LocalStore):
    """A store whose process dies right before the commit (the manifest put)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("/" + MANIFEST):
            raise RuntimeError("killed before commit")
        super().put_bytes(key, data)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_prefix_layout_and_validation(store: LocalStore) -> None:
    assert checkpoint_prefix("run-1", 25) == "runs/run-1/ckpt/000025"
    assert checkpoint_uri(store, "run-1", 25) == f"{store.uri}/runs/run-1/ckpt/000025"
    for bad in ["", "a/b", ".."]:
        with pytest.raises(ValueError, match="run_id"):
            checkpoint_prefix(bad, 1)
    with pytest.raises(ValueError, match="step"):
        checkpoint_prefix("r", -1)


def test_save_load_round_trip(store: LocalStore, tmp_path: Path) -> None:
    src = make_ckpt(tmp_path / "src", "a")
    manifest = save_checkpoint(store, "r", 25, src, {"policy_step": 25, "reward": 0.5})
    assert manifest["run_id"] == "r" and manifest["step"] == 25
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "optim/state.pt"]
    assert manifest["files"]["optim/state.pt"]["size"] == len(b"adam-a")
    assert manifest["meta"] == {"policy_step": 25, "reward": 0.5}
    assert store.exists("runs/r/ckpt/000025/optim/state.pt")
    assert read_manifest(store, "r", 25) == manifest
    assert manifest_digest(read_manifest(store, "r", 25)) == manifest_digest(manifest)

    dest = tmp_path / "dest"
    assert load_checkpoint(store, "r", 25, dest) == manifest
    for rel in manifest["files"]:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()


def test_manifest_is_written_last(store: LocalStore, tmp_path: Path) -> None:
    order: list[str] = []
    put_file, put_bytes = store.put_file, store.put_bytes
    store.put_file = lambda k, p: (order.append(k), put_file(k, p))[1]  # type: ignore[method-assign]
    store.put_bytes = lambda k, d: (order.append(k), put_bytes(k, d))[1]  # type: ignore[method-assign]
    save_checkpoint(store, "r", 1, make_ckpt(tmp_path / "src", "a"), {})
    assert order[-1] == "runs/r/ckpt/000001/manifest.json" and len(order) == 4


def test_crash_before_manifest_is_invisible(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    save_checkpoint(store, "r", 10, make_ckpt(tmp_path / "s10", "10"), {})
    crashing = CrashBeforeManifest(store.root)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(crashing, "r", 20, make_ckpt(tmp_path / "s20", "20"), {})
    assert store.exists("runs/r/ckpt/000020/model.safetensors")  # files did land...
    assert list_checkpoints(store, "r") == [10]  # ...but the step is not committed
    assert latest_checkpoint(store, "r") == 10
    with pytest.raises(CheckpointError, match="step 20"):
        load_checkpoint(store, "r", 20, tmp_path / "dest")

    # The retry (e.g. KFP re-running the step) commits cleanly over the leftovers.
    save_checkpoint(store, "r", 20, make_ckpt(tmp_path / "s20b", "20b"), {"retry": True})
    assert list_checkpoints(store, "r") == [10, 20]
    m = load_checkpoint(store, "r", 20, tmp_path / "dest")
    assert m["meta"] == {"retry": True}
    assert (tmp_path / "dest" / "optim" / "state.pt").read_bytes() == b"adam-20b"


def test_resave_same_step_replaces_files(store: LocalStore, tmp_path: Path) -> None:
    save_checkpoint(store, "r", 5, make_ckpt(tmp_path / "a", "a"), {"v": 1})
    only = tmp_path / "b"
    only.mkdir()
    (only / "model.safetensors").write_bytes(b"new")
    m = save_checkpoint(store, "r", 5, only, {"v": 2})
    assert list(m["files"]) == ["model.safetensors"]
    assert store.list("runs/r/ckpt/000005/") == [
        "runs/r/ckpt/000005/manifest.json",
        "runs/r/ckpt/000005/model.safetensors",
    ]  # files of the first attempt are gone
    assert load_checkpoint(store, "r", 5, tmp_path / "d")["meta"] == {"v": 2}
    assert list_checkpoints(store, "r") == [5]


def test_list_and_latest(store: LocalStore, tmp_path: Path) -> None:
    assert list_checkpoints(store, "r") == [] and latest_checkpoint(store, "r") is None
    src = make_ckpt(tmp_path / "src", "x")
    for step in [100, 7, 1_000_000, 25]:  # 7-digit step still sorts numerically
        save_checkpoint(store, "r", step, src, {})
    save_checkpoint(store, "other", 999, src, {})
    store.put_bytes("runs/r/ckpt/notes/manifest.json", b"{}")  # not a step folder
    assert list_checkpoints(store, "r") == [7, 25, 100, 1_000_000]
    assert latest_checkpoint(store, "r") == 1_000_000


def test_corrupted_file_named_in_error(store: LocalStore, tmp_path: Path) -> None:
    save_checkpoint(store, "r", 3, make_ckpt(tmp_path / "src", "a"), {})
    path = store.root / "runs/r/ckpt/000003/optim/state.pt"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step 3: file 'optim/state.pt' sha256"):
        load_checkpoint(store, "r", 3, tmp_path / "dest")


def test_truncated_file_is_size_mismatch(store: LocalStore, tmp_path: Path) -> None:
    save_checkpoint(store, "r", 3, make_ckpt(tmp_path / "src", "a"), {})
    path = store.root / "runs/r/ckpt/000003/model.safetensors"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"'model.safetensors' has 10 bytes, manifest says"):
        load_checkpoint(store, "r", 3, tmp_path / "dest")


def test_missing_file_and_bad_sources(store: LocalStore, tmp_path: Path) -> None:
    save_checkpoint(store, "r", 4, make_ckpt(tmp_path / "src", "a"), {})
    (store.root / "runs/r/ckpt/000004/config.json").unlink()
    with pytest.raises(CheckpointError, match=r"'config\.json' is missing"):
        load_checkpoint(store, "r", 4, tmp_path / "dest")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(store, "r", 5, tmp_path / "nope", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no files"):
        save_checkpoint(store, "r", 5, tmp_path / "empty", {})
    bad = make_ckpt(tmp_path / "bad", "a")
    (bad / MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match=MANIFEST):
        save_checkpoint(store, "r", 5, bad, {})
    with pytest.raises(TypeError):  # meta must be JSON; nothing was written
        save_checkpoint(store, "r", 5, make_ckpt(tmp_path / "ok", "a"), {"x": object()})
    assert store.list("runs/r/ckpt/000005") == []


def test_manifest_for_another_step_rejected(store: LocalStore, tmp_path: Path) -> None:
    save_checkpoint(store, "r", 1, make_ckpt(tmp_path / "src", "a"), {})
    store.put_bytes(
        "runs/r/ckpt/000002/manifest.json", store.get_bytes("runs/r/ckpt/000001/manifest.json")
    )
    with pytest.raises(CheckpointError, match="step 2"):
        read_manifest(store, "r", 2)
