"""Artifact stores: where checkpoints, guidance payloads and datasets live.

Objects are addressed by '/'-separated relative keys, e.g.
``runs/<run_id>/ckpt/000025/model.safetensors`` (see ``npo.store.checkpoint`` for the
checkpoint layout and its commit protocol). ``open_store(uri)`` picks the backend from the
URI scheme through a small registry:

- ``file:///abs/path`` or a plain path -> ``LocalStore`` (the laptop/CI default);
- ``s3://bucket/prefix`` -> ``npo.store.s3.S3Store`` (minio SDK; settings from the env).

Every object write is atomic per object: bytes go to a temporary file in the destination
directory, are fsynced, then ``os.replace``d onto the final name, so a crash mid-write never
leaves a partial object under its key. Multi-object atomicity is the caller's job (the
checkpoint manifest is written last).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

# Temporary files carry this name prefix so listings can skip in-flight writes.
_TMP_PREFIX = ".npo-tmp-"


class ArtifactNotFound(KeyError):
    """The key has no object in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@runtime_checkable
class ArtifactStore(Protocol):
    """A flat key -> bytes store with prefix listing (the subset of S3 the system needs)."""

    uri: str

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` to ``path``, creating parent directories."""
        ...

    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` (plain string prefix, as in S3), sorted."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key starting with ``prefix``."""
        ...


def _check_key(key: str) -> PurePosixPath:
    """Validate a key and return it as a relative path; keys must stay inside the root."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"artifact key {key!r} must be a relative '/'-separated path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact key {key!r} has an empty, '.' or '..' segment")
    if parts[-1].startswith(_TMP_PREFIX):
        raise ValueError(f"artifact key {key!r} uses the reserved prefix {_TMP_PREFIX!r}")
    return PurePosixPath(key)


@contextlib.contextmanager
def _atomic_writer(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temp file beside ``dest``; on success fsync + rename it onto ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalStore:
    """An ``ArtifactStore`` backed by a directory; keys map to files under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).parts)

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        with open(path, "rb") as src, _atomic_writer(dest) as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _atomic_writer(self._path(key)) as out:
            out.write(data)

    def get_file(self, key: str, path: Path) -> None:
        src_path = self._path(key)
        if not src_path.is_file():
            raise ArtifactNotFound(f"no object {key!r} in {self.uri}")
        # Atomic on the destination too: a half-downloaded file never looks complete.
        with open(src_path, "rb") as src, _atomic_writer(Path(path)) as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactNotFound(f"no object {key!r} in {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names, then filter by string prefix
        # (so "runs/r/ckpt/0000" matches "runs/r/ckpt/000025/..." like S3 does).
        dir_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(dir_part) if dir_part else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
        # Prune directories left empty so listings and disk stay tidy.
        for parent in sorted({self._path(k).parent for k in keys}, key=lambda p: -len(p.parts)):
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:  # not empty (or already gone): stop climbing
                    break
                parent = parent.parent


# --------------------------------------------------------------------------- scheme registry
StoreOpener = Callable[[str], ArtifactStore]
_SCHEMES: dict[str, StoreOpener] = {}


def register_scheme(scheme: str, opener: StoreOpener) -> None:
    """Make ``open_store`` hand URIs of ``scheme://...`` to ``opener(uri)``."""
    _SCHEMES[scheme] = opener


def _open_file(uri: str) -> ArtifactStore:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ValueError(f"file store URI {uri!r} must be file:///absolute/path")
    return LocalStore(Path(unquote(parsed.path)))


def _open_s3(uri: str) -> ArtifactStore:
    # Imported here so that minio (the `cluster` extra) stays optional for local runs.
    try:
        from npo.store.s3 import S3Store
    except ModuleNotFoundError as e:
        raise ImportError(
            f"{uri!r} needs the minio SDK ({e.name} is missing): pip install 'npo[cluster]'"
        ) from e
    return S3Store(uri)  # endpoint and credentials from the environment (S3Settings.from_env)


register_scheme("file", _open_file)
register_scheme("s3", _open_s3)


def open_store(uri: str) -> ArtifactStore:
    """Open the store named by ``uri``: ``file:///abs/path``, a plain path, or ``s3://...``."""
    if not uri:
        raise ValueError("artifact store URI is empty")
    if "://" not in uri:
        return LocalStore(Path(uri))
    scheme = uri.split("://", 1)[0].lower()
    opener = _SCHEMES.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ValueError(f"unsupported artifact store URI {uri!r} (known: {known}, or a path)")
    return opener(uri)
