"""Grad-CAM on the conv5 stage, through the grad-cam package (pytorch-grad-cam).

The naive use hooks the full model and back-propagates through all of it, costing 2.5-3.5x a
forward pass. Here the backbone runs once without autograd; its conv5 activation becomes a leaf
that requires grad, and grad-cam drives only the head (pool + fc). For a global-pool + linear
head the gradient reaching conv5 is the same either way, so the maps are identical to the naive
ones, at the price of one small matrix product. The same activation also gives the prediction.

Plain Grad-CAM, the default, needs no backward pass at all: behind a global average pool and a
linear layer, the gradient of class k's logit is ``fc.weight[k] / (h * w)`` at every conv5 cell,
so Grad-CAM's channel weights are known in closed form (the CAM of Zhou et al., 2016). It is
computed so, then scaled with grad-cam's own function; the tests check it against grad-cam's
naive full-model map. That saves grad-cam's hooks and autograd, about 1 ms per map on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

__all__ = ["CAM_METHODS", "SLOW_METHODS", "Explanation", "conv5_cams", "heatmap_on_photo", "overlay"]

# name -> grad-cam class name. All of them need one backward pass through the head at most.
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "finercam": "GradCAM",  # GradCAM with grad-cam's FinerWeightedTarget, as its FinerCAM does
}
# These run the network tens to thousands of times per map: minutes on a CPU.
SLOW_METHODS = {"scorecam", "ablationcam", "fullgrad", "shapleycam", "kpca_cam"}


class _Conv5Head(nn.Module):
    """The part of the network after conv5, with a named spot for grad-cam's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv5 = nn.Identity()  # grad-cam's target layer: its output is the conv5 activation
        self.fc = model.fc  # tells grad-cam the device; its eval() cannot reach the backbone
        self.forward_head = model.forward_head  # a bound method, not a submodule

    def forward(self, features: Tensor) -> Tensor:
        return self.forward_head(self.conv5(features))


def _cam_class(method: str, input_size: tuple[int, int]):
    """The grad-cam class for ``method``, sized to the network input instead of conv5."""
    key = method.lower()
    if key in SLOW_METHODS:
        raise ValueError(
            f"CAM method {method!r} runs the network many times per map (minutes on a CPU); "
            f"use one of {sorted(CAM_METHODS)}"
        )
    if key not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; use one of {sorted(CAM_METHODS)}")
    import pytorch_grad_cam  # heavy (OpenCV, matplotlib): imported on first explanation only

    base = getattr(pytorch_grad_cam, CAM_METHODS[key])

    class Conv5CAM(base):
        # grad-cam scales maps to its input's size; its input here is conv5, the network's is larger.
        def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
            return input_size

    return Conv5CAM


def conv5_cams(
    model: nn.Module,
    features: Tensor,
    targets: list[int],
    method: str = "gradcam",
    input_size: tuple[int, int] = (224, 224),
) -> np.ndarray:
    """CAMs for one image's conv5 activation, one per target class.

    Args:
        model: a ResNeXt (only ``forward_head`` is used; the model is not modified).
        features: conv5 activation, (1, C, h, w), from a pass made without autograd.
        targets: class indices to explain.
        method: a key of :data:`CAM_METHODS`.
        input_size: (width, height) of the network input the maps are scaled to.

    Returns:
        (len(targets), height, width) float32 maps in [0, 1].
    """
    if method.lower() == "gradcam":
        return _gradcam_closed_form(model, features, targets, input_size)
    if method.lower() == "eigencam":
        return np.repeat(_eigencam(features, input_size), len(targets), axis=0)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget

    cam_class = _cam_class(method, input_size)
    head = _Conv5Head(model)
    # One row per target; the leaf makes autograd stop here: backward runs through the head only.
    leaf = features.detach().float().repeat(len(targets), 1, 1, 1).requires_grad_()
    if method.lower() == "finercam":
        with torch.no_grad():
            logits = model.forward_head(leaf[:1])[0]
        cam_targets = [FinerWeightedTarget(t, _closest_classes(logits, t), alpha=1.0) for t in targets]
    else:
        cam_targets = [ClassifierOutputTarget(t) for t in targets]
    with torch.enable_grad(), cam_class(head, target_layers=[head.conv5]) as cam:
        maps = cam(input_tensor=leaf, targets=cam_targets)
    return maps.astype(np.float32)


def _gradcam_closed_form(model: nn.Module, features: Tensor, targets: list[int], input_size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM for a global-average-pool + linear head without autograd (see the module's text):
    the same steps as grad-cam's ``GradCAM`` (ReLU, min-max scaling and resizing per map, then its
    one-layer aggregation's second scaling), with the gradient written out."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    activation = features.detach().float()[0]  # (C, h, w)
    cells = activation.shape[1] * activation.shape[2]
    weights = model.fc.weight.detach().float()[list(targets)] / cells  # d logit_k / d A[c, y, x]
    cams = torch.einsum("kc,chw->khw", weights, activation).clamp_min(0).cpu().numpy()
    return scale_cam_image(scale_cam_image(cams, input_size)).astype(np.float32)


def _eigencam(features: Tensor, input_size: tuple[int, int]) -> np.ndarray:
    """Eigen-CAM (the activation's first principal component; the same for every class), as
    grad-cam's ``EigenCAM`` computes it, once: its full SVD of a (cells x 2,048) matrix built a
    2,048 x 2,048 basis for every class asked about (1.8 s for a photo and its top 3); the thin SVD
    gives the same first component."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    activation = features.detach().float()[0].cpu().numpy()  # (C, h, w)
    flat = activation.reshape(activation.shape[0], -1).T
    flat = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    cam = np.maximum((flat @ vt[0]).reshape(activation.shape[1:]), 0)[None]
    return scale_cam_image(scale_cam_image(cam, input_size)).astype(np.float32)


def _closest_classes(logits: Tensor, target: int, count: int = 3) -> list[int]:
    """The classes whose scores are closest to ``target``'s: the ones FinerCAM contrasts it with."""
    order = torch.argsort((logits - logits[target]).abs()).tolist()
    return [c for c in order if c != target][:count]


def heatmap_on_photo(cam: np.ndarray, photo_size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Place a network-input CAM back onto the photo it came from.

    Args:
        cam: (S, S) map over the crop the network saw.
        photo_size: (width, height) of the photo.
        box: (left, top, right, bottom) of that crop in photo pixels
            (:meth:`Preprocessing.crop_box`).

    Returns:
        (height, width) float32 map in [0, 1]; zero where the network saw nothing.
    """
    import cv2

    width, height = photo_size
    scale = (box[2] - box[0]) / cam.shape[1]
    # Pixel centres: cam pixel x covers photo [left + x*scale, left + (x+1)*scale).
    shift_x = box[0] + 0.5 * scale - 0.5
    shift_y = box[1] + 0.5 * scale - 0.5
    matrix = np.array([[scale, 0.0, shift_x], [0.0, scale, shift_y]], dtype=np.float64)
    heat = cv2.warpAffine(
        cam.astype(np.float32), matrix, (width, height), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0,
    )
    return np.clip(heat, 0.0, 1.0)


def overlay(
    photo: Image.Image, heatmap: np.ndarray, opacity: float = 0.5, box: tuple[float, float, float, float] | None = None,
    outline: bool = False, tint_outside: bool = False,
) -> np.ndarray:
    """The heatmap coloured (jet, as grad-cam draws it) and blended over the photo.

    Unlike grad-cam's ``show_cam_on_image``, the blend is not rescaled to its maximum, so opacity 0
    gives back the photo unchanged, and with ``box`` the parts of the photo the network never saw
    stay untinted instead of looking "cold" (unless ``tint_outside``: the whole photo was seen too);
    ``outline`` draws ``box`` (the box find-the-bird or a person chose).
    Returns RGB uint8 at the photo's size.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    import cv2

    rgb = np.asarray(photo.convert("RGB"))
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heatmap), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(rgb, 1.0 - opacity, colours, opacity, 0.0)
    if box is not None:
        left, top, right, bottom = (round(v) for v in box)
        if not tint_outside:
            seen = blended[max(top, 0) : bottom, max(left, 0) : right].copy()
            blended = rgb.copy()
            blended[max(top, 0) : bottom, max(left, 0) : right] = seen
        if outline:
            thickness = max(2, round(min(rgb.shape[:2]) / 150))
            cv2.rectangle(blended, (left, top), (right - 1, bottom - 1), (255, 255, 255), thickness + 2)
            cv2.rectangle(blended, (left, top), (right - 1, bottom - 1), (20, 160, 60), thickness)
    return blended


@dataclass
class Explanation:
    """Where the model looked to decide one class, for one photo.

    Attributes:
        cam: (H, W) float map in [0, 1] at the network input's size (the center crop).
        target: explained class index; ``label`` its name, ``prob`` its probability.
        predictions: the photo's top-k, from the same forward pass.
        method: the CAM method used.
        photo: the photo (upright RGB) that ``heatmap`` and ``overlay`` are drawn on.
        box: the crop of ``photo`` that the network saw, (left, top, right, bottom): a crop
            around the bird when find-the-bird made a second pass (``found``), and then drawn.
    """

    cam: np.ndarray
    target: int
    label: str
    prob: float
    predictions: list
    method: str
    photo: Image.Image = field(repr=False)
    box: tuple[float, float, float, float]
    found: bool = False
    boxed: bool = False  # ``box`` is the one the caller gave (drawn too)
    # Where find-the-bird classified a crop: the same class's map of the whole photo (over
    # ``whole_box``, the square the network saw of it), drawn around the crop's.
    whole_cam: np.ndarray | None = None
    whole_box: tuple[float, float, float, float] | None = None

    @property
    def verdict(self) -> str:
        """The answer's verdict (see :mod:`resnext.verdict`)."""
        return getattr(self.predictions, "verdict", "species")

    @cached_property
    def heatmap(self) -> np.ndarray:
        """(height, width) map in [0, 1] on the original photo: the crop's inside ``box`` and,
        where there is ``whole_cam``, the whole photo's around it; else zero outside the crop."""
        heat = heatmap_on_photo(self.cam, self.photo.size, self.box)
        if self.whole_cam is None:
            return heat
        around = heatmap_on_photo(self.whole_cam, self.photo.size, self.whole_box)
        left, top, right, bottom = (round(v) for v in self.box)
        around[max(top, 0) : bottom, max(left, 0) : right] = heat[max(top, 0) : bottom, max(left, 0) : right]
        return around

    @cached_property
    def overlay(self) -> np.ndarray:
        """The heatmap over the photo at half opacity, RGB uint8 (see :meth:`overlay_with`)."""
        return self.overlay_with(0.5)

    def overlay_with(self, opacity: float) -> np.ndarray:
        """The heatmap over the photo at ``opacity`` (0 = photo only, 1 = heatmap only)."""
        if self.whole_cam is not None:  # the whole photo tinted, the crop's box drawn on it
            return overlay(self.photo, self.heatmap, opacity, self.box, outline=True, tint_outside=True)
        return overlay(self.photo, self.heatmap, opacity, self.box, outline=self.found or self.boxed)
