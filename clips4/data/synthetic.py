"""The synthetic world (docs/method.md §8): stuff textures as backgrounds, thing shapes on top, and captions.

Everything is a pure function of :class:`~clips4.config.SyntheticConfig`. A class's look (hue, texture, shape) is
derived from a stable hash of (name, class index, seed), never from a table of known names, so the world works for any
class names. All classes share one evenly spaced hue ring, things are vivid and stuff muted, each thing gets its own
shape and texture while there are some left, so classes stay separable while instances vary (``appearance_jitter``).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clips4.config import SyntheticConfig
from clips4.data.records import IGNORE_INDEX, Record
from clips4.progress import track
from clips4.atomic import atomic_write

# Ordered from most to least distinct, so a world with few things gets the most separable ones.
SHAPES: tuple[str, ...] = (
    "disc", "ring", "star", "cross", "triangle", "crescent", "square", "frame", "heart", "semicircle", "ellipse",
    "hexagon",
)  # fmt: skip
THING_TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "rings", "waves")
STUFF_TEXTURES: tuple[str, ...] = ("blobs", "stripes", "checker", "dots", "waves", "grain")

# Each split draws image i from its own stream (seed, split code, i), so a split's size never changes another's images.
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_TWO_STUFF_PROB = 0.5


def stable_hash(*parts: object) -> int:
    """A 63-bit hash that is the same in every process and Python version (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class ClassAppearance:
    """How one class looks: HSV base colour, a texture and, for things, a shape."""

    name: str
    is_thing: bool
    hue: float
    saturation: float
    value: float
    texture: str
    frequency: float  # stuff: cycles per image side; things: cycles per object radius
    contrast: float
    shape: str | None = None

    @property
    def rgb(self) -> np.ndarray:
        return np.array(colorsys.hsv_to_rgb(self.hue, self.saturation, self.value), dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image with its class-id label map and caption."""

    image: np.ndarray  # uint8 [S,S,3]
    label: np.ndarray  # uint8 [S,S], class ids (stuff first, then things)
    caption: str


def _rank(keys: list[int]) -> list[int]:
    return [int(r) for r in np.argsort(np.argsort(keys))]


def _make_appearances(cfg: SyntheticConfig) -> list[ClassAppearance]:
    """One hue ring shared by all classes (so no thing shares its colour with a stuff), textures and shapes dealt
    per group, all in the order of a hash of (name, index, seed): separable for any names."""
    names = [*cfg.stuff, *cfg.things]
    keys = [stable_hash(name, i, cfg.seed) for i, name in enumerate(names)]
    hue_rank = _rank(keys)
    offset = np.random.default_rng(stable_hash("clips4-world", cfg.seed)).random()
    n_stuff = len(cfg.stuff)
    group_rank = _rank(keys[:n_stuff]) + _rank(keys[n_stuff:])
    out: list[ClassAppearance] = []
    for i, name in enumerate(names):
        own = np.random.default_rng(keys[i])
        is_thing, r = i >= n_stuff, group_rank[i]
        textures = THING_TEXTURES if is_thing else STUFF_TEXTURES
        out.append(
            ClassAppearance(
                name=name,
                is_thing=is_thing,
                hue=float((offset + hue_rank[i] / len(names)) % 1.0),
                # things are vivid, stuff is muted: one more cue that tells the groups apart
                saturation=float(own.uniform(0.75, 0.95) if is_thing else own.uniform(0.3, 0.5)),
                value=float(own.uniform(0.8, 0.95) if is_thing else own.uniform(0.45, 0.7)),
                texture=textures[r % len(textures)],
                frequency=float(own.uniform(1.5, 2.5) if is_thing else own.uniform(3.0, 7.0)),
                contrast=float(own.uniform(0.25, 0.45)),
                shape=SHAPES[r % len(SHAPES)] if is_thing else None,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------------- drawing
def _value_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Smooth random field: bilinear value noise with ``freq`` cells per coordinate unit."""
    gu, gv = (u - u.min()) * freq, (v - v.min()) * freq
    grid = rng.random((int(gv.max()) + 2, int(gu.max()) + 2), dtype=np.float32)
    i, j = gu.astype(np.int64), gv.astype(np.int64)
    fu, fv = gu - i, gv - j
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    top = grid[j, i] * (1 - fu) + grid[j, i + 1] * fu
    bottom = grid[j + 1, i] * (1 - fu) + grid[j + 1, i + 1] * fu
    return top * (1 - fv) + bottom * fv


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, freq: float, rng: np.random.Generator) -> np.ndarray:
    """Texture intensity in [0,1] at coordinates (u, v); the phase is random per instance."""
    phase = rng.random()
    if kind == "plain":
        return np.clip(1.0 - 0.5 * (u * u + v * v), 0.0, 1.0)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * u + phase))
    if kind == "checker":
        return ((np.floor(freq * u + phase) + np.floor(freq * v + phase)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = (freq * u + phase) % 1.0 - 0.5, (freq * v + phase) % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * u + phase) + 1.5 * np.sin(np.pi * freq * v))
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * np.sqrt(u * u + v * v) + phase))
    if kind == "blobs":
        return _value_noise(rng, u, v, freq)
    if kind == "grain":
        return rng.random(u.shape, dtype=np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * np.arange(sides) / sides
    proj = u[..., None] * np.cos(angles) + v[..., None] * np.sin(angles)
    return proj.max(-1) <= apothem


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of object-local coordinates (unit radius) in a parametric shape."""
    rho2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return rho2 <= 1.0
    if shape == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if shape == "star":
        phi = np.arctan2(v, u)
        return np.sqrt(rho2) <= 0.45 + 0.55 * (0.5 + 0.5 * np.cos(5 * phi)) ** 2
    if shape == "cross":
        return (np.minimum(au, av) <= 0.3) & (np.maximum(au, av) <= 1.0)
    if shape == "triangle":
        return _polygon(u, v, 3, 0.5)
    if shape == "crescent":
        return (rho2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    if shape == "square":
        return np.maximum(au, av) <= 0.75
    if shape == "frame":
        return (np.maximum(au, av) <= 0.8) & (np.maximum(au, av) >= 0.45)
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "semicircle":
        return (rho2 <= 1.0) & (v >= -0.2)
    if shape == "ellipse":
        return u * u + (v / 0.5) ** 2 <= 1.0
    if shape == "hexagon":
        return _polygon(u, v, 6, 0.87)
    raise ValueError(f"unknown shape {shape!r}")


def _jittered_rgb(look: ClassAppearance, rng: np.random.Generator, jitter: float, hue_slot: float) -> np.ndarray:
    """Instance colour: hue moves at most half-way to the neighbouring class (jitter = 1), s/v by up to ±jitter/2."""
    hue = (look.hue + rng.uniform(-1, 1) * jitter * hue_slot / 2) % 1.0
    sat = np.clip(look.saturation + rng.uniform(-1, 1) * jitter / 2, 0.0, 1.0)
    val = np.clip(look.value + rng.uniform(-1, 1) * jitter / 2, 0.05, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# Half the templates put the things last and half the stuff, so no word position stands for "stuff" to the text
# encoder (otherwise a lone thing name in a prompt such as "a photo of a ring." reads like a stuff name).
_THING_TEMPLATES = (
    "a photo of {things} on {stuff}.",
    "{things} on {stuff}.",
    "a picture of {things} lying on {stuff}.",
    "an image of {things} over {stuff}.",
    "a photo of {stuff} with {things}.",
    "{stuff} with {things}.",
    "a picture of {stuff} and {things}.",
    "there is {stuff} with {things}.",
)
_STUFF_TEMPLATES = ("a photo of {stuff}.", "a picture of {stuff}.", "{stuff}.", "an image of {stuff}.")


class SyntheticWorld:
    """Deterministic generator of images, label maps and captions for one :class:`SyntheticConfig`."""

    def __init__(self, cfg: SyntheticConfig):
        if len(cfg.stuff) + len(cfg.things) > IGNORE_INDEX:
            raise ValueError(f"the synthetic world holds at most {IGNORE_INDEX} classes (8-bit labels, 255 = ignore)")
        self.cfg = cfg
        self.appearances = _make_appearances(cfg)
        size = cfg.image_size
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._x, self._y = np.meshgrid(centres, centres)  # normalised image coordinates in (0, 1)

    @property
    def class_names(self) -> list[str]:
        return [*self.cfg.stuff, *self.cfg.things]

    def world_key(self) -> str:
        """Hash of every field that changes what :meth:`sample` returns (not the split sizes)."""
        fields = self.cfg.fingerprint_fields()
        fields.pop("num_train")
        fields.pop("num_val")
        fields.pop("num_test")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def _rng(self, split: str, index: int) -> np.random.Generator:
        code = _SPLIT_CODES.get(split, stable_hash("split", split) % 2**32)
        return np.random.default_rng([self.cfg.seed % 2**64, code, index])

    def _stuff_layer(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Background: one stuff class, or two separated by a wavy boundary."""
        cfg, x, y = self.cfg, self._x, self._y
        n = len(cfg.stuff)
        ids = [int(rng.integers(n))]
        label = np.full(x.shape, ids[0], dtype=np.uint8)
        if n > 1 and rng.random() < _TWO_STUFF_PROB:
            ids.append(int((ids[0] + rng.integers(1, n)) % n))
            angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.25, 0.25)
            along = -(x - 0.5) * np.sin(angle) + (y - 0.5) * np.cos(angle)
            wave = rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * rng.uniform(1, 3) * along + rng.uniform(0, 6.3))
            label[(x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + wave > offset] = ids[1]
        image = np.empty((*x.shape, 3), dtype=np.float32)
        for cid in ids:
            look = self.appearances[cid]
            angle = rng.uniform(0, np.pi)
            u = x * np.cos(angle) + y * np.sin(angle)
            v = -x * np.sin(angle) + y * np.cos(angle)
            freq = look.frequency * (1 + rng.uniform(-1, 1) * cfg.appearance_jitter)
            pattern = _pattern(look.texture, u, v, freq, rng)
            rgb = _jittered_rgb(look, rng, cfg.appearance_jitter, 1 / len(self.appearances))
            where = label == cid
            image[where] = rgb * (1 - look.contrast * (1 - pattern[where, None]))
        return image, label

    def _draw_things(self, rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> None:
        """Things in decreasing size, so small ones stay visible on top of large ones."""
        cfg = self.cfg
        n_stuff, n_things = len(cfg.stuff), len(cfg.things)
        count = int(rng.integers(cfg.min_things, cfg.max_things + 1))
        classes = rng.integers(n_things, size=count)
        sizes = np.sort(rng.uniform(*cfg.scale_range, size=count))[::-1]
        for cls, size in zip(classes, sizes, strict=True):
            look = self.appearances[n_stuff + int(cls)]
            radius = size / 2
            cx, cy = rng.uniform(0.1, 0.9, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            aspect = 1 + rng.uniform(-1, 1) * cfg.appearance_jitter / 2
            dx, dy = self._x - cx, self._y - cy
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius * aspect)
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) * aspect / radius
            mask = _shape_mask(look.shape or "disc", u, v)
            freq = look.frequency * (1 + rng.uniform(-1, 1) * cfg.appearance_jitter)
            pattern = _pattern(look.texture, u[mask], v[mask], freq, rng)
            rgb = _jittered_rgb(look, rng, cfg.appearance_jitter, 1 / len(self.appearances))
            image[mask] = rgb * (1 - look.contrast * (1 - pattern[:, None]))
            label[mask] = n_stuff + int(cls)

    def _caption(self, rng: np.random.Generator, label: np.ndarray) -> str:
        """Name every class that is visible in the label map, stuff and things, in random order."""
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=len(self.class_names)))
        names = self.class_names
        n_stuff = len(self.cfg.stuff)
        stuff = [names[i] for i in rng.permutation([i for i in present if i < n_stuff])]
        things = [_with_article(names[i]) for i in rng.permutation([i for i in present if i >= n_stuff])]
        if things:
            template = _THING_TEMPLATES[rng.integers(len(_THING_TEMPLATES))]
            return template.format(things=_join(things), stuff=_join(stuff))
        return _STUFF_TEMPLATES[rng.integers(len(_STUFF_TEMPLATES))].format(stuff=_join(stuff))

    def sample(self, split: str, index: int) -> SyntheticSample:
        """Image ``index`` of ``split``; the same arguments always give the same sample."""
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        rng = self._rng(split, index)
        image, label = self._stuff_layer(rng)
        self._draw_things(rng, image, label)
        caption = self._caption(rng, label)
        angle = rng.uniform(0, 2 * np.pi)  # soft lighting gradient: another intra-class nuisance
        light = 1 + self.cfg.appearance_jitter * ((self._x - 0.5) * np.cos(angle) + (self._y - 0.5) * np.sin(angle))
        image = image * light[..., None] + rng.normal(0.0, self.cfg.noise, image.shape).astype(np.float32)
        return SyntheticSample(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), label, caption)

    def write(self, out_dir: Path, split: str, count: int) -> list[Record]:
        """Write ``count`` samples of ``split`` as PNGs and return their records.

        Idempotent and cheap to repeat: existing files are kept, and captions are read back from
        ``captions_<split>.json`` instead of regenerating the images. A directory that holds a different world
        (other seed, names, ...) is refused rather than mixed.
        """
        out_dir = Path(out_dir).resolve()
        image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        index_path = out_dir / f"captions_{split}.json"
        captions: dict[str, str] = {}
        if index_path.is_file():
            stored = json.loads(index_path.read_text())
            if stored.get("world") != self.world_key():
                raise ValueError(
                    f"{out_dir} holds a synthetic world made with another configuration "
                    f"(world key {stored.get('world')} != {self.world_key()}); write this world to another directory"
                )
            captions = stored["captions"]
        records, changed = [], False
        for index in track(range(count), f"synthetic world: {split}", unit="img"):
            image_id = f"{split}_{index:05d}"
            image_path, label_path = image_dir / f"{image_id}.png", label_dir / f"{image_id}.png"
            if image_id not in captions or not image_path.is_file() or not label_path.is_file():
                sample = self.sample(split, index)
                for path, array in ((image_path, sample.image), (label_path, sample.label)):
                    if not path.is_file():
                        _write_png_atomic(path, array)
                captions[image_id], changed = sample.caption, True
            records.append(Record(image_id, split, str(image_path), str(label_path), captions[image_id]))
        if changed:
            index = json.dumps({"world": self.world_key(), "captions": captions}, indent=0)
            atomic_write(index_path, lambda tmp: tmp.write_text(index))
        return records


def _write_png_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
