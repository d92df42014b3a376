"""Image loading and the one preprocessing pipeline.

Every image the project sees (inference, Grad-CAM, evaluation, training) is opened by
:func:`load_image` and turned into a tensor by :class:`Preprocessing`, whose fields travel in the
checkpoint's metadata. Resize-then-center-crop is done as a single resample of a box of the
original photo, so the box is also exactly where a Grad-CAM map belongs on the photo.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFilter, ImageOps, UnidentifiedImageError

__all__ = [
    "ANSWER_SIDE",
    "ImageHeader",
    "ImageInput",
    "ImageLoadError",
    "MAX_ASPECT",
    "MAX_JPEG_SCANS",
    "MAX_PIXELS",
    "Preprocessing",
    "load_image",
    "load_photo",
    "probe_image",
    "shrink_to_fit",
    "to_rgb",
    "check_box",
    "shift_box",
    "sub_box",
    "wider_shot",
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
# The largest network input a checkpoint may ask for: 4.7x the usual 224 px per side. An input of
# 6,000 px made a tiny model cost 1.8 GB and 8 s per answer.
MAX_INPUT_SIZE = 1024

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


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


FRAMINGS = ("crop", "whole")


@dataclass(frozen=True)
class Preprocessing:
    """Resize, frame as a square of ``input_size``, normalize.

    ``framing`` says which square of a photo the network sees:
    - ``"crop"``: the shorter side resized to ``resize``, the centre ``input_size`` square cut out
      (a wide photo loses its sides: a 6000 x 4000 photo shows the network only its middle
      4000 x 4000);
    - ``"whole"``: the whole photo, its longer side over ``resize / input_size`` of the square,
      the rest of the square filled with the photo's own edge pixels stretched outwards and blurred
      (as :func:`wider_shot` makes them, which the default model learnt from).

    Stored in every checkpoint, so a model is always fed the way it was trained.
    """

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    framing: str = "crop"

    def __post_init__(self) -> None:
        if type(self.input_size) is not int or not 8 <= self.input_size <= MAX_INPUT_SIZE:
            raise ValueError(f"input_size must be an integer from 8 to {MAX_INPUT_SIZE}, got {str(self.input_size)[:40]}")
        if type(self.resize) is not int or not self.input_size <= self.resize <= 4 * self.input_size:
            raise ValueError(f"resize must be an integer from input_size ({self.input_size}) to 4x input_size, "
                             f"got {str(self.resize)[:40]}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {str(self.interpolation)[:40]!r}")
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {list(FRAMINGS)}, got {str(self.framing)[:40]!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (not isinstance(value, (list, tuple)) or len(value) != 3 or any(isinstance(v, bool) for v in value)
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                    or (name == "std" and min(value) <= 0)):
                raise ValueError(f"{name} must be 3 numbers{' > 0' if name == 'std' else ''}, got {str(value)[:60]}")
            object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        unknown = set(data) - {"input_size", "resize", "mean", "std", "interpolation", "framing"}
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def with_size(self, input_size: int) -> "Preprocessing":
        """The same pipeline at another input size, keeping the crop fraction."""
        resize = max(input_size, round(input_size * self.resize / self.input_size))
        return Preprocessing(input_size, resize, self.mean, self.std, self.interpolation, self.framing)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The square (left, top, right, bottom) of a ``width`` x ``height`` photo that the network
        sees, in photo pixels; with ``framing="whole"`` it reaches past the photo's shorter sides."""
        shorter_or_longer = max(width, height) if self.framing == "whole" else min(width, height)
        side = shorter_or_longer * self.input_size / self.resize  # the square's side in photo pixels
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)

    def crop(self, image: Image.Image) -> Image.Image:
        """The square of :meth:`crop_box` at ``input_size``, as one resample of the photo
        (antialiased when shrinking); where the square reaches past the photo, its blurred edges."""
        box = self.crop_box(*image.size)
        size = (self.input_size, self.input_size)
        width, height = image.size
        if box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height:
            return image.resize(size, _INTERPOLATIONS[self.interpolation], box=box)
        return _framed(image, box, self.input_size, _INTERPOLATIONS[self.interpolation])

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> normalized float tensor (3, H, W)."""
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> (3, input_size, input_size) tensor."""
        return self.normalize(self.crop(image))


def check_box(box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` as (left, top, right, bottom) floats, inside a photo of ``size`` (width, height)
    and at least 8 px a side; otherwise ValueError naming it."""
    try:
        left, top, right, bottom = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (left, top, right, bottom), got {box!r}") from None
    width, height = size
    left, top, right, bottom = max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom)
    if right - left < 8 or bottom - top < 8:
        raise ValueError(f"box {box!r} must cover at least 8x8 pixels of the {width}x{height} photo")
    return float(round(left)), float(round(top)), float(round(right)), float(round(bottom))


def shift_box(inner: tuple[float, ...], outer: tuple[float, ...]) -> tuple[float, ...]:
    """``inner`` (pixels of a crop) in the pixels of the photo that ``outer`` was cropped from."""
    return (inner[0] + outer[0], inner[1] + outer[1], inner[2] + outer[0], inner[3] + outer[1])


def sub_box(outer: tuple[float, float, float, float], frac: tuple[float, float, float, float]) -> tuple[float, ...]:
    """``frac`` (fractions of ``outer``) in the pixels ``outer`` is given in."""
    left, top, right, bottom = outer
    w, h = right - left, bottom - top
    return (left + frac[0] * w, top + frac[1] * h, left + frac[2] * w, top + frac[3] * h)


def _framed(image: Image.Image, box: tuple[float, ...], size: int, resample) -> Image.Image:
    """The square ``box`` of ``image`` at ``size`` pixels where it reaches past the photo: the photo's
    part resampled, the rest its edge pixels stretched outwards and blurred (as :func:`wider_shot`)."""
    width, height = image.size
    scale = size / (box[2] - box[0])
    inner = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height)))
    left, top = round((inner[0] - box[0]) * scale), round((inner[1] - box[1]) * scale)
    part_w = max(1, min(size - left, round((inner[2] - inner[0]) * scale)))
    part_h = max(1, min(size - top, round((inner[3] - inner[1]) * scale)))
    part = image.resize((part_w, part_h), resample, box=inner)
    array = np.asarray(part)
    padded = np.pad(array, ((top, size - part_h - top), (left, size - part_w - left), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(max(part_w, part_h) / 8))
    canvas.paste(part, (left, top))
    return canvas


def wider_shot(photo: Image.Image, factor: float = 3.0, blur: float | None = None) -> Image.Image:
    """``photo`` in the middle of a canvas ``factor`` times its size whose surroundings are its own
    edge pixels stretched outwards and blurred: the bird at 1/``factor`` of the frame."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    w, h = photo.size
    W, H = round(w * factor), round(h * factor)
    left, top = (W - w) // 2, (H - h) // 2
    array = np.asarray(photo.convert("RGB"))
    padded = np.pad(array, ((top, H - h - top), (left, W - w - left), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(blur if blur is not None else max(w, h) / 8))
    canvas.paste(photo.convert("RGB"), (left, top))
    return canvas
