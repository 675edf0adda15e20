"""The evaluation harness on a toy world, without Prefect or the store: which rows it scores, at which resolution,
and the summary of the best MaskCLIP row against each clips4 row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import clips4.harness as harness_module
from clips4.config import EvaluateConfig
from clips4.harness import METHODS, DenseModel, EvalInputs, Harness, Split, summary_table, to_grid

CPU = torch.device("cpu")
K, D, SIDE = 3, 4, 8
OFFSET = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the toy models' image cone: every map leans towards e3


def toy_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [n,8,8,3] whose 2x2 blocks are pure red, green or blue, and their labels (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, (n, SIDE // 2, SIDE // 2)).repeat(2, 1).repeat(2, 2)
    return (np.eye(3, dtype=np.uint8)[labels] * 255), labels.astype(np.uint8)


def encoder(stride: int):
    """A dense model whose pixel embedding is its colour plus the cone offset, at output stride ``stride``."""

    def encode(images: np.ndarray) -> torch.Tensor:
        rgb = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255
        maps = torch.cat([rgb, torch.zeros_like(rgb[:, :1])], dim=1) + OFFSET.view(1, -1, 1, 1)
        return F.avg_pool2d(maps, stride)

    return encode


def toy_split(n: int, seed: int) -> Split:
    images, labels = toy_images(n, seed)
    stored = encoder(2)(images).permute(0, 2, 3, 1).numpy().astype(np.float16)  # MaskCLIP's stored map, 4x4
    return Split(lambda i: images[i], lambda i: labels[i], stored, keys=stored)


def toy_inputs(student: bool = True, train: bool = True, centre: bool = True) -> EvalInputs:
    text = torch.eye(D)[:K]
    return EvalInputs(
        evaluated=toy_split(6, 1), train=toy_split(10, 0) if train else None, text=text, names=["red", "green", "blue"],
        held_out=[2], teacher=DenseModel(encoder(2), SIDE),
        student=DenseModel(encoder(1), SIDE) if student else None,
        student_centre=F.normalize(torch.tensor([1.0, 1.0, 1.0, 3.0]), dim=0) / 2 if centre else None,
    )


def settings(**overrides) -> EvaluateConfig:
    base = dict(test_scales=[1.0, 2.0], grid=SIDE, probe_epochs=5, probe_lr=0.5, calibration_pixels=1000,
                new_class_floor=0.25, batch_size=4)
    return EvaluateConfig(**{**base, **overrides})


def test_the_registry_names_plain_and_test_time_rows() -> None:
    assert list(METHODS) == ["maskclip", "maskclip+kspd", "maskclip+tta", "clips4", "clips4+tta"]
    assert not METHODS["maskclip"].steps and not METHODS["clips4"].steps
    assert METHODS["maskclip+tta"].steps == METHODS["clips4+tta"].steps == {"scales", "recentre", "floor"}
    assert {m.model for m in METHODS.values()} == {"maskclip", "clips4"}


def test_rows_follow_the_inputs_and_the_settings() -> None:
    full = Harness(toy_inputs(), settings(), CPU)
    assert full.rows("language") == list(METHODS)
    assert full.rows("unsupervised") == full.rows("probe") == ["maskclip", "maskclip+tta", "clips4", "clips4+tta"]
    # At scale 1 the test-time rows differ from the plain ones by their class scores only: no unsupervised, no probe.
    one = Harness(toy_inputs(), settings(test_scales=[1.0]), CPU)
    assert one.rows("language") == list(METHODS) and one.rows("probe") == ["maskclip", "clips4"]
    assert one.steps("clips4+tta", "language") == {"recentre", "floor"}
    # No step left: the test-time rows would repeat the plain ones.
    plain = Harness(toy_inputs(), settings(test_scales=[1.0], recentre_gap=False, new_class_floor=0), CPU)
    assert plain.rows("language") == ["maskclip", "maskclip+kspd", "clips4"]
    # A student trained on the image side has no centre: its test-time row keeps the scales and the floor.
    assert Harness(toy_inputs(centre=False), settings(), CPU).steps("clips4+tta", "language") == {"scales", "floor"}
    alone = Harness(toy_inputs(student=False, train=False), settings(), CPU)
    assert alone.rows("language") == ["maskclip", "maskclip+kspd", "maskclip+tta"] and alone.rows("probe") == []
    assert alone.steps("maskclip+tta", "language") == {"scales", "recentre"}  # no train split: no floor
    assert Harness(toy_inputs(), settings(tasks=["language"]), CPU).rows("unsupervised") == []


def test_maskclip_is_recentred_from_the_mean_of_its_stored_train_features() -> None:
    inputs = toy_inputs()
    stored = torch.from_numpy(inputs.train.features.astype(np.float32))
    expected = F.normalize(stored, dim=-1).mean(dim=(0, 1, 2))
    torch.testing.assert_close(Harness(inputs, settings(), CPU).centre("maskclip"), expected)
    assert Harness(inputs, settings(), CPU).centre("clips4") is inputs.student_centre


def test_a_run_scores_every_row_and_summarises_the_gains(tmp_path) -> None:
    harness = Harness(toy_inputs(), settings(), CPU, tmp_path / "cache")
    results = harness.run()
    metrics = results.metrics
    assert list(metrics.columns) == ["method", "task", "metric", "value"]
    assert list(pd.unique(metrics["method"])) == list(METHODS)
    assert set(metrics.loc[metrics["method"] == "maskclip+kspd", "task"]) == {"language"}
    assert set(metrics.loc[metrics["task"] != "language", "metric"]) == {"mIoU", "pAcc"}
    assert metrics["value"].notna().all()
    # Colours are the classes: every row but the denoised one finds them all on the clean toy world.
    language = metrics[(metrics["task"] == "language") & (metrics["metric"] == "mIoU")].set_index("method")["value"]
    assert (language.drop("maskclip+kspd") > 0.9).all()
    assert len(results.per_class) == K * len(metrics[metrics["metric"] == "mIoU"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "clips4@1+2x-evaluated.npy", "clips4@1+2x-train.npy", "clips4@1x-evaluated.npy", "clips4@1x-train.npy",
        f"labels@{SIDE}-train.npy", "maskclip@1+2x-evaluated.npy", "maskclip@1+2x-train.npy",
    ]
    # One floor per test-time row; the student's columns are those `clips4 segment` writes.
    assert list(results.calibration.columns) == [
        "class", "held_out", "maskclip_share", "maskclip+tta_share", "maskclip+tta_bias",
        "maskclip+tta_share_with_bias", "clips4_share", "bias", "clips4_share_with_bias",
    ]
    assert results.calibration["held_out"].tolist() == [False, False, True]
    summary = results.summary
    assert list(summary.columns[:4]) == ["task", "metric", "maskclip_best", "maskclip_best_value"]
    assert {"clips4", "clips4_gain", "clips4+tta", "clips4+tta_gain"} <= set(summary.columns)
    assert len(summary) == len(metrics[["task", "metric"]].drop_duplicates())
    label = harness.predict("clips4+tta", 0)
    assert label.shape == (SIDE, SIDE) and label.dtype == np.int64


def test_unsupervised_and_probe_see_every_map_on_one_grid(monkeypatch) -> None:
    seen: dict[str, set] = {}
    real = harness_module.unsupervised_segmentation

    def spy(batches, *args, **kwargs):
        seen.setdefault("shapes", set()).update(tuple(emb.shape[-2:]) for emb, _ in batches)
        return real(batches, *args, **kwargs)

    real_probe = harness_module.train_linear_probe

    def probe_spy(read, num_images, *args, **kwargs):
        def spied(idx):
            emb, labels = read(idx)
            seen.setdefault("probe", set()).add((len(idx), *emb.shape[-2:], *labels.shape[-2:]))
            return emb, labels

        return real_probe(spied, num_images, *args, **kwargs)

    monkeypatch.setattr(harness_module, "unsupervised_segmentation", spy)
    monkeypatch.setattr(harness_module, "train_linear_probe", probe_spy)
    harness = Harness(toy_inputs(), settings(grid=6, tasks=["unsupervised", "probe"]), CPU)
    for name in harness.rows("unsupervised"):  # MaskCLIP's stored map is 4x4, the student's 8x8
        harness.score(name, "unsupervised")
        harness.score(name, "probe")
    assert seen["shapes"] == {(6, 6)}
    assert {shape[1:] for shape in seen["probe"]} == {(6, 6, 6, 6)}  # maps and labels on the grid
    assert max(shape[0] for shape in seen["probe"]) <= 16  # streamed a batch at a time
    assert to_grid(torch.zeros(1, D, 4, 4), 6).shape == (1, D, 6, 6)


def test_the_summary_takes_the_best_maskclip_row_per_task_and_metric() -> None:
    metrics = pd.DataFrame(
        [("maskclip", "language", "mIoU", 0.30), ("maskclip+kspd", "language", "mIoU", 0.35),
         ("maskclip+tta", "language", "mIoU", 0.40), ("clips4", "language", "mIoU", 0.38),
         ("clips4+tta", "language", "mIoU", 0.55), ("maskclip", "probe", "mIoU", 0.50),
         ("clips4", "probe", "mIoU", 0.80)],
        columns=["method", "task", "metric", "value"],
    )
    summary = summary_table(metrics).set_index(["task", "metric"])
    assert summary.loc[("language", "mIoU"), "maskclip_best"] == "maskclip+tta"
    assert summary.loc[("language", "mIoU"), "clips4_gain"] == pytest.approx(-2.0)
    assert summary.loc[("language", "mIoU"), "clips4+tta_gain"] == pytest.approx(15.0)
    assert summary.loc[("probe", "mIoU"), "maskclip_best"] == "maskclip"
    assert summary.loc[("probe", "mIoU"), "clips4_gain"] == pytest.approx(30.0)
    assert np.isnan(summary.loc[("probe", "mIoU"), "clips4+tta_gain"])
    no_student = summary_table(metrics[metrics["method"].str.startswith("maskclip")])
    assert list(no_student.columns) == ["task", "metric", "maskclip_best", "maskclip_best_value"]
