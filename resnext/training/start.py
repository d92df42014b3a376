"""Where a training run starts: the shipped bird model, torchvision's ImageNet weights, random
weights, or a checkpoint of ours."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointInfo, load_checkpoint
from ..composition import build_model
from ..inference import DEFAULT_CHECKPOINT
from ..model import ResNeXt, resnext50_32x4d
from ..transforms import Preprocessing

__all__ = ["load_start_point"]

IMAGENET_HINT = (
    "torchvision could not download the ImageNet weights for resnext50_32x4d ({err}). With no "
    "network, copy resnext50_32x4d-1a0047aa.pth from a machine that has it into {cache} and retry."
)


def load_start_point(init: str, arch: str = "resnext50_32x4d") -> tuple[ResNeXt, CheckpointInfo | None, Preprocessing]:
    """The network to start from, its checkpoint metadata (if any) and preprocessing."""
    if init == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the default model {DEFAULT_CHECKPOINT.name} is not installed; use --init imagenet, scratch or a checkpoint path"
            )
        model, info = load_checkpoint(DEFAULT_CHECKPOINT)
        return model, info, info.preprocessing
    if init == "imagenet":
        return _imagenet_resnext50(), None, Preprocessing()
    if init == "scratch":
        builders = {
            "resnext50_32x4d": lambda: resnext50_32x4d(1000),
            "resnext101_32x8d": lambda: build_model({"layers": [3, 4, 23, 3], "cardinality": 32, "group_depth": 8, "num_classes": 1000}),
            "tiny": lambda: build_model({"layers": [1, 1, 1, 1], "cardinality": 4, "group_depth": 2, "num_classes": 10, "stem_width": 8}),
        }
        if arch not in builders:
            raise ValueError(f"unknown arch {arch!r}; use one of {sorted(builders)}")
        return builders[arch](), None, Preprocessing()
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"--init {init!r}: not default, imagenet, scratch, or an existing checkpoint file")
    model, info = load_checkpoint(path)
    return model, info, info.preprocessing


def _imagenet_resnext50() -> ResNeXt:
    """torchvision's ImageNet ResNeXt-50 weights (downloaded once, cached), mapped onto ours."""
    import torchvision

    from ..checkpoint import from_torchvision

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        weights = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # URLError, socket errors, HTTP errors: all mean "no weights"
        raise RuntimeError(IMAGENET_HINT.format(err=err, cache=cache)) from None
    model = resnext50_32x4d(1000)
    model.load_state_dict(from_torchvision(state))
    return model


# ----------------------------------------------------------------------------- data

