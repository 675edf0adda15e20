"""`clips4 segment` outputs: they mirror the inputs' paths, never overwrite each other, hold class ids past 255, and
the command says which stored student and teacher made them (the model itself is faked: see test_pipeline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clips4.tasks.segment as segment
from clips4.data.io import read_label_png
from clips4.flows.cli import app
from clips4.tasks.segment import collect_images, segment_files, write_masks


class FakeSegmenter:
    """Class i+1 (modulo the class count) everywhere on the i-th image of a call: tells two images' outputs apart."""

    def class_embeddings(self, names: list[list[str]]) -> torch.Tensor:
        return torch.zeros(len(names), 4)

    def __call__(self, images, text, batch_size, bias) -> list[np.ndarray]:
        return [np.full(image.shape[:2], (i + 1) % len(text), dtype=np.int64) for i, image in enumerate(images)]


@pytest.fixture
def fake_model(monkeypatch) -> None:
    loaded = (FakeSegmenter(), "train-0000000001", "teacher-0000000002")
    monkeypatch.setattr(segment, "load_segmenter", lambda *args: loaded)


def _png(path: Path, value: int = 0, size: tuple[int, int] = (5, 7)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def test_same_names_in_two_folders_write_two_outputs(tmp_path: Path, fake_model) -> None:
    a, b = _png(tmp_path / "in" / "a" / "1.png"), _png(tmp_path / "in" / "b" / "1.png", size=(3, 4))
    out = tmp_path / "out"
    done = segment_files(None, [a, b], "x, y, z", out)  # type: ignore[arg-type]
    assert done.masks == [out / "a" / "1_mask.png", out / "b" / "1_mask.png"]
    assert (done.student, done.teacher) == ("train-0000000001", "teacher-0000000002")
    assert read_label_png(out / "a" / "1_labels.png").shape == (5, 7)
    assert read_label_png(out / "b" / "1_labels.png").shape == (3, 4)
    assert (out / "a" / "1_overlay.png").is_file() and (out / "b" / "1_overlay.png").is_file()


def test_a_folder_input_is_searched_recursively(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for name in ("b.jpg", "a.png", "sub/c.PNG", ".hidden/d.png", "masks/old_mask.png"):
        _png(photos / name)
    (photos / "notes.txt").write_text("not an image")
    found = collect_images([photos], photos / "masks")  # an output folder inside the input is never input
    assert [stem for _, stem in found] == ["a", "b", "sub/c"]
    assert [path for path, _ in found] == [photos / "a.png", photos / "b.jpg", photos / "sub" / "c.PNG"]
    # A folder and a file inside it: stems are relative to the folder holding both, the file is segmented once.
    both = collect_images([photos / "sub" / "c.PNG", photos], photos / "masks")
    assert [stem for _, stem in both] == ["sub/c", "a", "b"]
    # Folders side by side keep their names.
    _png(tmp_path / "more" / "a.png")
    assert [s for _, s in collect_images([photos, tmp_path / "more"], tmp_path / "out")][-1] == "more/a"


def test_inputs_that_would_share_outputs_are_refused_before_anything_is_written(tmp_path: Path, fake_model) -> None:
    png, jpg = _png(tmp_path / "a" / "1.png"), _png(tmp_path / "a" / "1.jpg")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1.jpg and .*1.png would both write .*out/1_\*.png"):
        segment_files(None, [jpg, png], "x", out)  # type: ignore[arg-type]
    assert not out.exists()
    with pytest.raises(ValueError, match="no such image file or folder: .*nope.png"):
        collect_images([png, tmp_path / "nope.png"], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder .*empty holds no images"):
        collect_images([tmp_path / "empty"], out)


def test_a_decompression_bomb_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)
    monkeypatch.setattr(segment, "load_segmenter", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"bomb.png: is 10000x10000 .* raise --max-pixels .*leave it out of the"):
        segment_files(None, [bomb], "x", tmp_path / "out", max_pixels=50_000_000)  # type: ignore[arg-type]


def test_more_than_255_classes_give_16bit_label_maps(tmp_path: Path) -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    label = np.array([[0, 255, 256], [299, 7, 1]])
    palette = segment.distinct_palette(300)
    assert write_masks(tmp_path, "many", image, label, palette, 300) == tmp_path / "many_mask.png"
    stored = Image.open(tmp_path / "many_labels.png")
    assert stored.mode == "I;16"
    assert np.array_equal(read_label_png(tmp_path / "many_labels.png"), label)
    mask = np.asarray(Image.open(tmp_path / "many_mask.png"))
    assert mask.shape == (2, 3, 3) and np.array_equal(mask, palette[label])  # colours: a palette holds 256
    # Up to 255 classes: 8-bit ids and a palette mask whose indices are the ids.
    write_masks(tmp_path, "few", image, label % 4, palette[:4], 4)
    assert Image.open(tmp_path / "few_labels.png").mode == "L"
    assert Image.open(tmp_path / "few_mask.png").mode == "P"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "few_mask.png")), label % 4)


def test_the_command_says_which_student_and_teacher_it_used(tmp_path: Path, fake_model) -> None:
    _png(tmp_path / "photos" / "a" / "1.png")
    _png(tmp_path / "photos" / "b" / "1.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "photos"), "--classes", "x, y", "--out", str(out),
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "student train-0000000001 and teacher teacher-0000000002" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.png")) == ["a/1_mask.png", "b/1_mask.png"]
    missing = CliRunner().invoke(app, ["segment", str(tmp_path / "photos"), str(tmp_path / "nope.png"),
                                       "--classes", "x", "--store", str(tmp_path / "store")])
    assert missing.exit_code == 1 and "no such image file or folder" in missing.output and "nope.png" in missing.output
