"""The evaluate stage: reads the data, features and train artifacts into :mod:`clips4.harness`, writes its tables
(metrics, summary, per class, calibration) and pictures."""

from __future__ import annotations

import shutil

import pandas as pd
from prefect import task

from clips4.config import EvaluateConfig, PipelineConfig
from clips4.data.io import read_image
from clips4.device import resolve_device
from clips4.harness import EvalInputs, Harness, Results, Split, maskclip_model, student_model
from clips4.inference import embed_multiscale
from clips4.visualize import embedding_comparison, overlay_grid, share_bars
from clips4.storage import ArtifactFiles, Store, StoreError
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.readers import DataArtifact, FeaturesArtifact, TrainArtifact, load_teacher
from clips4.tasks.observe import observed
from clips4.tasks.report import publish_metrics, publish_pictures

CACHE = "cache"  # maps the harness computes (test scales, the student), removed once the tables are written


def read_split(cfg: PipelineConfig, data: DataArtifact, feats: FeaturesArtifact, split: str) -> Split:
    """A split's images, labels and MaskCLIP's stored map and keys, read lazily by index."""
    records, reader = data.records(split), data.label_reader(cfg.data)
    return Split(lambda i: read_image(records[i].image_path), lambda i: reader(records[i].label_path),
                 feats.features(split), feats.keys(split))


def build_evaluate(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    e = cfg.evaluate
    device = resolve_device(e.device)
    data = DataArtifact.open(store, upstream["data"])
    feats = FeaturesArtifact.open(store, upstream["features"])
    classes = data.classes
    if not classes.num_classes:
        raise ValueError(f"dataset {cfg.data.dataset} has no classes or labels; evaluation needs a labelled split")
    records = data.records(e.split)
    if not records or any(r.label_path is None for r in records):
        raise ValueError(f"split {e.split!r} has no labelled images; set evaluate.split to a labelled split")
    teacher = student = centre = None
    if e.test_scales != [1.0] or e.protocol != "stored":  # MaskCLIP run again: at the test scales, on whole images
        clip = load_teacher(store.open(_teacher_key(store, upstream["features"])), device)
        teacher = maskclip_model(clip, size=cfg.features.resolution, device=device, batch_size=e.batch_size,
                                 amp=cfg.features.amp)
    if "train" in upstream:
        trained = TrainArtifact.open(store, upstream["train"])
        student = student_model(trained.student(device), batch_size=e.batch_size)
        centre = trained.centre()
    inputs = EvalInputs(
        evaluated=read_split(cfg, data, feats, e.split),
        train=read_split(cfg, data, feats, "train") if "train" in data.splits else None,
        text=feats.text(), names=classes.names, held_out=classes.held_out_ids,
        teacher=teacher, student=student, student_centre=centre,
    )
    shutil.rmtree(files.file(CACHE), ignore_errors=True)  # never trust a cache a killed run left behind
    harness = Harness(inputs, e, device, files.file(CACHE))
    results = harness.run()
    _tables(files, results, e)
    _pictures(files, harness, data, min(e.num_pictures, len(records)))
    shutil.rmtree(files.file(CACHE), ignore_errors=True)
    summary = {
        f"{r.method}/{r.task}/{r.metric}": round(r.value, 4)
        for r in results.metrics.itertuples()
        if r.metric in ("mIoU", "mIoU_known", "mIoU_unknown")
    }
    return {**summary, "grid": e.grid}


def _teacher_key(store: Store, features_key: str) -> str:
    key = store.ancestor(features_key, "teacher")
    if key is None:
        raise StoreError(f"the teacher of {features_key} is not in {store.root}; evaluate.test_scales other than "
                         "[1] and evaluate.protocol 'whole' or 'slide' run it again on the images: rerun the teacher "
                         "stage, or set evaluate.test_scales=[1] and evaluate.protocol=stored")
    return key


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".4g")


def _protocol_note(e: EvaluateConfig) -> str:
    """How the language task saw the images and labelled the background, for metrics.md."""
    if e.protocol == "stored":
        note = "each method's class scores at its own map size, upsampled to each label's size"
    else:
        resized = f"resized to a short side of {e.short_side} px" if e.short_side else "at their own size"
        seen = f"{e.crop} px windows every {e.stride} px" if e.protocol == "slide" else "whole"
        note = f"images {resized} (aspect ratio kept), seen {seen}, class scores resized to each label's original size"
    if e.background == "threshold":
        note += f"; class 0 (background) where no other class has a probability of {e.background_threshold:g}"
    return note


def _tables(files: ArtifactFiles, results: Results, e: EvaluateConfig) -> None:
    """metrics, summary and per_class tables (parquet + csv; metrics.md shows the summary under the metrics), and
    the share floor's calibration table and bars when there is one."""
    files.write_table("metrics", results.metrics, also=("csv",))
    files.write_table("summary", results.summary, also=("csv", "md"))
    files.write_table("per_class", results.per_class, also=("csv",))
    files.file("metrics.md").write_text(
        f"{_markdown(results.metrics)}\n\n"
        f"Language: {_protocol_note(e)}. Unsupervised and probe: every map resized (bilinear) to "
        f"{e.grid}x{e.grid} first.\n\n"
        f"Best MaskCLIP row per task and metric, and each clips4 row's gain over it (points):\n\n"
        f"{_markdown(results.summary)}\n"
    )
    if results.calibration is not None:
        files.write_table("calibration", results.calibration, also=("csv",))
        share_bars(results.calibration, files.file("calibration.png"))


def _pictures(files: ArtifactFiles, harness: Harness, data: DataArtifact, n: int) -> None:
    """overlays.png: every language row's labels on the first ``n`` images; embeddings.png: the student's map
    (at its test scales) beside MaskCLIP's stored one."""
    if n == 0:
        return
    split = harness.inputs.evaluated
    images = [split.image(i) for i in range(n)]
    labels = [split.label(i) for i in range(n)]
    preds = {name: [harness.predict(name, i) for i in range(n)] for name in harness.rows("language")}
    overlay_grid(images, labels, preds, data.classes.names, palette=data.classes.palette,
                 path=files.file("overlays.png"))
    student = harness.inputs.student
    if student is not None:  # embedded here, for the shown images only: 'whole' and 'slide' cache no student maps
        shown = images[:3]
        maps = embed_multiscale(student.encode, shown, student.size, harness.cfg.test_scales)
        embedding_comparison(shown, list(maps), [harness.maps("maskclip")([i])[0] for i in range(len(shown))],
                             files.file("embeddings.png"))


@task(name="evaluate-stage")
def evaluate_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the evaluation artifact: metric tables and pictures, also shown in the run's artifacts."""
    store = Store(store_root)
    with observed():
        result = run_stage(store, cfg, "evaluate", upstream, lambda files: build_evaluate(cfg, store, upstream, files), force)
        publish_metrics(cfg, store, result.key, upstream)
        publish_pictures(cfg, store, result.key)
    return result
