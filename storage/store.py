"""The artifact store: the only code that knows where artifacts live and how they become visible.

Layout under the root::

    <root>/<kind>/<key>/manifest.json   complete artifacts (the manifest is written last, inside staging)
    <root>/.staging/<key>/              work in progress; resumable; never read as an artifact
    <root>/.locks/<key>.lock            per-key lock: one writer per artifact, across processes
    <root>/.trash/                      artifacts being replaced or removed

An artifact becomes visible by one ``rename`` of its finished staging folder, so readers never see a partial one;
a killed writer leaves only staging debris, which the next writer of that key resumes from and ``gc`` removes.
Paths go through :meth:`Store.path` only, so the root can later become an fsspec URL behind the same methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from clips4.storage.formats import ArtifactFiles

KEY_PATTERN = re.compile(r"^(?P<kind>[a-z][a-z0-9_]*)-(?P<digest>[0-9a-f]{10})$")
DEFAULT_STORE = Path.home() / ".cache" / "clips4" / "store"
STORE_ENV = "CLIPS4_STORE"
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """A store request the user must change (bad key, missing artifact, refused removal)."""


@dataclass
class Manifest:
    """What an artifact is and where it came from; written as ``manifest.json`` beside its files."""

    kind: str
    key: str
    created: str
    duration_s: float
    version: str
    git_revision: str | None
    config: dict[str, Any]
    upstream: list[str]
    files: dict[str, int]
    status: str = "complete"
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.files.values())

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


def resolve_root(store: str | Path | None = None) -> Path:
    """``--store`` wins, then ``$CLIPS4_STORE``, then ``~/.cache/clips4/store``."""
    return Path(store or os.environ.get(STORE_ENV) or DEFAULT_STORE).expanduser().resolve()


def make_key(kind: str, fingerprint: str, upstream: Iterable[str], format_version: int) -> str:
    """Identical (stage config, upstream artifacts, format) give the identical key."""
    blob = json.dumps([kind, fingerprint, sorted(upstream), format_version])
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def validate_key(key: str) -> str:
    """Refuse anything that is not ``<kind>-<10 hex>``, so no key can address a path outside the root."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise StoreError(f"{key!r} is not an artifact key (keys look like 'train-0123abcd45'; `clips4 store ls` lists them)")
    return key


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clips4")
    except PackageNotFoundError:
        return "unknown"


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB': sizes as people read them, in listings and estimates."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Store:
    """A folder of immutable, content-keyed artifacts with atomic publication and per-key locks."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = resolve_root(root)

    # ---------------------------------------------------------------------------------------------- locations
    def path(self, key: str) -> Path:
        kind = KEY_PATTERN.match(validate_key(key))["kind"]  # type: ignore[index]
        return self.root / kind / key

    def staging_dir(self, key: str) -> Path:
        """Where the work in progress of ``key`` lives (not created): other processes of one build read it there."""
        return self.root / ".staging" / validate_key(key)

    def staging(self, key: str, reset: bool = False) -> ArtifactFiles:
        """The work area of an artifact built in several steps (e.g. shards on several workers).

        Each step writes only its own files there; :meth:`produce` later publishes the folder. ``reset`` empties it.
        """
        folder = self.staging_dir(key)
        if reset and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return ArtifactFiles(folder)

    def _lock(self, key: str) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{validate_key(key)}.lock"))

    # -------------------------------------------------------------------------------------------------- reads
    def exists(self, key: str) -> bool:
        return (self.path(key) / MANIFEST).is_file()

    def manifest(self, key: str) -> Manifest:
        path = self.path(key) / MANIFEST
        if not path.is_file():
            raise StoreError(f"no artifact {key} in {self.root} (`clips4 store ls --store {self.root}` lists them)")
        return Manifest.read(path)

    def open(self, key: str) -> ArtifactFiles:
        """Read access to a complete artifact's files."""
        self.manifest(key)
        return ArtifactFiles(self.path(key))

    def list(self, kind: str | None = None) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        found = sorted(self.root.glob(f"{kind or '*'}/*/{MANIFEST}"))
        manifests = [Manifest.read(p) for p in found if not p.parent.parent.name.startswith(".")]
        return sorted(manifests, key=lambda m: m.created)

    def downstream(self, key: str) -> list[Manifest]:
        """Artifacts built from ``key`` (directly or further down the chain)."""
        found: list[Manifest] = []
        frontier = {key}
        everything = self.list()
        while frontier:
            children = [m for m in everything if frontier & set(m.upstream) and m not in found]
            found.extend(children)
            frontier = {m.key for m in children}
        return found

    def lineage(self, key: str) -> list[Manifest]:
        """The artifact and everything it was built from, nearest first (missing ancestors are skipped)."""
        seen: dict[str, Manifest] = {}
        queue = [key]
        while queue:
            k = queue.pop(0)
            if k in seen or not self.exists(k):
                continue
            seen[k] = self.manifest(k)
            queue.extend(seen[k].upstream)
        return list(seen.values())

    def ancestor(self, key: str, kind: str) -> str | None:
        """The key of the nearest ``kind`` artifact that ``key`` was built from (itself included), or None."""
        return next((m.key for m in self.lineage(key) if m.kind == kind), None)

    # ------------------------------------------------------------------------------------------------- writes
    def produce(
        self,
        kind: str,
        key: str,
        build: Callable[[ArtifactFiles], dict[str, Any] | None],
        *,
        config: dict[str, Any],
        upstream: list[str],
        force: bool = False,
        reset_staging: bool | None = None,
        lock_timeout: float = -1,
    ) -> tuple[Manifest, bool]:
        """Return the complete artifact ``key``, building it with ``build`` unless it exists (then ``reused``).

        ``build`` writes into a staging folder that survives a crash, so a rerun can resume work it finds there;
        ``force`` rebuilds even when the artifact exists, and also discards the staging folder unless
        ``reset_staging`` is False (a multi-step build resets it itself, at its start). ``build`` may return a
        summary dict stored in the manifest. Two processes asking for one key: the second waits, then reuses.
        """
        if KEY_PATTERN.match(validate_key(key))["kind"] != kind:  # type: ignore[index]
            raise StoreError(f"key {key} does not belong to kind {kind}")
        with self._lock(key).acquire(timeout=lock_timeout):
            if self.exists(key) and not force:
                return self.manifest(key), True
            files = self.staging(key, reset=force if reset_staging is None else reset_staging)
            staging = files.dir
            start = time.time()
            summary = build(files) or {}
            manifest = Manifest(
                kind=kind,
                key=key,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                duration_s=round(time.time() - start, 3),
                version=_package_version(),
                git_revision=_git_revision(),
                config=config,
                upstream=list(upstream),
                files=_file_sizes(staging),
                summary=summary,
            )
            tmp = staging / f"{MANIFEST}.tmp"
            tmp.write_text(json.dumps(asdict(manifest), indent=2, default=str))
            os.replace(tmp, staging / MANIFEST)
            self._publish(key, staging)
            return manifest, False

    def _publish(self, key: str, staging: Path) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self._discard(final)
        os.rename(staging, final)

    def _discard(self, folder: Path) -> None:
        trash = self.root / ".trash" / f"{folder.name}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, key: str, cascade: bool = False) -> list[str]:
        """Delete an artifact; refuse while others are built from it unless ``cascade``. Returns removed keys."""
        self.manifest(key)
        below = self.downstream(key)
        if below and not cascade:
            names = ", ".join(m.key for m in below)
            raise StoreError(f"{key} is used by {names}; rerun with --cascade to remove them too")
        removed = []
        for k in [*(m.key for m in reversed(below)), key]:
            with self._lock(k):
                if self.exists(k):
                    self._discard(self.path(k))
                    removed.append(k)
        return removed

    def gc(self) -> list[str]:
        """Remove staging debris of writers that are gone (their lock is free) and leftover trash."""
        cleaned: list[str] = []
        staging_root = self.root / ".staging"
        for folder in sorted(staging_root.glob("*")) if staging_root.is_dir() else []:
            try:
                with self._lock(folder.name).acquire(timeout=0):
                    shutil.rmtree(folder, ignore_errors=True)
                    cleaned.append(str(folder.relative_to(self.root)))
            except Timeout:
                continue
            except StoreError:
                shutil.rmtree(folder, ignore_errors=True)
                cleaned.append(str(folder.relative_to(self.root)))
        trash = self.root / ".trash"
        for folder in sorted(trash.glob("*")) if trash.is_dir() else []:
            shutil.rmtree(folder, ignore_errors=True)
            cleaned.append(str(folder.relative_to(self.root)))
        return cleaned
