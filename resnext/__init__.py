"""ResNeXt bird classifier: the model, checkpoints, preprocessing, prediction and conv5 Grad-CAM.

    >>> from resnext import load_classifier
    >>> clf = load_classifier("model.safetensors")          # doctest: +SKIP
    >>> clf.predict("bird.jpg", k=3)                         # doctest: +SKIP
    >>> clf.explain("bird.jpg").overlay                      # doctest: +SKIP
"""

from .checkpoint import CheckpointInfo, from_torchvision, load_checkpoint, read_metadata, save_checkpoint
from .explain import CAM_METHODS, Explanation
from .inference import Classifier, Prediction, display_name, load_classifier, select_device
from .model import ResNeXt, resnext50_32x4d, resnext101_32x8d, resnext_tiny
from .transforms import ImageLoadError, Preprocessing, load_image

__all__ = [
    "CAM_METHODS",
    "CheckpointInfo",
    "Classifier",
    "Explanation",
    "ImageLoadError",
    "Prediction",
    "Preprocessing",
    "ResNeXt",
    "display_name",
    "from_torchvision",
    "load_checkpoint",
    "load_classifier",
    "load_image",
    "read_metadata",
    "resnext101_32x8d",
    "resnext50_32x4d",
    "resnext_tiny",
    "save_checkpoint",
    "select_device",
]
