"""Thin Prefect tasks joining the clips4 library and the artifact store, one module per stage."""

from __future__ import annotations

from collections.abc import Callable

from tasks.cluster import cluster_task
from tasks.common import StageResult
from tasks.data import data_task
from tasks.evaluate import evaluate_task
from tasks.features import features_stage
from tasks.teacher import teacher_task
from tasks.train import train_task

STAGE_TASKS: dict[str, Callable[..., StageResult]] = {
    "data": data_task,
    "teacher": teacher_task,
    "features": features_stage,
    "cluster": cluster_task,
    "train": train_task,
    "evaluate": evaluate_task,
}
