"""Augmentations for the bird model: zoom-out (a wider shot with plausible surroundings), the
locator's target, and made-up non-photos for outlier exposure.

``zoom_out`` builds its surroundings the way :func:`resnext.transforms.wider_shot` makes the
evaluation's "bird at 1/3 of the frame" photos (edges stretched outwards and blurred), at random
sizes and places; half of the time it uses a non-bird photo as the scene instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["zoom_out", "coverage", "synthetic_nonphoto", "cutmix"]


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a float (C, H, W) tensor."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def zoom_out(view: Tensor, ratio: float, background: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, tuple[float, float, float, float]]:
    """Shrink a (3, S, S) float view to ``ratio`` of its side and place it at a random spot of an
    S x S canvas: its own edges stretched outwards and blurred, or ``background`` (3, S, S).

    Returns the canvas and the box (left, top, right, bottom) of the photo in it, as fractions.
    """
    size = view.shape[-1]
    side = max(4, round(size * ratio))
    small = F.interpolate(view[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    room = size - side
    left, top = (torch.randint(0, room + 1, (2,), generator=generator).tolist() if room > 0 else (0, 0))
    if background is None:
        canvas = F.pad(small[None], (left, room - left, top, room - top), mode="replicate")[0]
        canvas = _blur(canvas, sigma=max(1.0, side / 8))
    else:
        canvas = background.clone()
    canvas[:, top : top + side, left : left + side] = small
    return canvas, (left / size, top / size, (left + side) / size, (top + side) / size)


def coverage(box: tuple[float, float, float, float] | None, cells: int) -> Tensor:
    """The fraction of each of ``cells`` x ``cells`` grid cells that ``box`` covers (``None``: no
    bird, all zeros): the locator's target (one row of :func:`.views.coverage_batch`)."""
    from .views import coverage_batch

    return coverage_batch(torch.tensor([box if box is not None else [math.nan] * 4], dtype=torch.float32), cells)[0]


def synthetic_nonphoto(size: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """A made-up non-photo, float (3, size, size) in [0, 1]: noise, a gradient, stripes, shapes,
    a flat colour or a blurred blob field: things a visitor may upload that hold no bird. Made on
    ``device`` (``generator`` must be on it too; default: the CPU)."""
    g = generator
    kind = int(torch.randint(0, 6, (1,), generator=g, device=device))
    colour = lambda: torch.rand(3, 1, 1, generator=g, device=device)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size, device=device), torch.linspace(0, 1, size, device=device), indexing="ij")
    if kind == 0:  # noise, coarse or fine
        cell = int(torch.randint(1, 16, (1,), generator=g, device=device))
        x = torch.rand(3, math.ceil(size / cell), math.ceil(size / cell), generator=g, device=device)
        return F.interpolate(x[None], size=(size, size), mode="nearest")[0]
    if kind == 1:  # a linear gradient between two colours
        angle = float(torch.rand((), generator=g, device=device)) * math.tau
        t = (xx * math.cos(angle) + yy * math.sin(angle)).sub(-1.5).div(3)
        return colour() * (1 - t) + colour() * t
    if kind == 2:  # stripes or a checkerboard
        period = float(torch.randint(4, size // 2, (1,), generator=g, device=device))
        checks = int(torch.randint(0, 2, (1,), generator=g, device=device))
        stripes = ((xx * size / period).floor() + (yy * size / period).floor() * checks) % 2
        return colour() * stripes + colour() * (1 - stripes)
    if kind == 3:  # flat colour
        return colour().expand(3, size, size).clone()
    if kind == 4:  # rectangles and discs on a flat background
        x = colour().expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 8, (1,), generator=g, device=device))):
            cx, cy, r = torch.rand(3, generator=g, device=device).tolist()
            r = 0.05 + 0.3 * r
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2) if torch.rand((), generator=g, device=device) < 0.5 else \
                ((xx - cx).abs() < r) & ((yy - cy).abs() < r * 0.6)
            x = torch.where(mask, colour(), x)
        return x
    blobs = torch.rand(3, 4, 4, generator=g, device=device)  # smooth colour field
    return F.interpolate(blobs[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def cutmix(x: Tensor, share: float, generator: torch.Generator | None = None) -> Tensor:
    """CutMix within a batch (Yun et al., 2019): about ``share`` of the views (B, C, S, S) get a
    box of another view of the batch pasted in, its area a uniform 0..1 of the frame (side
    sqrt of it), anywhere. Changes ``x`` in place; returns which views were mixed (B,) bool.
    Views are taken from a copy, so a view pasted into another is its original self. Batched:
    one mask for the batch, on ``x``'s device (``generator`` must be on it too)."""
    n, _, height, width = x.shape
    dev, g = x.device, generator
    mixed = torch.rand(n, generator=g, device=dev) < share
    if n < 2:  # (no test of ``mixed`` here: it would wait for the GPU)
        return torch.zeros(n, dtype=torch.bool, device=dev)
    partners = (torch.arange(n, device=dev) + torch.randint(1, n, (n,), generator=g, device=dev)) % n  # never itself
    side = torch.rand(n, generator=g, device=dev).sqrt()
    h, w = (side * height).round().clamp_min(1), (side * width).round().clamp_min(1)
    top = (torch.rand(n, generator=g, device=dev) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=g, device=dev) * (width - w + 1)).floor()
    from .views import box_mask

    mask = box_mask(top, left, h, w, height, width) & mixed.view(-1, 1, 1, 1)
    x.copy_(torch.where(mask, x[partners], x))
    return mixed
