"""The artifact store: layout, atomic publication, locks, manifests and typed file formats."""

from clips4.storage.formats import ArtifactFiles
from clips4.storage.store import Manifest, Store, StoreError, human_bytes, make_key, resolve_root, validate_key

__all__ = ["ArtifactFiles", "Manifest", "Store", "StoreError", "human_bytes", "make_key", "resolve_root", "validate_key"]
