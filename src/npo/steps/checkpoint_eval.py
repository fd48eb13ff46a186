"""Helpers for `npo eval`: find the policy folder and the run config of a checkpoint path."""

from __future__ import annotations

from pathlib import Path

from npo.store.checkpoint import MANIFEST, verify_local_checkpoint


def resolve_policy_dir(path: Path) -> Path:
    """A checkpoint folder (manifest + policy/) or a bare HF model folder -> the model folder.

    A checkpoint folder is verified against its manifest first (sizes and sha256).
    """
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {path}")
    if (path / MANIFEST).is_file():
        verify_local_checkpoint(path)
    for candidate in (path / "policy", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"{path} is neither a checkpoint (policy/) nor a model folder (config.json)")


def find_run_config(path: Path) -> Path | None:
    """The config.yaml of the run that `path` belongs to, if any: a folder above it, or for
    a checkpoint in the shared local store `<root>/artifacts/runs/<run_id>/ckpt/<step>`,
    `<root>/<run>/config.yaml` (branches and lineages `<run>.<suffix>` included)."""
    for parent in [path.resolve(), *path.resolve().parents]:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
        if parent.parent.name == "runs" and parent.parent.parent.name == "artifacts":
            root = parent.parent.parent.parent
            candidate = root / parent.name.split(".")[0] / "config.yaml"
            if candidate.is_file():
                return candidate
    return None
