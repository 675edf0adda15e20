"""The artifact store: layout, atomic publication, locks, manifests and typed file formats."""

from clips4.storage.formats import ArtifactFiles, FileRecord, StoreError
from clips4.storage.store import (
    MANIFEST_FORMAT,
    BrokenArtifact,
    GcReport,
    Manifest,
    ManifestError,
    Problem,
    Store,
    git_revision,
    human_bytes,
    make_key,
    resolve_root,
    validate_key,
)

__all__ = [
    "MANIFEST_FORMAT",
    "ArtifactFiles",
    "BrokenArtifact",
    "FileRecord",
    "GcReport",
    "Manifest",
    "ManifestError",
    "Problem",
    "Store",
    "StoreError",
    "git_revision",
    "human_bytes",
    "make_key",
    "resolve_root",
    "validate_key",
]
