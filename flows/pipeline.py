"""Prefect flows: ``clips4-pipeline`` chains the stages; one flow per stage serves single-stage reruns.

Flows only compose: every stage is a task (or, for features, a sub-flow mapping shard tasks) from ``tasks/`` that
returns an artifact key. Parameters are plain JSON (preset, config file, overrides), so the same flows run in-process
from ``clips4 run`` and as deployments started with ``prefect deployment run``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from clips4.config import STAGES, PipelineConfig, resolve_config  # noqa: E402
from clips4.storage import Store  # noqa: E402
from clips4.tasks import STAGE_TASKS  # noqa: E402
from clips4.tasks.common import StageResult, forced_stages, plan_keys, upstream_stages  # noqa: E402
from clips4.tasks.report import publish_run_summary  # noqa: E402


class PipelineError(RuntimeError):
    """The requested run cannot start (a stage not built, an upstream artifact missing)."""


def upstream_for(cfg: PipelineConfig, stage: str, chosen: list[str], store: Store) -> list[str]:
    """Upstream stages of ``stage`` in this run. Evaluate reads a trained student only when one is (or will be) there,
    so ``--stages data,teacher,features,evaluate`` evaluates the MaskCLIP baseline alone."""
    ups = upstream_stages(cfg, stage)
    if stage == "evaluate" and "train" not in chosen and not store.exists(plan_keys(cfg, ["train"])["train"]):
        ups = [u for u in ups if u != "train"]
    return ups


def execute(cfg: PipelineConfig, stages: list[str], force: str | None, store: str | None) -> list[StageResult]:
    """Run ``stages`` in pipeline order; ``force`` recomputes that stage and every later one in this run."""
    not_built = [s for s in stages if s not in STAGE_TASKS]
    if not_built:
        raise PipelineError(f"stage(s) not built yet: {', '.join(not_built)} (built: {', '.join(STAGE_TASKS) or 'none'})")
    st = Store(store)
    forced = forced_stages(force)
    keys: dict[str, str] = {}
    results: list[StageResult] = []
    for stage in (s for s in STAGES if s in stages):
        ups = upstream_for(cfg, stage, stages, st)
        upstream = {u: keys.get(u) or plan_keys(cfg, [u])[u] for u in ups}
        absent = [f"{u} ({k})" for u, k in upstream.items() if u not in keys and not st.exists(k)]
        if absent:
            raise PipelineError(
                f"stage {stage} needs the {', '.join(absent)} artifact(s), which are not in {st.root}; "
                f"add those stages to --stages"
            )
        result = STAGE_TASKS[stage](cfg, str(st.root), upstream, stage in forced)
        keys[stage] = result.key
        results.append(result)
    return results


@flow(name="clips4-pipeline", log_prints=True)
def clips4_pipeline(
    preset: str | None = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: str | None = None,
    store: str | None = None,
) -> list[dict[str, Any]]:
    """The whole pipeline data -> teacher -> features -> cluster -> train -> evaluate, reusing stored artifacts."""
    cfg = resolve_config(preset, config_file, overrides)
    results = execute(cfg, list(stages or STAGES), force, store)
    publish_run_summary(cfg, Store(store), results)
    return [asdict(r) for r in results]


def _stage_flow(stage: str):
    @flow(name=stage, log_prints=True)
    def stage_flow(
        preset: str | None = "demo",
        config_file: str | None = None,
        overrides: list[str] | None = None,
        force: bool = False,
        store: str | None = None,
    ) -> dict[str, Any]:
        cfg = resolve_config(preset, config_file, overrides)
        (result,) = execute(cfg, [stage], stage if force else None, store)
        return asdict(result)

    stage_flow.__doc__ = f"Run the {stage} stage alone (its upstream artifacts must be in the store)."
    return stage_flow


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}


def run_pipeline(
    preset: str | None,
    config_file: str | None,
    overrides: list[str] | None,
    stages: list[str],
    force: str | None,
    store: str | None,
    console: Console,
) -> list[StageResult]:
    """In-process run (Prefect's ephemeral mode, no server) with a stage summary and the metric table at the end."""
    rows = clips4_pipeline(preset, config_file, overrides, stages, force, store)
    results = [StageResult(**r) for r in rows]
    table = Table("stage", "status", "key", "seconds", title="stages")
    for r in results:
        table.add_row(r.stage, "reused" if r.reused else "computed", r.key, f"{r.seconds:.1f}")
    console.print(table)
    evaluate = next((r for r in results if r.stage == "evaluate"), None)
    if evaluate is not None:
        files = Store(store).open(evaluate.key)
        if files.has("metrics.md"):
            console.print(files.file("metrics.md").read_text(), markup=False, highlight=False)
    console.print(f"store: {Store(store).root}")
    return results
