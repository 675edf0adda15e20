"""Prefect artifacts that point people at the store: the run summary, the metric and loss tables, the pictures.

Every publication is best effort (:func:`~clips4.tasks.observe.best_effort`): skipped outside a Prefect run, logged
rather than raised when the API refuses it. The store stays the source of truth; artifacts are views of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clips4.config import EvaluateConfig, PipelineConfig
from clips4.storage import Store
from clips4.tasks.common import StageResult
from clips4.tasks.observe import best_effort

LOSS_ROWS = 100  # a loss table artifact shows at most this many steps, spread evenly over training
PICTURES = ("overlays.png", "embeddings.png", "calibration.png")  # what the evaluate stage draws, in reading order


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: values rounded, missing cells as null (JSON has no NaN)."""
    table = table.round(4).astype(object)
    return table.where(table.notna(), None).to_dict(orient="records")


def metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The evaluate stage's tidy table (method, task, metric, value) with one row per method and one column per
    task and metric ("language mIoU"), both in the order the stage wrote them."""
    cells = metrics.assign(column=metrics["task"] + " " + metrics["metric"])
    wide = cells.pivot(index="method", columns="column", values="value")
    wide = wide.reindex(index=pd.unique(cells["method"]), columns=pd.unique(cells["column"]))
    return wide.rename_axis(index="method", columns=None).reset_index()


def protocol_label(e: EvaluateConfig) -> str:
    """How the language task saw the images, in a few words, for a table that compares presets."""
    side = f"short side {e.short_side}" if e.short_side else "own size"
    text = {"stored": "stored maps", "whole": f"whole, {side}", "slide": f"slide {e.crop}/{e.stride}, {side}"}
    background = f", background below {e.background_threshold:g}" if e.background == "threshold" else ""
    return text[e.protocol] + background


def benchmark_table(runs: list[tuple[PipelineConfig, str, pd.DataFrame]]) -> pd.DataFrame:
    """One row per (preset, method) of each (config, evaluate key, metrics table): the benchmark and its protocol,
    then :func:`metric_table`'s columns; a metric that a preset did not compute stays empty."""
    frames = []
    for cfg, key, metrics in runs:
        wide = metric_table(metrics)
        about = {"preset": cfg.name, "dataset": cfg.data.dataset, "split": cfg.evaluate.split,
                 "protocol": protocol_label(cfg.evaluate)}
        for i, (column, value) in enumerate(about.items()):
            wide.insert(i, column, value)
        frames.append(wide.assign(evaluate=key))
    table = pd.concat(frames, ignore_index=True)
    return table[[c for c in table.columns if c != "evaluate"] + ["evaluate"]]


def loss_table(losses: pd.DataFrame, rows: int = LOSS_ROWS) -> pd.DataFrame:
    """The train stage's loss log (step, component, value) as one row per step and one column per loss, cut to at
    most ``rows`` steps spread evenly from the first to the last."""
    wide = losses.pivot(index="step", columns="component", values="value")
    wide = wide.reindex(columns=pd.unique(losses["component"]))
    picks = np.unique(np.linspace(0, len(wide) - 1, min(rows, len(wide))).round().astype(int))
    return wide.iloc[picks].rename_axis(index="step", columns=None).reset_index()


@best_effort
def publish_run_summary(cfg: PipelineConfig, store: Store, results: list[StageResult]) -> None:
    lines = [f"# clips4 run: {cfg.name}", "", "| stage | status | key | seconds | path |", "|---|---|---|---|---|"]
    for r in results:
        status = "reused" if r.reused else "computed"
        lines.append(f"| {r.stage} | {status} | `{r.key}` | {r.seconds:.1f} | `{store.path(r.key)}` |")
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(f"clips4-run-{cfg.name}"), description="Stages of the last run and their artifacts"
    )


@best_effort
def publish_metrics(cfg: PipelineConfig, store: Store, key: str, upstream: dict[str, str]) -> None:
    """The evaluate artifact's metrics, methods as rows, and where they come from (preset, dataset, artifact keys)."""
    table = metric_table(store.open(key).read_table("metrics"))
    sources = ", ".join(f"{stage} `{k}`" for stage, k in [("evaluate", key), *upstream.items()] if stage != "data")
    description = (f"clips4 metrics of preset `{cfg.name}` on `{cfg.data.dataset}` split `{cfg.evaluate.split}` "
                   f"({sources})")
    create_table_artifact(_records(table), key=artifact_key(f"clips4-metrics-{cfg.name}"), description=description)


@best_effort
def publish_pictures(cfg: PipelineConfig, store: Store, key: str) -> None:
    """Links to the evaluate artifact's pictures: the UI cannot show files, so it says where they are."""
    folder = store.path(key)
    found = [folder / name for name in PICTURES if (folder / name).is_file()]
    lines = [f"# clips4 pictures: {cfg.name}", "", f"Evaluate artifact `{key}` in `{folder}`:", ""]
    lines += [f"- [{p.name}]({p.resolve().as_uri()}) `{p.resolve()}`" for p in found] or ["- (no pictures drawn)"]
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(f"clips4-pictures-{cfg.name}"), description="Pictures of the last evaluation"
    )


@best_effort
def publish_losses(cfg: PipelineConfig, store: Store, key: str) -> None:
    """The train artifact's loss log, one row per (sampled) step and one column per loss."""
    losses = store.open(key).read_table("losses")
    table = loss_table(losses)
    steps = losses["step"].nunique()
    description = f"clips4 training losses of preset `{cfg.name}` (train `{key}`), {len(table)} of {steps} steps"
    create_table_artifact(_records(table), key=artifact_key(f"clips4-losses-{cfg.name}"), description=description)
