"""The fast inference path: the backbone up to conv5, rebuilt for eval-mode speed.

Three steps, each measured on a 2-core Zen 4 CPU, ResNeXt-50 at 224 px, batch 1 (torchvision
eager fp32: about 60 ms):

1. Batch-norm folded into the convolution before it (exact in fp32: BN in eval mode is an affine
   map per channel).
2. On CPUs, every convolution runs through oneDNN with its weights *pre-packed once* into the
   blocked layout oneDNN computes in, and with ReLU and the residual add fused into the
   convolution. Eager PyTorch re-packs every weight on every call, which at batch 1 costs about a
   third of the time. Activations are ``channels_last``. (These are the kernels that
   ``torch.compile`` with freezing picks; calling them directly gives the same speed, ~25 ms,
   without its ~25 s compile at start-up.)
3. bf16 where the CPU computes it natively (AVX-512 BF16 / AMX), fp32 elsewhere; fp16 autocast on
   CUDA. The head (pool + fc) and everything after it stay fp32.

Only ``Classifier`` uses this module; ``Classifier(fast=False)`` runs the plain fp32 model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from .model import Bottleneck, ResNeXt

__all__ = ["PackedMobileNet", "fast_backbone", "fold_batchnorm", "cpu_count", "configure_cpu_threads", "onednn_usable"]

Backbone = Callable[[Tensor], Tensor]  # (B, 3, H, W) fp32 -> conv5 activation (B, C, H/32, W/32)


def fold_batchnorm(model: ResNeXt) -> ResNeXt:
    """A copy of an eval-mode ``model`` with every BN folded into its convolution (exact in fp32)."""
    folded = copy.deepcopy(model).eval()
    stem_conv, stem_bn = folded.conv1[0], folded.conv1[1]
    folded.conv1[0], folded.conv1[1] = fuse_conv_bn_eval(stem_conv, stem_bn), nn.Identity()
    for block in _blocks(folded):
        for i in (1, 2, 3):
            conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
            setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, bn))
            setattr(block, f"bn{i}", nn.Identity())
        if block.downsample is not None:
            block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
    return folded


def _blocks(model: ResNeXt) -> list[Bottleneck]:
    return [block for stage in (model.conv2, model.conv3, model.conv4, model.conv5) for block in stage]


class _PackedConv:
    """conv + folded BN as one oneDNN call with a pre-packed weight and a fused activation."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, input_shape: list[int]):
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach().to(dtype), *self.args, input_size=input_shape
        )
        self.bias = bias.detach().to(dtype)
        self.out_channels = conv.out_channels
        self.stride = conv.stride[0]

    def __call__(self, x: Tensor, activation: str = "relu") -> Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, activation, [], "")

    def relu6(self, x: Tensor) -> Tensor:
        """min(max(conv(x), 0), 6), MobileNetV2's activation, in one call."""
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "hardtanh", [0.0, 6.0], "")

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """conv(x) + residual in one call."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.weight, self.bias, *self.args, "add", 1.0, None, [], ""
        )

    def add_relu(self, x: Tensor, residual: Tensor) -> Tensor:
        """relu(conv(x) + residual) in one call."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.weight, self.bias, *self.args, "add", 1.0, "relu", [], ""
        )


def _strided(size: int, stride: int = 2) -> int:
    """Output size of a 'same'-padded convolution or pool with this stride."""
    return (size - 1) // stride + 1


class OneDNNBackbone:
    """The backbone as pre-packed oneDNN convolutions (CPU only); see the module docstring."""

    def __init__(self, model: ResNeXt, dtype: torch.dtype, input_size: int):
        self.dtype = dtype
        self.stem = _PackedConv(model.conv1[0], model.conv1[1], dtype, [1, 3, input_size, input_size])
        self.pool = model.conv1[3]
        size, channels = _strided(_strided(input_size)), model.stem_width  # after conv1 and its pool
        self.blocks = []
        for block in _blocks(model):
            reduce = _PackedConv(block.conv1, block.bn1, dtype, [1, channels, size, size])
            grouped = _PackedConv(block.conv2, block.bn2, dtype, [1, reduce.out_channels, size, size])
            out_size = _strided(size, grouped.stride)
            expand = _PackedConv(block.conv3, block.bn3, dtype, [1, grouped.out_channels, out_size, out_size])
            shortcut = None
            if block.downsample is not None:
                shortcut = _PackedConv(block.downsample[0], block.downsample[1], dtype, [1, channels, size, size])
            self.blocks.append((reduce, grouped, expand, shortcut))
            size, channels = out_size, expand.out_channels

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        x = self.pool(self.stem(x))  # (B, stem, H/4, W/4)
        for reduce, grouped, expand, shortcut in self.blocks:
            residual = x if shortcut is None else shortcut(x, "none")
            x = expand.add_relu(grouped(reduce(x)), residual)
        return x  # (B, C, H/32, W/32), channels_last, self.dtype


class PackedMobileNet:
    """The bird detector's MobileNetV2 features (:mod:`resnext.detector`) as pre-packed oneDNN
    fp32 convolutions, for one input shape: batch-norm folded, ReLU6 and the residual add fused,
    ``channels_last``. About 7 ms instead of 15 for a 288 x 192 photo on 2 cores. (bf16 was 6 %
    off and, for any shape but the packed one, slower.) Returns the stride-16 and the last features."""

    def __init__(self, features: nn.Sequential, input_shape: list[int]):
        _, channels, height, width = input_shape

        def pack(conv_bn, channels, height, width):
            packed = _PackedConv(conv_bn[0], conv_bn[1], torch.float32, [1, channels, height, width])
            return packed, packed.out_channels, _strided(height, packed.stride), _strided(width, packed.stride)

        self.stem, channels, height, width = pack(features[0], channels, height, width)
        self.blocks = []
        for block in features[1:18]:  # torchvision's InvertedResidual: [expand], depthwise, project + BN
            layers = list(block.conv)
            convs = []
            for conv_bn_relu6 in layers[:-2]:
                packed, channels, height, width = pack(conv_bn_relu6, channels, height, width)
                convs.append(packed)
            project, channels, height, width = pack((layers[-2], layers[-1]), channels, height, width)
            self.blocks.append((convs, project, block.use_res_connect))
        self.last, _, _, _ = pack(features[18], channels, height, width)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem.relu6(x.float().contiguous(memory_format=torch.channels_last))
        middle = x
        for i, (convs, project, residual) in enumerate(self.blocks, start=1):
            y = x
            for conv in convs:
                y = conv.relu6(y)
            x = project.add(y, x) if residual else project(y, "none")
            if i == 13:
                middle = x
        return middle, self.last.relu6(x)


class FoldedBackbone:
    """Folded BN, ``channels_last`` and autocast in eager PyTorch: the path for CUDA, MPS and
    CPUs whose PyTorch lacks oneDNN."""

    def __init__(self, model: ResNeXt, device: torch.device, dtype: torch.dtype | None):
        self.model = fold_batchnorm(model).to(device=device, memory_format=torch.channels_last)
        self.device_type = device.type
        self.dtype = dtype

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model.forward_features(x)


def onednn_usable() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_convolution_pointwise", "_reorder_convolution_weight")
    )


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_backbone(model: ResNeXt, device: torch.device, input_size: int) -> tuple[Backbone, str]:
    """The fastest backbone for ``device``, and a short name for it (shown to users)."""
    if device.type == "cpu" and onednn_usable():
        dtype = torch.bfloat16 if _cpu_has_bf16() else torch.float32
        try:
            backbone = OneDNNBackbone(model, dtype, input_size)
            with torch.inference_mode():  # prove it runs here before trusting it
                backbone(torch.zeros(1, 3, input_size, input_size))
            return backbone, f"oneDNN {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        except RuntimeError:
            pass  # an unusual build: fall through to the eager path
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return FoldedBackbone(model, device, dtype), f"CUDA {str(dtype).removeprefix('torch.')} autocast"
    return FoldedBackbone(model, device, None), "folded BN fp32"


def cpu_count() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    Containers (a Hugging Face Space, for instance) often see the host's cores through
    ``os.cpu_count()`` while their quota is 2; one thread per visible core then thrashes.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_cpu_threads() -> int:
    """Use one intra-op thread per usable CPU, unless the user chose with OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        threads = cpu_count()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return torch.get_num_threads()
