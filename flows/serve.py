"""Deployments: the full pipeline and every single stage, served from this process (``clips4 serve``).

With a Prefect server on loopback (``prefect server start``), users then start runs with e.g.
``prefect deployment run 'clips4-pipeline/default' --param preset=demo`` or rerun one stage with
``prefect deployment run 'train/default' --param preset=demo --param overrides='["train.lr=0.02"]'``.
"""

from __future__ import annotations

from prefect import serve

from clips4.flows.pipeline import STAGE_FLOWS, clips4_pipeline


def deployments(name: str = "default", store: str | None = None, limit: int | None = None) -> list:
    """One deployment per flow; ``store`` becomes the default store parameter of each."""
    params = {"store": store} if store else {}
    flows = [clips4_pipeline, *STAGE_FLOWS.values()]
    return [f.to_deployment(name=name, parameters=params, concurrency_limit=limit) for f in flows]


def serve_all(name: str = "default", store: str | None = None, limit: int | None = None) -> None:
    """Block, executing runs of the served deployments as they are requested."""
    serve(*deployments(name, store, limit))
