"""The data stage: index and validate a dataset, then store resized training images and their superpixel regions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from prefect import task

from clips4.config import PipelineConfig
from clips4.data.datasets import get_dataset
from clips4.data.records import Record
from clips4.data.regions import prepare_all
from clips4.data.validate import validate_records
from clips4.progress import track
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.observe import observed
from clips4.tasks.readers import CLASSES, RECORDS, REPORT, TRAIN_IMAGES, TRAIN_REGIONS, WORLD, classes_to_json

log = logging.getLogger(__name__)


def _relative(path: str | None, base: Path) -> str | None:
    """Generated files are stored relative to the artifact, which moves when it is published."""
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


def build_data(cfg: PipelineConfig, files: ArtifactFiles) -> dict:
    data = cfg.data
    world = files.file(WORLD) if data.dataset == "synthetic" else None
    if world is not None:
        world.mkdir(parents=True, exist_ok=True)
    dataset = get_dataset(data, world)
    records: list[Record] = [r for split in data.splits for r in dataset.records(split)]
    if not records:
        raise ValueError(f"dataset {data.dataset} at {data.root} has no images in splits {data.splits}")
    report = validate_records(records, dataset, data.on_bad_input, data.num_workers, data.max_pixels)
    base = files.dir.resolve()
    table = pd.DataFrame(
        {
            "image_id": [r.image_id for r in report.good],
            "split": [r.split for r in report.good],
            "image_path": [_relative(r.image_path, base) for r in report.good],
            "label_path": [_relative(r.label_path, base) for r in report.good],
            "caption": [r.caption for r in report.good],
            "has_label": [r.label_path is not None for r in report.good],
        }
    )
    files.write_table(RECORDS, table, also=("csv",))
    files.write_json(CLASSES, classes_to_json(dataset.classes, data.dataset))
    files.write_json(REPORT, {"policy": data.on_bad_input, "bad": [p.__dict__ for p in report.problems]})

    train = [r for r in report.good if r.split == "train"]
    size = data.train_resolution
    if train:
        images = files.create_array(TRAIN_IMAGES, (len(train), size, size, 3), (1, size, size, 3), "uint8")
        regions = files.create_array(TRAIN_REGIONS, (len(train), size, size), (1, size, size), "int32")
        done = prepare_all([r.image_path for r in train], size, data.regions, data.num_workers)
        for i, (image, region) in enumerate(track(done, "superpixel regions", len(train), unit="img")):
            images[i] = image
            regions[i] = region
    counts = table.groupby("split").size().to_dict()
    return {"images": {k: int(v) for k, v in counts.items()}, "bad_inputs": len(report.problems), "classes": dataset.classes.num_classes}


@task(name="data-stage")
def data_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the dataset artifact."""
    with observed():
        store = Store(store_root)
        result = run_stage(store, cfg, "data", upstream, lambda files: build_data(cfg, files), force)
        warn_skipped(store, result)
        return result


def warn_skipped(store: Store, result: StageResult) -> None:
    """One warning line (terminal and Prefect run log) when data.on_bad_input=skip set files aside, so a skip is
    never silent; a reused artifact warns again, since its skipped files are still missing from this run."""
    count = result.summary.get("bad_inputs", 0)
    if not count:
        return
    report = store.path(result.key) / REPORT
    first = json.loads(report.read_text())["bad"][0]
    log.warning(
        "skipped %d bad input file%s (first: %s: %s); list in %s",
        count, "" if count == 1 else "s", first["path"], first["problem"], report,
    )
