"""Checkpoint commit protocol on top of an ``ArtifactStore``: a half-written one is never used.

Layout, one folder per (run, step), step zero-padded so keys sort by step::

    runs/<run_id>/ckpt/<step:06d>/model.safetensors     # whatever files the trainer wrote,
    runs/<run_id>/ckpt/<step:06d>/optim/state.pt        # uploaded first (nested dirs kept)
    runs/<run_id>/ckpt/<step:06d>/manifest.json         # written LAST: the commit record

A step exists only once its ``manifest.json`` does. The manifest lists every file with its
size and sha256, so ``load_checkpoint`` detects missing, truncated or corrupted files and
refuses them. A crash before the manifest write leaves an invisible step that the next
``save_checkpoint`` of that step (a KFP retry) overwrites.

    store = open_store("file:///tmp/npo-artifacts")
    manifest = save_checkpoint(store, "run-1", 25, Path("out/ckpt"), {"policy_step": 25})
    step = latest_checkpoint(store, "run-1")
    load_checkpoint(store, "run-1", step, Path("work/ckpt"), db)

The manifest next to the files proves they are intact, not that they are what training
wrote: whoever can write the bucket can rewrite both. So the committing process also records
the manifest's digest in the metadata DB (``npo.training.history.record_checkpoint``), and
``read_manifest`` / ``load_checkpoint`` given that DB refuse a manifest it did not record
(``verify_recorded``). Without a DB (tools holding only a store, the store's own tests) they
check the files against the manifest alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from npo.store.artifacts import ArtifactNotFound, ArtifactStore

if TYPE_CHECKING:  # not at runtime: the GPU image loads checkpoints without SQLAlchemy
    from npo.store.metadata import CheckpointRow, MetadataDB

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match its manifest."""


class CheckpointNotRecorded(CheckpointError):
    """A checkpoint's manifest is not the one the metadata DB recorded at commit: changed
    since (files and manifest rewritten together) or never committed by a training process."""


def _ckpt_root(run_id: str) -> str:
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ValueError(f"run_id {run_id!r} must be a single non-empty path segment")
    return f"runs/{run_id}/ckpt"


def checkpoint_prefix(run_id: str, step: int) -> str:
    """Key prefix (no trailing '/') of a checkpoint: ``runs/<run_id>/ckpt/<step:06d>``."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{_ckpt_root(run_id)}/{step:06d}"


def checkpoint_uri(store: ArtifactStore, run_id: str, step: int) -> str:
    """Full URI of a checkpoint folder, e.g. for the metadata DB's ``checkpoints.uri``."""
    return f"{store.uri.rstrip('/')}/{checkpoint_prefix(run_id, step)}"


def _join(prefix: str, rel: str) -> str:
    """Key of `rel` under `prefix` ('' = the store's root, e.g. a staged input's URI)."""
    return f"{prefix}/{rel}" if prefix else rel


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest as stored (canonical JSON); the DB records it."""
    return hashlib.sha256(_manifest_bytes(manifest)).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(
    store: ArtifactStore, run_id: str, step: int, local_dir: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Upload every file under ``local_dir``, then commit by writing the manifest; return it.

    ``meta`` must be JSON-serialisable. Re-saving a step first retracts its old manifest
    (the step turns invisible), clears its files, then uploads afresh, so a retry after a
    crash never mixes files of two attempts.
    """
    header = {"run_id": run_id, "step": step}
    return commit_folder(store, checkpoint_prefix(run_id, step), Path(local_dir), header, meta)


def commit_folder(
    store: ArtifactStore,
    prefix: str,
    local_dir: Path,
    header: dict[str, Any],
    meta: dict[str, Any],
    on_file: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Upload ``local_dir`` under ``prefix``, then write its manifest (``header``, file sizes
    and sha256, ``meta``) LAST; return the manifest. Errors name ``header``'s step or prefix.
    ``on_file(relative path, bytes)`` is called after each upload (progress)."""
    what = f"step {header['step']}" if "step" in header else (prefix or store.uri)
    if not local_dir.is_dir():
        raise CheckpointError(f"{what}: source {local_dir} is not a directory")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise CheckpointError(f"{what}: source {local_dir} has no files")
    rels = [p.relative_to(local_dir).as_posix() for p in files]
    if MANIFEST in rels:
        raise CheckpointError(f"{what}: {local_dir} contains a file named {MANIFEST}")
    body = json.dumps(meta)  # fail before touching the store if meta is not JSON

    store.delete_prefix(_join(prefix, MANIFEST))  # retract first: the folder is now invisible
    store.delete_prefix(_join(prefix, ""))
    entries: dict[str, dict[str, Any]] = {}
    for path, rel in zip(files, rels, strict=True):
        entries[rel] = {"size": path.stat().st_size, "sha256": _file_sha256(path)}
        store.put_file(_join(prefix, rel), path)
        if on_file is not None:
            on_file(rel, entries[rel]["size"])
    manifest = {
        **header,
        "created_at": datetime.now(UTC).isoformat(),
        "files": entries,
        "meta": json.loads(body),
    }
    store.put_bytes(_join(prefix, MANIFEST), _manifest_bytes(manifest))  # the commit point
    return manifest


def list_checkpoints(store: ArtifactStore, run_id: str) -> list[int]:
    """Steps of ``run_id`` that are committed (have a manifest), ascending."""
    root = f"{_ckpt_root(run_id)}/"
    steps = []
    for key in store.list(root):
        step_dir, sep, name = key[len(root) :].partition("/")
        if sep and name == MANIFEST and step_dir.isdigit():
            steps.append(int(step_dir))
    return sorted(steps)


def latest_checkpoint(store: ArtifactStore, run_id: str) -> int | None:
    """Highest committed step of ``run_id``, or None when it has none."""
    steps = list_checkpoints(store, run_id)
    return steps[-1] if steps else None


def read_manifest(
    store: ArtifactStore, run_id: str, step: int, db: MetadataDB | None = None
) -> dict[str, Any]:
    """The manifest of a committed checkpoint; CheckpointError if it is absent or malformed,
    and with `db`, CheckpointNotRecorded if it is not the one the DB recorded."""
    key = f"{checkpoint_prefix(run_id, step)}/{MANIFEST}"
    try:
        manifest = json.loads(store.get_bytes(key))
    except ArtifactNotFound:
        raise CheckpointError(
            f"run {run_id!r} step {step}: no {MANIFEST} (checkpoint missing or never committed)"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"run {run_id!r} step {step}: unreadable {MANIFEST}: {e}") from e
    if manifest.get("run_id") != run_id or manifest.get("step") != step:
        raise CheckpointError(
            f"run {run_id!r} step {step}: {MANIFEST} names run {manifest.get('run_id')!r} "
            f"step {manifest.get('step')!r}"
        )
    if db is not None:
        verify_recorded(db, manifest)
    return manifest


def recorded_steps(db: MetadataDB, run_id: str) -> set[int]:
    """Steps of ``run_id`` whose checkpoints the metadata DB recorded."""
    return {row.step for row in db.checkpoints(run_id)}


def verify_recorded(db: MetadataDB, manifest: dict[str, Any]) -> CheckpointRow | None:
    """Check that ``manifest`` is the one the metadata DB recorded when its checkpoint was
    committed; return that row. CheckpointNotRecorded names run, step and both digests.

    A run the DB holds no checkpoint of at all passes (None): one whose first save crashed
    before it was recorded, or checkpoints written by a tool without the DB. A run with
    rows must have recorded this step, with this manifest's digest.
    """
    run_id, step = manifest["run_id"], manifest["step"]
    rows = {row.step: row for row in db.checkpoints(run_id)}
    if not rows:
        return None
    digest = manifest_digest(manifest)
    row = rows.get(step)
    if row is None:
        raise CheckpointNotRecorded(
            f"run {run_id!r} step {step}: the metadata DB recorded no checkpoint at this step "
            f"(it has {len(rows)} other steps of the run); manifest sha256 {digest}, "
            f"recorded sha256 none: refusing a checkpoint no training process committed"
        )
    if row.manifest_sha256 != digest:
        raise CheckpointNotRecorded(
            f"run {run_id!r} step {step}: manifest sha256 {digest} differs from the sha256 "
            f"{row.manifest_sha256} the metadata DB recorded at commit: the checkpoint "
            f"changed after it was committed, refusing it"
        )
    return row


def load_checkpoint(
    store: ArtifactStore, run_id: str, step: int, dest: Path, db: MetadataDB | None = None
) -> dict[str, Any]:
    """Download a committed checkpoint into ``dest``, verify every file, return the manifest.

    With ``db`` the manifest is first checked against the DB's record (``verify_recorded``),
    so nothing is downloaded from a checkpoint changed since its commit."""
    manifest = read_manifest(store, run_id, step, db)
    fetch_folder_files(store, checkpoint_prefix(run_id, step), manifest, Path(dest), f"step {step}")
    return manifest


def fetch_folder_files(
    store: ArtifactStore, prefix: str, manifest: dict[str, Any], dest: Path, what: str
) -> None:
    """Download every file ``manifest`` lists from under ``prefix`` into ``dest`` and check
    its size and sha256; CheckpointError (starting with ``what``) on any difference."""
    for rel, want in sorted(manifest["files"].items()):
        rel_path = PurePosixPath(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:  # a manifest must not escape dest
            raise CheckpointError(f"{what}: manifest file path {rel!r} escapes the folder")
        local = dest.joinpath(*rel_path.parts)
        try:
            store.get_file(_join(prefix, rel), local)
        except ArtifactNotFound:
            raise CheckpointError(f"{what}: file {rel!r} is missing from the store") from None
        _verify_file(what, rel, local, want)


def _verify_file(what: str, rel: str, local: Path, want: dict[str, Any]) -> None:
    if not local.is_file():
        raise CheckpointError(f"{what}: file {rel!r} is missing")
    size = local.stat().st_size
    if size != want["size"]:
        raise CheckpointError(
            f"{what}: file {rel!r} has {size} bytes, manifest says {want['size']}"
        )
    digest = _file_sha256(local)
    if digest != want["sha256"]:
        raise CheckpointError(
            f"{what}: file {rel!r} sha256 {digest[:12]}... does not match the manifest "
            f"({want['sha256'][:12]}...)"
        )


def verify_local_checkpoint(folder: Path) -> dict[str, Any]:
    """Check a checkpoint folder on local disk against its own manifest; return the manifest."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}: {e}") from None
    for rel, want in sorted(manifest.get("files", {}).items()):
        _verify_file(
            f"step {manifest.get('step', -1)}",
            rel,
            Path(folder).joinpath(*PurePosixPath(rel).parts),
            want,
        )
    return manifest
