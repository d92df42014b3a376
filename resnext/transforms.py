"""The one preprocessing pipeline, and the boxes drawn on a photo.

Every image the project sees is opened by :func:`~resnext.imagefile.load_image` (re-exported
here) and turned into a tensor by :class:`Preprocessing`, whose fields travel in the
checkpoint's metadata. Resize-then-center-crop is done as a single resample of a box of the
original photo, so the box is also exactly where a Grad-CAM map belongs on the photo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

# Reading image files lives in resnext.imagefile; its public names are this module's too.
from .imagefile import (ANSWER_SIDE, MAX_ASPECT, MAX_JPEG_SCANS, MAX_PIXELS, ImageHeader, ImageInput,  # noqa: F401
                        ImageLoadError, load_image, load_photo, probe_image, shrink_to_fit, to_rgb)

__all__ = ["ANSWER_SIDE", "ImageHeader", "ImageInput", "ImageLoadError", "MAX_ASPECT", "MAX_JPEG_SCANS", "MAX_PIXELS",
           "Preprocessing", "check_box", "load_image", "load_photo", "probe_image", "shift_box", "shrink_to_fit",
           "sub_box", "to_rgb", "wider_shot"]

# The largest network input a checkpoint may ask for: 4.7x the usual 224 px per side. An input of
# 6,000 px made a tiny model cost 1.8 GB and 8 s per answer.
MAX_INPUT_SIZE = 1024

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


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
