"""ResNeXt bird classifier: the model, checkpoints, preprocessing, prediction and conv5 Grad-CAM.

    >>> from resnext import load_classifier
    >>> clf = load_classifier("model.safetensors")          # doctest: +SKIP
    >>> clf.predict("bird.jpg", k=3)                         # doctest: +SKIP
    >>> clf.explain("bird.jpg").overlay                      # doctest: +SKIP

The names below are imported on first use, so ``import resnext.model`` loads the network alone
(with torch), not the checkpoint, inference and explanation modules beside it.
"""

from __future__ import annotations

import importlib

# Each public name -> the module of this package that defines it.
_EXPORTS = {
    "CAM_METHODS": "explain",
    "CheckpointInfo": "checkpoint",
    "Classifier": "inference",
    "Explanation": "explain",
    "ImageLoadError": "transforms",
    "Prediction": "inference",
    "Preprocessing": "transforms",
    "ResNeXt": "model",
    "display_name": "inference",
    "from_torchvision": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_classifier": "inference",
    "load_image": "transforms",
    "read_metadata": "checkpoint",
    "resnext101_32x8d": "model",
    "resnext50_32x4d": "model",
    "resnext_tiny": "model",
    "save_checkpoint": "checkpoint",
    "select_device": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
