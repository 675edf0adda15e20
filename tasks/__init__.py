"""Thin Prefect tasks joining the clips4 library and the artifact store, one module per stage."""

from __future__ import annotations

from collections.abc import Callable

from clips4.tasks.cluster import cluster_task
from clips4.tasks.common import StageResult
from clips4.tasks.data import data_task
from clips4.tasks.evaluate import evaluate_task
from clips4.tasks.features import features_stage
from clips4.tasks.teacher import teacher_task
from clips4.tasks.train import train_task

STAGE_TASKS: dict[str, Callable[..., StageResult]] = {
    "data": data_task,
    "teacher": teacher_task,
    "features": features_stage,
    "cluster": cluster_task,
    "train": train_task,
    "evaluate": evaluate_task,
}
