"""The artifact store: the only code that knows where artifacts live and how they become visible.

Layout under the root::

    <root>/<kind>/<key>/manifest.json   complete artifacts (the manifest, with each file's size and SHA-256, is
                                        written last, inside staging)
    <root>/.staging/<key>/              work in progress; resumable; never read as an artifact
    <root>/.locks/<key>.lock            per-key lock: one writer per artifact, across processes
    <root>/.trash/                      artifacts being replaced or removed

An artifact becomes visible by one ``rename`` of its finished staging folder, so readers never see a partial one;
a killed writer leaves only staging debris, which the next writer of that key resumes from and ``gc`` removes.
Every file and folder is fsynced before the manifest, and the manifest before the rename, so a power cut cannot leave
a published artifact with missing contents. A manifest that cannot be read makes its artifact "broken": listed as
such, never reused, replaced by the next build of its key, removable with ``clips4 store rm``.
Paths go through :meth:`Store.path` only, so the root can later become an fsspec URL behind the same methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout

from clips4.storage.formats import ArtifactFiles, FileRecord, StoreError, fsync_path, sha256_file

KEY_PATTERN = re.compile(r"^(?P<kind>[a-z][a-z0-9_]*)-(?P<digest>[0-9a-f]{10})$")
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_STORE = Path.home() / ".cache" / "clips4" / "store"
STORE_ENV = "CLIPS4_STORE"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 1: files {name: size}; 2: files {name: {size, sha256}}

# One FileLock per lock file in this process, shared by all threads (thread_local=False): a build that holds its key
# (Store.building) may call Store.produce for that key from any thread without waiting for itself.
_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> FileLock:
    with _LOCKS_GUARD:
        if str(path) not in _LOCKS:
            _LOCKS[str(path)] = FileLock(str(path), thread_local=False)
        return _LOCKS[str(path)]


class ManifestError(StoreError):
    """Why a manifest cannot be trusted (bad JSON, missing fields, a newer format): its artifact is broken."""


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
    files: dict[str, FileRecord]
    status: str = "complete"
    summary: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def size(self) -> int:
        return sum(r.size for r in self.files.values())

    @property
    def verified(self) -> bool:
        """Whether the manifest records digests (format 2 on); older ones record sizes only."""
        return self.format >= 2

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Parse ``manifest.json``, raising ManifestError with the reason when it cannot be trusted."""
        try:
            data = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"manifest.json is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ManifestError("manifest.json is not a JSON object")
        fmt = data.setdefault("format", 1)
        if not isinstance(fmt, int) or fmt < 1:
            raise ManifestError(f"manifest.json has format {fmt!r}, which is not a format number")
        if fmt > MANIFEST_FORMAT:
            raise ManifestError(
                f"manifest format {fmt} is newer than this clips4 reads ({MANIFEST_FORMAT}); upgrade clips4"
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if missing := sorted(required - set(data)):
            raise ManifestError(f"manifest.json lacks {', '.join(missing)}")
        if unknown := sorted(set(data) - names):
            raise ManifestError(f"manifest.json has unknown field(s) {', '.join(unknown)}")
        for name, kind in [("kind", str), ("key", str), ("created", str), ("config", dict), ("upstream", list),
                           ("files", dict)]:
            if not isinstance(data[name], kind):
                raise ManifestError(f"manifest.json field {name} is not a {kind.__name__}")
        if not all(isinstance(k, str) for k in data["upstream"]):
            raise ManifestError("manifest.json field upstream is not a list of keys")
        data["files"] = {name: _file_record(name, value, fmt) for name, value in data["files"].items()}
        return cls(**data)


def _file_record(name: str, value: Any, fmt: int) -> FileRecord:
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ManifestError(f"manifest.json lists {name!r}, which is not a file inside the artifact")
    if fmt == 1 and isinstance(value, int):
        return FileRecord(value)
    if (fmt >= 2 and isinstance(value, dict) and set(value) == {"size", "sha256"} and isinstance(value["size"], int)
            and isinstance(value["sha256"], str) and SHA256_PATTERN.match(value["sha256"])):
        return FileRecord(value["size"], value["sha256"])
    raise ManifestError(f"manifest.json has a malformed record for file {name}")


@dataclass(frozen=True)
class BrokenArtifact:
    """An artifact folder whose manifest cannot be read: never reused, replaced by the next build of its key."""

    kind: str
    key: str
    path: Path
    reason: str
    status: str = "broken"


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`Store.verify`; ``serious`` ones (damaged, missing, broken) mean data cannot be trusted."""

    key: str
    file: str | None
    what: str  # damaged | missing | broken | unlisted | unverified
    detail: str

    @property
    def serious(self) -> bool:
        return self.what in ("damaged", "missing", "broken")

    def __str__(self) -> str:
        return f"{self.what}: {self.key}" + (f" file {self.file}" if self.file else "") + f": {self.detail}"


@dataclass
class GcReport:
    """What :meth:`Store.gc` removed, left alone on purpose (with why), and failed to remove (with why)."""

    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


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


def git_revision() -> str | None:
    """The short commit of the clips4 checkout in use; None outside a git checkout (a wheel install)."""
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


def _regular_files(folder: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every regular file below ``folder`` (links are neither followed nor listed), as (relpath, path, lstat)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                yield path.relative_to(folder).as_posix(), path, st


def _newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` or anything below it, links not followed."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return newest


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

    def staging_files(self, key: str) -> ArtifactFiles:
        """The existing work area of ``key``, neither created nor reset: for processes helping a build another holds."""
        folder = self.staging_dir(key)
        if not folder.is_dir():
            raise StoreError(
                f"the work area {folder} of {key} does not exist; the process building {key} creates it first"
            )
        return ArtifactFiles(folder)

    def lock_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{validate_key(key)}.lock"

    @contextmanager
    def _locked(self, key: str, timeout: float = -1) -> Iterator[None]:
        """Hold ``key``'s lock (re-entrant within this process); a store where it cannot be created is read-only."""
        path = self.lock_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _process_lock(path)
            lock.acquire(timeout=timeout)
        except Timeout:
            raise
        except OSError as e:
            raise StoreError(
                f"the store {self.root} is read-only: cannot create the lock {path} ({e.strerror or e}); "
                "pass --store PATH to a writable store"
            ) from e
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def building(self, key: str, timeout: float = -1, reset: bool = False) -> Iterator[ArtifactFiles]:
        """Hold ``key``'s lock for a build made of several steps, and give its (created) staging folder.

        The lock is held from the first touch of ``.staging/<key>`` to publication, so neither ``gc`` nor a second
        writer interferes; :meth:`produce` of the same key inside it (any thread of this process) does not wait.
        ``reset`` empties the staging folder first.
        """
        with self._locked(key, timeout):
            yield self.staging(key, reset=reset)

    # -------------------------------------------------------------------------------------------------- reads
    def _no_artifact(self, key: str) -> StoreError:
        return StoreError(f"no artifact {key} in {self.root} (`clips4 store ls --store {self.root}` lists them)")

    def _read_manifest(self, key: str) -> Manifest:
        """The manifest of ``key``; ManifestError when its folder exists but the manifest cannot be trusted."""
        folder = self.path(key)
        try:
            manifest = Manifest.read(folder / MANIFEST)
        except FileNotFoundError:
            if folder.is_dir():
                raise ManifestError("manifest.json is missing") from None
            raise self._no_artifact(key) from None
        except OSError as e:
            raise ManifestError(f"manifest.json cannot be read ({e.strerror or e})") from e
        if (manifest.kind, manifest.key) != (folder.parent.name, key):
            raise ManifestError(f"manifest.json describes {manifest.kind} artifact {manifest.key}, not {key}")
        return manifest

    def exists(self, key: str) -> bool:
        """Whether ``key`` is complete and its manifest readable (a broken artifact does not exist: it is rebuilt)."""
        try:
            self._read_manifest(key)
        except StoreError:
            return False
        return True

    def manifest(self, key: str) -> Manifest:
        try:
            return self._read_manifest(key)
        except ManifestError as e:
            kind = KEY_PATTERN.match(key)["kind"]  # type: ignore[index]
            raise StoreError(
                f"artifact {key} in {self.root} is broken: {e}; rebuild it with --force {kind} or remove it with "
                f"clips4 store rm {key}"
            ) from e

    def open(self, key: str) -> ArtifactFiles:
        """Read access to a complete artifact's files, each verified against the manifest when read."""
        return ArtifactFiles(self.path(key), key=key, records=self.manifest(key).files)

    def _scan(self, kind: str | None = None) -> tuple[list[Manifest], list[BrokenArtifact]]:
        if kind is not None and not KIND_PATTERN.match(kind):
            raise StoreError(f"{kind!r} is not an artifact kind (kinds are stage names such as 'train')")
        good: list[Manifest] = []
        broken: list[BrokenArtifact] = []
        if not self.root.is_dir():
            return good, broken
        kinds = [self.root / kind] if kind else sorted(self.root.iterdir())
        for kind_dir in kinds:
            if kind_dir.name.startswith(".") or not kind_dir.is_dir():
                continue
            for folder in sorted(kind_dir.iterdir()):
                match = KEY_PATTERN.match(folder.name)
                if not match or match["kind"] != kind_dir.name or not folder.is_dir():
                    continue
                try:
                    good.append(self._read_manifest(folder.name))
                except ManifestError as e:
                    broken.append(BrokenArtifact(kind_dir.name, folder.name, folder, str(e)))
                except StoreError:  # removed while we looked
                    continue
        return sorted(good, key=lambda m: m.created), broken

    def list(self, kind: str | None = None) -> list[Manifest]:
        """Complete artifacts, oldest first; broken ones are left out (see :meth:`broken`)."""
        return self._scan(kind)[0]

    def broken(self, kind: str | None = None) -> list[BrokenArtifact]:
        """Artifact folders whose manifest cannot be read, each with the reason."""
        return self._scan(kind)[1]

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
        Only a build takes the key's lock (re-entrant, so it may run inside :meth:`building`); before publication
        every file is hashed into the manifest and made durable.
        """
        if KEY_PATTERN.match(validate_key(key))["kind"] != kind:  # type: ignore[index]
            raise StoreError(f"key {key} does not belong to kind {kind}")
        if not force:  # reuse takes no lock and writes nothing, so a complete read-only store can be read
            try:
                return self.manifest(key), True
            except StoreError:
                pass
        with self._locked(key, lock_timeout):
            if self.exists(key) and not force:
                return self.manifest(key), True
            files = self.staging(key, reset=force if reset_staging is None else reset_staging)
            start = time.time()
            summary = build(files) or {}
            records = self._seal(files)
            manifest = Manifest(
                kind=kind,
                key=key,
                created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                duration_s=round(time.time() - start, 3),
                version=_package_version(),
                git_revision=git_revision(),
                config=config,
                upstream=list(upstream),
                files=records,
                summary=summary,
            )
            self._publish(key, files.dir, manifest)
            return manifest, False

    def _seal(self, files: ArtifactFiles) -> dict[str, FileRecord]:
        """Digest and fsync every file of a finished staging folder (reusing digests its writers took), and fsync
        its sub-folders: once the manifest exists, everything it lists is on disk."""
        records: dict[str, FileRecord] = {}
        for rel, path, st in _regular_files(files.dir):
            if rel == MANIFEST:
                continue
            digest = files.known_digest(rel, st)
            if digest is None:
                digest = sha256_file(path, fsync=True)
            else:
                fsync_path(path)
            records[rel] = FileRecord(st.st_size, digest)
        for dirpath, _, _ in os.walk(files.dir):
            if Path(dirpath) != files.dir:
                fsync_path(Path(dirpath))
        return dict(sorted(records.items()))

    def _publish(self, key: str, staging: Path, manifest: Manifest) -> None:
        """Write the manifest durably, fsync the staging folder, rename it into place, fsync the kind folder."""
        with open(staging / MANIFEST, "w") as f:
            f.write(json.dumps(asdict(manifest), indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        fsync_path(staging)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() or final.is_symlink():  # a broken artifact, or one rebuilt with --force
            self._discard(final)
        os.rename(staging, final)
        fsync_path(final.parent)

    def _discard(self, folder: Path) -> None:
        """Move ``folder`` into the trash in one rename, then delete it (``gc`` finishes what is left)."""
        trash = self.root / ".trash"
        if trash.is_symlink():
            raise StoreError(
                f"cannot remove {folder}: the store's trash folder {trash} is a symbolic link; remove the link"
            )
        target = trash / f"{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            trash.mkdir(parents=True, exist_ok=True)
            os.rename(folder, target)
        except OSError as e:
            reason = e.strerror or e
            raise StoreError(f"cannot remove {folder}: {reason}; check that you may write to {self.root}") from e
        shutil.rmtree(target, ignore_errors=True)

    def remove(self, key: str, cascade: bool = False) -> list[str]:
        """Delete an artifact, broken ones included; refuse while others are built from it unless ``cascade``.

        Returns the removed keys."""
        if not self.path(key).is_dir():
            raise self._no_artifact(key)
        below = self.downstream(key)
        if below and not cascade:
            names = ", ".join(m.key for m in below)
            raise StoreError(f"{key} is used by {names}; rerun with --cascade to remove them too")
        removed = []
        for k in [*(m.key for m in reversed(below)), key]:
            with self._locked(k):
                if self.path(k).is_dir():
                    self._discard(self.path(k))
                    removed.append(k)
        return removed

    def gc(self, older_than: float = 3600.0) -> GcReport:
        """Remove staging debris of writers that are gone, and leftover trash, without ever following a link.

        A staging folder stays while its key's lock is held (a build is running) or while anything in it changed
        less than ``older_than`` seconds ago (a build may be about to take it up again).
        """
        report = GcReport()
        for area in (".staging", ".trash"):
            top = self.root / area
            if top.is_symlink():
                report.skipped.append(f"{area}: a symbolic link, not followed (remove the link if it is debris)")
                continue
            for entry in sorted(top.iterdir()) if top.is_dir() else []:
                rel = f"{area}/{entry.name}"
                if area == ".trash":
                    self._gc_remove(entry, rel, report)
                    continue
                try:
                    age = time.time() - _newest_mtime(entry)
                except FileNotFoundError:  # its writer published or removed it meanwhile
                    continue
                if age < older_than:
                    report.skipped.append(f"{rel}: modified {age / 60:.0f} min ago")
                    continue
                if not KEY_PATTERN.match(entry.name):  # not a key: nothing can be building it
                    self._gc_remove(entry, rel, report)
                    continue
                if _process_lock(self.lock_path(entry.name)).is_locked:
                    report.skipped.append(f"{rel}: being built by this process")
                    continue
                try:
                    with self._locked(entry.name, timeout=0):
                        self._gc_remove(entry, rel, report)
                except Timeout:
                    report.skipped.append(f"{rel}: being built (its lock is held)")
                except StoreError as e:
                    report.failed.append(f"could not remove {rel}: {e}")
        return report

    def _gc_remove(self, entry: Path, rel: str, report: GcReport) -> None:
        """Unlink a link or file, or delete a real folder inside the root; record only what is really gone."""
        try:
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            elif self.root not in entry.resolve().parents:
                report.skipped.append(f"{rel}: resolves outside the store, not removed")
                return
            else:
                shutil.rmtree(entry)
        except OSError as e:
            report.failed.append(f"could not remove {rel}: {e.strerror or e}")
            return
        if os.path.lexists(entry):
            report.failed.append(f"could not remove {rel}: it is still there")
        else:
            report.removed.append(rel)

    # ------------------------------------------------------------------------------------------------- verify
    def verify(
        self,
        keys: Iterable[str] | None = None,
        progress: Callable[[Manifest, list[str]], Iterable[str]] | None = None,
    ) -> list[Problem]:
        """Check every file of the artifacts (all by default) against their manifests: present, same size, same
        SHA-256 (Zarr chunks included). ``progress`` may wrap each artifact's file list, e.g. in a progress bar."""
        problems: list[Problem] = []
        if keys is None:
            manifests, broken = self._scan()
            problems += [Problem(b.key, None, "broken", b.reason) for b in broken]
        else:
            manifests = []
            for key in keys:
                try:
                    manifests.append(self._read_manifest(key))
                except ManifestError as e:
                    problems.append(Problem(key, None, "broken", str(e)))
        for manifest in manifests:
            problems += self._verify_one(manifest, progress)
        return problems

    def _verify_one(
        self, manifest: Manifest, progress: Callable[[Manifest, list[str]], Iterable[str]] | None
    ) -> list[Problem]:
        key, folder = manifest.key, self.path(manifest.key)
        problems: list[Problem] = []
        names = list(manifest.files)
        for name in progress(manifest, names) if progress else names:
            record, path = manifest.files[name], folder / name
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    problems.append(Problem(key, name, "damaged", "is not a regular file"))
                elif st.st_size != record.size:
                    detail = f"size {st.st_size} differs from its manifest's {record.size}"
                    problems.append(Problem(key, name, "damaged", detail))
                elif record.sha256 is not None and sha256_file(path) != record.sha256:
                    problems.append(Problem(key, name, "damaged", "sha256 differs from its manifest"))
            except FileNotFoundError:
                problems.append(Problem(key, name, "missing", "is missing"))
            except OSError as e:
                problems.append(Problem(key, name, "damaged", f"cannot be read ({e.strerror or e})"))
        listed = set(manifest.files) | {MANIFEST}
        problems += [
            Problem(key, rel, "unlisted", "is not in the manifest")
            for rel, _, _ in _regular_files(folder)
            if rel not in listed
        ]
        if not manifest.verified:
            detail = f"manifest format {manifest.format} records sizes only, so contents were not checked"
            problems.append(Problem(key, None, "unverified", detail))
        return problems
