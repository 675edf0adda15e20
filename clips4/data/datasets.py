"""Dataset adapters: each reads one dataset's own on-disk layout into records, class metadata and train-id labels.

Each benchmark variant is its own adapter, named as the field names it; ``data.root`` points at the folder named
first in each layout. 255 is the ignore value of every train-id label.

- voc20, voc21: ``VOC2012/`` with ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs: the stored
  index is the class, 0 = background, 255 = boundary) and ``ImageSets/Segmentation/<split>.txt``. voc21 keeps the
  21 ids as stored; voc20 ignores the background (0 -> 255, v -> v - 1). With ``data.sbd_aug`` the train split reads
  ``ImageSets/Segmentation/train_aug.txt`` and labels from ``SegmentationClassAug/<id>.png`` (the DeepLab release).
- context59, context60: ``VOC2010/`` as prepared by mmsegmentation's Pascal Context converter:
  ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png`` (0 = background, 1..59 = the 59 classes) and
  ``ImageSets/SegmentationContext/<split>.txt``. context60 keeps 0 as the background class; context59 ignores it.
- cocoobject: the COCO-Stuff 164k folder with ``images/<split>2017/<id>.jpg`` and the COCO-Object labels
  ``annotations/<split>2017/<id>_instanceTrainIds.png`` that GroupViT's converter (used by TCL, SCLIP and NACLIP)
  writes from the stuffthingmaps: 0 = background (every stuff class and unlabelled pixels), 1..80 = the 80 thing
  classes in COCO category order, 255 (where present) ignored. Where they are absent, the stuffthingmaps ``<id>.png``
  are converted the same way as they are read.
- cocostuff171, cocostuff27: ``images/<split>2017/<id>.jpg`` with ``annotations/<split>2017/<id>_labelTrainIds.png``
  (0..170, 255 = unlabelled; mmsegmentation's converter) or, where those are absent, the official stuffthingmaps
  ``<id>.png`` (COCO category id - 1, 255 = unlabelled), mapped to the same 171 ids; cocostuff27 maps those to the
  27 coarse classes of the unsupervised protocol (``cocostuff171_to_27.txt``).
- cityscapes, cityscapes27: ``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<x>_gtFine_labelIds.png``, mapped to the 19 train ids by the official label table;
  cityscapes27: the 27 non-void classes (ids 7..33) of the unsupervised protocol.
- ade20k: ``ADEChallengeData2016/`` (or its parent) with ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; split train -> training, val -> validation; 0 ("other") is ignored.
- imagefolder: any folder. Every image (jpg, jpeg, png, bmp, webp; recursive; hidden files skipped) is in *every*
  requested split, because unlabelled data has no split of its own. No labels and no classes.
- synthetic: the generated world (docs/method.md §8), written under the ``root`` the caller passes.

Class names come from the adapter's file in ``clips4/data/classes`` (one class per line in label-id order, synonyms
separated by `` | ``), or from ``data.classes``. Records of a split are sorted by image id; ``data.max_images`` keeps
the first N.
"""

from __future__ import annotations

import colorsys
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from clips4.config import DataConfig
from clips4.data.io import BadImageError, read_label_png
from clips4.data.records import IGNORE_INDEX, ClassInfo, Record
from clips4.data.synthetic import SyntheticWorld

# Official Cityscapes label table (cityscapesscripts.helpers.labels): train id of each label id 0..33.
CITYSCAPES_TRAIN_IDS: tuple[int, ...] = (
    255, 255, 255, 255, 255, 255, 255,  # void: unlabeled, ego vehicle, rectification border, ..., ground
    0, 1, 255, 255,  # road, sidewalk, parking, rail track
    2, 3, 4, 255, 255, 255,  # building, wall, fence, guard rail, bridge, tunnel
    5, 255, 6, 7,  # pole, polegroup, traffic light, traffic sign
    8, 9, 10,  # vegetation, terrain, sky
    11, 12,  # person, rider
    13, 14, 15, 255, 255, 16, 17, 18,  # car, truck, bus, caravan, trailer, train, motorcycle, bicycle
)  # fmt: skip
CITYSCAPES_FIRST_NONVOID = 7  # label ids 7..33 are the 27 classes of the unsupervised (coarse) protocol

# COCO category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 were never annotated; stuffthingmaps store id - 1.
COCO_UNUSED_RAW_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_NUM_RAW_IDS = 182
COCO_FIRST_STUFF_RAW_ID = 91  # stuffthingmaps store the 80 thing classes below 91 and the 91 stuff classes from it
COCO_STUFF_CLASSES = COCO_NUM_RAW_IDS - len(COCO_UNUSED_RAW_IDS)  # 171

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """The dataset on disk does not match the configured layout; the message names the path and the field to set."""


# ------------------------------------------------------------------------------------------------- class metadata
def locate_class_file(name: str) -> Traversable:
    """A class-name file: a bare file name shipped in ``clips4/data/classes``, else a path on disk."""
    shipped = resources.files("clips4.data").joinpath("classes", name)
    if Path(name).name == name and shipped.is_file():
        return shipped
    path = Path(name).expanduser()
    if not path.is_file():
        shipped_names = sorted(f.name for f in resources.files("clips4.data").joinpath("classes").iterdir()
                               if f.name.endswith(".txt"))
        raise DatasetError(
            f"class-name file {name!r} does not exist; give a file shipped with clips4 ({', '.join(shipped_names)}) "
            "or the path of your own (one class per line in label-id order, synonyms separated by ' | ')"
        )
    return path


def _data_lines(name: str) -> list[str]:
    """Non-empty lines of a class-name or table file (see :func:`locate_class_file`), ``#`` comments removed."""
    text = locate_class_file(name).read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def load_class_file(name: str) -> list[list[str]]:
    """One class per line in class-id order, synonyms separated by `` | ``; the first is the display name."""
    classes = [[synonym.strip() for synonym in line.split("|")] for line in _data_lines(name)]
    for class_id, synonyms in enumerate(classes):
        if not all(synonyms):
            raise DatasetError(f"class-name file {name}: class {class_id} ({' | '.join(synonyms)}) has an empty name; "
                               "write one name between each pair of ' | '")
    return classes


def cocostuff_coarse_table() -> np.ndarray:
    """Coarse (27) id of each of the 171 COCO-Stuff classes, from ``cocostuff171_to_27.txt``."""
    pairs = np.array([[int(v) for v in line.split()] for line in _data_lines("cocostuff171_to_27.txt")])
    if not np.array_equal(pairs[:, 0], np.arange(len(pairs))):
        raise ValueError("cocostuff171_to_27.txt must list fine ids 0, 1, 2, ... in order")
    return pairs[:, 1]


def voc_palette(num: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: bit k of each channel comes from bits of the class id, spread over 8 levels."""
    ids = np.arange(num)
    palette = np.zeros((num, 3), dtype=np.uint8)
    for level in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * level + channel)) & 1) << (7 - level)).astype(np.uint8)
    return palette


def distinct_palette(num: int) -> np.ndarray:
    """Deterministic, well-separated colours: golden-ratio hue steps with alternating value."""
    colours = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 - 0.3 * (i % 2)) for i in range(num)]
    return (np.array(colours, dtype=np.float64).reshape(num, 3) * 255).round().astype(np.uint8)


def _name_key(name: str) -> str:
    """Names compare without case, spaces, '-' or '_' (so 'tvmonitor' and 'TV monitor' are the same class)."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def resolve_class_names(synonyms: Sequence[Sequence[str]], names: Iterable[str]) -> list[int]:
    """Class ids of ``names``, matched against every display name and synonym; unknown names raise ValueError."""
    index: dict[str, int] = {}
    for class_id, group in enumerate(synonyms):
        for name in group:
            owner = index.setdefault(_name_key(name), class_id)
            if owner != class_id:
                raise ValueError(f"class name {name!r} is used by classes {owner} and {class_id}; names must be unique")
    ids = []
    for name in names:
        if _name_key(name) not in index:
            valid = ", ".join(group[0] for group in synonyms) or "(none: this dataset has no classes)"
            raise ValueError(f"unknown class name {name!r} in data.held_out; valid names: {valid}")
        ids.append(index[_name_key(name)])
    return ids


def build_class_info(synonyms: list[list[str]], held_out: Iterable[str], palette: np.ndarray) -> ClassInfo:
    """ClassInfo with ``held_out`` names resolved to flags."""
    chosen = set(resolve_class_names(synonyms, held_out))
    return ClassInfo(
        synonyms=synonyms, held_out=[i in chosen for i in range(len(synonyms))], palette=palette[: len(synonyms)]
    )


# ------------------------------------------------------------------------------------------------------ label codec
class LabelCodec:
    """Stored label value -> train id.

    ``table[v]`` is the train id (or 255) of stored value ``v < len(table)``; 255 always means ignore; any other
    stored value is invalid (a corrupt file, or a label of another dataset) and is reported, never silently ignored.
    """

    def __init__(self, table: Sequence[int] | np.ndarray) -> None:
        table = np.asarray(table, dtype=np.int64)
        if table.ndim != 1 or len(table) > IGNORE_INDEX or table.min(initial=0) < 0 or table.max(initial=0) > 255:
            raise ValueError("a label table maps at most 255 stored values to ids in 0..255")
        self.table = table
        self._lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        self._lut[: len(table)] = table
        self._valid = np.zeros(256, dtype=bool)
        self._valid[: len(table)] = True
        self._valid[IGNORE_INDEX] = True

    def then(self, table: Sequence[int] | np.ndarray) -> LabelCodec:
        """This codec followed by a train id -> train id table (e.g. fine -> coarse); 255 stays 255."""
        table = np.asarray(table, dtype=np.int64)
        mapped = table[np.minimum(self.table, len(table) - 1)]
        return LabelCodec(np.where(self.table == IGNORE_INDEX, IGNORE_INDEX, mapped))

    def decode(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Train ids (uint8, 255 = ignore) of the stored values ``raw``; invalid values raise BadImageError."""
        if raw.dtype != np.uint8:
            outside = (raw < 0) | (raw > 255)
            if outside.any():
                self._reject(raw[outside], path)
            raw = raw.astype(np.uint8)
        valid = self._valid[raw]
        if not valid.all():
            self._reject(raw[~valid], path)
        return self._lut[raw]

    def _reject(self, bad: np.ndarray, path: str | Path) -> None:
        values = np.unique(bad)
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise BadImageError(
            path, f"label has values {shown} that this dataset never stores (valid: 0..{len(self.table) - 1} and 255)"
        )


def _reduce_zero_table(num_classes: int) -> np.ndarray:
    """Stored 0 is 'background/other' -> ignore; 1..K -> 0..K-1."""
    return np.concatenate([[IGNORE_INDEX], np.arange(num_classes)])


def _zero_codec(num_classes: int, keeps_background: bool) -> LabelCodec:
    """Labels that store the background as 0: kept as class 0 (the class list starts with it), or ignored."""
    return LabelCodec(np.arange(num_classes) if keeps_background else _reduce_zero_table(num_classes))


def _coco_raw_table() -> np.ndarray:
    """stuffthingmaps value (COCO category id - 1) -> contiguous 0..170; never-annotated ids -> ignore."""
    table = np.full(COCO_NUM_RAW_IDS, IGNORE_INDEX, dtype=np.int64)
    used = [v for v in range(COCO_NUM_RAW_IDS) if v not in COCO_UNUSED_RAW_IDS]
    table[used] = np.arange(len(used))
    return table


# ---------------------------------------------------------------------------------------------------------- datasets
class Dataset(ABC):
    """One dataset: its classes, its records per split, and how to read its labels as train ids."""

    name: str
    layout: str  # what data.root must hold, for error messages
    class_file: str | None = None  # its class names in clips4/data/classes; None: the classes are not a file's
    classes: ClassInfo
    codec: LabelCodec

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = Path(root)

    def _class_names(self) -> list[list[str]]:
        """The names in data.classes, else in the dataset's own file; either way one line per label id."""
        own = load_class_file(self.class_file)
        if self.cfg.classes is None:
            return own
        chosen = load_class_file(self.cfg.classes)
        if len(chosen) != len(own):
            raise DatasetError(
                f"data.classes {self.cfg.classes} lists {len(chosen)} classes but {self.name} labels have {len(own)}; "
                f"give one line per label id in id order (as {self.class_file} does)"
            )
        return chosen

    def _set_classes(
        self,
        synonyms: list[list[str]],
        codec: LabelCodec,
        default_held_out: Sequence[str] = (),
        palette: np.ndarray | None = None,
    ) -> None:
        """Classes with data.held_out (or, when it is null, the dataset's default held-out names) resolved."""
        held_out = self.cfg.held_out if self.cfg.held_out is not None else default_held_out
        palette = distinct_palette(len(synonyms)) if palette is None else palette
        self.codec = codec
        self.classes = build_class_info(synonyms, held_out, palette)

    def records(self, split: str) -> list[Record]:
        """The split's records, sorted by image id, at most ``data.max_images``."""
        found = sorted(self._records(split), key=lambda r: r.image_id)
        for a, b in zip(found, found[1:]):
            if a.image_id == b.image_id:
                raise DatasetError(
                    f"{self.name}: image id {a.image_id!r} is used twice ({a.image_path}, {b.image_path})"
                )
        return found[: self.cfg.max_images] if self.cfg.max_images else found

    def read_label(self, path: str) -> np.ndarray:
        """Train ids uint8 [H, W], 255 = ignore."""
        return self._codec_for(path).decode(read_label_png(path), path)

    def _codec_for(self, path: str) -> LabelCodec:
        return self.codec

    @abstractmethod
    def _records(self, split: str) -> list[Record]: ...

    def _missing(self, split: str, path: Path, what: str) -> DatasetError:
        return DatasetError(
            f"{self.name}: split {split!r} needs the {what} {path}, which does not exist; data.root must be "
            f"{self.layout}, and data.splits must name splits it has"
        )

    def _require_dir(self, split: str, path: Path) -> Path:
        if not path.is_dir():
            raise self._missing(split, path, "folder")
        return path

    def _listed(self, split: str, list_file: Path, image_dir: Path, label_dir: Path) -> list[Record]:
        """Records of a split list file (one id per line; DeepLab's '/JPEGImages/<id>.jpg ...' lines work too)."""
        if not list_file.is_file():
            raise self._missing(split, list_file, "split list file")
        ids = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
        return [Record(i, split, str(image_dir / f"{i}.jpg"), str(label_dir / f"{i}.png")) for i in ids]


class Voc21Dataset(Dataset):
    """Pascal VOC 2012 with its 21 ids as stored: 0 is the background class."""

    name = "voc21"
    class_file = "voc21.txt"
    layout = "the VOC2012 folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"
    DEFAULT_HELD_OUT = ("potted plant", "sheep", "sofa", "train", "tv monitor")
    KEEPS_BACKGROUND = True

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        synonyms = self._class_names()
        palette = voc_palette(len(synonyms) + 1)[0 if self.KEEPS_BACKGROUND else 1 :]  # the colour of each stored id
        self._set_classes(synonyms, _zero_codec(len(synonyms), self.KEEPS_BACKGROUND), self.DEFAULT_HELD_OUT, palette)

    def _records(self, split: str) -> list[Record]:
        sets = self.root / "ImageSets" / "Segmentation"
        if split == "train" and self.cfg.sbd_aug:
            if not (self.root / "SegmentationClassAug").is_dir():
                raise DatasetError(
                    f"{self.name}: data.sbd_aug is set but {self.root / 'SegmentationClassAug'} does not exist; add "
                    "the SBD augmented labels there (with ImageSets/Segmentation/train_aug.txt) or set "
                    "data.sbd_aug=false"
                )
            return self._listed(
                split, sets / "train_aug.txt", self.root / "JPEGImages", self.root / "SegmentationClassAug"
            )
        return self._listed(split, sets / f"{split}.txt", self.root / "JPEGImages", self.root / "SegmentationClass")


class Voc20Dataset(Voc21Dataset):
    """Pascal VOC 2012 without its background: stored 0 is ignored, 1..20 become 0..19."""

    name = "voc20"
    class_file = "voc20.txt"
    KEEPS_BACKGROUND = False


class Context60Dataset(Dataset):
    """Pascal Context with 0 as the background class and the 59 classes as stored (1..59)."""

    name = "context60"
    class_file = "context60.txt"
    layout = (
        "the VOC2010 folder holding JPEGImages/, SegmentationClassContext/ and ImageSets/SegmentationContext/ "
        "(as prepared by mmsegmentation's pascal_context converter)"
    )
    DEFAULT_HELD_OUT = (
        "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tv monitor", "keyboard", "aeroplane",
    )  # fmt: skip
    KEEPS_BACKGROUND = True

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        synonyms = self._class_names()
        self._set_classes(synonyms, _zero_codec(len(synonyms), self.KEEPS_BACKGROUND), self.DEFAULT_HELD_OUT)

    def _records(self, split: str) -> list[Record]:
        return self._listed(
            split,
            self.root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
            self.root / "JPEGImages",
            self.root / "SegmentationClassContext",
        )


class Context59Dataset(Context60Dataset):
    """Pascal Context without its background: stored 0 is ignored, 1..59 become 0..58."""

    name = "context59"
    class_file = "context59.txt"
    KEEPS_BACKGROUND = False


def _coco_records(
    split: str, image_dir: Path, label_dir: Path, label_names: Callable[[str], list[str]]
) -> list[Record]:
    """One record per ``<id>.jpg``, labelled by the first of ``label_names(id)`` stored in ``label_dir``."""
    stored = {entry.name for entry in os.scandir(label_dir)}
    records = []
    for image in image_dir.glob("*.jpg"):
        names = label_names(image.stem)
        label = next((name for name in names if name in stored), names[0])
        records.append(Record(image.stem, split, str(image), str(label_dir / label)))
    return records


class CocoStuff171Dataset(Dataset):
    """COCO-Stuff 164k with its 171 classes, from mmsegmentation's train-id labels or the official stuffthingmaps."""

    name = "cocostuff171"
    class_file = "cocostuff171.txt"
    layout = "the COCO-Stuff 164k folder holding images/{train,val}2017/ and annotations/{train,val}2017/"
    DEFAULT_HELD_OUT: tuple[str, ...] = (
        "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds", "grass",
        "playingfield", "river", "road", "tree", "concrete wall",
    )  # fmt: skip
    TRAIN_IDS_SUFFIX = "_labelTrainIds.png"
    TO_COARSE = False

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        self.train_ids_codec = LabelCodec(np.arange(COCO_STUFF_CLASSES))
        self.raw_codec = LabelCodec(_coco_raw_table())
        if self.TO_COARSE:
            coarse = cocostuff_coarse_table()
            self.train_ids_codec = self.train_ids_codec.then(coarse)
            self.raw_codec = self.raw_codec.then(coarse)
        self._set_classes(self._class_names(), self.train_ids_codec, self.DEFAULT_HELD_OUT)

    def _codec_for(self, path: str) -> LabelCodec:
        return self.train_ids_codec if path.endswith(self.TRAIN_IDS_SUFFIX) else self.raw_codec

    def _records(self, split: str) -> list[Record]:
        image_dir = self._require_dir(split, self.root / "images" / f"{split}2017")
        label_dir = self._require_dir(split, self.root / "annotations" / f"{split}2017")
        return _coco_records(split, image_dir, label_dir, lambda i: [i + self.TRAIN_IDS_SUFFIX, f"{i}.png"])


class CocoStuff27Dataset(CocoStuff171Dataset):
    """COCO-Stuff's 171 classes merged into the 27 coarse classes of the unsupervised protocol; no default held-out
    classes (the held-out protocol is defined on the fine classes)."""

    name = "cocostuff27"
    class_file = "cocostuff27.txt"
    DEFAULT_HELD_OUT = ()
    TO_COARSE = True


class CocoObjectDataset(Dataset):
    """COCO-Object: COCO-Stuff 164k's images with 0 = background (every stuff class and unlabelled pixels) and
    1..80 = the thing classes, from the converted ``_instanceTrainIds.png`` labels or, where those are absent,
    derived the same way from the stuffthingmaps."""

    name = "cocoobject"
    class_file = "cocoobject.txt"
    layout = "the COCO-Stuff 164k folder holding images/{train,val}2017/ and annotations/{train,val}2017/"
    LABEL_SUFFIX = "_instanceTrainIds.png"
    UNLABELLED = COCO_NUM_RAW_IDS  # where a stuffthingmap's 255 (unlabelled) is looked up: the converter's background

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        synonyms = self._class_names()
        self._set_classes(synonyms, LabelCodec(np.arange(len(synonyms))))
        things = _coco_raw_table()[: COCO_FIRST_STUFF_RAW_ID]
        table = np.zeros(self.UNLABELLED + 1, dtype=np.int64)  # stuff and unlabelled -> background 0
        table[: len(things)] = np.where(things == IGNORE_INDEX, IGNORE_INDEX, things + 1)
        self.raw_codec = LabelCodec(table)

    def read_label(self, path: str) -> np.ndarray:
        if path.endswith(self.LABEL_SUFFIX):
            return super().read_label(path)
        raw = read_label_png(path)
        return self.raw_codec.decode(np.where(raw == IGNORE_INDEX, self.UNLABELLED, raw), path)

    def _records(self, split: str) -> list[Record]:
        image_dir = self._require_dir(split, self.root / "images" / f"{split}2017")
        label_dir = self._require_dir(split, self.root / "annotations" / f"{split}2017")
        return _coco_records(split, image_dir, label_dir, lambda i: [i + self.LABEL_SUFFIX, f"{i}.png"])


class CityscapesDataset(Dataset):
    """Cityscapes' label ids mapped to the 19 train ids of the official label table."""

    name = "cityscapes"
    class_file = "cityscapes.txt"
    layout = "the Cityscapes folder holding leftImg8bit/ and gtFine/"
    TABLE: tuple[int, ...] = CITYSCAPES_TRAIN_IDS

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        self._set_classes(self._class_names(), LabelCodec(self.TABLE))

    def _records(self, split: str) -> list[Record]:
        image_dir = self._require_dir(split, self.root / "leftImg8bit" / split)
        label_dir = self.root / "gtFine" / split
        records = []
        for image in image_dir.glob("*/*_leftImg8bit.png"):
            image_id = image.name.removesuffix("_leftImg8bit.png")
            label = label_dir / image.parent.name / f"{image_id}_gtFine_labelIds.png"
            records.append(Record(image_id, split, str(image), str(label)))
        return records


class Cityscapes27Dataset(CityscapesDataset):
    """Cityscapes' 27 non-void classes (label ids 7..33) of the unsupervised protocol."""

    name = "cityscapes27"
    class_file = "cityscapes27.txt"
    TABLE = (IGNORE_INDEX,) * CITYSCAPES_FIRST_NONVOID + tuple(
        range(len(CITYSCAPES_TRAIN_IDS) - CITYSCAPES_FIRST_NONVOID)
    )


class Ade20kDataset(Dataset):
    """ADE20K's 150 classes; stored 0 ("other") is ignored."""

    name = "ade20k"
    class_file = "ade20k.txt"
    layout = "the ADEChallengeData2016 folder (or its parent) holding images/ and annotations/"
    SPLIT_FOLDERS = {"train": "training", "val": "validation"}

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        nested = Path(root) / "ADEChallengeData2016"
        super().__init__(cfg, nested if nested.is_dir() else root)
        synonyms = self._class_names()
        self._set_classes(synonyms, LabelCodec(_reduce_zero_table(len(synonyms))))

    def _records(self, split: str) -> list[Record]:
        if split not in self.SPLIT_FOLDERS:
            raise DatasetError(f"ade20k has splits {', '.join(self.SPLIT_FOLDERS)}, not {split!r}; fix data.splits")
        folder = self.SPLIT_FOLDERS[split]
        image_dir = self._require_dir(split, self.root / "images" / folder)
        label_dir = self.root / "annotations" / folder
        return [
            Record(image.stem, split, str(image), str(label_dir / f"{image.stem}.png"))
            for image in image_dir.glob("*.jpg")
        ]


class ImageFolderDataset(Dataset):
    name = "imagefolder"
    layout = "a folder of images (searched recursively)"

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        self._set_classes([], LabelCodec([]))

    def _records(self, split: str) -> list[Record]:
        records = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                path = Path(dirpath) / filename
                if filename.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                image_id = path.relative_to(self.root).with_suffix("").as_posix().replace("/", "__")
                records.append(Record(image_id, split, str(path)))
        if not records:
            raise DatasetError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) under data.root {self.root}")
        return records


class SyntheticDataset(Dataset):
    """The synthetic world, written (idempotently) under ``root`` the first time a split is asked for."""

    name = "synthetic"
    layout = "a writable folder for the generated world"

    def __init__(self, cfg: DataConfig, root: Path) -> None:
        super().__init__(cfg, root)
        self.world = SyntheticWorld(cfg.synthetic)
        names = self.world.class_names
        self._set_classes([[name] for name in names], LabelCodec(np.arange(len(names))))

    def _records(self, split: str) -> list[Record]:
        s = self.cfg.synthetic
        counts = {"train": s.num_train, "val": s.num_val, "test": s.num_test}
        if split not in counts:
            raise DatasetError(f"the synthetic world has splits train, val and test, not {split!r}; fix data.splits")
        if counts[split] == 0:
            raise DatasetError(f"data.splits names {split!r} but data.synthetic.num_{split} is 0; raise it")
        count = min(counts[split], self.cfg.max_images or counts[split])
        return self.world.write(self.root, split, count)


ADAPTERS: dict[str, type[Dataset]] = {
    cls.name: cls
    for cls in (
        Voc20Dataset, Voc21Dataset, Context59Dataset, Context60Dataset, CocoObjectDataset, CocoStuff171Dataset,
        CocoStuff27Dataset, CityscapesDataset, Cityscapes27Dataset, Ade20kDataset, ImageFolderDataset, SyntheticDataset,
    )
}  # fmt: skip


def get_dataset(cfg: DataConfig, root: Path | None = None) -> Dataset:
    """The adapter for ``cfg.dataset``; ``root`` overrides ``cfg.root`` (the synthetic world needs one to write to)."""
    adapter = ADAPTERS[cfg.dataset]
    root = Path(root) if root is not None else cfg.root
    if root is None:
        raise DatasetError(
            f"data.root is not set; dataset {cfg.dataset!r} needs {adapter.layout}. "
            "Set it in the preset or config file, or with --set data.root=/path/to/it"
        )
    if adapter is not SyntheticDataset and not Path(root).is_dir():
        raise DatasetError(f"data.root {root} does not exist; dataset {cfg.dataset!r} needs {adapter.layout}")
    if cfg.classes is not None and adapter.class_file is None:
        raise DatasetError(f"data.classes names label classes, which dataset {cfg.dataset!r} has not; unset it")
    return adapter(cfg, Path(root))
