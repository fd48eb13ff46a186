"""LocalStore round trips, key safety, scheme dispatch, and atomic writes."""

from pathlib import Path

import pytest

import npo.store.artifacts as artifacts
from npo.store.artifacts import ArtifactNotFound, ArtifactStore, LocalStore, open_store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_bytes_round_trip_and_overwrite(store: LocalStore) -> None:
    store.put_bytes("runs/r1/a.txt", b"hello")
    assert store.get_bytes("runs/r1/a.txt") == b"hello"
    store.put_bytes("runs/r1/a.txt", b"bye")
    assert store.get_bytes("runs/r1/a.txt") == b"bye"
    assert isinstance(store, ArtifactStore)


def test_file_round_trip_creates_parent_dirs(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    store.put_file("runs/r1/ckpt/000001/w.bin", src)
    dest = tmp_path / "deep" / "er" / "w.bin"
    store.get_file("runs/r1/ckpt/000001/w.bin", dest)
    assert dest.read_bytes() == src.read_bytes()


def test_missing_key_raises_artifact_not_found(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound, match="nope"):
        store.get_bytes("nope")
    with pytest.raises(KeyError):  # ArtifactNotFound is a KeyError
        store.get_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_exists_list_and_prefixes(store: LocalStore) -> None:
    for key in ["runs/a/ckpt/000002/m", "runs/a/ckpt/000010/m", "runs/a/x", "runs/ab/y", "top"]:
        store.put_bytes(key, b"1")
    assert store.exists("runs/a/x")
    assert not store.exists("runs/a")  # a "directory" is not an object
    assert not store.exists("runs/a/zz")
    assert store.list("runs/a/") == ["runs/a/ckpt/000002/m", "runs/a/ckpt/000010/m", "runs/a/x"]
    # Plain string prefix, as in S3: "runs/a" also matches "runs/ab/...".
    assert store.list("runs/a") == [
        "runs/a/ckpt/000002/m",
        "runs/a/ckpt/000010/m",
        "runs/a/x",
        "runs/ab/y",
    ]
    assert store.list("runs/a/ckpt/00001") == ["runs/a/ckpt/000010/m"]
    assert store.list("")[-2:] == ["runs/ab/y", "top"] and len(store.list("")) == 5
    assert store.list("missing/") == []
    assert LocalStore(store.root / "never-created").list("") == []


def test_delete_prefix(store: LocalStore) -> None:
    for key in ["runs/a/1", "runs/a/sub/2", "runs/b/3"]:
        store.put_bytes(key, b"1")
    store.delete_prefix("runs/a/")
    assert store.list("") == ["runs/b/3"]
    assert not (store.root / "runs" / "a").exists()  # empty folders pruned
    store.delete_prefix("runs/nothing/")  # no-op


@pytest.mark.parametrize(
    "key", ["../escape", "runs/../../escape", "/etc/passwd", "a//b", "a/./b", "", "a\\b"]
)
def test_escaping_keys_rejected(store: LocalStore, key: str) -> None:
    with pytest.raises(ValueError, match="artifact key"):
        store.put_bytes(key, b"x")
    assert not (store.root.parent / "escape").exists()


def test_open_store_schemes(tmp_path: Path) -> None:
    s = open_store(f"file://{tmp_path}/a")
    assert isinstance(s, LocalStore) and s.root == tmp_path / "a"
    assert s.uri == (tmp_path / "a").as_uri()
    s.put_bytes("k", b"v")
    assert open_store(str(tmp_path / "a")).get_bytes("k") == b"v"  # plain path, same root
    from npo.store.s3 import S3Store

    s3 = open_store("s3://bucket/prefix")  # no network call until first use
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="gopher://x"):
        open_store("gopher://x")
    with pytest.raises(ValueError, match="absolute"):
        open_store("file://relative/path")


def test_interrupted_write_leaves_no_partial_object(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(b"N" * 10_000)
    store.put_bytes("runs/r/w.bin", b"OLD")

    def crash_midway(fsrc, fdst, length=0):
        fdst.write(fsrc.read(100))  # some bytes land on disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.shutil, "copyfileobj", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        store.put_file("runs/r/w.bin", src)
    with pytest.raises(OSError, match="disk full"):
        store.put_file("runs/r/new.bin", src)
    assert store.get_bytes("runs/r/w.bin") == b"OLD"  # old object intact
    assert not store.exists("runs/r/new.bin")
    assert store.list("runs/") == ["runs/r/w.bin"]
    assert sorted(p.name for p in (store.root / "runs" / "r").iterdir()) == ["w.bin"]  # no temps
