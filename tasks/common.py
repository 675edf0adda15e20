"""What every stage task shares: artifact keys (from the stage table and the content the config names) and the
reuse-or-build step."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clips4.config import PipelineConfig, to_yaml
from clips4.storage import ArtifactFiles, Store, make_key
from clips4.tasks.readers import CONFIG
from clips4.tasks.stages import stage as stage_of
from clips4.atomic import atomic_write

# SHA-256 of weight files named by path, remembered per (path, size, mtime_ns): a multi-GB checkpoint is read once.
HASH_CACHE = Path.home() / ".cache" / "clips4" / "file-sha256.json"
HASH_BLOCK = 2**24


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, from :data:`HASH_CACHE` while its size and mtime are unchanged."""
    path = path.resolve()
    stat = path.stat()
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if entry and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
        return entry[2]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    cache[str(path)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    try:  # the cache only saves time: a store on a read-only home still gets correct keys
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(HASH_CACHE, lambda tmp: tmp.write_text(json.dumps(cache)))
    except OSError:
        pass
    return digest.hexdigest()


def _visible_files(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under ``root`` that is not hidden (nor inside a hidden folder), with its stat, sorted by name.

    Linked folders are followed (dataset layouts often link their parts in), each real folder once."""
    found: list[tuple[str, os.stat_result]] = []
    folders, seen = [root], set()
    while folders:
        folder = folders.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    folders.append(Path(entry.path))
                elif entry.is_file():
                    found.append((Path(entry.path).relative_to(root).as_posix(), entry.stat()))
    return sorted(found, key=lambda item: item[0])


def listing_fingerprint(root: Path) -> str:
    """Hash of the names, sizes and mtimes of the visible files under ``root``: one directory walk, no file read."""
    listing = [[name, st.st_size, st.st_mtime_ns] for name, st in _visible_files(root)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _weights_identity(path: Path) -> str:
    """A weights file by its bytes, a weights folder by its files' bytes; 'missing' lets preflight say what is wrong."""
    path = path.expanduser()
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    if path.is_dir():
        files = [[name, file_sha256(path / name)] for name, _ in _visible_files(path)]
        return "sha256:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return "missing"


def _class_file_identity(name: str) -> str:
    """A class-name file by its bytes; 'missing' lets preflight say what is wrong."""
    from clips4.data.datasets import DatasetError, locate_class_file

    try:
        return "sha256:" + hashlib.sha256(locate_class_file(name).read_bytes()).hexdigest()
    except DatasetError:
        return "missing"


def content_identity(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """What the config names by path, identified by content: a path keeps its key only while its content stays.

    The paths themselves stay in the fingerprint too: stored records and teacher artifacts read from them later.
    """
    from clips4.teacher import is_checkpoint_path

    identity: dict[str, str] = {}
    if stage == "data" and cfg.data.dataset != "synthetic" and cfg.data.root is not None:
        root = cfg.data.root.expanduser()
        identity["data.root"] = f"listing:{listing_fingerprint(root)}" if root.is_dir() else "missing"
    if stage == "data" and cfg.data.classes is not None:
        identity["data.classes"] = _class_file_identity(cfg.data.classes)
    if stage == "teacher" and cfg.teacher.train == "none":
        if cfg.teacher.model.startswith("local-dir:"):
            identity["teacher.model"] = _weights_identity(Path(cfg.teacher.model.removeprefix("local-dir:")))
        pretrained = cfg.teacher.pretrained
        if pretrained is not None and is_checkpoint_path(pretrained):
            identity["teacher.pretrained"] = _weights_identity(Path(pretrained))
    if stage == "train" and cfg.train.backbone_weights is not None:
        identity["train.backbone_weights"] = _weights_identity(cfg.train.backbone_weights)
    return identity


def stage_key(cfg: PipelineConfig, stage: str, upstream: dict[str, str]) -> str:
    """Key = stage + hash(stage fingerprint, content of what it names by path, upstream keys, format version):
    same inputs, same key. A config that names no path keeps the key it had before content identities existed."""
    fingerprint = cfg.stage(stage).fingerprint()
    identity = content_identity(cfg, stage)
    if identity:
        fingerprint = hashlib.sha256(json.dumps([fingerprint, identity], sort_keys=True).encode()).hexdigest()[:16]
    return make_key(stage, fingerprint, sorted(upstream.values()), stage_of(stage).version)


def plan_keys(cfg: PipelineConfig, stages: list[str]) -> dict[str, str]:
    """Keys of ``stages`` and of everything they depend on, from the config and the content of the paths it names
    (a listing of a dataset root, hashes of weight files; no artifact is read)."""
    keys: dict[str, str] = {}

    def visit(stage: str) -> str:
        if stage not in keys:
            ups = {u: visit(u) for u in stage_of(stage).reads(cfg)}
            keys[stage] = stage_key(cfg, stage, ups)
        return keys[stage]

    for s in stages:
        visit(s)
    return keys


@dataclass
class StageResult:
    """What a stage task returns to the flow: a key, never arrays."""

    stage: str
    key: str
    reused: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def run_stage(
    store: Store,
    cfg: PipelineConfig,
    stage: str,
    upstream: dict[str, str],
    build: Callable[[ArtifactFiles], dict[str, Any] | None],
    force: bool = False,
    reset_staging: bool | None = None,
) -> StageResult:
    """Reuse the stage's artifact when its key is complete in the store; otherwise build it (resumably).

    The resolved stage config is written beside the artifact's files, so every artifact says how it was made.
    """
    missing = [k for k in upstream.values() if not store.exists(k)]
    if missing:
        raise RuntimeError(f"stage {stage} needs artifact(s) {', '.join(missing)}, which are not in {store.root}; run their stages first")
    key = stage_key(cfg, stage, upstream)
    section = cfg.stage(stage)

    def build_with_config(files: ArtifactFiles) -> dict[str, Any] | None:
        files.file(CONFIG).write_text(to_yaml(section))
        return build(files)

    start = time.time()
    manifest, reused = store.produce(
        stage,
        key,
        build_with_config,
        config=section.model_dump(mode="json"),
        upstream=list(upstream.values()),
        force=force,
        reset_staging=reset_staging,
    )
    return StageResult(stage, key, reused, round(time.time() - start, 2), manifest.summary)
