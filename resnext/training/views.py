"""Distill mode's training views, made a batch at a time on the training device.

Every photo of a pool is decoded once and kept as a uint8 square of ``side`` pixels (squeezed to
the square; its shape is kept as ``aspect`` and every crop is drawn in the photo's own
proportions, so what comes out is the photo's shape, not the square's). A batch of views is then
a handful of batched tensor operations, on the CPU or the GPU alike:

- random-resized crops (torchvision's rule: area 1/4..1 for birds, 0.08..1 for scenes, aspect
  3/4..4/3, ten tries then the centre) resampled with ``torchvision.ops.roi_align``, which
  averages ceil(crop / view) samples per pixel: a shrink is anti-aliased;
- a mirror flip and one TrivialAugment operation each (Müller & Hutter, 2021: one of 14
  operations at one of 31 strengths, chosen at random);
- zoom-out: the view shrunk to 1/4..1 of the frame at a random place, its surroundings its own
  edges stretched outwards and blurred, or a scene from the no-bird pool; the box is returned;
- made-up non-photos (:func:`.augment.synthetic_nonphoto`) among the negatives.

On an H200 this makes views far faster than the GPU trains on them; per photo on the CPU it was
the training loop's bottleneck there (441 views/s).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..imagefile import load_image
from .augment import synthetic_nonphoto

__all__ = ["Pool", "BatchViews", "load_pool", "rrc_boxes", "trivial_augment", "zoom_out_batch", "coverage_batch"]

TA_BINS = 31  # TrivialAugmentWide's strengths
TA_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
          "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


@dataclass
class Pool:
    """Photos as uint8 squares ``(N, 3, side, side)`` on one device, and each one's width / height."""

    images: Tensor
    aspect: Tensor

    def __len__(self) -> int:
        return len(self.images)


def _square(path: Path, side: int) -> tuple[np.ndarray, float]:
    image = load_image(path, shrink_to=side, max_side=2 * side)
    aspect = image.width / image.height
    return np.array(image.resize((side, side), Image.Resampling.BILINEAR)), aspect


def load_pool(paths: list[Path], side: int, device: torch.device, stop=lambda: False) -> Pool | None:
    """Every photo decoded once (bounded: shrunk as it is decoded) and squeezed to ``side``;
    ``None`` if ``stop()`` asked to stop."""
    images = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)
    aspect = torch.empty(len(paths))
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(paths), 256):
            if stop():
                return None
            for i, (array, a) in enumerate(pool.map(lambda p: _square(p, side), paths[start : start + 256]), start):
                images[i] = torch.from_numpy(array).permute(2, 0, 1)
                aspect[i] = a
    return Pool(images.to(device), aspect.to(device))


# ----------------------------------------------------------------------------- crops


def rrc_boxes(aspect: Tensor, scale: tuple[float, float], g: torch.Generator, tries: int = 10) -> Tensor:
    """Random-resized-crop boxes (n, 4) as fractions of each photo (left, top, right, bottom)."""
    n, dev = len(aspect), aspect.device
    a = aspect[:, None]
    area = (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=g, device=dev)) * a
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, tries, generator=g, device=dev))
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()
    ok = (w <= a) & (h <= 1)
    first = ok.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # no try fitted: the centre, its aspect clamped to 3/4..4/3 (as torchvision does)
    fw = torch.where(aspect < 3 / 4, aspect, torch.where(aspect > 4 / 3, torch.full_like(aspect, 4 / 3), aspect))
    fh = torch.where(aspect < 3 / 4, aspect * 4 / 3, torch.ones_like(aspect))
    none = ~ok.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    x0 = torch.where(none, (aspect - w) / 2, torch.rand(n, generator=g, device=dev) * (aspect - w))
    y0 = torch.where(none, (1 - h) / 2, torch.rand(n, generator=g, device=dev) * (1 - h))
    return torch.stack([x0 / aspect, y0, (x0 + w) / aspect, y0 + h], 1)


def crop(pool: Pool, idx: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    """Random-resized crops of ``pool``'s photos ``idx``: float (n, 3, size, size) in [0, 1].

    Bilinear sampling: a pool's squares are kept at 1.3 x the view's side at most, so no crop is
    shrunk by more than that and needs no anti-aliasing."""
    if not len(idx):
        return torch.empty(0, 3, size, size, device=pool.images.device)
    box = rrc_boxes(pool.aspect[idx], scale, g)
    theta = torch.zeros(len(idx), 2, 3, device=box.device)
    theta[:, 0, 0], theta[:, 1, 1] = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = box[:, 0] + box[:, 2] - 1, box[:, 1] + box[:, 3] - 1
    grid = F.affine_grid(theta, [len(idx), 3, size, size], align_corners=False)
    views = F.grid_sample(pool.images[idx].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return views.div_(255).clamp_(0, 1)


# ----------------------------------------------------------------------------- TrivialAugment


def _grey(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(3, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=3)
    return _blend(x, smooth, factor)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation of each channel (PIL's rule, on 256 levels)."""
    n, c, h, w = x.shape
    q = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last = hist.gather(1, (q.max(1, keepdim=True).values))  # count of the highest level present
    step = ((h * w - last) / 255).floor()
    cdf = hist.cumsum(1) - hist  # pixels below each level
    lut = ((cdf + (step / 2).floor()) / step.clamp_min(1)).floor().clamp(0, 255)
    out = lut.gather(1, q) / 255
    return torch.where(step > 0, out, q.float() / 255).view(n, c, h, w)


def _geometry(x: Tensor, op: Tensor, level: Tensor) -> Tensor:
    """Shear, translate (up to 32 px) and rotate (up to 135 degrees) about the centre, black fill."""
    n, size = len(x), x.shape[-1]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    angle = torch.deg2rad(level * 135) * (op == 5)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = -torch.sin(angle), torch.cos(angle)
    theta[:, 0, 1] += -level * 0.99 * (op == 1)
    theta[:, 1, 0] += -level * 0.99 * (op == 2)
    theta[:, 0, 2] = -2 * level * 32 / size * (op == 3)
    theta[:, 1, 2] = -2 * level * 32 / size * (op == 4)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def trivial_augment(x: Tensor, g: torch.Generator, dense: bool | None = None) -> Tensor:
    """One TrivialAugmentWide operation per view of ``x`` (n, 3, S, S) in [0, 1]. ``dense`` (the
    default on a GPU): every operation computed on every view and each kept where chosen, which
    waits for nothing and launches a few dozen kernels; else (in place) each only where chosen."""
    n, dev = len(x), x.device
    op = torch.randint(0, len(TA_OPS), (n,), generator=g, device=dev)
    strength = torch.randint(0, TA_BINS, (n,), generator=g, device=dev).float() / (TA_BINS - 1)
    sign = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
    level = strength * sign
    factor = 1 + 0.99 * level
    pixel = {
        "brightness": lambda v, i: (v * factor[i].view(-1, 1, 1, 1)).clamp_(0, 1),
        "color": lambda v, i: _blend(v, _grey(v), factor[i]),
        "contrast": lambda v, i: _blend(v, _grey(v).mean((1, 2, 3), keepdim=True), factor[i]),
        "sharpness": lambda v, i: _sharpness(v, factor[i]),
        "posterize": lambda v, i: _posterize(v, 8 - (strength[i] * 6).round()),
        "solarize": lambda v, i: torch.where(v >= (1 - strength[i]).view(-1, 1, 1, 1), 1 - v, v),
        "autocontrast": lambda v, i: _autocontrast(v),
        "equalize": lambda v, i: _equalize(v),
    }
    if x.is_cuda if dense is None else dense:
        geo = ((op >= 1) & (op <= 5)).view(-1, 1, 1, 1)
        x = torch.where(geo, _geometry(x, op, level), x)
        out = x
        for i, (name, fn) in enumerate(pixel.items(), TA_OPS.index("brightness")):
            out = torch.where((op == i).view(-1, 1, 1, 1), fn(x, slice(None)), out)
        return out
    # on a CPU each operation only on the views that chose it (a fourteenth of the work)
    ops = {name: (op == i).nonzero()[:, 0] for i, name in enumerate(TA_OPS)}
    geo = torch.cat([ops[k] for k in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")])
    if len(geo):
        x[geo] = _geometry(x[geo], op[geo], level[geo])
    for name, fn in pixel.items():
        rows = ops[name]
        if len(rows):
            x[rows] = fn(x[rows], rows)
    return x


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)
    return ((x * 255).floor() / step).floor() * step / 255


def _autocontrast(x: Tensor) -> Tensor:
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-6), x)


# ----------------------------------------------------------------------------- zoom-out, boxes


def _surroundings(views: Tensor, theta: Tensor, sigma: float) -> Tensor:
    """The canvases' surroundings: each view's edges stretched outwards (``theta`` maps the canvas
    onto the view), blurred by ``sigma`` canvas pixels. Made at a resolution where sigma is ~2 px,
    blurred there and stretched back: the blur costs the same whatever its width."""
    n, size = len(views), views.shape[-1]
    low = min(size, max(4, round(size * 2 / sigma)))
    grid = F.affine_grid(theta, [n, 3, low, low], align_corners=False)
    y = F.grid_sample(views, grid, mode="bilinear", padding_mode="border", align_corners=False)
    t = torch.arange(-4, 5, device=views.device, dtype=views.dtype)
    k = torch.exp(-(t**2) / 8)
    k = k / k.sum()
    y = F.pad(y, (4, 4, 4, 4), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False) if low < size else y


ZOOM_STEP = 4  # a zoomed-out view's side is a multiple of this: views of one side shrink together


def zoom_out_batch(views: Tensor, ratio: Tensor, scenes: Tensor | None, g: torch.Generator,
                   dense: bool | None = None) -> tuple[Tensor, Tensor]:
    """Each view (n, 3, S, S) shrunk to ``ratio`` of its side at a random place of an S x S canvas:
    where ``scenes`` has a row (not NaN) on that scene, else on its own edges stretched outwards
    and blurred. Returns the canvases and the boxes (n, 4) as fractions. ``dense`` (the default
    on a GPU) places every view at once (:func:`_place_at_once`), else by groups of one side."""
    n, size, dev = len(views), views.shape[-1], views.device
    side = (size * ratio / ZOOM_STEP).round().clamp(1, size // ZOOM_STEP) * ZOOM_STEP
    left = (torch.rand(n, generator=g, device=dev) * (size - side + 1)).floor()
    top = (torch.rand(n, generator=g, device=dev) * (size - side + 1)).floor()
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = size / side
    theta[:, 0, 2], theta[:, 1, 2] = (size - 2 * left) / side - 1, (size - 2 * top) / side - 1
    canvas = torch.empty_like(views)
    sigma = torch.exp2(torch.log2((side / 8).clamp_min(1)).round())  # a few blur widths, not n
    for s in sigma.unique().tolist():
        rows = (sigma == s).nonzero()[:, 0]
        canvas[rows] = _surroundings(views[rows], theta[rows], s)
    if scenes is not None:
        canvas = torch.where(torch.isnan(scenes[:, :1, :1, :1]), canvas, scenes.nan_to_num())
    if views.is_cuda if dense is None else dense:
        canvas = _place_at_once(views, canvas, left, top, side)
    else:
        placed = torch.stack([top, left, side], 1).long().tolist()
        for s in side.unique().tolist():  # anti-aliased shrink, all views of one side at once
            rows = (side == s).nonzero()[:, 0]
            small = F.interpolate(views[rows], size=(int(s), int(s)), mode="bilinear", antialias=True, align_corners=False)
            for r, image in zip(rows.tolist(), small):
                y, x, w = placed[r]
                canvas[r, :, y : y + w, x : x + w] = image
    boxes = torch.stack([left, top, left + side, top + side], 1) / size
    return canvas.clamp_(0, 1), boxes


def _place_at_once(views: Tensor, canvas: Tensor, left: Tensor, top: Tensor, side: Tensor) -> Tensor:
    """Every view shrunk into its place on its canvas by one ``roi_align`` (which averages
    ceil(1 / ratio)^2 samples per pixel: anti-aliased) and one mask: the GPU's way."""
    from torchvision.ops import roi_align

    n, size, dev = len(views), views.shape[-1], views.device
    k = size / side  # view pixels per canvas pixel
    rois = torch.stack([torch.arange(n, device=dev, dtype=views.dtype), -left * k, -top * k,
                        (size - left) * k, (size - top) * k], 1)
    small = roi_align(views, rois, (size, size), sampling_ratio=-1, aligned=True)
    return torch.where(box_mask(top, left, side, side, size, size), small, canvas)


def box_mask(top: Tensor, left: Tensor, h: Tensor, w: Tensor, height: int, width: int) -> Tensor:
    """(n, 1, height, width) bool: each row's box of ``h`` x ``w`` pixels at (``top``, ``left``)."""
    rows = torch.arange(height, device=top.device)[None]
    cols = torch.arange(width, device=top.device)[None]
    inside_y = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    inside_x = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


def coverage_batch(boxes: Tensor, cells: int) -> Tensor:
    """The fraction of each of ``cells`` x ``cells`` cells each box (n, 4) covers; rows of NaN
    (no bird) give zeros. The batched :func:`.augment.coverage`."""
    edges = torch.linspace(0, 1, cells + 1, device=boxes.device)
    lo, hi = edges[:-1], edges[1:]
    b = boxes.nan_to_num(0.0)

    def overlap(a: Tensor, z: Tensor) -> Tensor:
        return (torch.minimum(hi, z[:, None]) - torch.maximum(lo, a[:, None])).clamp_min(0) * cells

    cover = overlap(b[:, 1], b[:, 3])[:, :, None] * overlap(b[:, 0], b[:, 2])[:, None, :]
    return cover.clamp(0, 1) * (~torch.isnan(boxes[:, :1]))[:, :, None]


class BatchViews:
    """One batch of distill mode's views: labelled photos, unlabelled birds, then negatives."""

    def __init__(self, pools: dict[str, Pool], size: int, config, mean, std, device: torch.device, seed: int = 0):
        self.pools, self.size, self.config, self.device = pools, size, config, device
        self.g = torch.Generator(device).manual_seed(seed)
        self.cpu_g = torch.Generator().manual_seed(seed)  # for the choices the CPU makes
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def _colour(self, x: Tensor) -> Tensor:
        flip = torch.rand(len(x), generator=self.g, device=self.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return trivial_augment(x, self.g)

    def _random(self, pool: str, n: int) -> Tensor:
        return torch.randint(0, max(1, len(self.pools[pool])), (n,), generator=self.g, device=self.device)

    def _scenes(self, n: int) -> Tensor:
        return self._colour(crop(self.pools["negatives"], self._random("negatives", n), self.size, (0.08, 1.0), self.g))

    def birds(self, pool: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Views of bird photos ``idx`` of ``pool`` and their boxes (n, 4)."""
        c, n = self.config, len(idx)
        views = self._colour(crop(self.pools[pool], idx, self.size, (c.min_scale, 1.0), self.g))
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.device).repeat(n, 1)
        zoom = (torch.rand(n, generator=self.g, device=self.device) < c.zoom_out).nonzero()[:, 0]
        if len(zoom):
            ratio = c.min_zoom + (1 - c.min_zoom) * torch.rand(len(zoom), generator=self.g, device=self.device)
            scenes = None
            if len(self.pools["negatives"]):
                on_scene = torch.rand(len(zoom), generator=self.g, device=self.device) < 0.5
                scenes = torch.full((len(zoom), 3, self.size, self.size), float("nan"), device=self.device)
                if on_scene.any():
                    scenes[on_scene] = self._scenes(int(on_scene.sum()))
            views[zoom], boxes[zoom] = zoom_out_batch(views[zoom], ratio, scenes, self.g)
        return views, boxes

    def negatives(self, n: int) -> Tensor:
        """``n`` views with no bird: scenes from the no-bird pool, or made-up non-photos."""
        has_real = len(self.pools["negatives"]) > 0
        real = (torch.rand(n, generator=self.cpu_g) < self.config.real_negatives) & has_real
        out = torch.empty(n, 3, self.size, self.size, device=self.device)
        if real.any():
            out[real.to(self.device)] = self._scenes(int(real.sum()))
        made = (~real).nonzero()[:, 0].tolist()
        if made:
            fake = torch.stack([synthetic_nonphoto(self.size, self.g, self.device) for _ in made])
            out[torch.tensor(made, device=self.device)] = fake
        return out

    def batch(self, labelled: Tensor, n_unlabelled: int, n_negatives: int) -> tuple[Tensor, Tensor]:
        """Normalised views (B, 3, S, S) and boxes (B, 4), NaN rows where there is no bird."""
        parts = [self.birds("labelled", labelled.to(self.device))]
        if n_unlabelled and len(self.pools["unlabelled"]):
            parts.append(self.birds("unlabelled", self._random("unlabelled", n_unlabelled)))
        x = torch.cat([v for v, _ in parts] + [self.negatives(n_negatives)])
        boxes = torch.cat([b for _, b in parts] + [torch.full((n_negatives, 4), float("nan"), device=self.device)])
        return (x - self.mean) / self.std, boxes
