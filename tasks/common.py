"""What every stage task shares: the stage graph, artifact keys, and the reuse-or-build step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clips4.config import STAGES, PipelineConfig, to_yaml
from clips4.storage import ArtifactFiles, Store, make_key
from clips4.tasks.readers import CONFIG

# Bump a stage's number when what it writes changes shape or meaning: old artifacts then stop matching.
FORMAT_VERSION: dict[str, int] = {
    "data": 1,
    "teacher": 1,
    "features": 1,
    "cluster": 1,
    "train": 3,
    "evaluate": 1,
}


def upstream_stages(cfg: PipelineConfig, stage: str) -> list[str]:
    """The stages whose artifacts ``stage`` reads, for this config."""
    if stage == "data":
        return []
    if stage == "teacher":
        return ["data"] if cfg.teacher.train == "synthetic" else []
    if stage == "features":
        return ["data", "teacher"]
    if stage == "cluster":
        return ["features"]
    if stage == "train":
        return ["data", "features", "cluster"]
    if stage == "evaluate":
        return ["data", "features", "train"]
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def forced_stages(force: str | None) -> set[str]:
    """The stages ``--force STAGE`` recomputes: that stage and every later one."""
    return set(STAGES[STAGES.index(force):]) if force else set()


def stage_key(cfg: PipelineConfig, stage: str, upstream: dict[str, str]) -> str:
    """Key = stage + hash(stage fingerprint, upstream keys, format version): same inputs, same key."""
    return make_key(stage, cfg.stage(stage).fingerprint(), sorted(upstream.values()), FORMAT_VERSION[stage])


def plan_keys(cfg: PipelineConfig, stages: list[str]) -> dict[str, str]:
    """Keys of ``stages`` and of everything they depend on, computed from the config alone (no I/O)."""
    keys: dict[str, str] = {}

    def visit(stage: str) -> str:
        if stage not in keys:
            ups = {u: visit(u) for u in upstream_stages(cfg, stage)}
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
