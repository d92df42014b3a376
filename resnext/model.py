"""ResNeXt (Xie et al., 2017, "Aggregated Residual Transformations for Deep Neural Networks").

The network keeps the article's names: a stem ``conv1``, four stages ``conv2`` .. ``conv5`` of
bottleneck blocks whose 3x3 convolution is split into ``cardinality`` groups, global average
pooling and ``fc``. ResNeXt is configuration of one block class, not a second network.

This module does no I/O and imports torch only: the bird detector kept beside the network, the
architecture a checkpoint stores and its full cost are :mod:`resnext.composition`'s. Fixes to the
seed implementation are marked ``# Fix (seed):``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Bottleneck",
    "ResNeXt",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext_tiny",
    "network_cost",
]

# A stage's output width is EXPANSION * stem_width * 2**stage, as in the article's Table 1:
# 256, 512, 1024, 2048 for a 64-channel stem, whatever the cardinality or group depth.
EXPANSION = 4


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Fix (seed): no bias on a convolution followed by batch-norm (BN's beta already is one).
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> grouped 3x3 (``cardinality`` groups) -> 1x1 expand, plus a shortcut.

    As in the article (and torchvision), a stage's down-sampling is done by the stride of the
    grouped 3x3 convolution of its first block.
    """

    def __init__(self, in_ch: int, width: int, out_ch: int, cardinality: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        # Fix (seed): identity shortcut when the shape is unchanged; a projection (1x1 conv + BN,
        # the article's option B) only where the stride or the width changes.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (B, out_ch, H/stride, W/stride)
        return self.relu(out + identity)


class ResNeXt(nn.Module):
    """ResNeXt with the article's stage names.

    Args:
        layers: blocks per stage ``conv2`` .. ``conv5``, e.g. ``(3, 4, 6, 3)`` for ResNeXt-50.
        cardinality: groups of the 3x3 convolution (C in the article).
        group_depth: channels per group in ``conv2`` (d in the article); doubles every stage.
        num_classes: outputs of ``fc``.
        stem_width: channels of ``conv1`` (64 in the article); stage widths scale with it.
            Only tiny test models change it.
        locator: add ``locator``, a 1x1 convolution on the conv5 map giving, per conv5 cell, the
            logit of "this cell shows a bird" (trained on the covered fraction of each cell). It
            finds the bird in a wide shot and says when there is none; it reads the same conv5
            activation as ``fc`` and Grad-CAM, so it costs one tiny convolution.
        bird_head: add ``bird``, a linear layer on the pooled conv5 features (those ``fc``
            reads) giving the logit of "this photo shows a bird". It is fit on frozen features
            with photos of no bird (:func:`resnext.training.calibrate.fit_bird_head`) and, where
            present, is the bird score of the verdict; the locator then only finds the bird.
        zero_init_residual: start each block's last BN gamma at zero, so every block begins as
            the identity. Goyal et al. (2017) report this helps training from scratch, which is how
            our default bird model is trained; it changes nothing when weights are loaded.

    ``forward`` returns logits; ``forward_features`` stops after ``conv5`` and ``forward_head``
    pools and classifies, so Grad-CAM and feature caching can run the two halves apart.

    ``detector`` is None here: :func:`resnext.composition.attach_detector` may keep a bird detector
    there, beside the network (its tensors ``detector.*``); nothing in this class calls it.
    """

    def __init__(
        self,
        layers: Sequence[int],
        cardinality: int,
        group_depth: int,
        num_classes: int,
        *,
        stem_width: int = 64,
        zero_init_residual: bool = True,
        locator: bool = False,
        bird_head: bool = False,
    ):
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts (conv2..conv5), got {layers}")
        for name, value in (
            ("cardinality", cardinality),
            ("group_depth", group_depth),
            ("num_classes", num_classes),
            ("stem_width", stem_width),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.layers = layers
        self.cardinality = cardinality
        self.group_depth = group_depth
        self.stem_width = stem_width

        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        in_ch = stem_width
        stages = []
        for i, blocks in enumerate(layers):
            width = cardinality * group_depth * 2**i
            out_ch = EXPANSION * stem_width * 2**i
            stages.append(self._make_stage(in_ch, width, out_ch, blocks, stride=1 if i == 0 else 2))
            in_ch = out_ch
        self.conv2, self.conv3, self.conv4, self.conv5 = stages
        # Fix (seed): adaptive pooling instead of avg_pool2d(out, 7), so any input size works.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.locator = nn.Conv2d(in_ch, 1, 1) if locator else None
        self.bird = nn.Linear(in_ch, 1) if bird_head else None
        self.num_features = in_ch
        self._init_weights(zero_init_residual)
        self.detector: nn.Module | None = None  # see the class docstring: filled, if ever, by resnext.composition

    def _make_stage(self, in_ch: int, width: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        first = Bottleneck(in_ch, width, out_ch, self.cardinality, stride)
        rest = [Bottleneck(out_ch, width, out_ch, self.cardinality) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # Fix (seed): Kaiming (He) init for the ReLU network, unit BN, as in torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        if self.locator is not None:
            self._init_locator()

    def _init_locator(self) -> None:
        # A small start: Kaiming's fan-out of 1 would give huge logits.
        nn.init.normal_(self.locator.weight, std=0.01)
        nn.init.zeros_(self.locator.bias)

    def add_locator(self) -> None:
        """Give a network without one a freshly initialised ``locator`` head."""
        self.locator = nn.Conv2d(self.num_features, 1, 1).to(self.fc.weight.device)
        self._init_locator()

    def add_bird_head(self) -> None:
        """Give a network without one a ``bird`` head that says "bird" for every photo (zero
        weights, bias 4: sigmoid 0.98) until it is fit, so nothing is called "not a bird" by chance."""
        self.bird = nn.Linear(self.num_features, 1).to(self.fc.weight.device)
        nn.init.zeros_(self.bird.weight)
        nn.init.constant_(self.bird.bias, 4.0)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> conv5 activation (B, num_features, H/32, W/32)."""
        x = self.conv1(x)  # (B, stem, H/4, W/4)
        x = self.conv2(x)  # (B, 4*stem, H/4, W/4)
        x = self.conv3(x)  # (B, 8*stem, H/8, W/8)
        x = self.conv4(x)  # (B, 16*stem, H/16, W/16)
        return self.conv5(x)  # (B, 32*stem, H/32, W/32)

    def forward_head(self, features: Tensor) -> Tensor:
        """conv5 activation -> logits (B, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward_locator(self, features: Tensor) -> Tensor:
        """conv5 activation -> bird logits per conv5 cell (B, H/32, W/32).

        Raises:
            ValueError: the network has no locator head.
        """
        if self.locator is None:
            raise ValueError("this network has no locator head (locator=False)")
        return self.locator(features).squeeze(1)

    def forward_bird(self, features: Tensor) -> Tensor:
        """conv5 activation -> the logit of "this photo shows a bird" (B,).

        Raises:
            ValueError: the network has no bird head.
        """
        if self.bird is None:
            raise ValueError("this network has no bird head (bird_head=False)")
        return self.bird(torch.flatten(self.avgpool(features), 1)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        # Fix (seed): return logits, not softmax: CrossEntropyLoss and Grad-CAM targets need them.
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` with a freshly initialised head of ``num_classes`` outputs."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.fc = nn.Linear(self.num_features, num_classes).to(self.fc.weight.device)

    def config(self) -> dict:
        """The constructor arguments needed to rebuild this network (a checkpoint stores them, with
        the detector's size: :func:`resnext.composition.architecture`)."""
        return {
            "layers": list(self.layers),
            "cardinality": self.cardinality,
            "group_depth": self.group_depth,
            "num_classes": self.num_classes,
            "stem_width": self.stem_width,
            "locator": self.locator is not None,
            "bird_head": self.bird is not None,
        }


def resnext50_32x4d(num_classes: int = 1000) -> ResNeXt:
    """ResNeXt-50 (32x4d): 25,028,904 parameters with 1000 classes, as torchvision's."""
    return ResNeXt((3, 4, 6, 3), cardinality=32, group_depth=4, num_classes=num_classes)


def resnext101_32x8d(num_classes: int = 1000) -> ResNeXt:
    """ResNeXt-101 (32x8d): 88,791,336 parameters with 1000 classes, as torchvision's."""
    return ResNeXt((3, 4, 23, 3), cardinality=32, group_depth=8, num_classes=num_classes)


def resnext_tiny(num_classes: int = 10) -> ResNeXt:
    """A ResNeXt of about 94k parameters with every feature of the big ones, for tests."""
    return ResNeXt((1, 1, 1, 1), cardinality=4, group_depth=2, num_classes=num_classes, stem_width=8)


def _halve(side: int) -> int:
    """A 3x3 (or 7x7, or 1x1 shortcut) convolution or pooling of stride 2 with the usual padding."""
    return (side - 1) // 2 + 1


def network_cost(config: dict, input_size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image at ``input_size``) of the network that
    ``ResNeXt(**config)`` would make (other keys of ``config`` are ignored), counted from the
    numbers alone, without building anything: a checkpoint's declared size is checked against a
    budget with this first (see :func:`resnext.composition.architecture_cost`). Batch-norm
    buffers are not parameters and are not counted (as in ``model.parameters()``).
    """
    layers, card, depth = config["layers"], config["cardinality"], config["group_depth"]
    stem, classes = config.get("stem_width", 64), config["num_classes"]
    side = _halve(input_size)  # conv1's 7x7/2
    params, macs = 3 * 49 * stem + 2 * stem, side * side * stem * 3 * 49
    side = _halve(side)  # the stem's 3x3/2 max-pool
    in_ch = stem
    for i, blocks in enumerate(layers):
        width, out_ch = card * depth * 2**i, EXPANSION * stem * 2**i
        for b in range(blocks):
            out_side = _halve(side) if (i > 0 and b == 0) else side
            grouped = width * (width // card) * 9
            params += in_ch * width + grouped + width * out_ch + 4 * width + 2 * out_ch
            macs += side * side * in_ch * width + out_side * out_side * (grouped + width * out_ch)
            if out_side != side or in_ch != out_ch:  # the projection shortcut
                params += in_ch * out_ch + 2 * out_ch
                macs += out_side * out_side * in_ch * out_ch
            in_ch, side = out_ch, out_side
    params += in_ch * classes + classes
    macs += in_ch * classes
    params += (in_ch + 1) * (bool(config.get("locator")) + bool(config.get("bird_head")))
    return params, macs
