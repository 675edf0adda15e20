"""The stage graph, declared once: every stage's name, the stages it reads, its format version, whether it wants a
GPU, and its Prefect task. Planning keys, forced stages, flows, deployments, the CLI and preflight all read
:data:`STAGE_TABLE`; nothing else lists stages.

This module imports no task module (they import it), so the CLI can read the graph without loading torch; a
stage's task is imported when it is first run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clips4.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    """One node of the graph. ``when`` makes an upstream edge depend on the config (the teacher reads the data
    artifact only when it is pre-trained on the synthetic world)."""

    name: str
    upstream: tuple[str, ...]
    version: int  # bump when what the stage writes changes shape or meaning: old artifacts then stop matching
    task: str  # "module:function" of the Prefect task that builds (or reuses) the artifact
    gpu: bool = True  # holds a slot of the `clips4-gpu` concurrency limit while it runs
    when: Mapping[str, Callable[[PipelineConfig], bool]] = field(default_factory=dict)

    def reads(self, cfg: PipelineConfig) -> list[str]:
        """The stages whose artifacts this stage reads, for this config."""
        return [u for u in self.upstream if self.when.get(u, lambda _: True)(cfg)]

    def run(self) -> Callable[..., Any]:
        module, _, name = self.task.partition(":")
        return getattr(importlib.import_module(module), name)


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("data", (), 2, "clips4.tasks.data:data_task", gpu=False),
    Stage("teacher", ("data",), 1, "clips4.tasks.teacher:teacher_task",
          when={"data": lambda cfg: cfg.teacher.train == "synthetic"}),
    Stage("features", ("data", "teacher"), 2, "clips4.tasks.features:features_stage"),
    Stage("cluster", ("features",), 1, "clips4.tasks.cluster:cluster_task"),
    Stage("train", ("data", "features", "cluster"), 3, "clips4.tasks.train:train_task"),
    Stage("evaluate", ("data", "features", "train"), 2, "clips4.tasks.evaluate:evaluate_task"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)  # in an order where every stage follows its upstream
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}") from None


def forced_stages(force: str | None) -> set[str]:
    """The stages ``--force STAGE`` recomputes: that stage and every later one."""
    return set(STAGES[STAGES.index(force):]) if force else set()
