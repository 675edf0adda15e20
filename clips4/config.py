"""Pipeline configuration: one pydantic model per stage inside one :class:`PipelineConfig`.

Configs are data. Resolution order is defaults <- preset or config file <- ``--set dotted.key=value`` overrides.
Every stage exposes a fingerprint of exactly the fields that change its output, so the artifact store can tell
whether a stored artifact is still valid after a config change. Fields that only change *how* work is done (worker
counts, devices, progress output) are marked ``volatile`` and left out of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).resolve().parent / "configs"  # presets ship inside the package
MIN_TEST_SCALE, MAX_TEST_SCALE = 0.25, 4.0  # evaluate.test_scales and `clips4 segment --scale`


def volatile(default: Any, description: str) -> Any:
    """A field that changes how a stage runs but never what it writes (kept out of fingerprints)."""
    return Field(default, description=description, json_schema_extra={"volatile": True})


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that determine this section's output, recursively, as plain JSON-able data."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("volatile"):
                continue
            value = getattr(self, name)
            out[name] = value.fingerprint_fields() if isinstance(value, Section) else _plain(value)
        return out

    def fingerprint(self) -> str:
        """Stable short hash of :meth:`fingerprint_fields`."""
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    """The synthetic world (docs/method.md §8): stuff textures as backgrounds, thing shapes on top, captions."""

    seed: int = Field(0, description="Seed that fully determines the world.")
    image_size: int = Field(64, ge=16, le=1024, description="Square image side in pixels.")
    num_train: int = Field(800, ge=1, description="Number of training images.")
    num_val: int = Field(160, ge=1, description="Number of validation images (every choice of design or value).")
    num_test: int = Field(
        160, ge=0, description="Number of test images (reported figures, never a choice); generated when "
        "data.splits names 'test'."
    )
    stuff: list[str] = Field(
        default_factory=lambda: ["grass", "sand", "water", "snow"],
        min_length=1,
        description="Background (stuff) class names; each becomes a texture.",
    )
    things: list[str] = Field(
        default_factory=lambda: ["kite", "ring", "star", "ball", "box", "cross"],
        min_length=1,
        description="Foreground (thing) class names; each becomes a shape with its own colour and texture.",
    )
    min_things: int = Field(1, ge=0, description="Fewest things per image.")
    max_things: int = Field(3, ge=1, description="Most things per image.")
    scale_range: tuple[float, float] = Field((0.18, 0.45), description="Thing size as a fraction of the image side.")
    appearance_jitter: float = Field(0.12, ge=0.0, le=1.0, description="Intra-class colour variation.")
    noise: float = Field(0.04, ge=0.0, le=1.0, description="Per-pixel noise amplitude.")

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.min_things > self.max_things:
            raise ValueError("min_things must not exceed max_things")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError("scale_range must satisfy 0 < low <= high <= 1")
        names = [*self.stuff, *self.things]
        if len(set(names)) != len(names):
            raise ValueError("stuff and things names must be unique")
        return self


class RegionsConfig(Section):
    """Superpixel over-segmentation used for the contrastive positives (docs/method.md §2)."""

    method: Literal["slic", "felzenszwalb"] = Field("slic", description="scikit-image superpixel algorithm.")
    n_segments: int = Field(64, ge=2, description="SLIC: approximate number of superpixels.")
    compactness: float = Field(10.0, gt=0, description="SLIC: colour vs. space trade-off.")
    scale: float = Field(100.0, gt=0, description="Felzenszwalb: observation scale.")
    sigma: float = Field(0.8, ge=0, description="Gaussian smoothing before segmenting.")
    min_size: int = Field(20, ge=1, description="Felzenszwalb: minimum component size.")


DatasetName = Literal[
    "synthetic", "voc20", "voc21", "context59", "context60", "cocoobject", "cocostuff171", "cocostuff27", "cityscapes",
    "cityscapes27", "ade20k", "imagefolder",
]  # fmt: skip


class DataConfig(Section):
    """Which images, which classes, and how bad input is handled."""

    dataset: DatasetName = Field(
        "synthetic", description="Dataset adapter: the benchmark as its field names it (docs/datasets.md)."
    )
    root: Path | None = Field(None, description="Dataset root on disk (not used by the synthetic world).")
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], min_length=1, description="Splits to index.")
    held_out: list[str] | None = Field(
        None, description="Class names never used in training; null = the dataset's default (docs/method.md §7)."
    )
    max_images: int | None = Field(None, ge=1, description="Cap per split (for quick runs); null = all.")
    classes: str | None = Field(
        None,
        description="Class-name file: a file shipped in clips4/data/classes (e.g. voc20.txt) or a path; one class per "
        "line in label-id order, synonyms separated by ' | '. null = the dataset's own file.",
    )
    sbd_aug: bool = Field(False, description="voc20, voc21: add the SBD augmented training list when present.")
    train_resolution: int = Field(
        320, ge=16, description="Training images are resized to this square side; superpixels are computed there."
    )
    on_bad_input: Literal["error", "skip"] = Field(
        "error", description="error: stop and name the bad file; skip: record it in the report and go on."
    )
    max_pixels: int | None = Field(
        50_000_000,
        ge=1,
        description="Images and label maps with more pixels are bad input (see on_bad_input), refused from the file "
        "header before decoding: a small file can decode to gigabytes. null = no limit.",
    )
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    num_workers: int = volatile(
        0, "Parallel workers: threads that check images, then processes that compute superpixels (0 = none)."
    )


# -------------------------------------------------------------------------------------------------------- teacher
class TeacherConfig(Section):
    """The frozen CLIP teacher: an open_clip model, pretrained, loaded from a file, or pre-trained here."""

    model: str = Field(
        "ViT-B-16", description="open_clip model name, or an 'hf-hub:org/repo' id (then pretrained is ignored)."
    )
    pretrained: str | None = Field(
        "openai",
        description="open_clip pretrained tag, or a local checkpoint path (OpenAI's own release loads with QuickGELU).",
    )
    train: Literal["none", "synthetic"] = Field(
        "none", description="'synthetic': pre-train `model` here on the synthetic world's captions."
    )
    num_images: int = Field(
        4000, ge=2, description="Synthetic pre-training images, from the world's own 'teacher' split (val stays unseen)."
    )
    single_class_prob: float = Field(
        0.25, ge=0, le=1, description="Chance a caption is swapped for a single-class one naming a class it mentions."
    )
    epochs: int = Field(4, ge=1, description="Synthetic pre-training epochs.")
    batch_size: int = Field(32, ge=2, description="Synthetic pre-training batch size (contrastive: it matters).")
    lr: float = Field(2e-3, gt=0, description="Synthetic pre-training AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="Synthetic pre-training weight decay.")
    seed: int = Field(0, description="Synthetic pre-training seed.")
    checkpoint_every: int = volatile(1, "Epochs between resumable checkpoints.")
    device: str = volatile("auto", "'auto', 'cpu' or 'cuda[:i]'.")

    @field_validator("pretrained")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None


# ------------------------------------------------------------------------------------------------------- features
class FeaturesConfig(Section):
    """MaskCLIP dense features of the un-augmented images (docs/method.md §5)."""

    resolution: int = Field(224, ge=16, description="Images are resized to this square side before the teacher.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored dtype of the dense features.")
    keep_keys: bool = Field(
        True, description="Store the last block's keys (for key smoothing, the maskclip+kspd row) of every split but "
        "train: no stage reads the train split's keys."
    )
    amp: bool = Field(True, description="Autocast on CUDA (ignored on CPU).")
    extra_templates: bool = Field(True, description="Add MaskCLIP's 5 scene templates to the 80 ImageNet ones.")
    shard_size: int = volatile(64, "Images per unit of work (and per Zarr shard).")
    batch_size: int = volatile(32, "Images per teacher forward pass.")
    num_workers: int = volatile(
        2, "Threads that decode and resize images ahead of the teacher (0 = none: the teacher waits for each "
        "batch); a Dask worker uses one."
    )
    device: str = volatile("auto", "'auto', 'cpu' or 'cuda[:i]'.")
    dask_address: str | None = volatile(None, "Run the shards on this Dask scheduler (prefect-dask); null = local.")


# -------------------------------------------------------------------------------------------------------- cluster
class ClusterConfig(Section):
    """Unknown prototypes: spherical k-means with the known text embeddings as fixed centres (docs/method.md §4)."""

    num_unknown: int = Field(16, ge=0, description="M: number of free centres (unknown prototypes).")
    sample_size: int = Field(100_000, ge=1, description="Dense feature vectors sampled from the train split.")
    iterations: int = Field(25, ge=1, description="k-means iterations.")
    max_points_per_centroid: int = Field(
        100_000, ge=1, description="FAISS subsampling cap; set high on purpose so the sample is used whole."
    )
    close_modality_gap: bool = Field(
        True,
        description="Cluster (and label segments) with CLIP image features moved by mean(known text) - mean(image), "
        "so text centres and prototypes compete on one scale.",
    )
    labels: Literal["nearest", "known_first", "named_clusters"] = Field(
        "known_first",
        description="L_sem's segment labels: 'nearest' = the nearest of known texts and prototypes; 'known_first' = "
        "the known class when CLIP's softmax over the known texts is confident (known_confidence), else the nearest "
        "prototype; 'named_clusters' = the name of the nearest of num_centres clusters, a cluster taking a known "
        "class when the known_first rule gives that class to name_share of its features, else being a prototype.",
    )
    num_centres: int = Field(
        64, ge=1, description="named_clusters: clusters fitted on all sampled features (named ones + prototypes)."
    )
    name_share: float = Field(
        0.5, gt=0, le=1, description="named_clusters: share of a cluster's features the known_first rule must give "
        "one known class for the cluster to take that class."
    )
    known_scale: float = Field(
        100.0, gt=0, description="Logit scale of that softmax: softmax(known_scale x cosine) (CLIP's and MaskCLIP's 100)."
    )
    known_confidence: float = Field(
        0.5, gt=0, le=1, description="known_first: the peak known-class probability at which a segment takes that class."
    )
    known_quantile: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="known_first: this share of the sampled features, those with the lowest cosine to their nearest "
        "known text, is left to the prototypes however sure the softmax is; the cosine there is the floor a segment "
        "must reach to take a known class (0 = no floor).",
    )
    fit_on: Literal["all", "unexplained"] = Field(
        "unexplained",
        description="Features the prototypes are fitted (and refreshed) on: 'all' sampled ones, or 'unexplained' = "
        "those the known_first rule gives no known class, so prototypes describe what no known class names.",
    )
    seed: int = Field(0, description="Sampling and initialisation seed.")
    device: str = volatile("auto", "'auto' uses faiss-gpu when installed and a GPU is present.")


# ---------------------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    """The student and CLIP-S4's three losses (docs/method.md §1-4)."""

    student: Literal["small_cnn", "resnet50", "resnet101"] = Field("small_cnn", description="Pixel encoder.")
    backbone_weights: Path | None = Field(
        None, description="Local torchvision ImageNet weights file for ResNet students (null: random weights)."
    )
    width: int = Field(64, ge=8, description="small_cnn: base channel width.")
    context: list[int] = Field(
        default_factory=lambda: [1, 1],
        min_length=1,
        description="small_cnn: dilation of each conv of the context branch; receptive field 15 + 8 x sum px.",
    )
    input_size: int = Field(64, ge=16, description="Side of each augmented view fed to the student.")
    steps: int = Field(600, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Images per step (two views each).")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="SGD momentum 0.9 (paper-style) or AdamW.")
    lr: float = Field(2e-3, gt=0, description="Base learning rate (poly decay).")
    head_lr_mult: float = Field(10.0, gt=0, description="Head learning-rate multiplier (ResNet students).")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    kappa: float = Field(16.0, gt=0, description="Concentration of the pixel-segment contrastive loss.")
    contrast_targets: Literal["regions", "teacher"] = Field(
        "regions",
        description="L_contrast's targets over a pixel's segments: 'regions' = the segments of its region in either "
        "view are the positives, every other segment a negative (docs/method.md §2); 'teacher' = the teacher's own "
        "softmax over the same segments (its pixel feature against their pooled CLIP features, concentration "
        "kappa_teacher), so only segments the teacher tells apart are pushed apart.",
    )
    kappa_teacher: float = Field(
        32.0, gt=0, description="Concentration of the teacher's softmax when train.contrast_targets is 'teacher'."
    )
    tau: float = Field(0.07, gt=0, description="Temperature of the semantic-consistency softmax.")
    lambda_contrast: float = Field(1.0, ge=0, description="Weight of L_contrast (0 turns it off).")
    lambda_emb: float = Field(1.0, ge=0, description="Weight of L_emb (0 turns it off).")
    lambda_sem: float = Field(1.0, ge=0, description="Weight of L_sem (0 turns it off).")
    emb_space: Literal["image", "text"] = Field(
        "image",
        description="L_emb targets: 'image' = CLIP's image features as they are (docs/method.md §3); 'text' = moved "
        "across the modality gap the cluster stage measured, so student pixels land where the class texts are.",
    )
    emb_pooling: Literal["segments", "patches", "both"] = Field(
        "segments",
        description="L_emb pairs: 'segments' = student and CLIP map pooled over the student's segments (docs/method.md §3); "
        "'patches' = the student pooled over each CLIP patch's footprint in the view against that patch; 'both' = "
        "the mean of the two.",
    )
    patch_norm_power: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Per-patch L_emb ('patches', 'both') is 1 - <m, t> / norm(m)**p, with m the mean of the "
        "student's unit pixels over the patch footprint and t the patch: 1 compares m's direction (pixels of a thing "
        "that fills part of a patch then carry the residual the ground leaves, amplified by 1/coverage); 0 pulls "
        "each pixel to t.",
    )
    contrast_pixels: int = Field(
        4096, ge=0, description="Pixels sampled per step for L_contrast (0 = every pixel); segments use all pixels."
    )
    grid_seeds: int = Field(4, ge=1, description="Segment k-means seeds per side (grid_seeds**2 per view).")
    kmeans_iters: int = Field(10, ge=1, description="Segment k-means iterations.")
    crop_scale: tuple[float, float] = Field((0.5, 1.5), description="Random resized crop scale range.")
    color_jitter: float = Field(0.4, ge=0, description="Brightness/contrast/saturation jitter strength.")
    grayscale: float = Field(0.2, ge=0, le=1, description="Chance a view is turned grayscale.")
    refresh_every: int = Field(
        200, ge=0, description="Steps between unknown-prototype refreshes (0 = never; none while lambda_sem is 0)."
    )
    seed: int = Field(0, description="Training seed.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    checkpoint_every: int = volatile(100, "Steps between resumable checkpoints.")
    device: str = volatile("auto", "'auto', 'cpu' or 'cuda[:i]'.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi:
            raise ValueError("crop_scale must satisfy 0 < low <= high")
        return self


# ------------------------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    """Batch evaluation of MaskCLIP and CLIP-S4 in one harness (docs/method.md §6)."""

    split: str = Field("val", description="Split to evaluate.")
    tasks: list[Literal["language", "unsupervised", "probe"]] = Field(
        default_factory=lambda: ["language", "unsupervised", "probe"], description="Tasks to run."
    )
    probe_epochs: int = Field(20, ge=1, description="Linear-probe epochs on the train split.")
    probe_lr: float = Field(
        0.2, gt=0, description="Linear-probe learning rate (SGD on channels standardised with the train split's moments)."
    )
    seed: int = Field(0, description="Seed for k-means and the probe.")
    num_pictures: int = Field(6, ge=0, description="Images drawn in the overlay pictures.")
    test_scales: list[Annotated[float, Field(ge=MIN_TEST_SCALE, le=MAX_TEST_SCALE)]] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Input scales of the table's test-time rows (`maskclip+tta`, `clips4+tta`): each image is resized "
        "to round(scale x size) for every scale, and the unit embeddings, resized to the first scale's grid, are "
        "averaged. Above 1 small things get more pixels. The plain rows `maskclip` and `clips4` stay at scale 1.",
    )
    recentre_gap: bool = Field(
        True,
        description="Language task, test-time rows: before the embeddings meet the class texts, move them by the mean "
        "text embedding of the classes named now minus the model's own embedding centre: the modality gap measured "
        "on the model and re-centred on the test-time class set. `maskclip+tta` uses the mean of MaskCLIP's stored "
        "train features; `clips4+tta` the mean of the student's embeddings over up to 1024 training images, stored "
        "by the train stage (students trained with train.emb_space 'text' only).",
    )
    new_class_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Language task, test-time rows, classes named only at test time (held out): each gets at least "
        "this fraction of plain MaskCLIP's share of the train split's pixels in the row's argmax, through one score "
        "bias per class measured on those images without their labels. The student keeps the teacher's majority "
        "for alike-looking pixels, so a class the teacher finds on a minority of them can vanish. 0 turns it off.",
    )
    calibration_pixels: int = Field(
        100_000, ge=1000, le=1_000_000, description="Pixels sampled from the train split for new_class_floor."
    )
    grid: int = Field(
        64,
        ge=1,
        description="Side of the one grid every method's map is resized to (bilinear) before the unsupervised and "
        "probe tasks, so MaskCLIP's coarse map and the student's finer one are compared at the same output "
        "resolution (64: the demo's label size and the student's map at test scale 2). The probe reads the train "
        "split's maps at this size a batch at a time.",
    )
    protocol: Literal["stored", "whole", "slide"] = Field(
        "stored",
        description="How the language task's models see each image. 'stored': MaskCLIP's map as the features stage "
        "stored it (the image squashed to a features.resolution square) and the student on the image squashed to "
        "its train.input_size square. 'whole': MaskCLIP and the student each on the whole image, resized by "
        "short_side. 'slide': each on crop x crop windows of that image every stride pixels, class scores averaged "
        "where windows overlap (the SCLIP family's harness). Scores are resized (bilinear) to each label's original "
        "size before the argmax. 'whole' and 'slide' leave out the maskclip+kspd row; the unsupervised and probe "
        "tasks, and the share floor's calibration, always read the stored maps (see grid).",
    )
    short_side: int | None = Field(
        None,
        ge=16,
        description="'whole' and 'slide': each image is resized (bilinear, aspect ratio kept) so that its short side "
        "has this many pixels (the SCLIP family: 336 for VOC, Context, ADE20K and COCO-Object, 448 for COCO-Stuff, "
        "560 for Cityscapes; MaskCLIP's own tables: 512 with 'whole'); the test scales of the +tta rows multiply "
        "it. null = each image at its own size.",
    )
    crop: int = Field(
        224, ge=16, description="'slide': side in pixels of the square windows MaskCLIP and the student each see "
        "(cut to the image where it is smaller)."
    )
    stride: int = Field(
        112, ge=1, description="'slide': pixels between neighbouring windows, at most crop; the last window of each "
        "row and column is aligned to the image's border, so windows cover every pixel."
    )
    background: Literal["ignore", "threshold"] = Field(
        "ignore",
        description="Language task. 'ignore': every class has a text and is scored (labels mark unlabelled "
        "background 255). 'threshold': class 0 is 'background' and has no text; the other classes are scored "
        "against their texts, and a pixel is background where the largest of their softmax probabilities "
        "(softmax of CLIP's 100 x cosine) is below background_threshold. 'threshold' leaves out the maskclip+kspd "
        "row; the unsupervised and probe tasks score every class.",
    )
    background_threshold: float = Field(
        0.1, gt=0, lt=1, description="'threshold': the largest class probability below which a pixel is "
        "background; published tables differ in it, so set it per benchmark."
    )
    batch_size: int = volatile(16, "Images per forward pass.")
    device: str = volatile("auto", "'auto', 'cpu' or 'cuda[:i]'.")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.stride > self.crop:
            raise ValueError(f"stride ({self.stride}) must not exceed crop ({self.crop}): windows further apart than "
                             "their side would leave pixels unseen")
        if self.short_side is not None and self.protocol == "stored":
            raise ValueError(f"short_side ({self.short_side}) resizes images for protocol 'whole' or 'slide'; set "
                             "evaluate.protocol to one of them, or short_side to null")
        return self


# ------------------------------------------------------------------------------------------------------- pipeline
class PipelineConfig(Section):
    """The whole pipeline: one section per stage."""

    name: str = volatile("custom", "Preset or config name (shown in summaries and artifact names).")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def stage(self, name: str) -> Section:
        sections = [f for f in type(self).model_fields if f != "name"]
        if name not in sections:
            raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(sections)}")
        return getattr(self, name)


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the field and what is allowed."""


# ----------------------------------------------------------------------------------------------------- resolution
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of stage sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.02`` -> (["train", "lr"], 0.02); the value is read as YAML, so lists and nulls work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {origin!r}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field (check the spelling; `clips4 config show` lists every field)")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{loc}: {e['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def resolve_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Defaults <- preset or config file <- dotted overrides; any bad key or value raises :class:`ConfigError`."""
    if preset and config_file:
        raise ConfigError("give either a preset or a config file, not both")
    tree: dict[str, Any] = {}
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; presets are: {', '.join(list_presets())}")
        tree = _load_yaml(path)
        tree.setdefault("name", preset)
    elif config_file:
        tree = _load_yaml(Path(config_file))
        tree.setdefault("name", Path(config_file).stem)
    for text in overrides or []:
        path_parts, value = parse_override(text)
        _set_dotted(tree, path_parts, value, text)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def to_yaml(cfg: Section) -> str:
    """The resolved config as YAML (paths as strings, tuples as lists)."""
    return yaml.safe_dump(_plain(cfg.model_dump(mode="json")), sort_keys=False)


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the models so it cannot drift."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `clips4/config.py` by `clips4 config reference` (a test keeps this file in sync).",
        "Set any field with `--set section.field=value` (values are YAML: `[a, b]`, `null`, `0.02`).",
        "Fields marked *volatile* change how a stage runs, not what it writes: they do not change artifact keys.",
        "",
    ]

    def walk(model: type[Section], prefix: str) -> None:
        rows, subsections = [], []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                subsections.append((annotation, f"{prefix}{name}."))
                continue
            default = field.default_factory() if field.default_factory else field.default
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            note = " *(volatile)*" if extra.get("volatile") else ""
            shown = yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{name}` | `{shown}` | {field.description or ''}{note} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'pipeline'}`", "", (model.__doc__ or "").strip(), ""])
            lines.extend(["| field | default | meaning |", "|---|---|---|", *rows, ""])
        for sub, sub_prefix in subsections:
            walk(sub, sub_prefix)

    walk(PipelineConfig, "")
    return "\n".join(lines)
