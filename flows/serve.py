"""Deployments of the seven flows (``clips4-pipeline`` and ``clips4-<stage>``): served from this process with
``clips4 serve``, or registered on a work pool with ``clips4 deploy``.

Each deployment's entrypoint is the flow's module path (``clips4.flows.pipeline.clips4_train``), so whatever runs it
(the serving process, a process worker, a container with clips4 installed) imports the installed package, not a file.
"""

from __future__ import annotations

from prefect import deploy, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from clips4.flows.pipeline import GPU_LIMIT, STAGE_FLOWS, clips4_pipeline

FLOWS = (clips4_pipeline, *STAGE_FLOWS.values())


def deployments(name: str = "default", store: str | None = None) -> list[RunnerDeployment]:
    """One deployment per flow; ``store`` becomes the default store parameter of each."""
    params = {"store": store} if store else {}
    return [
        f.to_deployment(name=name, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH, tags=["clips4"])
        for f in FLOWS
    ]


def set_gpu_slots(slots: int) -> None:
    """Create or resize the ``clips4-gpu`` global concurrency limit: at most ``slots`` GPU-bound stages at once."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        if not limit.active:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(active=True))


def serve_all(name: str = "default", store: str | None = None, gpu_slots: int | None = None) -> None:
    """Block, executing runs of the served deployments as they are requested."""
    if gpu_slots:
        set_gpu_slots(gpu_slots)
    serve(*deployments(name, store))


def deploy_all(pool: str, name: str = "default", store: str | None = None, image: str | None = None,
               gpu_slots: int | None = None) -> list:
    """Register the deployments on work pool ``pool``; its workers must have clips4 installed (or run ``image``)."""
    if gpu_slots:
        set_gpu_slots(gpu_slots)
    return deploy(*deployments(name, store), work_pool_name=pool, image=image, build=False, push=False,
                  ignore_warnings=True)
