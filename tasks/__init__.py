"""Thin Prefect tasks joining the clips4 library and the artifact store, one module per stage."""

from __future__ import annotations

from collections.abc import Callable

from tasks.common import StageResult

STAGE_TASKS: dict[str, Callable[..., StageResult]] = {}
