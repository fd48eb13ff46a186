"""A run's inputs by URI: the starting model folder and the dataset files.

`model.source`, `task.train_path` and `task.eval_path` name either a local path or an
object in a store (``s3://bucket/key``, ``file:///abs/path``). A cluster's pods share no
disk, so a real model and its datasets go into the object store once, with ``npo stage``,
and every pod that needs them fetches its own copy:

    npo stage ./Qwen2.5-Math-1.5B s3://npo/models/qwen2.5-math-1.5b   # a folder
    npo stage train.jsonl s3://npo/datasets/math/train.jsonl          # a file

A staged folder gets a ``manifest.json`` (sizes and sha256), written last, as checkpoints
do: its fetch checks every file and is kept in a local cache that the next fetch reuses
while the manifest is unchanged. A folder copied into the bucket by other tools (no
manifest) is fetched whole, unchecked, each time. Files are small and fetched each time.

The cache is ``$NPO_CACHE_DIR``, else ``<system temp>/npo-cache``; entries appear by rename,
so a fetch cut short never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npo.store.artifacts import ArtifactNotFound, ArtifactStore, open_store
from npo.store.checkpoint import (
    MANIFEST,
    CheckpointError,
    commit_folder,
    fetch_folder_files,
    manifest_digest,
)

CACHE_ENV = "NPO_CACHE_DIR"


class InputError(RuntimeError):
    """An input that cannot be fetched or staged; the message names its URI."""


def is_uri(ref: str) -> bool:
    """Whether `ref` names a store object (``scheme://...``) rather than a local path."""
    return "://" in ref


def cache_root() -> Path:
    """Where fetched inputs are kept: ``$NPO_CACHE_DIR`` or ``<temp>/npo-cache``."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "npo-cache")


def _split(uri: str) -> tuple[str, str]:
    """``s3://b/a/f.jsonl`` -> (``s3://b/a``, ``f.jsonl``): the store and the object's key."""
    base, _, name = uri.rstrip("/").rpartition("/")
    if base.endswith(":/") or not name:  # "s3://bucket" splits into "s3:/" and "bucket"
        raise InputError(f"{uri}: names a bucket, not an object or a folder in it")
    return base, name


def _open(uri: str) -> ArtifactStore:
    try:
        return open_store(uri)
    except (ValueError, ImportError) as e:
        raise InputError(f"{uri}: {e}") from None


def _entry(uri: str, name: str) -> Path:
    """The cache folder of `uri`: readable name, digest for uniqueness."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / f"{name}-{digest}"


def fetch_file(ref: str) -> Path:
    """Local path of the file `ref` names: the path itself, or a fresh download of the URI."""
    if not is_uri(ref):
        return Path(ref)
    store_uri, key = _split(ref)
    store = _open(store_uri)
    dest = _entry(ref, key) / key
    try:
        store.get_file(key, dest)  # atomic: a cut-short download never replaces `dest`
    except ArtifactNotFound:
        raise InputError(f"{ref}: no such object") from None
    return dest


def fetch_folder(ref: str) -> Path:
    """Local folder of `ref`: the path itself, or the URI's files fetched into the cache."""
    if not is_uri(ref):
        return Path(ref)
    entry = _entry(ref, _split(ref)[1])
    store = _open(ref)
    try:
        manifest = json.loads(store.get_bytes(MANIFEST))
    except ArtifactNotFound:
        manifest = None
    except json.JSONDecodeError as e:
        raise InputError(f"{ref}: unreadable {MANIFEST}: {e}") from None
    if manifest is not None and _cached(entry, manifest):
        return entry
    if manifest is None:
        keys = [k for k in store.list("") if not k.endswith("/")]
        if not keys:
            raise InputError(f"{ref}: no objects under this prefix")
        manifest = {"files": {k: None for k in keys}}
    return _download(store, ref, manifest, entry)


def _cached(entry: Path, manifest: dict[str, Any]) -> bool:
    try:
        kept = json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest_digest(kept) == manifest_digest(manifest)


def _download(store: ArtifactStore, ref: str, manifest: dict[str, Any], entry: Path) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        if all(want is None for want in manifest["files"].values()):
            for key in manifest["files"]:
                store.get_file(key, work.joinpath(*key.split("/")))
        else:
            fetch_folder_files(store, "", manifest, work, ref)
            (work / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(work, entry)  # the entry appears whole or not at all
        except OSError:
            # another process put the same folder there meanwhile: use its copy if complete
            if not _cached(entry, manifest):
                raise
    except CheckpointError as e:
        raise InputError(str(e)) from None
    except ArtifactNotFound as e:
        raise InputError(f"{ref}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def stage(
    local: Path, uri: str, on_file: Callable[[str, int], None] | None = None
) -> dict[str, Any]:
    """Upload a file or a folder (manifest last) to `uri`; returns {uri, files, bytes}.
    ``on_file(relative path, bytes)`` follows the uploads."""
    if not is_uri(uri):
        raise InputError(f"{uri}: the destination must be a store URI (s3://bucket/key)")
    if local.is_file():
        store_uri, key = _split(uri)
        _open(store_uri).put_file(key, local)
        if on_file is not None:
            on_file(local.name, local.stat().st_size)
        return {"uri": uri, "files": 1, "bytes": local.stat().st_size}
    if not local.is_dir():
        raise InputError(f"{local}: no such file or folder")
    _split(uri)  # a key below the bucket: staging replaces what is under it
    try:
        manifest = commit_folder(_open(uri), "", local, {"source": local.name}, {}, on_file)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    sizes = [f["size"] for f in manifest["files"].values()]
    return {"uri": uri, "files": len(sizes), "bytes": sum(sizes)}
