"""The field's evaluation protocols (clips4.protocol): keep-ratio resizing, sliding windows that cover the image and
agree with whole-image inference for a position-independent model, the thresholded background, and the harness and
the pipeline scoring under protocol 'slide'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clips4.config import ConfigError, EvaluateConfig, resolve_config
from clips4.harness import METHODS, DenseModel, EvalInputs, Harness, Split
from clips4.protocol import (
    keep_ratio_size,
    predict_labels,
    protocol_scores,
    resize_image,
    slide_logits,
    threshold_background,
    whole_logits,
    window_boxes,
)

CPU = torch.device("cpu")
K = 5


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def per_pixel(weights: torch.Tensor):
    """A scorer whose scores at a pixel are a linear map of that pixel's colour alone, wherever the window is."""

    def score(windows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(windows).float().permute(0, 3, 1, 2) / 255
        return torch.einsum("bchw,kc->bkhw", x, weights)

    return score


@pytest.mark.parametrize(("height", "width", "crop", "stride"), [(37, 53, 16, 5), (20, 9, 16, 16), (8, 8, 16, 4)])
def test_sliding_windows_agree_with_the_whole_image_for_a_per_pixel_model(height, width, crop, stride) -> None:
    image, score = random_image(height, width), per_pixel(torch.randn(K, 3))
    slid = slide_logits(score, image, crop, stride, K)
    assert slid.shape == (1, K, height, width)
    torch.testing.assert_close(slid, whole_logits(score, image, K), rtol=1e-5, atol=1e-5)


def test_a_crop_that_covers_the_image_is_one_window_the_size_of_the_image() -> None:
    seen: list[tuple[int, ...]] = []
    inner = per_pixel(torch.randn(K, 3))

    def score(windows: np.ndarray) -> torch.Tensor:
        seen.append(windows.shape)
        return inner(windows)

    image = random_image(30, 41)
    assert torch.equal(slide_logits(score, image, 64, 32, K), whole_logits(score, image, K))
    assert seen == [(1, 30, 41, 3), (1, 30, 41, 3)]


@pytest.mark.parametrize(("height", "width", "crop", "stride"), [
    (336, 448, 224, 112), (336, 500, 224, 112), (100, 300, 224, 112), (50, 61, 10, 7), (5, 5, 3, 1),
])
def test_windows_cover_every_pixel_and_end_at_the_border(height, width, crop, stride) -> None:
    boxes = window_boxes(height, width, crop, stride)
    covered = np.zeros((height, width), np.int64)
    for t, l, b, r in boxes:
        assert 0 <= t < b <= height and 0 <= l < r <= width
        assert (b - t, r - l) == (min(crop, height), min(crop, width))  # one size: a batch of windows
        covered[t:b, l:r] += 1
    assert covered.min() >= 1
    assert max(b for _, _, b, _ in boxes) == height and max(r for _, _, _, r in boxes) == width
    tops = sorted({t for t, _, _, _ in boxes})
    assert all(0 < b - a <= stride for a, b in zip(tops, tops[1:]))
    # Averaging divides by how many windows saw each pixel: a constant score stays that constant everywhere.
    ones = slide_logits(lambda w: torch.ones(len(w), 2, 3, 3), random_image(height, width), crop, stride, 2)
    torch.testing.assert_close(ones, torch.ones(1, 2, height, width))


def test_the_field_windows_of_a_voc_sized_image() -> None:
    assert window_boxes(336, 448, 224, 112) == [
        (0, 0, 224, 224), (0, 112, 224, 336), (0, 224, 224, 448),
        (112, 0, 336, 224), (112, 112, 336, 336), (112, 224, 336, 448),
    ]
    with pytest.raises(ValueError, match="stride must lie in"):
        window_boxes(10, 10, 4, 5)


def test_keep_ratio_resize_fixes_the_short_side() -> None:
    assert keep_ratio_size(375, 500, 336) == (336, 448)
    assert keep_ratio_size(500, 375, 336) == (448, 336)
    assert keep_ratio_size(1024, 2048, 560) == (560, 1120)
    assert keep_ratio_size(333, 500, 512) == (512, 769)  # 768.77 rounds up
    assert keep_ratio_size(100, 100, 224) == (224, 224)  # small images grow
    image = random_image(375, 500)
    assert resize_image(image, (336, 448)).shape == (336, 448, 3)
    assert resize_image(image, (375, 500)) is image


def test_a_model_with_a_patch_sees_multiples_of_it_and_scores_come_back_at_the_window_size() -> None:
    seen: list[tuple[int, ...]] = []

    def score(windows: np.ndarray) -> torch.Tensor:
        seen.append(windows.shape[1:3])
        return torch.zeros(len(windows), K, windows.shape[1] // 16, windows.shape[2] // 16)

    assert whole_logits(score, random_image(50, 70), K, multiple=16).shape == (1, K, 50, 70)
    assert seen == [(48, 64)]
    with pytest.raises(ValueError, match=r"expected \[1,4,h,w\]"):
        whole_logits(score, random_image(32, 32), 4, multiple=16)


def test_test_scales_multiply_the_short_side_and_scores_come_back_at_the_label_size() -> None:
    seen: list[tuple[int, ...]] = []
    inner = per_pixel(torch.randn(K, 3))

    def score(windows: np.ndarray) -> torch.Tensor:
        seen.append(windows.shape[1:3])
        return inner(windows)

    cfg = EvaluateConfig(protocol="whole", short_side=20)
    out = protocol_scores(score, random_image(10, 15), (10, 15), cfg, K, scales=(1.0, 2.0))
    assert out.shape == (1, K, 10, 15) and seen == [(20, 30), (40, 60)]
    seen.clear()
    protocol_scores(score, random_image(10, 15), (7, 9), EvaluateConfig(protocol="whole"), K, scales=(1.5,))
    assert seen == [(15, 23)]  # no short side: the image's own, times the scale
    with pytest.raises(ValueError, match="reads stored maps"):
        protocol_scores(score, random_image(10, 15), (10, 15), EvaluateConfig(), K)


def test_background_where_no_named_class_is_confident() -> None:
    # Three pixels scored against two named classes (ids 1 and 2): sure of 1, undecided, sure of 2.
    scores = torch.tensor([[[[30.0, 0.0, 0.0]], [[0.0, 0.0, 30.0]]]])
    assert threshold_background(scores, 0.6).tolist() == [[[1, 0, 2]]]
    assert threshold_background(scores, 0.4).tolist() == [[[1, 1, 2]]]  # 0.5 each: the first best class
    # A 1x1 score map resized to the label first: every label pixel takes it.
    assert predict_labels(scores[..., :1], (2, 3), 0.6).tolist() == [[[1, 1, 1], [1, 1, 1]]]
    assert predict_labels(scores[..., 1:2], (1, 2), 0.6).tolist() == [[[0, 0]]]
    assert predict_labels(scores[..., 1:2], (1, 2)).tolist() == [[[0, 0]]]  # plain argmax: class index 0


def test_protocol_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="stride .*must not exceed crop"):
        resolve_config(overrides=["evaluate.protocol=slide", "evaluate.stride=300"])
    with pytest.raises(ConfigError, match="short_side .*protocol 'whole' or 'slide'"):
        resolve_config(overrides=["evaluate.short_side=336"])
    with pytest.raises(ConfigError, match="background_threshold"):
        resolve_config(overrides=["evaluate.background=threshold", "evaluate.background_threshold=1"])
    cfg = resolve_config(overrides=["evaluate.protocol=slide", "evaluate.short_side=336"]).evaluate
    assert (cfg.crop, cfg.stride, cfg.background) == (224, 112, "ignore")



def test_segment_refuses_bad_protocol_options_before_it_loads_anything(tmp_path) -> None:
    from typer.testing import CliRunner

    from clips4.flows.cli import app

    base = ["segment", str(tmp_path / "a.png"), "--classes", "cat", "--store", str(tmp_path / "store")]
    result = CliRunner().invoke(app, [*base, "--protocol", "slide", "--crop", "100", "--stride", "300"])
    assert result.exit_code == 2 and "stride (300) must not exceed crop (100)" in result.output
    result = CliRunner().invoke(app, [*base, "--protocol", "sliding"])
    assert result.exit_code == 2 and "evaluate.protocol" in result.output


# ------------------------------------------------------------------------------------------------------ harness
COLOURS = np.array([[128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)  # grey, red, green, blue
OFFSET = torch.tensor([0.0, 0.0, 0.0, 1.0])


def toy_split(labels: np.ndarray, colours: np.ndarray) -> Split:
    """Images whose pixels have the colour of their label, and MaskCLIP's stored map of them at stride 2."""
    images = colours[labels]
    stored = encoder(2)(images).permute(0, 2, 3, 1).numpy().astype(np.float16)
    return Split(lambda i: images[i], lambda i: labels[i].astype(np.uint8), stored)


def blocks(n: int, seed: int) -> np.ndarray:
    """Labels [n,12,20] (non-square) of 2x2 blocks of classes 0-2."""
    return np.random.default_rng(seed).integers(0, 3, (n, 6, 10)).repeat(2, 1).repeat(2, 2)


def encoder(stride: int, calls: list | None = None):
    """A dense model whose pixel embedding is its colour plus a common offset, at output stride ``stride``."""

    def encode(images: np.ndarray) -> torch.Tensor:
        if calls is not None:
            calls.append(images.shape)
        rgb = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255
        maps = torch.cat([rgb, torch.zeros_like(rgb[:, :1])], dim=1) + OFFSET.view(1, -1, 1, 1)
        return F.avg_pool2d(maps, stride)

    return encode


def test_the_harness_scores_language_by_sliding_windows_at_each_label_size(device) -> None:
    teacher_calls: list = []
    inputs = EvalInputs(
        evaluated=toy_split(blocks(4, 1), COLOURS[1:]), train=toy_split(blocks(6, 0), COLOURS[1:]),
        text=torch.eye(4)[:3], names=["red", "green", "blue"],
        held_out=[2], teacher=DenseModel(encoder(2, teacher_calls), 8, multiple=2),
        student=DenseModel(encoder(1), 8), student_centre=None,
    )
    cfg = EvaluateConfig(protocol="slide", short_side=24, crop=16, stride=8, test_scales=[1.0, 2.0],
                         tasks=["language"], new_class_floor=0, batch_size=4)
    harness = Harness(inputs, cfg, torch.device(device))
    assert harness.rows("language") == ["maskclip", "maskclip+tta", "clips4", "clips4+tta"]  # no kspd here
    results = harness.run()
    miou = results.metrics[results.metrics["metric"] == "mIoU"].set_index("method")["value"]
    assert (miou == 1.0).all(), miou
    # MaskCLIP saw 16 px windows of each image resized to a short side of 24 (and 48 for its +tta row), never the
    # stored maps; labels are scored at their own 12 x 20.
    assert {shape[1:3] for shape in teacher_calls} == {(16, 16)}
    windows = 2 * len(window_boxes(24, 40, 16, 8)) + len(window_boxes(48, 80, 16, 8))  # maskclip, maskclip+tta
    assert sum(shape[0] for shape in teacher_calls) == len(inputs.evaluated) * windows
    assert harness.predict("clips4", 0).shape == (12, 20)


def test_the_harness_predicts_a_background_without_text_where_no_class_is_confident() -> None:
    # Each image is one colour (grey: the background, 0): a score map blends neighbours nowhere, whatever the protocol.
    split = toy_split(np.arange(5)[:, None, None].repeat(12, 1).repeat(20, 2) % 4, COLOURS)
    inputs = EvalInputs(
        evaluated=split, text=torch.cat([torch.eye(4)[:1], torch.eye(4)[:3]]),  # background's row: red's text
        names=["background", "red", "green", "blue"], held_out=[], teacher=DenseModel(encoder(2), 8, multiple=2),
    )
    for protocol, short_side in (("stored", None), ("whole", 16), ("slide", 24)):
        cfg = EvaluateConfig(protocol=protocol, short_side=short_side, crop=16, stride=8, tasks=["language"],
                             background="threshold", background_threshold=0.5, recentre_gap=False)
        harness = Harness(inputs, cfg, CPU)
        assert harness.rows("language") == ["maskclip"]
        assert harness.score("maskclip", "language")["mIoU"] == 1.0, protocol
        assert set(np.unique(harness.predict("maskclip", 0))) == set(np.unique(split.label(0)))
    # 'ignore' scores class 0 by its text too, which ties with red's: red pixels go to the first, class 0.
    ignored = Harness(inputs, EvaluateConfig(tasks=["language"], recentre_gap=False), CPU)
    assert (ignored.predict("maskclip", 1) == 0).all()
    with pytest.raises(ValueError, match="class 0 of this dataset is 'red'"):
        Harness(EvalInputs(evaluated=split, text=torch.eye(4)[:3], names=["red", "green", "blue"], held_out=[]),
                EvaluateConfig(background="threshold"), CPU)


@pytest.mark.slow
def test_the_pipeline_and_segment_run_under_protocol_slide(tmp_path, prefect_harness) -> None:
    from clips4.flows.pipeline import execute
    from clips4.storage import Store
    from clips4.tasks.segment import segment_files
    from clips4.tasks.stages import STAGES
    from conftest import tiny_config
    from PIL import Image

    protocol = ["evaluate.protocol=slide", "evaluate.short_side=48", "evaluate.crop=32", "evaluate.stride=16",
                "evaluate.test_scales=[1, 2]", "evaluate.tasks=[language]"]
    cfg = tiny_config(*protocol)
    done = {r.stage: r for r in execute(cfg, list(STAGES), None, str(tmp_path))}
    evaluated = Store(tmp_path).open(done["evaluate"].key)
    metrics = evaluated.read_table("metrics")
    assert set(metrics["method"]) == set(METHODS) - {"maskclip+kspd"}
    assert metrics["value"].notna().all()
    assert "32 px windows every 16 px" in evaluated.file("metrics.md").read_text()

    photo = tmp_path / "photo.png"
    Image.fromarray(random_image(30, 45)).save(photo)
    settings = resolve_config(overrides=protocol).evaluate
    masks = segment_files(Store(tmp_path), [photo], "grass, kite", tmp_path / "masks", device="cpu",
                          evaluate=settings).masks
    assert np.asarray(Image.open(masks[0])).shape == (30, 45)
