"""Image and label file I/O with errors that name the file and say what to do about it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile

# A truncated JPEG must fail loudly instead of decoding to a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

T = TypeVar("T")
R = TypeVar("R")

REMEDY = "re-download or remove it, or set data.on_bad_input=skip"


class BadImageError(ValueError):
    """An image or label file that cannot be used; ``problem`` says why without the remedy."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; {REMEDY}")


def _open_loaded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` (PIL is lazy: without ``load`` a truncated file would pass)."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise BadImageError(path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(path, f"cannot be decoded ({err})") from None
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file into uint8 RGB [H, W, 3] (grayscale, palette and alpha images are converted)."""
    return np.asarray(_open_loaded(path).convert("RGB"), dtype=np.uint8)


def read_label_png(path: str | Path) -> np.ndarray:
    """Raw stored values of a label map [H, W]: palette PNGs give their indices, not their colours."""
    image = _open_loaded(path)
    if image.mode not in ("P", "L", "I", "I;16", "I;16B"):
        raise BadImageError(
            path, f"label map has mode {image.mode!r}; expected a palette or grayscale PNG of class values"
        )
    values = np.asarray(image)
    return values if values.dtype == np.uint8 else values.astype(np.int32)


def write_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write uint8 [H, W] or [H, W, 3]; with ``palette`` ([N<=256, 3] uint8) a 2-D array becomes a palette PNG."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8 values, got {array.dtype}")
    image = Image.fromarray(array)  # 2-D uint8 -> mode "L"; putpalette turns it into "P" keeping the values
    if palette is not None:
        if array.ndim != 2:
            raise ValueError("a palette needs a 2-D array of indices")
        colours = np.zeros((256, 3), dtype=np.uint8)
        colours[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        image.putpalette(colours.ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def prefetch(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn`` of each item in order, the next one computed in a background thread while the caller uses this one.

    Decoding the next batch of images overlaps the model's forward pass on the current one (PIL and torch release
    the GIL); an error in ``fn`` is raised where its result would have been yielded."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = (pool.submit(fn, item) for item in items)  # lazy: each next() submits one
        pending = next(futures, None)
        while pending is not None:
            following = next(futures, None)
            yield pending.result()
            pending = following
