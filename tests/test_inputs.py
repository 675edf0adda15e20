"""Faithful inputs: high-bit-depth images scaled (not clipped), EXIF orientation applied, decompression bombs refused
from the header, and the data stage storing what a viewer would show."""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets import write_jpg, write_voc

from clips4.config import DataConfig
from clips4.data.datasets import get_dataset, voc_palette
from clips4.data.io import BadImageError, check_pixels, read_image, read_label_png, write_png
from clips4.data.validate import BadInputError, validate_records
from clips4.storage import Store
from conftest import tiny_config

RAMP = np.array([[0, 255, 256, 257, 32768, 65535]], dtype=np.uint16)
RAMP_8BIT = [0, 0, 1, 1, 128, 255]  # the high byte: 65535 -> 255, 32768 -> 128
ORIENTATION = 0x0112
BOMB_SIDE = 10_000  # 100 Mpx, over the 50 Mpx default, in a 12 kB file


def write_png16(path: Path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG, chunk by chunk: Pillow cannot write one."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def write_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (side, side)).save(path)


def write_sideways_jpg(path: Path) -> None:
    """Stored 16x32 (HxW), white on the left; EXIF orientation 6 shows it 32x16, white on top."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


# ------------------------------------------------------------------------------------------------- bit depth
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(RAMP).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (1, 6, 3)
    assert (image == np.array(RAMP_8BIT, np.uint8)[None, :, None]).all()


def test_big_endian_32bit_and_float_grayscale_are_scaled(tmp_path: Path) -> None:
    Image.fromarray(RAMP.astype(">u2")).save(tmp_path / "big.tif")
    Image.fromarray(RAMP.astype(np.int32)).save(tmp_path / "int.tif")
    Image.fromarray(np.array([[0, 0.5, 1]], np.float32)).save(tmp_path / "float.tif")
    assert [Image.open(tmp_path / n).mode for n in ("big.tif", "int.tif", "float.tif")] == ["I;16B", "I", "F"]
    assert read_image(tmp_path / "big.tif")[0, :, 0].tolist() == RAMP_8BIT
    assert read_image(tmp_path / "int.tif")[0, :, 0].tolist() == RAMP_8BIT
    assert read_image(tmp_path / "float.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_pixel_values_with_no_defined_brightness_are_bad_input(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-5, 70000]], np.int32)).save(tmp_path / "int.tif")
    Image.fromarray(np.array([[0, 2.5]], np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImageError, match=r"int.tif: has 32-bit integer pixel values from -5 to 70000"):
        read_image(tmp_path / "int.tif")
    with pytest.raises(BadImageError, match=r"float.tif: has floating-point pixel values .* outside the range 0..1"):
        read_image(tmp_path / "float.tif")


def test_48bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.png"
    write_png16(path, np.stack([RAMP, RAMP // 2, 65535 - RAMP], axis=-1))
    image = read_image(path)
    assert image[0, :, 0].tolist() == RAMP_8BIT
    assert image[0, -1].tolist() == [255, 127, 0]
    assert image[0, 4].tolist() == [128, 64, 127]


# ------------------------------------------------------------------------------------------------ orientation
def test_exif_orientation_is_applied_to_images(tmp_path: Path) -> None:
    path = tmp_path / "sideways.jpg"
    write_sideways_jpg(path)
    image = read_image(path)
    assert image.shape == (32, 16, 3)
    assert image[:12].min() > 200 and image[-12:].max() < 50  # white on top


def test_label_maps_keep_their_values_and_turn_only_by_their_own_orientation(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_png(tmp_path / "plain.png", values, palette=voc_palette())
    assert np.array_equal(read_label_png(tmp_path / "plain.png"), values)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    image = Image.fromarray(values)
    image.putpalette(voc_palette().ravel().tolist())
    image.save(tmp_path / "turned.png", exif=exif)
    turned = read_label_png(tmp_path / "turned.png")
    assert np.array_equal(turned, np.rot90(values, k=-1))  # moved, never changed


def test_a_label_drawn_on_the_sideways_pixels_is_reported(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC", {"train": ["sideways"]})
    write_sideways_jpg(root / "JPEGImages" / "sideways.jpg")
    write_png(root / "SegmentationClass" / "sideways.png", np.zeros((16, 32), np.uint8), palette=voc_palette())
    ds = get_dataset(DataConfig(dataset="voc21", root=root))
    (problem,) = validate_records(ds.records("train"), ds, "skip").problems
    assert "label is 32x16 (WxH)" in problem.problem and "16x32" in problem.problem
    assert "EXIF orientation" in problem.problem


# ------------------------------------------------------------------------------------------ decompression bombs
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    write_bomb(bomb)
    assert bomb.stat().st_size < 20_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not come first
        with pytest.raises(BadImageError) as caught:
            read_image(bomb, max_pixels=50_000_000)
        check_pixels(bomb, None)  # no limit: the header opens without Pillow's warning
    message = str(caught.value)
    assert str(bomb) in message and "10000x10000" in message and "50,000,000" in message
    assert "data.max_pixels" in message


def test_the_limit_covers_label_maps_too(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC", {"train": ["a", "b"]})  # 6x8 images
    Image.new("P", (40, 40)).save(root / "SegmentationClass" / "b.png")
    ds = get_dataset(DataConfig(dataset="voc21", root=root))
    report = validate_records(ds.records("train"), ds, "skip", max_pixels=100)
    assert [r.image_id for r in report.good] == ["a"]
    (problem,) = report.problems
    assert problem.path.endswith("b.png") and "40x40 = 1,600 pixels, more than the limit of 100" in problem.problem


def test_error_policy_names_the_bomb_the_limit_and_both_remedies(tmp_path: Path) -> None:
    write_jpg(tmp_path / "ok.jpg")
    write_bomb(tmp_path / "bomb.png")
    ds = get_dataset(DataConfig(dataset="imagefolder", root=tmp_path))
    with pytest.raises(BadInputError) as caught:
        validate_records(ds.records("train"), ds, "error", max_pixels=50_000_000)
    message = str(caught.value)
    assert str(tmp_path / "bomb.png") in message and "50,000,000" in message
    assert "raise data.max_pixels" in message and "--set data.on_bad_input=skip" in message


# ------------------------------------------------------------------------------------------ data stage end to end
def test_the_data_stage_stores_what_a_viewer_shows_and_says_what_it_skipped(tmp_path: Path, caplog) -> None:
    from clips4.tasks.data import data_task
    from clips4.tasks.readers import DataArtifact

    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "deep.png")
    write_sideways_jpg(root / "phone.jpg")
    write_bomb(root / "zz_bomb.png")
    cfg = tiny_config("data.dataset=imagefolder", f"data.root={root}", "data.splits=[train]", "data.held_out=[]",
                      "data.on_bad_input=skip")
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="clips4"):
        result = data_task.fn(cfg, str(store), {})
        again = data_task.fn(cfg, str(store), {})  # reused: its skipped files are still missing, so it warns again
    assert again.reused and again.key == result.key
    data = DataArtifact.open(Store(store), result.key)
    assert [r.image_id for r in data.records("train")] == ["deep", "phone"]
    images = np.asarray(data.train_images()[:])
    assert images.shape == (2, 32, 32, 3)
    assert (images[0] == 40000 >> 8).all()  # 156, where clipping gave 255
    assert images[1, :12].min() > 200 and images[1, -12:].max() < 50  # upright: white on top
    report = Store(store).path(result.key) / "report.json"
    lines = [r.getMessage() for r in caplog.records if r.name == "clips4.tasks.data"]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith(f"skipped 1 bad input file (first: {root / 'zz_bomb.png'}: is 10000x10000")
    assert lines[0].endswith(f"raise data.max_pixels or set it to null); list in {report}")
