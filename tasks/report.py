"""Prefect artifacts that point people at the store: the run summary (markdown) and metric tables."""

from __future__ import annotations

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clips4.config import PipelineConfig
from clips4.storage import Store
from clips4.tasks.common import StageResult


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_run_summary(cfg: PipelineConfig, store: Store, results: list[StageResult]) -> None:
    lines = [f"# clips4 run: {cfg.name}", "", "| stage | status | key | seconds | path |", "|---|---|---|---|---|"]
    for r in results:
        status = "reused" if r.reused else "computed"
        lines.append(f"| {r.stage} | {status} | `{r.key}` | {r.seconds:.1f} | `{store.path(r.key)}` |")
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(f"clips4-run-{cfg.name}"), description="Stages of the last run and their artifacts"
    )


def publish_metrics(cfg: PipelineConfig, metrics: pd.DataFrame) -> None:
    """The evaluate stage's tidy metric table, keyed per preset (the store keeps the source of truth)."""
    rows = metrics.round(4).astype(object).where(metrics.notna(), None).to_dict(orient="records")
    create_table_artifact(rows, key=artifact_key(f"clips4-metrics-{cfg.name}"), description="clips4 metrics")
