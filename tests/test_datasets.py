"""Dataset adapters against tiny fixtures written in each dataset's true on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.config import DataConfig, SyntheticConfig, list_presets, resolve_config
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
from clips4.data.io import BadImageError, read_image, read_label_png, write_png

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
        ("voc20.txt", 20),
        ("voc21.txt", 21),
        ("context59.txt", 59),
        ("context60.txt", 60),
        ("cocoobject.txt", 81),
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


@pytest.mark.parametrize(
    ("with_background", "without", "count"),
    [
        ("voc21.txt", "voc20.txt", 20),
        ("context60.txt", "context59.txt", 59),
        ("cocoobject.txt", "cocostuff171.txt", 80),
    ],
)
def test_lists_with_a_background_class_are_it_and_the_classes_of_the_list_without(
    with_background: str, without: str, count: int
) -> None:
    """Class 0 is the background (no synonyms: it gets no text under evaluate.background=threshold); the other
    classes name the same things, in the same order, as the list that ignores the background."""
    kept = load_class_file(with_background)
    assert kept[0] == ["background"]
    assert [g[0] for g in kept[1:]] == [g[0] for g in load_class_file(without)[:count]]


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
    ds = get_dataset(DataConfig(dataset="voc21", root=root))
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
    # voc20: the same files, the background ignored and every class one id lower, with its colour
    voc20 = get_dataset(DataConfig(dataset="voc20", root=root))
    assert np.array_equal(voc20.read_label(train[0].label_path), label_of([255, 0, 14, 19, 255, 6]))
    assert voc20.classes.names == ds.classes.names[1:]
    assert voc20.classes.held_out_ids == [i - 1 for i in ds.classes.held_out_ids]
    assert np.array_equal(voc20.classes.palette, ds.classes.palette[1:])


def test_voc_invalid_palette_index_names_the_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"val": ["a"]}, label=label_of([0, 37, 21]))
    ds = get_dataset(DataConfig(dataset="voc21", root=root))
    path = ds.records("val")[0].label_path
    with pytest.raises(BadImageError, match=r"a.png: label has values 21, 37 .*valid: 0..20 and 255"):
        ds.read_label(path)


def test_voc_sbd_aug_reads_train_aug_list_and_aug_labels(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"train": ["a"], "val": ["b"]})
    cfg = DataConfig(dataset="voc21", root=root, sbd_aug=True)
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
    ds = get_dataset(DataConfig(dataset="voc21", root=root, max_images=2))
    assert [r.image_id for r in ds.records("train")] == ["a", "b"]


def test_missing_root_and_split_files_name_the_path_and_field(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data.root is not set.*JPEGImages"):
        get_dataset(DataConfig(dataset="voc21"))
    with pytest.raises(DatasetError, match=f"data.root {tmp_path / 'nope'} does not exist"):
        get_dataset(DataConfig(dataset="cityscapes", root=tmp_path / "nope"))
    root = write_voc(tmp_path / "voc", {"train": ["a"]})
    with pytest.raises(DatasetError, match=r"split 'val' needs the split list file .*val.txt.*data.root.*data.splits"):
        get_dataset(DataConfig(dataset="voc21", root=root)).records("val")
    # the root argument overrides cfg.root
    assert len(get_dataset(DataConfig(dataset="voc21", root=tmp_path / "nope"), root=root).records("train")) == 1


# --------------------------------------------------------------------------------------------------- held-out names
def test_held_out_names_resolve_against_synonyms_and_spellings(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"val": ["a"]})
    ds = get_dataset(DataConfig(dataset="voc21", root=root, held_out=["tvmonitor", "Airplane", "dining_table"]))
    assert ds.classes.held_out_ids == [1, 11, 20]
    assert ds.classes.known_ids == [i for i in range(21) if i not in (1, 11, 20)]
    assert get_dataset(DataConfig(dataset="voc21", root=root, held_out=[])).classes.held_out_ids == []
    with pytest.raises(ValueError, match="unknown class name 'unicorn' in data.held_out; valid names: background, "):
        get_dataset(DataConfig(dataset="voc21", root=root, held_out=["sheep", "unicorn"]))


def test_data_classes_names_a_shipped_file_or_a_path_with_one_line_per_label_id(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOC2012", {"val": ["a"]})
    assert get_dataset(DataConfig(dataset="voc20", root=root, classes="voc20.txt")).classes.names[0] == "aeroplane"
    own = tmp_path / "my_voc.txt"
    own.write_text("# my prompts\n" + "".join(f"thing {i} | item {i}\n" for i in range(20)))
    ds = get_dataset(DataConfig(dataset="voc20", root=root, classes=str(own), held_out=["item 3"]))
    assert ds.classes.synonyms[3] == ["thing 3", "item 3"] and ds.classes.held_out_ids == [3]
    with pytest.raises(DatasetError, match="data.classes .*my_voc.txt lists 20 classes but voc21 labels have 21"):
        get_dataset(DataConfig(dataset="voc21", root=root, classes=str(own)))
    own.write_text("aeroplane | \n" * 20)
    with pytest.raises(DatasetError, match="my_voc.txt: class 0 .* has an empty name"):
        get_dataset(DataConfig(dataset="voc20", root=root, classes=str(own)))
    with pytest.raises(DatasetError, match="'nope.txt' does not exist; give a file shipped with clips4 .*voc20.txt"):
        get_dataset(DataConfig(dataset="voc20", root=root, classes="nope.txt"))
    with pytest.raises(DatasetError, match="data.classes names label classes, which dataset 'imagefolder' has not"):
        get_dataset(DataConfig(dataset="imagefolder", root=root, classes="voc20.txt"))


def test_resolve_class_names_refuses_ambiguous_class_lists() -> None:
    with pytest.raises(ValueError, match="used by classes 0 and 1"):
        resolve_class_names([["sofa", "couch"], ["Couch"]], [])


# ------------------------------------------------------------------------------------------------------- context
def test_context59_ignores_background_and_context60_keeps_it(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n")
    write_jpg(root / "JPEGImages" / "2008_000002.jpg")
    write_gray(root / "SegmentationClassContext" / "2008_000002.png", label_of([0, 1, 59, 31]))
    ds = get_dataset(DataConfig(dataset="context59", root=root))
    (record,) = ds.records("train")
    assert ds.read_label(record.label_path)[0, :5].tolist() == [255, 0, 58, 30, 255]
    assert ds.classes.num_classes == 59 and ds.classes.names[0] == "aeroplane"
    assert len(ds.classes.held_out_ids) == 10
    context60 = get_dataset(DataConfig(dataset="context60", root=root))
    assert context60.read_label(record.label_path)[0, :5].tolist() == [0, 1, 59, 31, 255]
    assert context60.classes.num_classes == 60 and context60.classes.names[:2] == ["background", "aeroplane"]
    assert [context60.classes.names[i] for i in context60.classes.held_out_ids] == [
        ds.classes.names[i] for i in ds.classes.held_out_ids
    ]
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
    ds = get_dataset(DataConfig(dataset="cocostuff171", root=tmp_path))
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
    ds = get_dataset(DataConfig(dataset="cocostuff171", root=tmp_path))
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    used = [cid for cid in range(1, 183) if cid not in unused]
    raw = np.array([cid - 1 for cid in used] + [255], dtype=np.uint8)[None]
    assert ds.raw_codec.decode(raw, "x").tolist() == [list(range(171)) + [255]]


def test_cocostuff27_maps_both_formats_and_has_no_default_held_out(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    ds = get_dataset(DataConfig(dataset="cocostuff27", root=tmp_path))
    a, b = ds.records("val")
    assert ds.classes.num_classes == 27 and ds.classes.held_out_ids == []
    assert ds.read_label(a.label_path)[0, :4].tolist() == [9, 8, 24, 255]  # person, outdoor, solid
    assert ds.read_label(b.label_path)[0, :5].tolist() == [9, 8, 255, 24, 255]


def test_cocoobject_reads_converted_labels_and_derives_them_from_stuffthingmaps(tmp_path: Path) -> None:
    """The COCO-Object conversion: things (raw 0..90) -> 1..80 in category order, stuff and unlabelled -> 0."""
    _write_coco(tmp_path)
    ann = tmp_path / "annotations" / "val2017"
    write_gray(ann / "000000000139_instanceTrainIds.png", label_of([0, 1, 80, 255]))
    ds = get_dataset(DataConfig(dataset="cocoobject", root=tmp_path))
    a, b = ds.records("val")
    assert a.label_path.endswith("000000000139_instanceTrainIds.png") and b.label_path.endswith("000000000285.png")
    assert ds.read_label(a.label_path)[0, :4].tolist() == [0, 1, 80, 255]
    # stuffthingmaps of 285: person, stop sign, never-annotated 11, wood (stuff), unlabelled
    assert ds.read_label(b.label_path)[0, :5].tolist() == [1, 12, 255, 0, 0]
    names = ds.classes.names
    assert ds.classes.num_classes == 81 and (names[0], names[1], names[12], names[80]) == (
        "background", "person", "stop sign", "toothbrush",
    )  # fmt: skip
    assert ds.classes.held_out_ids == []
    write_gray(ann / "000000000139_instanceTrainIds.png", label_of([81]))
    with pytest.raises(BadImageError, match="valid: 0..80 and 255"):
        ds.read_label(a.label_path)


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


def test_cityscapes27_is_the_27_non_void_classes(tmp_path: Path) -> None:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    _write_cityscapes(tmp_path, "train")
    ds = get_dataset(DataConfig(dataset="cityscapes27", root=tmp_path))
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


# ------------------------------------------------------------------------------------------------------- presets
def _label_map(size: tuple[int, int], fill: int, boxes: list[tuple[int, int, int, int, int]], ring: bool) -> np.ndarray:
    """``fill`` with rectangles (top, left, bottom, right, value), each outlined by a 5 px 255 ring when ``ring``
    (VOC's object boundaries)."""
    out = np.full(size, fill, dtype=np.uint8)
    for top, left, bottom, right, value in boxes:
        if ring:
            out[top - 5 : bottom + 5, left - 5 : right + 5] = 255
        out[top:bottom, left:right] = value
    return out


def _photo(path: Path, size: tuple[int, int]) -> None:
    """A smooth picture of ``size`` (height, width), quick to encode at full benchmark size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[: size[0], : size[1]]
    Image.fromarray(np.stack([ys % 256, xs % 256, (ys + xs) % 256], -1).astype(np.uint8)).save(path)


def _voc_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 500x375 VOC2012 val image: background 0, a person (15) and a dog (12) outlined by 255, as palette PNG."""
    root = tmp / "VOCdevkit" / "VOC2012"
    label = _label_map((375, 500), 0, [(100, 150, 300, 350, 15), (40, 20, 90, 120, 12)], ring=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000129\n")
    _photo(root / "JPEGImages" / "2007_000129.jpg", label.shape)
    write_png(root / "SegmentationClass" / "2007_000129.png", label, palette=voc_palette())
    return root, root / "SegmentationClass" / "2007_000129.png", label


def _context_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 500x375 VOC2010 image with mmsegmentation's Context labels: background 0, person 37, sky 47."""
    root = tmp / "VOCdevkit" / "VOC2010"
    label = _label_map((375, 500), 0, [(0, 0, 120, 500, 47), (150, 200, 370, 320, 37)], ring=False)
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000008\n")
    _photo(root / "JPEGImages" / "2008_000008.jpg", label.shape)
    write_gray(root / "SegmentationClassContext" / "2008_000008.png", label)
    return root, root / "SegmentationClassContext" / "2008_000008.png", label


def _coco_root(tmp: Path, suffix: str, label: np.ndarray) -> tuple[Path, Path, np.ndarray]:
    root = tmp / "coco_stuff164k"
    _photo(root / "images" / "val2017" / "000000000139.jpg", label.shape)
    write_gray(root / "annotations" / "val2017" / f"000000000139{suffix}", label)
    return root, root / "annotations" / "val2017" / f"000000000139{suffix}", label


def _cocostuff_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 640x426 image with mmsegmentation's train ids: person 0, wood 170, unlabelled 255."""
    label = _label_map((426, 640), 170, [(0, 0, 30, 640, 255), (100, 100, 400, 300, 0)], ring=False)
    return _coco_root(tmp, "_labelTrainIds.png", label)


def _cocoobject_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 640x426 image with COCO-Object labels: background 0, person 1, car 3."""
    label = _label_map((426, 640), 0, [(100, 100, 400, 300, 1), (200, 400, 300, 600, 3)], ring=False)
    return _coco_root(tmp, "_instanceTrainIds.png", label)


def _cityscapes_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 2048x1024 frame with label ids: sky 23, road 7, a car 26, the ego vehicle 1, unlabelled 0 at the border."""
    root = tmp / "cityscapes"
    label = _label_map((1024, 2048), 0, [(10, 10, 400, 2038, 23), (500, 10, 900, 2038, 7), (550, 800, 700, 1200, 26),
                                         (900, 10, 1014, 2038, 1)], ring=False)  # fmt: skip
    frame = "frankfurt_000000_000294"
    _photo(root / "leftImg8bit" / "val" / "frankfurt" / f"{frame}_leftImg8bit.png", label.shape)
    path = root / "gtFine" / "val" / "frankfurt" / f"{frame}_gtFine_labelIds.png"
    write_gray(path, label)
    return root, path, label


def _ade20k_root(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """A 683x512 validation image: other 0, wall 1, sky 3."""
    root = tmp / "ADEChallengeData2016"
    label = _label_map((512, 683), 0, [(0, 0, 200, 683, 3), (250, 0, 512, 300, 1)], ring=False)
    _photo(root / "images" / "validation" / "ADE_val_00000001.jpg", label.shape)
    write_gray(root / "annotations" / "validation" / "ADE_val_00000001.png", label)
    return root, root / "annotations" / "validation" / "ADE_val_00000001.png", label


VOC = {0: "background", 15: "person", 12: "dog", 255: None}
CONTEXT = {0: "background", 37: "person", 47: "sky"}
# preset: (fixture, class count, stored value -> the class it is scored as; None = ignored, "background" = class 0
# where the preset keeps the background and ignored where it does not)
PRESETS = {
    "voc20": (_voc_root, 20, VOC),
    "voc21": (_voc_root, 21, VOC),
    "context59": (_context_root, 59, CONTEXT),
    "context60": (_context_root, 60, CONTEXT),
    "cocoobject": (_cocoobject_root, 81, {0: "background", 1: "person", 3: "car"}),
    "cocostuff171": (_cocostuff_root, 171, {0: "person", 170: "wood", 255: None}),
    "cocostuff27": (_cocostuff_root, 27, {0: "person", 170: "solid", 255: None}),
    "cityscapes": (_cityscapes_root, 19, {23: "sky", 7: "road", 26: "car", 1: None, 0: None}),
    "ade20k": (_ade20k_root, 150, {0: None, 1: "wall", 3: "sky"}),
}


def test_every_shipped_preset_resolves_and_the_benchmarks_are_the_tested_ones() -> None:
    for name in list_presets():
        cfg = resolve_config(name)
        assert cfg.name == name
    benchmarks = {n for n in list_presets() if resolve_config(n).evaluate.protocol != "stored"}
    assert benchmarks == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_benchmark_preset_reads_its_dataset_at_full_size(preset: str, tmp_path: Path) -> None:
    """Each benchmark preset, pointed at a fixture in its dataset's true format and size, reads non-square labels
    at their size with the preset's class count, ignore value and background rule."""
    write, count, scored_as = PRESETS[preset]
    root, label_path, stored = write(tmp_path)
    cfg = resolve_config(preset, overrides=[f"data.root={root}"])
    assert cfg.teacher.model == "ViT-B-16" and cfg.teacher.pretrained == "openai"
    assert (cfg.evaluate.protocol, cfg.evaluate.crop, cfg.evaluate.stride) == ("slide", 224, 112)
    ds = get_dataset(cfg.data)
    (record,) = ds.records("val")
    assert record.label_path == str(label_path)
    label = ds.read_label(record.label_path)
    assert label.shape == stored.shape == read_image(record.image_path).shape[:2] and stored.shape[0] != stored.shape[1]
    assert ds.classes.num_classes == count
    keeps_background = cfg.evaluate.background == "threshold"
    assert (ds.classes.names[0] == "background") == keeps_background
    for value, name in scored_as.items():
        got = set(np.unique(label[stored == value]).tolist())
        if name is None or (name == "background" and not keeps_background):
            assert got == {255}, (value, got)
        else:
            (class_id,) = got
            assert ds.classes.names[class_id] == name
    assert set(np.unique(label).tolist()) <= set(range(count)) | {255}
