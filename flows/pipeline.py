"""Prefect flows: ``clips4-pipeline`` chains the stages; one flow per stage (``clips4-data`` ... ``clips4-evaluate``)
reruns a single stage.

Flows only compose: every stage is a task (or, for features, a sub-flow mapping shard tasks) from ``tasks/`` that
returns an artifact key. Parameters are plain JSON (preset, config file, overrides, force, store), so the same flows
run in-process from ``clips4 run`` and as deployments started with ``prefect deployment run``. Every flow is a
module-level object, so a worker or ``clips4 serve`` re-imports it as ``clips4.flows.pipeline.<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pandas as pd  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.concurrency.sync import concurrency  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.flows import Flow  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from clips4.atomic import atomic_write  # noqa: E402
from clips4.config import ConfigError, PipelineConfig, resolve_config  # noqa: E402
from clips4.flows.server import interruptible, prefect_api  # noqa: E402
from clips4.storage import Store  # noqa: E402
from clips4.tasks.common import StageResult, plan_keys  # noqa: E402
from clips4.tasks.stages import BY_NAME, STAGES, forced_stages  # noqa: E402
from clips4.tasks.preflight import PreflightError, check_force, check_stages, preflight  # noqa: E402
from clips4.tasks.report import benchmark_table, publish_run_summary  # noqa: E402

GPU_LIMIT = "clips4-gpu"  # Prefect global concurrency limit that GPU-bound stages take a slot of, when it exists


class PipelineError(RuntimeError):
    """The requested run cannot start (bad parameters, an upstream artifact missing, a failed preflight check)."""


def load_run_config(
    preset: str | None, config_file: str | None, overrides: list[str] | str | None
) -> PipelineConfig:
    """Flow parameters -> config, refused up front with one message (a single override string is accepted too)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if overrides is not None and not all(isinstance(o, str) for o in overrides):
        raise PipelineError(f"overrides must be a list of 'section.field=value' strings (got {overrides!r})")
    try:
        return resolve_config(preset, config_file, overrides)
    except ConfigError as err:
        raise PipelineError(str(err)) from None


def upstream_for(cfg: PipelineConfig, stage: str, chosen: list[str], store: Store) -> list[str]:
    """Upstream stages of ``stage`` in this run. Evaluate reads a trained student only when one is (or will be) there,
    so ``--stages data,teacher,features,evaluate`` evaluates the MaskCLIP baseline alone."""
    ups = BY_NAME[stage].reads(cfg)
    if stage == "evaluate" and "train" not in chosen and not store.exists(plan_keys(cfg, ["train"])["train"]):
        ups = [u for u in ups if u != "train"]
    return ups


def _gpu_limit_exists() -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def gpu_slot(stage: str, limited: bool) -> Iterator[None]:
    """Hold one slot of the ``clips4-gpu`` limit while a GPU-bound stage runs (``clips4 serve --gpu-slots N``)."""
    if limited and BY_NAME[stage].gpu:
        with concurrency(GPU_LIMIT, occupy=1):
            yield
    else:
        yield


def execute(cfg: PipelineConfig, stages: list[str], force: str | None, store: str | None) -> list[StageResult]:
    """Run ``stages`` in pipeline order after the preflight checks; ``force`` recomputes that stage and every later
    one in this run."""
    st = Store(store)
    try:
        plan = preflight(cfg, stages, force, st)
    except PreflightError as err:
        raise PipelineError(str(err)) from None
    for line in plan.lines():
        print(line)
    forced = forced_stages(force)
    limited = any(BY_NAME[s].gpu for s in plan.build) and _gpu_limit_exists()
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
        with gpu_slot(stage, limited and stage in plan.build):
            result = BY_NAME[stage].run()(cfg, str(st.root), upstream, stage in forced)
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
    """The whole pipeline data -> teacher -> features -> cluster -> train -> evaluate, reusing stored artifacts.

    ``stages`` picks some stages; ``force`` names the stage from which everything is recomputed."""
    cfg = load_run_config(preset, config_file, overrides)
    chosen = list(stages or STAGES)
    try:
        check_stages(chosen)
        check_force(force)
    except PreflightError as err:
        raise PipelineError(str(err)) from None
    results = execute(cfg, chosen, force, store)
    publish_run_summary(cfg, Store(store), results)
    return [asdict(r) for r in results]


def _stage_flow(stage: str) -> Flow:
    """The flow ``clips4-<stage>``: one stage alone, its upstream artifacts read from the store."""

    def run_stage(
        preset: str | None = "demo",
        config_file: str | None = None,
        overrides: list[str] | None = None,
        force: bool = False,
        store: str | None = None,
    ) -> dict[str, Any]:
        cfg = load_run_config(preset, config_file, overrides)
        results = execute(cfg, [stage], stage if force else None, store)
        publish_run_summary(cfg, Store(store), results)
        return asdict(results[0])

    # The module-level name below is how Prefect re-imports the flow: clips4.flows.pipeline.clips4_<stage>
    run_stage.__name__ = run_stage.__qualname__ = f"clips4_{stage}"
    run_stage.__module__ = __name__
    run_stage.__doc__ = f"Run the {stage} stage alone (its upstream artifacts must be in the store)."
    return flow(name=f"clips4-{stage}", log_prints=True)(run_stage)


clips4_data = _stage_flow("data")
clips4_teacher = _stage_flow("teacher")
clips4_features = _stage_flow("features")
clips4_cluster = _stage_flow("cluster")
clips4_train = _stage_flow("train")
clips4_evaluate = _stage_flow("evaluate")
STAGE_FLOWS: dict[str, Flow] = {s: globals()[f"clips4_{s}"] for s in STAGES}  # one module-level flow per stage


def run_pipeline(
    preset: str | None,
    config_file: str | None,
    overrides: list[str] | None,
    stages: list[str],
    force: str | None,
    store: str | None,
    console: Console,
) -> list[StageResult]:
    """In-process run with a stage summary and the metric table at the end.

    Without PREFECT_API_URL the run starts a temporary Prefect server that ends with it, however it ends; SIGTERM and
    SIGINT raise :class:`~clips4.flows.server.Interrupted`, leaving staged work for a rerun to resume."""
    with interruptible(), prefect_api(console.print):
        rows = clips4_pipeline(preset, config_file, overrides, stages, force, store)
    results = [StageResult(**r) for r in rows]
    console.print(stage_table(results, "stages"))
    evaluate = next((r for r in results if r.stage == "evaluate"), None)
    if evaluate is not None:
        files = Store(store).open(evaluate.key)
        if files.has("metrics.md"):
            console.print(files.file("metrics.md").read_text(), markup=False, highlight=False)
    console.print(f"store: {Store(store).root}")
    return results


def stage_table(results: list[StageResult], title: str) -> Table:
    """What each stage of a run did: reused or computed, its key and its time."""
    table = Table("stage", "status", "key", "seconds", title=title)
    for r in results:
        table.add_row(r.stage, "reused" if r.reused else "computed", r.key, f"{r.seconds:.1f}")
    return table


BENCHMARK = "benchmark"  # the combined table's file name, written as .csv and .md


def run_benchmark(
    runs: list[tuple[str | None, str | None, list[str]]],
    stages: list[str],
    force: str | None,
    store: str | None,
    out: Path,
    console: Console,
) -> pd.DataFrame:
    """The pipeline of each (preset, config file, overrides), one after another into one store under one Prefect
    server, then one table of their evaluations (:func:`~clips4.tasks.report.benchmark_table`) as
    ``out/benchmark.csv`` and ``out/benchmark.md``. A rerun reuses every artifact that is already complete."""
    evaluated = []
    with interruptible(), prefect_api(console.print):
        for preset, config_file, overrides in runs:
            cfg = load_run_config(preset, config_file, overrides)
            results = [StageResult(**r) for r in clips4_pipeline(preset, config_file, overrides, stages, force, store)]
            console.print(stage_table(results, f"stages of {cfg.name}"))
            key = next(r.key for r in results if r.stage == "evaluate")
            evaluated.append((cfg, key, Store(store).open(key).read_table("metrics")))
    table = benchmark_table(evaluated)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{BENCHMARK}.csv", lambda tmp: table.to_csv(tmp, index=False))
    markdown = table.to_markdown(index=False, floatfmt=".4g")
    atomic_write(out / f"{BENCHMARK}.md", lambda tmp: tmp.write_text(
        f"{markdown}\n\nStore: `{Store(store).root}`; the evaluate column is each run's evaluation artifact.\n"
    ))
    return table
