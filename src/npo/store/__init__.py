"""Storage: artifact stores (file://, later s3://), the checkpoint commit protocol, and the
metadata DB.

Only the dependency-free parts are re-exported here, so the GPU image can save and load
checkpoints without SQLAlchemy; import ``npo.store.metadata`` explicitly for the DB.
"""

from npo.store.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    LocalStore,
    open_store,
    register_scheme,
)
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

__all__ = [
    "MANIFEST",
    "ArtifactNotFound",
    "ArtifactStore",
    "CheckpointError",
    "LocalStore",
    "checkpoint_prefix",
    "checkpoint_uri",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "manifest_digest",
    "open_store",
    "read_manifest",
    "register_scheme",
    "save_checkpoint",
]
