"""Image and label file I/O with errors that name the file and say what to do about it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated JPEG must fail loudly instead of decoding to a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is data.max_pixels, checked from each file's header before decoding (``max_pixels`` below), where
# it names the file and the setting. Pillow's own check (a warning from 89 Mpx, an error from 179 Mpx) names no file
# and would refuse images the user allowed by raising data.max_pixels.
Image.MAX_IMAGE_PIXELS = None

REMEDY = "re-download or remove it, or set data.on_bad_input=skip"
LIMIT_SETTING = "data.max_pixels or set it to null"
ORIENTATION = 0x0112  # the EXIF tag


class BadImageError(ValueError):
    """An image or label file that cannot be used; ``problem`` says why without the remedy."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; {REMEDY}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from both fields: an image worker process sends its errors to the reader pickled.
        return type(self), (self.path, self.problem)


def _open(path: str | Path, max_pixels: int | None, setting: str) -> Image.Image:
    """Open ``path`` reading only its header, and refuse it there when it has more than ``max_pixels`` pixels: a
    140 kB PNG can decode to gigabytes."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise BadImageError(path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, f"cannot be decoded ({err})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise BadImageError(
            path,
            f"is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
            f"if the image is genuine, raise {setting}",
        )
    return image


def _open_loaded(path: str | Path, max_pixels: int | None = None, setting: str = LIMIT_SETTING) -> Image.Image:
    """Open and fully decode ``path`` (PIL is lazy: without ``load`` a truncated file would pass), turned upright by
    its EXIF orientation: a transpose moves pixels and never changes a value, so label maps stay exact."""
    image = _open(path, max_pixels, setting)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError) as err:
        image.close()
        raise BadImageError(path, f"cannot be decoded ({err})") from None
    return image


def check_pixels(path: str | Path, max_pixels: int | None, setting: str = LIMIT_SETTING) -> None:
    """Read only the header of ``path``: BadImageError when it is missing, not an image, or has more than
    ``max_pixels`` pixels (None: no limit); ``setting`` names what raises the limit."""
    _open(path, max_pixels, setting).close()


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation ``read_image`` applied to ``path`` (1: stored upright)."""
    with Image.open(path) as image:
        image.load()  # a PNG may keep its EXIF after the pixels
        return int(image.getexif().get(ORIENTATION, 1))


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file into uint8 RGB [H, W, 3] as a viewer shows it: upright by its EXIF orientation, and with
    high-bit-depth values scaled to 8 bits, never clipped (:func:`to_uint8_rgb`). Images with more than
    ``max_pixels`` pixels are refused before decoding (None: no limit; the data stage passes data.max_pixels)."""
    image = _open_loaded(path, max_pixels)
    try:
        return to_uint8_rgb(image)
    except ValueError as err:
        raise BadImageError(path, str(err)) from None


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB pixels that span the full range of the image's type.

    16-bit grayscale (modes I;16*) keeps its high byte, as Pillow itself does for 16-bit colour PNGs and TIFFs (which
    it opens as 8-bit RGB): 65535 -> 255, 32768 -> 128. 32-bit integers (mode I) are read as 16-bit values and floats
    (mode F) as 0..1, the convention of float images; values outside those ranges have no defined brightness and
    raise ValueError. Grayscale is replicated to RGB; palette, alpha and other modes are converted by Pillow.
    """
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    elif image.mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 0xFFFF:
            raise ValueError(
                f"has 32-bit integer pixel values from {low} to {high}, outside the 16-bit range 0..65535 that maps "
                "to brightness; convert it to an 8- or 16-bit image"
            )
        gray = (values >> 8).astype(np.uint8)
    elif image.mode == "F":
        values = np.asarray(image)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(
                f"has floating-point pixel values from {values.min()} to {values.max()}, outside the range 0..1 "
                "that maps to brightness; convert it to an 8- or 16-bit image"
            )
        gray = np.round(values * 255).astype(np.uint8)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def read_label_png(path: str | Path) -> np.ndarray:
    """Raw stored values of a label map [H, W]: palette PNGs give their indices, not their colours.

    A label map is only turned by an EXIF orientation of its own (label PNGs rarely have one), never by its image's."""
    image = _open_loaded(path)
    if image.mode not in ("P", "L", "I", "I;16", "I;16B"):
        raise BadImageError(
            path, f"label map has mode {image.mode!r}; expected a palette or grayscale PNG of class values"
        )
    values = np.asarray(image)
    return values if values.dtype == np.uint8 else values.astype(np.int32)


def write_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write uint8 [H, W] or [H, W, 3], or uint16 [H, W] (a 16-bit grayscale PNG, for label maps whose class ids do
    not fit 8 bits); with ``palette`` ([N<=256, 3] uint8) a 2-D uint8 array becomes a palette PNG."""
    array = np.asarray(array)
    if array.dtype != np.uint8 and not (array.dtype == np.uint16 and array.ndim == 2 and palette is None):
        raise ValueError(f"write_png needs uint8 values, or a 2-D uint16 array without palette; got {array.dtype} "
                         f"of shape {array.shape}")
    image = Image.fromarray(array)  # 2-D uint8 -> "L" (putpalette makes it "P", keeping the values); uint16 -> "I;16"
    if palette is not None:
        if array.ndim != 2:
            raise ValueError("a palette needs a 2-D array of indices")
        colours = np.zeros((256, 3), dtype=np.uint8)
        colours[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        image.putpalette(colours.ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)

