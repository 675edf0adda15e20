"""Dataset adapters against tiny fixtures written in each dataset's true on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.config import DataConfig, SyntheticConfig
from clips4.data.datasets import (
    CITYSCAPES_FIRST_NONVOID,
    DatasetError,
    LabelCodec,
    cocostuff_coarse_table,
    distinct_palette,
    get_dataset,
    load_class_file,
    resolve_class_names,
    voc_palette,
)
from clips4.data.io import BadImageError, prefetch, read_image, read_label_png, write_png

H, W = 6, 8


def write_jpg(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def write_gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def label_of(values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A label map of ``size`` whose first pixels are ``values`` and the rest 255."""
    out = np.full(size[0] * size[1], 255, dtype=np.uint8)
    out[: len(values)] = values
    return out.reshape(size)


def write_voc(root: Path, splits: dict[str, list[str]], label: np.ndarray | None = None) -> Path:
    """VOC2012 layout: JPEGImages, palette PNGs in SegmentationClass, ImageSets/Segmentation/<split>.txt."""
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for n, image_id in enumerate(ids):
            write_jpg(root / "JPEGImages" / f"{image_id}.jpg", seed=n)
            values = label if label is not None else label_of([0, 1, 15, 20, 255, 7])
            write_png(root / "SegmentationClass" / f"{image_id}.png", values, palette=voc_palette())
    return root


# ------------------------------------------------------------------------------------------------------- class data
@pytest.mark.parametrize(
    ("filename", "count"),
    [
        ("voc.txt", 21),
        ("context59.txt", 59),
        ("cocostuff171.txt", 171),
        ("cocostuff27.txt", 27),
        ("cityscapes.txt", 19),
        ("cityscapes27.txt", 27),
        ("ade20k.txt", 150),
    ],
)
def test_class_files_have_the_right_count_and_unambiguous_names(filename: str, count: int) -> None:
    synonyms = load_class_file(filename)
    assert len(synonyms) == count
    names = [name for group in synonyms for name in group]
    assert all(name and name == name.strip() for name in names)
    # every name resolves to its own class, never to another one
    for class_id, group in enumerate(synonyms):
        assert resolve_class_names(synonyms, group) == [class_id] * len(group)


def test_cocostuff_coarse_table_covers_all_27_coarse_classes() -> None:
    table = cocostuff_coarse_table()
    assert table.shape == (171,)
    assert sorted(set(table.tolist())) == list(range(27))
    fine = [g[0] for g in load_class_file("cocostuff171.txt")]
    coarse = [g[0] for g in load_class_file("cocostuff27.txt")]
    assert coarse[table[fine.index("person")]] == "person"
    assert coarse[table[fine.index("giraffe")]] == "animal"
    assert coarse[table[fine.index("tv")]] == "electronic"
    assert coarse[table[fine.index("clouds")]] == "sky"
    assert coarse[table[fine.index("concrete wall")]] == "wall"
    assert coarse[table[fine.index("river")]] == "water"


def test_palettes() -> None:
    palette = voc_palette()
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # VOC boundary colour
    colours = distinct_palette(171)
    assert colours.shape == (171, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == 171
    assert np.array_equal(colours, distinct_palette(171))


# ----------------------------------------------------------------------------------------------------------- io
def test_read_image_converts_to_rgb_and_names_bad_files(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    write_gray(gray, np.full((4, 5), 9))
    image = read_image(gray)
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and (image == 9).all()
    with pytest.raises(BadImageError, match="missing.jpg.*does not exist.*on_bad_input=skip"):
        read_image(tmp_path / "missing.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="junk.jpg.*cannot be decoded"):
        read_image(junk)


def test_prefetch_keeps_order_and_raises_where_the_bad_item_is(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    write_gray(good, np.full((2, 2), 7))
    paths = [good, good, tmp_path / "missing.png", good]
    loaded = prefetch(read_image, paths)
    assert [int(next(loaded)[0, 0, 0]) for _ in range(2)] == [7, 7]
    with pytest.raises(BadImageError, match="missing.png"):
        next(loaded)
    assert list(prefetch(lambda i: i * i, range(5))) == [0, 1, 4, 9, 16]
    assert list(prefetch(read_image, [])) == []


def test_read_label_png_rejects_rgb_labels(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(path)
    with pytest.raises(BadImageError, match="rgb.png.*mode 'RGB'"):
        read_label_png(path)


# ---------------------------------------------------------------------------------------------------------- voc
def test_voc_reads_palette_indices_not_colours(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012", {"train": ["2007_000002", "2007_000001"], "val": ["2007_000003"]})
    stored = Image.open(root / "SegmentationClass" / "2007_000001.png")
    assert stored.mode == "P"  # a true VOC label: colours in the file, indices in the pixels
    ds = get_dataset(DataConfig(dataset="voc", root=root))
    train = ds.records("train")
    assert [r.image_id for r in train] == ["2007_000001", "2007_000002"]
    assert train[0].image_path == str(root / "JPEGImages" / "2007_000001.jpg")
    label = ds.read_label(train[0].label_path)
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert np.array_equal(label, label_of([0, 1, 15, 20, 255, 7]))
    assert [r.image_id for r in ds.records("val")] == ["2007_000003"]
    assert ds.classes.num_classes == 21 and ds.classes.names[0] == "background"
    assert [ds.classes.names[i] for i in ds.classes.held_out_ids] == [
        "potted plant",
        "sheep",
        "sofa",
        "train",
        "tv monitor",
    ]
    assert ds.classes.palette.shape == (21, 3)


def test_voc_invalid_palette_index_names_the_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"val": ["a"]}, label=label_of([0, 37, 21]))
    ds = get_dataset(DataConfig(dataset="voc", root=root))
    path = ds.records("val")[0].label_path
    with pytest.raises(BadImageError, match=r"a.png: label has values 21, 37 .*valid: 0..20 and 255"):
        ds.read_label(path)


def test_voc_sbd_aug_reads_train_aug_list_and_aug_labels(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"train": ["a"], "val": ["b"]})
    cfg = DataConfig(dataset="voc", root=root, sbd_aug=True)
    with pytest.raises(DatasetError, match="SegmentationClassAug.*data.sbd_aug=false"):
        get_dataset(cfg).records("train")
    # the DeepLab release lists '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png'
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/c.jpg /SegmentationClassAug/c.png\n/JPEGImages/a.jpg /SegmentationClassAug/a.png\n"
    )
    write_jpg(root / "JPEGImages" / "c.jpg")
    write_gray(root / "SegmentationClassAug" / "c.png", label_of([3, 4]))
    ds = get_dataset(cfg)
    train = ds.records("train")
    assert [r.image_id for r in train] == ["a", "c"]
    assert train[1].label_path == str(root / "SegmentationClassAug" / "c.png")
    assert ds.read_label(train[1].label_path)[0, :2].tolist() == [3, 4]
    assert [r.image_id for r in ds.records("val")] == ["b"]


def test_max_images_keeps_the_first_sorted(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"train": ["c", "a", "b"]})
    ds = get_dataset(DataConfig(dataset="voc", root=root, max_images=2))
    assert [r.image_id for r in ds.records("train")] == ["a", "b"]


def test_missing_root_and_split_files_name_the_path_and_field(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data.root is not set.*JPEGImages"):
        get_dataset(DataConfig(dataset="voc"))
    with pytest.raises(DatasetError, match=f"data.root {tmp_path / 'nope'} does not exist"):
        get_dataset(DataConfig(dataset="cityscapes", root=tmp_path / "nope"))
    root = write_voc(tmp_path / "voc", {"train": ["a"]})
    with pytest.raises(DatasetError, match=r"split 'val' needs the split list file .*val.txt.*data.root.*data.splits"):
        get_dataset(DataConfig(dataset="voc", root=root)).records("val")
    # the root argument overrides cfg.root
    assert len(get_dataset(DataConfig(dataset="voc", root=tmp_path / "nope"), root=root).records("train")) == 1


# --------------------------------------------------------------------------------------------------- held-out names
def test_held_out_names_resolve_against_synonyms_and_spellings(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"val": ["a"]})
    ds = get_dataset(DataConfig(dataset="voc", root=root, held_out=["tvmonitor", "Airplane", "dining_table"]))
    assert ds.classes.held_out_ids == [1, 11, 20]
    assert ds.classes.known_ids == [i for i in range(21) if i not in (1, 11, 20)]
    assert get_dataset(DataConfig(dataset="voc", root=root, held_out=[])).classes.held_out_ids == []
    with pytest.raises(ValueError, match="unknown class name 'unicorn' in data.held_out; valid names: background, "):
        get_dataset(DataConfig(dataset="voc", root=root, held_out=["sheep", "unicorn"]))


def test_resolve_class_names_refuses_ambiguous_class_lists() -> None:
    with pytest.raises(ValueError, match="used by classes 0 and 1"):
        resolve_class_names([["sofa", "couch"], ["Couch"]], [])


# ------------------------------------------------------------------------------------------------------- context
def test_context_ignores_background_and_shifts_ids(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n")
    write_jpg(root / "JPEGImages" / "2008_000002.jpg")
    write_gray(root / "SegmentationClassContext" / "2008_000002.png", label_of([0, 1, 59, 31]))
    ds = get_dataset(DataConfig(dataset="context", root=root))
    (record,) = ds.records("train")
    assert ds.read_label(record.label_path)[0, :5].tolist() == [255, 0, 58, 30, 255]
    assert ds.classes.num_classes == 59 and ds.classes.names[0] == "aeroplane"
    assert len(ds.classes.held_out_ids) == 10
    write_gray(root / "SegmentationClassContext" / "2008_000002.png", label_of([60]))
    with pytest.raises(BadImageError, match="valid: 0..59 and 255"):
        ds.read_label(record.label_path)


# ----------------------------------------------------------------------------------------------------- cocostuff
def _write_coco(root: Path) -> None:
    for n, image_id in enumerate(["000000000285", "000000000139"]):
        write_jpg(root / "images" / "val2017" / f"{image_id}.jpg", seed=n)
    ann = root / "annotations" / "val2017"
    write_gray(ann / "000000000139_labelTrainIds.png", label_of([0, 11, 170, 255]))
    # only the raw stuffthingmaps label for 285: person 0, stop sign 12, unused 11 (street sign), wood 181
    write_gray(ann / "000000000285.png", label_of([0, 12, 11, 181, 255]))


def test_cocostuff_reads_train_ids_and_maps_raw_ids(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    ds = get_dataset(DataConfig(dataset="cocostuff", root=tmp_path))
    a, b = ds.records("val")
    assert (a.image_id, b.image_id) == ("000000000139", "000000000285")
    assert a.label_path.endswith("000000000139_labelTrainIds.png") and b.label_path.endswith("000000000285.png")
    assert ds.read_label(a.label_path)[0, :4].tolist() == [0, 11, 170, 255]
    assert ds.read_label(b.label_path)[0, :5].tolist() == [0, 11, 255, 170, 255]
    names = ds.classes.names
    assert (names[0], names[11], names[170]) == ("person", "stop sign", "wood")
    assert len(ds.classes.held_out_ids) == 15
    with pytest.raises(DatasetError, match="images/train2017"):
        ds.records("train")


def test_cocostuff_raw_table_matches_the_official_category_ids(tmp_path: Path) -> None:
    """Every used COCO category id (1..182 minus the 11 never annotated) lands on its class, in id order."""
    _write_coco(tmp_path)
    ds = get_dataset(DataConfig(dataset="cocostuff", root=tmp_path))
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    used = [cid for cid in range(1, 183) if cid not in unused]
    raw = np.array([cid - 1 for cid in used] + [255], dtype=np.uint8)[None]
    assert ds.raw_codec.decode(raw, "x").tolist() == [list(range(171)) + [255]]


def test_cocostuff_coarse_maps_both_formats_and_has_no_default_held_out(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    ds = get_dataset(DataConfig(dataset="cocostuff", root=tmp_path, coarse=True))
    a, b = ds.records("val")
    assert ds.classes.num_classes == 27 and ds.classes.held_out_ids == []
    assert ds.read_label(a.label_path)[0, :4].tolist() == [9, 8, 24, 255]  # person, outdoor, solid
    assert ds.read_label(b.label_path)[0, :5].tolist() == [9, 8, 255, 24, 255]


# ---------------------------------------------------------------------------------------------------- cityscapes
def _write_cityscapes(root: Path, split: str = "val") -> None:
    for city, frame in [("lindau", "lindau_000000_000019"), ("frankfurt", "frankfurt_000000_000294")]:
        write_jpg(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png")
        write_gray(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", label_of(list(range(34)), (5, 7)))


def test_cityscapes_label_ids_map_to_train_ids_by_the_official_table(tmp_path: Path) -> None:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    _write_cityscapes(tmp_path)
    ds = get_dataset(DataConfig(dataset="cityscapes", root=tmp_path))
    records = ds.records("val")
    assert [r.image_id for r in records] == ["frankfurt_000000_000294", "lindau_000000_000019"]
    assert records[0].label_path.endswith("gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png")
    got = ds.read_label(records[0].label_path).ravel()[:34]
    official = {label.id: label.trainId for label in labels.labels if label.id >= 0}
    assert sorted(official) == list(range(34))
    expected = [official[i] if official[i] not in (-1, 255) else 255 for i in range(34)]
    assert got.tolist() == expected
    names = {label.trainId: label.name for label in labels.labels if 0 <= label.trainId < 255}
    assert ds.classes.names == [names[i] for i in range(19)]
    assert ds.classes.held_out_ids == []


def test_cityscapes_coarse_is_the_27_non_void_classes(tmp_path: Path) -> None:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    _write_cityscapes(tmp_path, "train")
    ds = get_dataset(DataConfig(dataset="cityscapes", root=tmp_path, coarse=True))
    got = ds.read_label(ds.records("train")[0].label_path).ravel()[:34]
    assert got.tolist() == [255] * 7 + list(range(27))
    by_id = {label.id: label.name for label in labels.labels}
    assert ds.classes.names == [by_id[i] for i in range(CITYSCAPES_FIRST_NONVOID, 34)]


# -------------------------------------------------------------------------------------------------------- ade20k
def test_ade20k_zero_is_ignored_and_splits_map_to_folders(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_jpg(base / "images" / "validation" / "ADE_val_00000001.jpg")
    write_gray(base / "annotations" / "validation" / "ADE_val_00000001.png", label_of([0, 1, 150, 3]))
    for root in (base, tmp_path):  # the folder itself or its parent
        ds = get_dataset(DataConfig(dataset="ade20k", root=root))
        (record,) = ds.records("val")
        assert record.image_id == "ADE_val_00000001"
        assert ds.read_label(record.label_path)[0, :5].tolist() == [255, 0, 149, 2, 255]
    assert ds.classes.num_classes == 150 and ds.classes.names[:3] == ["wall", "building", "sky"]
    with pytest.raises(DatasetError, match="images/training"):
        ds.records("train")
    with pytest.raises(DatasetError, match="splits train, val, not 'test'"):
        ds.records("test")


# --------------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_finds_images_recursively_in_every_split(tmp_path: Path) -> None:
    write_jpg(tmp_path / "b.JPG")
    write_jpg(tmp_path / "sub" / "a.png")
    write_jpg(tmp_path / ".hidden" / "c.jpg")
    write_jpg(tmp_path / "._d.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = get_dataset(DataConfig(dataset="imagefolder", root=tmp_path))
    for split in ("train", "val"):
        records = ds.records(split)
        assert [(r.image_id, r.split, r.label_path) for r in records] == [("b", split, None), ("sub__a", split, None)]
    assert ds.classes.num_classes == 0 and ds.classes.held_out_ids == []
    with pytest.raises(ValueError, match="unknown class name 'cat'.*none"):
        get_dataset(DataConfig(dataset="imagefolder", root=tmp_path, held_out=["cat"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        get_dataset(DataConfig(dataset="imagefolder", root=tmp_path / "empty")).records("train")


def test_duplicate_image_ids_are_refused(tmp_path: Path) -> None:
    write_jpg(tmp_path / "a.jpg")
    write_jpg(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="image id 'a' is used twice"):
        get_dataset(DataConfig(dataset="imagefolder", root=tmp_path)).records("train")


# ----------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_adapter_writes_the_world_and_reads_its_labels(tmp_path: Path) -> None:
    cfg = DataConfig(
        dataset="synthetic",
        synthetic=SyntheticConfig(image_size=32, num_train=3, num_val=2, things=["kite", "ring"]),
        held_out=["ring"],
    )
    ds = get_dataset(cfg, root=tmp_path)
    assert ds.classes.names == ["grass", "sand", "water", "snow", "kite", "ring"]
    assert ds.classes.held_out_ids == [5]
    train, val = ds.records("train"), ds.records("val")
    assert len(train) == 3 and len(val) == 2 and all(r.caption for r in train)
    label = ds.read_label(train[0].label_path)
    assert label.shape == (32, 32) and label.max() < 6
    assert len(get_dataset(cfg.model_copy(update={"max_images": 1}), root=tmp_path).records("train")) == 1
    with pytest.raises(DatasetError, match="synthetic world has splits train, val and test"):
        ds.records("holdout")
    no_test = cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"num_test": 0})})
    with pytest.raises(DatasetError, match="num_test is 0"):
        get_dataset(no_test, root=tmp_path / "no-test").records("test")
    with pytest.raises(DatasetError, match="data.root is not set"):
        get_dataset(cfg)


def test_label_codec_rejects_values_outside_a_16_bit_label() -> None:
    codec = LabelCodec(np.arange(3))
    assert codec.decode(np.array([[0, 2, 255]], dtype=np.int32), "x").tolist() == [[0, 2, 255]]
    with pytest.raises(BadImageError, match="300"):
        codec.decode(np.array([[0, 300]], dtype=np.int32), "x")
