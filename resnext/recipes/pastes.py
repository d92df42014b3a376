"""Birds pasted into scenes for the detector's fits and for measuring: through a rectangle, as
before, or through soft, irregular masks (a feathered ellipse, a blob of ellipses, a blurred
alpha), with the bird's colour, light, sharpness and noise moved toward the scene's.

A detector fit on rectangles alone learns the paste's straight edges: real birds have none (at
1/3 of held-out scenes made here, v6 names 65.5 % of validation birds pasted as rectangles and
25.4 % through a feathered ellipse).
The mask that pastes a bird is also its ground truth: the share of each feature-map cell it covers.

Training code: serving never imports this module.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["KINDS", "mask_coverage", "mask_of", "match", "paste", "random_kind"]

KINDS = ("rect", "ellipse", "blob", "alpha")


def random_kind(rng: random.Random) -> str:
    """Half the pastes rectangles (a photo of a bird is a rectangle too), half soft."""
    return "rect" if rng.random() < 0.5 else rng.choice(KINDS[1:])


def mask_of(kind: str, width: int, height: int, rng: random.Random) -> Image.Image:
    """An 8-bit mask (``L``) of ``width`` x ``height`` through which a bird photo is pasted."""
    if kind == "rect":
        return Image.new("L", (width, height), 255)
    short = min(width, height)
    blur = short * {"ellipse": rng.uniform(0.02, 0.06), "blob": rng.uniform(0.02, 0.05), "alpha": rng.uniform(0.08, 0.14)}.get(kind, 0)
    if not blur:
        raise ValueError(f"unknown paste kind {kind!r}; one of {KINDS}")
    # The shapes stay two blurs inside the bird photo, so the blurred mask fades out before its edges.
    inside = 2 * blur + rng.uniform(0.0, 0.06) * short
    left, top, right, bottom = inside, inside, width - inside, height - inside
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "blob":
        w, h = right - left, bottom - top
        draw.ellipse((left + 0.2 * w, top + 0.2 * h, right - 0.2 * w, bottom - 0.2 * h), fill=255)  # a body, then lumps
        for _ in range(rng.randint(3, 7)):
            lw, lh = rng.uniform(0.25, 0.6) * w, rng.uniform(0.25, 0.6) * h
            x, y = rng.uniform(left, right - lw), rng.uniform(top, bottom - lh)
            draw.ellipse((x, y, x + lw, y + lh), fill=255)
    else:
        draw.ellipse((left, top, right, bottom), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(0.5, blur)))


def match(bird: Image.Image, scene: Image.Image, rng: random.Random) -> Image.Image:
    """``bird`` with its colour and light moved part of the way (0-50 %) toward ``scene``'s (each
    channel's mean and spread), and sometimes (30 %) blurred a little."""
    b = np.asarray(bird, dtype=np.float32)
    s = np.asarray(scene.resize((64, 64)), dtype=np.float32)
    t = rng.uniform(0.0, 0.5)
    b_mean, b_std = b.mean((0, 1)), b.std((0, 1)) + 1e-3
    target_mean = (1 - t) * b_mean + t * s.mean((0, 1))
    target_std = (1 - t) * b_std + t * (s.std((0, 1)) + 1e-3)
    out = Image.fromarray(np.clip((b - b_mean) / b_std * target_std + target_mean, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    return out


def add_noise(photo: Image.Image, rng: random.Random) -> Image.Image:
    """Sensor-like noise over the whole photo (standard deviation 2-8 of 255)."""
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 8), (photo.size[1], photo.size[0], 3))
    return Image.fromarray(np.clip(np.asarray(photo, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def paste(scene: Image.Image, bird: Image.Image, share: float, rng: random.Random, longer: int, kind: str = "rect",
          harmonise: bool = False) -> tuple[Image.Image, tuple[int, int, int, int], Image.Image]:
    """``scene`` with its longer side at ``longer`` px (0: as it is) and ``bird`` pasted into it
    through a ``kind`` mask, the bird photo's longer side ``share`` of the scene's shorter side, at a
    random place. ``harmonise``: the bird's colour and light matched to the scene (70 %) and noise
    over the result (30 %). Returns (photo, the bird photo's box, the mask over the whole photo)."""
    if longer:
        scale = longer / max(scene.size)
        scene = scene.resize((max(8, round(scene.size[0] * scale)), max(8, round(scene.size[1] * scale))),
                             Image.Resampling.BILINEAR)
    side = max(8, round(share * min(scene.size)))
    r = side / max(bird.size)
    bird = bird.resize((max(4, round(bird.size[0] * r)), max(4, round(bird.size[1] * r))), Image.Resampling.BILINEAR)
    if harmonise and rng.random() < 0.7:
        bird = match(bird, scene, rng)
    left, top = rng.randint(0, scene.size[0] - bird.size[0]), rng.randint(0, scene.size[1] - bird.size[1])
    mask = mask_of(kind, *bird.size, rng)
    out = scene.copy()
    out.paste(bird, (left, top), mask)
    if harmonise and rng.random() < 0.3:
        out = add_noise(out, rng)
    whole = Image.new("L", out.size, 0)
    whole.paste(mask, (left, top))
    return out, (left, top, left + bird.size[0], top + bird.size[1]), whole


def mask_coverage(mask: Image.Image, rows: int, cols: int) -> torch.Tensor:
    """The share of each of ``rows`` x ``cols`` cells of ``mask``'s image that the bird covers
    (the mask's mean over the cell; rows and columns split the image as evenly as they can)."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return F.adaptive_avg_pool2d(m[None, None], (rows, cols))[0, 0]
