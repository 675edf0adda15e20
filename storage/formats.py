"""Typed readers and writers for the file formats artifacts hold: JSON, YAML, Parquet tables, Zarr v3 arrays,
safetensors checkpoints, PNG pictures. One object serves both the staging folder (writes) and a stored artifact
(reads), so a stage that resumes reads its own partial work with the same calls."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
import zarr
from PIL import Image


class ArtifactFiles:
    """The files of one artifact folder, addressed by names relative to it (never outside it)."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder

    def file(self, name: str) -> Path:
        path = (self.dir / name).resolve()
        if self.dir.resolve() not in path.parents:
            raise ValueError(f"artifact file name {name!r} points outside the artifact")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def has(self, name: str) -> bool:
        return (self.dir / name).exists()

    def _atomic_write(self, name: str, data: bytes) -> Path:
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
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
        path = self.file(f"{name}.parquet")
        tmp = path.with_name(path.name + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
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
        path = self.dir / name
        if not path.exists():
            raise FileNotFoundError(f"array {name} is not in artifact {self.dir}")
        return zarr.open_array(str(path), mode=mode)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_tensors(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_tensors(self, name: str, device: str = "cpu") -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.file(name)), device=device)

    # ---------------------------------------------------------------------------------------------- pictures
    def write_png(self, name: str, array: np.ndarray, palette: np.ndarray | None = None) -> Path:
        img = Image.fromarray(np.ascontiguousarray(array))
        if palette is not None:  # an 'L' class-id map becomes a 'P' palette PNG
            img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp.png")
        img.save(tmp)
        os.replace(tmp, path)
        return path

    def read_png(self, name: str) -> np.ndarray:
        with Image.open(self.file(name)) as img:
            return np.array(img)
