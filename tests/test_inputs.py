"""Inputs by URI (npo.store.inputs): staging a folder or file, fetching it back, the cache.

The store is a file:// one here; tests/test_e2e_real_model.py does the same over S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npo.store.artifacts import LocalStore
from npo.store.inputs import InputError, fetch_file, fetch_folder, stage


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 10)
    (folder / "sub" / "tok.json").write_text("{}")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }


def test_local_paths_pass_through_untouched(tmp_path, cache):
    assert fetch_file("data/train.jsonl") == Path("data/train.jsonl")
    assert fetch_folder(str(tmp_path)) == tmp_path
    assert not cache.exists()


def test_staged_folder_comes_back_identical_and_reports_its_size(tmp_path, model_dir):
    uri = (tmp_path / "store").as_uri() + "/models/m1"
    seen: list[tuple[str, int]] = []
    done = stage(model_dir, uri, lambda rel, size: seen.append((rel, size)))
    assert done == {"uri": uri, "files": 3, "bytes": 2560 + 8 + 2}
    assert sorted(seen) == [("config.json", 8), ("sub/tok.json", 2), ("weights.bin", 2560)]
    manifest = json.loads((tmp_path / "store/models/m1/manifest.json").read_text())
    assert manifest["source"] == "model" and set(manifest["files"]) == set(files_of(model_dir))
    local = fetch_folder(uri)
    assert files_of(local) == files_of(model_dir)


def test_a_second_fetch_reuses_the_cache_until_the_folder_is_restaged(
    tmp_path, model_dir, monkeypatch
):
    uri = (tmp_path / "store").as_uri() + "/m"
    stage(model_dir, uri)
    first = fetch_folder(uri)
    downloads: list[str] = []
    real_get = LocalStore.get_file

    def counting_get(self, key, path):
        downloads.append(key)
        return real_get(self, key, path)

    monkeypatch.setattr(LocalStore, "get_file", counting_get)
    assert fetch_folder(uri) == first
    assert downloads == []  # only the manifest was read
    (model_dir / "config.json").write_text('{"a": 2}')
    stage(model_dir, uri)
    again = fetch_folder(uri)
    assert (again / "config.json").read_text() == '{"a": 2}'
    assert sorted(downloads) == ["config.json", "sub/tok.json", "weights.bin"]


def test_a_corrupted_object_is_refused_and_leaves_no_cache_entry(tmp_path, model_dir, cache):
    uri = (tmp_path / "store").as_uri() + "/m"
    stage(model_dir, uri)
    (tmp_path / "store/m/weights.bin").write_bytes(b"\0" * 2560)  # same size, other bytes
    with pytest.raises(InputError, match=r"file 'weights.bin' sha256 .* does not match"):
        fetch_folder(uri)
    assert [p.name for p in cache.iterdir()] == []  # the half-made entry is gone


def test_a_fetch_that_loses_the_race_to_another_uses_its_copy(
    tmp_path, model_dir, cache, monkeypatch
):
    import os

    uri = (tmp_path / "store").as_uri() + "/m"
    stage(model_dir, uri)

    real_replace = os.replace

    def racing(src, dst):  # the other process's fetch lands first, then ours fails
        if not Path(src).name.startswith(".m-"):  # a file's atomic write, not the folder's
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", real_replace)
        fetch_folder(uri)
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(os, "replace", racing)
    local = fetch_folder(uri)
    assert files_of(local) == files_of(model_dir)
    assert [p.name for p in cache.iterdir()] == [local.name]  # our temp copy is gone


def test_a_folder_copied_in_without_a_manifest_is_fetched_whole(tmp_path, model_dir):
    store = LocalStore(tmp_path / "store")
    for rel, data in files_of(model_dir).items():
        store.put_bytes(f"plain/{rel}", data)
    local = fetch_folder((tmp_path / "store").as_uri() + "/plain")
    assert files_of(local) == files_of(model_dir)


def test_restaging_a_folder_drops_files_it_no_longer_has(tmp_path, model_dir):
    uri = (tmp_path / "store").as_uri() + "/m"
    stage(model_dir, uri)
    (model_dir / "sub" / "tok.json").unlink()
    stage(model_dir, uri)
    assert sorted(files_of(fetch_folder(uri))) == ["config.json", "weights.bin"]


def test_a_staged_file_comes_back(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text('{"prompt": "1+1", "answer": "2"}\n')
    uri = (tmp_path / "store").as_uri() + "/datasets/train.jsonl"
    assert stage(src, uri) == {"uri": uri, "files": 1, "bytes": src.stat().st_size}
    local = fetch_file(uri)
    assert local.name == "train.jsonl" and local.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda root: fetch_file(f"{root}/nope.jsonl"), "nope.jsonl: no such object"),
        (lambda root: fetch_folder(f"{root}/empty"), "empty: no objects under this prefix"),
        (lambda root: fetch_file("gs://bucket/x.jsonl"), "unsupported artifact store URI"),
        (lambda root: fetch_file("s3://bucket"), "names a bucket, not an object"),
        (lambda root: stage(Path("/no/such/dir"), f"{root}/m"), "/no/such/dir: no such file"),
        (lambda root: stage(Path("."), "s3://bucket"), "names a bucket"),
        (lambda root: stage(Path("."), "/local/path"), "must be a store URI"),
    ],
    ids=["missing-file", "empty-prefix", "scheme", "bucket-file", "no-source", "bucket", "path"],
)
def test_bad_inputs_name_the_problem(tmp_path, call, message):
    (tmp_path / "store").mkdir()
    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        call((tmp_path / "store").as_uri())


def test_npo_stage_uploads_and_refuses_bad_input_with_exit_2(tmp_path, model_dir):
    from typer.testing import CliRunner

    from npo.cli import app

    uri = (tmp_path / "store").as_uri() + "/models/m"
    done = CliRunner().invoke(app, ["stage", str(model_dir), uri])
    assert done.exit_code == 0, done.output
    assert f"{model_dir} -> {uri}: 3 files, 0.0 MB" in done.stdout
    assert files_of(fetch_folder(uri)) == files_of(model_dir)
    refused = CliRunner().invoke(app, ["stage", str(tmp_path / "nope"), uri])
    assert refused.exit_code == 2
    assert f"error: {tmp_path / 'nope'}: no such file or folder" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.output


def test_npo_stage_to_a_bad_bucket_name_exits_2_without_a_traceback(tmp_path):
    """The S3 SDK refuses a bucket name before any request (here: shorter than 3)."""
    pytest.importorskip("minio")
    from typer.testing import CliRunner

    from npo.cli import app

    config = tmp_path / "exp.yaml"
    config.write_text("name: x\n")
    refused = CliRunner().invoke(app, ["stage", str(config), "s3://b/k"])
    assert refused.exit_code == 2, refused.output
    assert "error: s3://b/k: invalid bucket name b" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.output
