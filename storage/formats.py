"""Typed readers and writers for the file formats artifacts hold: JSON, YAML, Parquet tables, Zarr v3 arrays,
safetensors checkpoints, PNG pictures. One object serves both the staging folder (writes) and a stored artifact
(reads), so a stage that resumes reads its own partial work with the same calls.

Integrity: the writers here remember the SHA-256 of the bytes they write, so publication need not read them again; an
artifact opened from the store verifies each file against its manifest before handing it out (Zarr chunk files are
only checked to exist with their size, since hashing them would read the whole array)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
import zarr
from PIL import Image
from clips4.atomic import atomic_write

HASH_BLOCK = 1 << 20  # streaming reads: large files are hashed without holding them in memory
ZARR_META = "zarr.json"


class StoreError(ValueError):
    """A store request the user must change (bad key, missing or damaged artifact, refused removal)."""


@dataclass(frozen=True)
class FileRecord:
    """What a manifest says one file is; ``sha256`` is None in manifests older than format 2 (sizes only)."""

    size: int
    sha256: str | None = None


def sha256_file(path: Path, fsync: bool = False) -> str:
    """Hash a file in 1 MiB blocks; ``fsync`` also makes it durable through the same open file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's data and entries to disk (a folder's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactFiles:
    """The files of one artifact folder, addressed by names relative to it (never outside it).

    Opened from the store (``key`` and ``records`` given), it is a complete artifact: reads are verified against the
    manifest's records and nothing is created. Without them it is a staging folder being written.
    """

    def __init__(self, folder: Path, key: str | None = None, records: dict[str, FileRecord] | None = None) -> None:
        self.dir = folder
        self.key = key
        self.records = records
        # relpath -> (inode, size, mtime_ns, sha256) of what this object's writers wrote, reused at publication.
        self.written: dict[str, tuple[int, int, int, str]] = {}
        self._checked: dict[str, tuple[int, int, int]] = {}
        self._checked_folders: set[str] = set()
        self._arrays = {r[: -len(ZARR_META) - 1] for r in records or {} if r.endswith("/" + ZARR_META)}

    def _resolve(self, name: str) -> Path:
        path = (self.dir / name).resolve()
        if self.dir.resolve() not in path.parents:
            raise ValueError(f"artifact file name {name!r} points outside the artifact")
        return path

    def _rel(self, name: str) -> str:
        return self._resolve(name).relative_to(self.dir.resolve()).as_posix()

    def file(self, name: str) -> Path:
        """The path of ``name``: in staging its folder is created; in a complete artifact it is verified first."""
        path = self._resolve(name)
        if self.records is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.check(name)
        return path

    def has(self, name: str) -> bool:
        return (self.dir / name).exists()

    def seal(self, name: str) -> tuple[int, int, int, str]:
        """Digest and flush file ``name``, written by another library (a Zarr shard), and flush each folder from its
        own up to the artifact's (a new folder's entry lasts only once its parent is flushed): a marker written after
        this cannot outlive the file, and publication reuses the digest instead of reading the file again. Returns
        what :attr:`written` now holds of it: (inode, size, mtime_ns, sha256)."""
        path = self._resolve(name)
        digest = sha256_file(path, fsync=True)
        st = path.stat()
        record = self.written[self._rel(name)] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
        top = self.dir.resolve()
        for folder in path.parents:
            fsync_path(folder)
            if folder == top:
                break
        return record

    # --------------------------------------------------------------------------------------------- integrity
    def check(self, name: str) -> None:
        """Raise StoreError unless ``name`` (a file, or every recorded file below a folder) matches the manifest.

        Call it (or :meth:`verified_path`) before handing a path of a complete artifact to a library. Names the
        manifest does not list, and everything in a staging folder, pass unchecked.
        """
        if self.records is None:
            return
        rel = self._rel(name)
        if rel in self.records:
            self._check_one(rel, self.records[rel])
        elif rel not in self._checked_folders:
            for f, record in self.records.items():
                if f.startswith(rel + "/"):
                    self._check_one(f, record)
            self._checked_folders.add(rel)

    def verified_path(self, name: str) -> Path:
        """The path of ``name`` after :meth:`check`: e.g. for safetensors or open_clip to load a checkpoint."""
        self.check(name)
        return self._resolve(name)

    def _array_of(self, rel: str) -> str | None:
        """The Zarr array whose chunk (or other content) ``rel`` is; its ``zarr.json`` is not content."""
        return next((a for a in self._arrays if rel.startswith(a + "/") and rel != f"{a}/{ZARR_META}"), None)

    def _check_one(self, rel: str, record: FileRecord) -> None:
        path = self.dir / rel
        array = self._array_of(rel)
        try:
            st = path.stat()
        except FileNotFoundError:
            what = f"array {array} is missing its chunk file {rel}" if array else f"file {rel} is missing"
            raise self._damaged(what) from None
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._checked.get(rel) == seen:
            return
        if array or record.sha256 is None:  # chunks (hashed by `store verify` only) and format-1 manifests: sizes
            if st.st_size != record.size:
                raise self._damaged(f"file {rel} is damaged (size differs from its manifest)")
        elif st.st_size != record.size or sha256_file(path) != record.sha256:
            raise self._damaged(f"file {rel} is damaged (sha256 differs from its manifest)")
        self._checked[rel] = seen

    def _damaged(self, what: str) -> StoreError:
        kind = (self.key or "").rsplit("-", 1)[0]
        return StoreError(
            f"artifact {self.key}: {what}; rebuild it with --force {kind} or remove it with clips4 store rm {self.key}"
        )

    def known_digest(self, rel: str, st: os.stat_result) -> str | None:
        """The digest this object's writers took of ``rel``, if the file is unchanged since (inode, size, mtime)."""
        written = self.written.get(rel)
        return written[3] if written and written[:3] == (st.st_ino, st.st_size, st.st_mtime_ns) else None

    def _atomic_write(self, name: str, data: bytes) -> Path:
        path = self.file(name)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        st = path.stat()
        self.written[self._rel(name)] = (st.st_ino, st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        return path

    # ------------------------------------------------------------------------------------------- json / yaml
    def write_json(self, name: str, obj: Any) -> Path:
        return self._atomic_write(name, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def write_yaml(self, name: str, obj: Any) -> Path:
        return self._atomic_write(name, yaml.safe_dump(obj, sort_keys=False).encode())

    def read_yaml(self, name: str) -> Any:
        return yaml.safe_load(self.file(name).read_text())

    # ------------------------------------------------------------------------------------------------ tables
    def write_table(self, name: str, df: pd.DataFrame, also: tuple[str, ...] = ()) -> Path:
        """Parquet (the source of truth) plus optional ``csv`` / ``md`` copies for people."""
        buffer = io.BytesIO()
        df.to_parquet(buffer, index=False)
        path = self._atomic_write(f"{name}.parquet", buffer.getvalue())
        if "csv" in also:
            self._atomic_write(f"{name}.csv", df.to_csv(index=False).encode())
        if "md" in also:
            self._atomic_write(f"{name}.md", (df.to_markdown(index=False, floatfmt=".4g") + "\n").encode())
        return path

    def read_table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.file(f"{name}.parquet"))

    # -------------------------------------------------------------------------------------------------- zarr
    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        shards: tuple[int, ...] | None = None,
        compress: bool = True,
    ) -> zarr.Array:
        """A Zarr v3 array; reopened (not recreated) when a resumed writer finds one of the same layout.

        ``compress=False`` stores chunks raw: float16 embeddings shrink by under a tenth under Zarr's default zstd,
        which costs about four times the write time."""
        path = self.file(name)
        if path.exists():
            arr = zarr.open_array(str(path), mode="r+")
            if arr.shape == tuple(shape) and str(arr.dtype) == np.dtype(dtype).name:
                return arr
            raise ValueError(f"{path} exists with shape {arr.shape} {arr.dtype}, expected {shape} {dtype}")
        return zarr.create_array(
            store=str(path), shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0, zarr_format=3,
            **({} if compress else {"compressors": None}),
        )

    def open_array(self, name: str, mode: str = "r") -> zarr.Array:
        """Open an array; in a complete artifact its metadata is verified and every chunk file checked to exist first,
        so a lost chunk is an error rather than zeros."""
        path = self.dir / name
        if not path.exists():
            raise FileNotFoundError(f"array {name} is not in artifact {self.dir}")
        self.check(name)
        return zarr.open_array(str(path), mode=mode)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_tensors(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save

        return self._atomic_write(name, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))

    def load_tensors(self, name: str, device: str = "cpu") -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.file(name)), device=device)

    # ---------------------------------------------------------------------------------------------- pictures
    def write_png(self, name: str, array: np.ndarray, palette: np.ndarray | None = None) -> Path:
        img = Image.fromarray(np.ascontiguousarray(array))
        if palette is not None:  # an 'L' class-id map becomes a 'P' palette PNG
            img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return self._atomic_write(name, buffer.getvalue())

    def read_png(self, name: str) -> np.ndarray:
        with Image.open(self.file(name)) as img:
            return np.array(img)
