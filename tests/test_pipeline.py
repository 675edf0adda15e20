"""End to end on a tiny synthetic world: every stage, reuse, and which stages a config change recomputes. One run of
every stage is shared by the tests that read it, so one failed check does not hide the others."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clips4.config import resolve_config
from clips4.tasks.common import StageResult
from clips4.tasks.stages import STAGES
from clips4.flows.pipeline import PipelineError, execute
from clips4.storage import Store
from conftest import tiny_cli, tiny_config

pytestmark = pytest.mark.slow

Run = Callable[..., dict[str, StageResult]]


def _runner(root: Path) -> Run:
    """Runs of the tiny world (tests/tiny.yaml, with overrides) into the store at ``root``, results by stage."""

    def go(overrides=(), stages=STAGES, force=None) -> dict[str, StageResult]:
        return {r.stage: r for r in execute(tiny_config(*overrides), list(stages), force, str(root))}

    return go


@pytest.fixture
def run(tmp_path, prefect_harness) -> Run:
    """Runs into a store of the test's own."""
    return _runner(tmp_path)


@dataclass
class Shared:
    """The first run of every stage, in a store the module's tests share: they read it, or add runs to it."""

    store: Store
    first: dict[str, StageResult]
    run: Run

    def evaluated(self):
        return self.store.open(self.first["evaluate"].key)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, prefect_harness) -> Shared:
    root = tmp_path_factory.mktemp("pipeline")
    run = _runner(root)
    return Shared(Store(root), run(), run)


def test_the_first_run_builds_every_stage(shared) -> None:
    assert all(not r.reused for r in shared.first.values())
    assert {m.kind for m in shared.store.list()} == set(STAGES)


def test_features_are_stored_float16_one_chunk_per_image(shared) -> None:
    from clips4.tasks.readers import FeaturesArtifact

    feats = FeaturesArtifact.open(shared.store, shared.first["features"].key).features("train")
    assert feats.dtype == "float16" and feats.shape[0] == 24 and feats.chunks[0] == 1


def test_evaluate_scores_plain_and_test_time_rows(shared) -> None:
    evaluated = shared.evaluated()
    metrics = evaluated.read_table("metrics")
    # Plain rows and test-time rows (tiny.yaml's scales, re-centring, the share floor) for MaskCLIP and the student.
    assert set(metrics["method"]) == {"maskclip", "maskclip+kspd", "maskclip+tta", "clips4", "clips4+tta"}
    assert {"language", "unsupervised", "probe"} <= set(metrics["task"])
    assert metrics["value"].notna().all()
    assert evaluated.has("overlays.png")
    summary = evaluated.read_table("summary")
    assert {"maskclip_best", "clips4_gain", "clips4+tta_gain"} <= set(summary.columns)
    assert "Best MaskCLIP row" in evaluated.file("metrics.md").read_text()


def test_held_out_classes_get_their_share_floor_and_known_classes_no_bias(shared) -> None:
    """evaluate.new_class_floor (0.25 in tiny.yaml): a held-out class below a quarter of MaskCLIP's share is raised to
    it; when none is below, no class gets a bias."""
    calibration = shared.evaluated().read_table("calibration")
    held = calibration[calibration["held_out"]]
    assert set(held["class"]) == {"star", "box"} and (calibration.loc[~calibration["held_out"], "bias"] == 0).all()
    floor = 0.25 * held["maskclip_share"]
    below = held["clips4_share"] < floor
    assert (held["clips4_share_with_bias"] >= 0.9 * floor).all()
    assert (held.loc[below, "bias"] > 0).all()
    if not below.any():
        assert (held["bias"] == 0).all() and (held["clips4_share_with_bias"] == held["clips4_share"]).all()
    assert shared.evaluated().has("calibration.png")


def test_the_train_stage_stores_where_the_student_embeddings_sit(shared) -> None:
    """The student was trained towards the known classes' text cone; the train stage stores where its embeddings
    sit, and the evaluate stage re-centres from there on the classes it names."""
    from clips4.inference import embedding_centre, student_embedder
    from clips4.tasks.readers import DataArtifact, TrainArtifact

    trained = TrainArtifact.open(shared.store, shared.first["train"].key)
    assert trained.gap() is not None
    embed = student_embedder(trained.student(torch.device("cpu")), 8, (1.0,))
    remeasured = embedding_centre(embed, DataArtifact.open(shared.store, shared.first["data"].key).train_images())
    torch.testing.assert_close(trained.centre(), remeasured)
    assert 0.0 < trained.centre().norm() < 1.0


def test_evaluate_only_settings_recompute_only_evaluate(shared) -> None:
    plain = shared.run(["evaluate.recentre_gap=false", "evaluate.new_class_floor=0"])
    assert [s for s, r in plain.items() if not r.reused] == ["evaluate"]
    assert not shared.store.open(plain["evaluate"].key).has("calibration.parquet")


def test_a_student_trained_on_the_image_side_stores_no_centre(shared) -> None:
    from clips4.tasks.readers import TrainArtifact

    image_side = shared.run(["train.emb_space=image"])
    assert TrainArtifact.open(shared.store, image_side["train"].key).centre() is None


def test_an_unchanged_config_reuses_every_stage(shared) -> None:
    again = shared.run()
    assert all(r.reused for r in again.values())
    assert {s: r.key for s, r in again.items()} == {s: r.key for s, r in shared.first.items()}


@pytest.mark.parametrize(
    ("override", "recomputed"),
    [
        ("train.lr=0.004", ["train", "evaluate"]),
        ("features.dtype=float32", ["features", "cluster", "train", "evaluate"]),
    ],
)
def test_a_config_change_recomputes_its_stage_and_every_later_one(shared, override, recomputed) -> None:
    changed = shared.run([override])
    assert [s for s, r in changed.items() if not r.reused] == recomputed


def test_held_out_names_never_reach_training(shared) -> None:
    store, results = shared.store, shared.first
    protos = store.open(results["cluster"].key).load_tensors("prototypes.safetensors")
    known = protos["known"]
    assert protos["gap"].shape == (known.shape[1],) and protos["gap"].norm() > 0  # the modality-gap offset
    text = store.open(results["features"].key).load_tensors("text.safetensors")["text"]
    classes = store.open(results["features"].key).read_json("classes.json")
    held = [i for i, h in enumerate(classes["held_out"]) if h]
    assert held and len(known) == len(text) - len(held)
    # Every training target is a known class's text embedding; no held-out embedding is among them.
    for i in held:
        assert not (known - text[i]).abs().sum(dim=1).lt(1e-6).any()
    table = store.open(results["cluster"].key).read_table("prototypes")
    assert not set(table["name"]) & {"star", "box"}


def test_named_clusters_reach_training_through_the_store(shared) -> None:
    """The cluster stage stores the named centres with their classes; the train stage labels with them."""
    named = shared.run(["cluster.labels=named_clusters", "cluster.num_centres=6"])
    protos = shared.store.open(named["cluster"].key).load_tensors("prototypes.safetensors")
    anchors, classes = protos["anchors"], protos["anchor_class"]
    assert len(anchors) + len(protos["unknown"]) == 6 and len(anchors) == len(classes)
    assert ((classes >= 0) & (classes < len(protos["known"]))).all()
    table = shared.store.open(named["cluster"].key).read_table("prototypes")
    assert table["named_clusters"].sum() == len(anchors) == named["cluster"].summary["named_clusters"]
    assert named["train"].summary["known_label_share"] is not None


def test_force_recomputes_the_stage_and_every_later_one(shared) -> None:
    """Last of the tests on the shared store: it rewrites the first run's cluster, train and evaluate artifacts."""
    forced = shared.run(force="cluster")
    assert [s for s, r in forced.items() if not r.reused] == ["cluster", "train", "evaluate"]


# The demo preset's sizes scaled down to tests/tiny.yaml's; every method setting stays the demo's own.
DEMO_AT_TINY_SIZE = [
    "data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.num_test=8",
    "data.synthetic.image_size=32", "data.train_resolution=32", "data.regions.n_segments=16",
    "teacher.epochs=1", "teacher.num_images=32", "teacher.batch_size=8",
    "features.resolution=32", "features.shard_size=8", "features.batch_size=4",
    "cluster.num_unknown=2", "cluster.sample_size=400",
    "train.steps=3", "train.batch_size=4", "train.input_size=32", "train.checkpoint_every=2", "train.refresh_every=2",
    "evaluate.probe_epochs=1", "evaluate.num_pictures=2",
]


def test_the_demo_preset_runs_every_stage(tmp_path, prefect_harness) -> None:
    results = execute(resolve_config("demo", overrides=DEMO_AT_TINY_SIZE), list(STAGES), None, str(tmp_path))
    assert [r.stage for r in results] == list(STAGES) and not any(r.reused for r in results)
    metrics = Store(tmp_path).open(results[-1].key).read_table("metrics")
    assert set(metrics["method"]) == {"maskclip", "maskclip+kspd", "maskclip+tta", "clips4", "clips4+tta"}
    assert metrics["value"].notna().all()


def test_missing_upstream_is_refused(tmp_path, run) -> None:
    with pytest.raises(PipelineError, match="add those stages"):
        run(stages=["train"])


def test_train_stage_under_torchrun_trains_with_every_rank(tmp_path, run, child_env) -> None:
    """`torchrun --nproc-per-node 2 clips4 run`: rank 0 runs the stage, rank 1 trains beside it (DDP over gloo)."""
    import subprocess
    import sys

    from clips4.tasks.train import follow_train

    run(stages=["data", "teacher", "features", "cluster"])
    sets = tiny_cli("train.device=cpu")  # two ranks even on a one-GPU machine
    env = {**child_env, "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "clips4.flows.cli", "run", *sets, "--stages", "train", "--store", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 1 of 2: training" in done.stderr
    store = Store(tmp_path)
    (trained,) = store.list("train")
    assert trained.summary["processes"] == 2 and trained.summary["steps"] == 3
    assert not any((tmp_path / ".staging").iterdir())  # nothing left behind by either rank
    # A rank > 0 trains only when rank 0 will: not when the student is stored, not when train is not run.
    cfg = tiny_config()
    assert not follow_train(cfg, store, ["train"], None) and not follow_train(cfg, store, ["evaluate"], None)


def test_baseline_only_evaluation(tmp_path, run) -> None:
    import torch

    from clips4.data.io import read_image
    from clips4.data.prepare import resize_square
    from clips4.harness import maskclip_model
    from clips4.tasks.readers import DataArtifact, FeaturesArtifact, load_teacher

    results = run(stages=["data", "teacher", "features", "evaluate"])
    store = Store(tmp_path)
    metrics: pd.DataFrame = store.open(results["evaluate"].key).read_table("metrics")
    assert set(metrics["method"]) == {"maskclip", "maskclip+kspd", "maskclip+tta"}
    language = metrics[(metrics["task"] == "language") & (metrics["metric"] == "mIoU")].set_index("method")["value"]
    assert language["maskclip+tta"] != language["maskclip"]  # really another input, not the stored map again

    # At scale 1 the evaluate stage's MaskCLIP path gives back the features stage's stored map.
    resolution = tiny_config().features.resolution
    records = DataArtifact.open(store, results["data"].key).records("val")[:2]
    images = np.stack([resize_square(read_image(r.image_path), resolution) for r in records])
    teacher = load_teacher(store.open(results["teacher"].key), torch.device("cpu"))
    again = maskclip_model(teacher, size=resolution, device=torch.device("cpu"), batch_size=2).encode(images)
    again = again.permute(0, 2, 3, 1).numpy()
    stored = np.asarray(FeaturesArtifact.open(store, results["features"].key).features("val")[:2], dtype=np.float32)
    np.testing.assert_allclose(again, stored, atol=2e-3)


def test_segment_and_export_masks_on_unseen_images(tmp_path, run) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from clips4.config import SyntheticConfig
    from clips4.data.synthetic import SyntheticWorld
    from clips4.flows.cli import app

    results = run()
    # Images from a world the student never saw (another seed), and class names given only now.
    world = SyntheticWorld(SyntheticConfig(seed=123, image_size=48))
    paths = []
    for i in range(3):
        path = tmp_path / f"mine_{i}.png"
        Image.fromarray(world.sample("val", i).image).save(path)
        paths.append(str(path))
    out = tmp_path / "masks"
    cli = CliRunner()
    result = cli.invoke(app, ["segment", *paths, "--classes", "grass, sand | beach, kite, star", "--out", str(out),
                              "--store", str(tmp_path), "--scale", "2", "--scale", "3"])
    assert result.exit_code == 0, result.output
    for i in range(3):
        mask = Image.open(out / f"mine_{i}_mask.png")
        assert mask.mode == "P" and mask.size == (48, 48)
        assert set(np.unique(np.array(Image.open(out / f"mine_{i}_labels.png")))) <= {0, 1, 2, 3}
        assert (out / f"mine_{i}_overlay.png").is_file()
    assert "sand | beach" in (out / "classes.txt").read_text()
    bad = cli.invoke(app, ["segment", paths[0], "--classes", "grass, kite", "--out", str(tmp_path / "bad"),
                           "--store", str(tmp_path), "--scale", "9"])
    assert bad.exit_code == 1 and "test scales must lie in [0.25, 4]" in bad.output

    exported = cli.invoke(app, ["export-masks", "--split", "val", "--checkpoint", results["train"].key,
                                "--out", str(tmp_path / "val"), "--store", str(tmp_path)])
    assert exported.exit_code == 0, exported.output
    assert len(list((tmp_path / "val").glob("*_mask.png"))) == 8
    assert not (tmp_path / "val" / "calibration.csv").exists()

    # With the evaluate stage's share floor and test scales, the export measures the shares (hence the bias) the
    # evaluate stage scored with, on the held-out names only (float16 cached embeddings there, float32 here).
    scales = ["--scale", "2", "--scale", "3", "--scale", "4"]
    floored = cli.invoke(app, ["export-masks", "--split", "val", "--out", str(tmp_path / "floored"),
                               "--store", str(tmp_path), "--new-class-floor", "0.25", *scales])
    assert floored.exit_code == 0, floored.output
    mine = pd.read_csv(tmp_path / "floored" / "calibration.csv")
    scored = Store(tmp_path).open(results["evaluate"].key).read_table("calibration")
    assert mine["class"].tolist() == scored["class"].tolist()
    assert mine["held_out"].tolist() == scored["held_out"].tolist()
    np.testing.assert_allclose(mine["maskclip_share"], scored["maskclip_share"], atol=1e-6)
    np.testing.assert_allclose(mine["clips4_share"], scored["clips4_share"], atol=0.01)
    np.testing.assert_allclose(mine["bias"], scored["bias"], atol=0.05)
    assert (tmp_path / "floored" / "calibration.png").is_file()
    # A user's own names: only those the student was never trained on (star) can get a bias.
    named = cli.invoke(app, ["segment", *paths, "--classes", "grass, kite, star", "--out", str(tmp_path / "named"),
                             "--store", str(tmp_path), "--new-class-floor", "1", *scales])
    assert named.exit_code == 0, named.output
    calibration = pd.read_csv(tmp_path / "named" / "calibration.csv")
    assert calibration["held_out"].tolist() == [False, False, True]
    assert (calibration.loc[:1, "bias"] == 0).all()
    too_high = cli.invoke(app, ["segment", paths[0], "--classes", "grass, star", "--store", str(tmp_path),
                                "--new-class-floor", "2"])
    assert too_high.exit_code == 2 and "new-class-floor" in too_high.output

    missing = cli.invoke(app, ["segment", str(tmp_path / "nope.png"), "--classes", "a", "--store", str(tmp_path)])
    assert missing.exit_code != 0 and "nope.png" in missing.output
