"""Reading an image file a visitor brings: every size it declares checked before a pixel is
decoded, then decoded at the size needed, upright, in RGB.

Every image the project sees (inference, Grad-CAM, evaluation, training) is opened by
:func:`load_image` (or :func:`load_photo`, or :func:`probe_image` for its header alone);
:mod:`resnext.transforms` turns it into the network's input.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ANSWER_SIDE",
    "DEEP_MODES",
    "DEEP_STRIP_ROWS",
    "ImageHeader",
    "ImageInput",
    "ImageLoadError",
    "MAX_ASPECT",
    "MAX_JPEG_SCANS",
    "MAX_PIXELS",
    "deep_to_grey",
    "jpeg_scans",
    "load_image",
    "load_photo",
    "probe_image",
    "shrink_to_fit",
    "to_rgb",
    "what_it_is",
]

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# Refuse anything larger before decoding it: 64 MP covers every camera photo; a "decompression
# bomb" (a small file declaring 100k x 100k pixels) would need 30 GB of memory once decoded.
MAX_PIXELS = 64_000_000
# A panorama is rarely over 8:1. Anything longer is no photo of a bird, and a 1-bit PNG of
# 640,000 x 100 pixels (8 kB on disk) is 192 MB once decoded and could never be shrunk enough.
MAX_ASPECT = 20
# The app answers a photo shrunk to this longer side (the network sees less; heatmaps are drawn at
# it); a fine-tune's verdict rules are chosen on its photos at the same size.
ANSWER_SIDE = 1280
# A progressive JPEG is decoded once per scan: 3,000 scans of a 64 MP image cost 43 s in a 0.5 MB
# file. Encoders write 1 (baseline), 3 (one per colour) or about 10 (progressive, mozjpeg included).
MAX_JPEG_SCANS = 32
# 16- and 32-bit images (I;16, I, F) are turned into 8 bits this many rows at a time, so the
# conversion never holds more than a strip of the image in a wider type.
DEEP_STRIP_ROWS = 256


class ImageLoadError(ValueError):
    """An input that cannot be used as an image; the message says which and why."""


def _describe(source: ImageInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageInput, *, max_pixels: int = MAX_PIXELS, shrink_to: int | None = None, max_side: int | None = None
) -> Image.Image:
    """Open any image PIL can read and return it upright, in RGB.

    Accepts a path, the file's bytes, a PIL image, or a numpy array (HxW, HxWx1, HxWx3 or
    HxWx4; uint8, uint16, or floats in [0, 1]). EXIF orientation is applied; every mode becomes
    RGB (see :func:`to_rgb`); an animated image gives its first frame. ``shrink_to``: return the
    photo with its shorter side at most this many pixels, for callers that keep many photos in
    memory; ``max_side``: its longer side at most this many (a 12-megapixel phone photo shown at
    1,280 px). Either way a JPEG is decoded at a reduced scale already (Pillow's ``draft``: a
    4032 x 3024 photo decodes at 2016 x 1512 in a third of the time).

    Raises:
        FileNotFoundError: a path that does not exist.
        ImageLoadError: anything that is not a usable image, larger than ``max_pixels``, or
            longer and thinner than :data:`MAX_ASPECT` (both read from the file's header).
    """
    return _load(source, max_pixels, shrink_to, max_side)[0]


def load_photo(source: ImageInput, max_side: int, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, float]:
    """:func:`load_image` with its longer side at most ``max_side``, and the scale from the
    source's (upright) pixels to the photo's: what a box given in the source's pixels is multiplied by."""
    image, source_size = _load(source, max_pixels, None, max_side)
    return image, max(image.size) / max(source_size)


def _load(source, max_pixels: int, shrink_to: int | None, max_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, and the source's size as declared (before any reduced-scale decoding)."""
    if isinstance(source, Image.Image):
        image, source_size = source, source.size
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
        source_size = image.size
    elif isinstance(source, (bytes, bytearray)):
        image, source_size = _open(io.BytesIO(source), _describe(source), max_pixels, shrink_to, max_side)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        image, source_size = _open(path, str(path), max_pixels, shrink_to, max_side)
    else:
        raise ImageLoadError(f"cannot read an image from a {type(source).__name__}")
    _check_size(image, _describe(source), max_pixels)
    try:
        # A rotated phone photo stands upright. Pillow's exif_transpose copies every photo, rotated
        # or not (a 64 MP image then took 512 MB instead of 256): asked only where the tag says so.
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode in DEEP_MODES:
            factor = int(1 / _shrink_scale(image.size, shrink_to, max_side))
            if factor > 1 and image.mode in ("I", "F"):  # averaged down in its own type first: 30 ms at 64 MP
                image = image.reduce(factor)
            image = deep_to_grey(image)
        scale = _shrink_scale(image.size, shrink_to, max_side)
        if image.mode == "L":  # shrunk before it takes 3 bytes a pixel
            return to_rgb(_shrink(image, scale)), source_size
        return _shrink(to_rgb(image), scale), source_size
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt pixel data
        raise ImageLoadError(f"{_describe(source)}: the image data is damaged or cut short ({err})") from None


def shrink_to_fit(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` with its longer side at most ``max_side`` (never enlarged), resampled as
    :func:`load_image` shrinks photos."""
    return _shrink(image, _shrink_scale(image.size, None, max_side))


def _shrink_scale(size: tuple[int, int], shrink_to: int | None, max_side: int | None) -> float:
    """The scale that brings a photo of ``size`` to ``shrink_to`` on its shorter side or ``max_side``
    on its longer one (the smaller of the two when both are given); at most 1."""
    scale = 1.0
    for side, measure in ((shrink_to, min), (max_side, max)):
        if side is not None:
            if type(side) is not int or side < 1:
                raise ValueError(f"a side to shrink to must be a positive integer, got {side!r}")
            scale = min(scale, side / measure(size))
    return scale


def _shrink(image: Image.Image, scale: float) -> Image.Image:
    if scale >= 1:
        return image
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _open(fp, name: str, max_pixels: int, shrink_to: int | None, max_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """The image in ``fp``, decoded (at a reduced scale where a JPEG allows it), and its declared size."""
    with _reading(fp, name, max_pixels):
        image = _checked_open(fp, name, max_pixels)
        declared, scale = image.size, _shrink_scale(image.size, shrink_to, max_side)
        if scale < 1 and image.format == "JPEG":  # draft keeps at least the requested size
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        image.load()
    return image, declared


def _checked_open(fp, name: str, max_pixels: int) -> Image.Image:
    """``Image.open``, then every check of what the file declares, before any pixel is decoded."""
    with warnings.catch_warnings():
        # PIL warns, then raises, past its own bomb limit; ours (in _check_size) is the one that speaks.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(fp)
    _check_size(image, name, max_pixels)
    if image.format == "JPEG":
        _check_scans(fp, name)
    return image


@contextmanager
def _reading(fp, name: str, max_pixels: int):
    """Whatever reading ``fp`` raises, as an :class:`ImageLoadError` naming ``name`` and why."""
    try:
        yield
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit, past ours, raised while opening
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(declared.group(1)):,} pixels" if declared else f"over {max_pixels:,} pixels"
        raise ImageLoadError(f"{name}: image is too large ({size}; the limit is {max_pixels:,})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: {what_it_is(fp)}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(f"{name}: the image data is damaged or cut short ({err})") from None


# After a scan's header, its entropy-coded data runs to the next marker: 0xFF followed by anything
# but 0x00 (a stuffed 0xFF byte) or a restart marker (0xD0-0xD7).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass(frozen=True)
class ImageHeader:
    """What a file declares, read without decoding a pixel (see :func:`probe_image`)."""

    size: tuple[int, int]  # as stored (before any EXIF rotation)
    format: str
    mode: str

    def decode_cost(self, reduced: bool) -> int:
        """Pixels decoding it costs: a JPEG that may be decoded at a reduced scale (``reduced``,
        Pillow's ``draft``, as every training use does: at most a quarter of its sides) counts a
        sixteenth of them."""
        pixels = self.size[0] * self.size[1]
        return pixels // 16 if reduced and self.format == "JPEG" else pixels


def probe_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Open ``path``, check what it declares (pixels, shape, a JPEG's scans) and decode nothing.

    Raises:
        FileNotFoundError, ImageLoadError: as :func:`load_image` would, before decoding.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _reading(path, str(path), max_pixels), _checked_open(path, str(path), max_pixels) as image:
        return ImageHeader(image.size, image.format or "", image.mode)


def jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """How many scans (SOS segments) a JPEG's bytes hold, read marker by marker without decoding
    (0xFFDA bytes inside other segments, an EXIF thumbnail for one, are not counted). Counting
    stops past ``stop_after``."""
    i, n, scans = 2, len(data), 0
    while i + 1 < n:
        if data[i] != 0xFF:  # entropy-coded data: find where it ends
            found = _NEXT_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            break
        if marker == 0xDA:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return scans


def _check_scans(fp, name: str) -> None:
    """Refuse a JPEG with more than :data:`MAX_JPEG_SCANS` scans before decoding it."""
    if isinstance(fp, io.BytesIO):
        data = fp.getvalue()
    else:
        with open(fp, "rb") as f:
            data = f.read()
    scans = jpeg_scans(data, stop_after=MAX_JPEG_SCANS)
    if scans > MAX_JPEG_SCANS:
        raise ImageLoadError(f"{name}: this JPEG is stored in more than {MAX_JPEG_SCANS} passes (scans), which would "
                             f"take minutes to decode; a camera's photo has at most about 10")


def what_it_is(fp) -> str:
    """Plain words for a file that is not an image any reader knows: empty, text, or other."""
    try:
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:2048]
        else:
            with open(fp, "rb") as f:
                head = f.read(2048)
    except OSError:
        head = b"?"
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text):
            return "this is text, not a photo"
    except UnicodeDecodeError:
        pass
    return "not a photo in a format this app reads (JPEG, PNG, WebP, GIF, BMP or TIFF)"


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: image is too large ({width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,})"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageLoadError(f"{name}: image is too long and thin ({width}x{height}; a photo this app reads is at "
                             f"most {MAX_ASPECT} times as long as it is wide)")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(f"array of shape {array.shape} is not an HxW, HxWx3 or HxWx4 image")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("array image contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageLoadError(f"array image of dtype {array.dtype} is not supported (use uint8, uint16 or float)")
    return Image.fromarray(np.ascontiguousarray(array))


DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def deep_to_grey(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey image (I;16*, I, F) in 8 bits: 16-bit images and any image with values
    over 255 are scaled from 0..65535, others kept as they are. Pillow's C code converts a strip
    of :data:`DEEP_STRIP_ROWS` rows at a time: no copy of the whole image in a wider type (a
    64 MP float image once cost 2 GB and 10-24 s here as a float64 array)."""
    low, high = image.getextrema()
    factor = 255.0 / (65535.0 if image.mode.startswith("I;16") or high > 255 else 255.0)
    width, height = image.size
    grey = Image.new("L", image.size)
    for top in range(0, height, DEEP_STRIP_ROWS):
        strip = image.crop((0, top, width, min(height, top + DEEP_STRIP_ROWS)))
        if strip.mode != "F":
            strip = strip.convert("I")  # I;16 has no point(); I holds every 16-bit value
        strip = strip.point(lambda v: v * factor + 0.5)  # noqa: B023 - used at once
        grey.paste(strip.convert("L"), (0, top))  # clipped to 0..255
    return grey


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparent pixels are composited on white (dropping alpha would paint them black);
    16- and 32-bit grey images are scaled to 8 bits (PIL's own conversion clips them to white).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in DEEP_MODES:
        return deep_to_grey(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
