"""The bird model: the ResNeXt network (:mod:`resnext.model`), the bird detector kept beside it
(:mod:`resnext.detector`) and the verdict rules its answers follow (:mod:`resnext.verdict`).

:mod:`resnext.model` knows only the network. Here the three meet: the architecture a checkpoint
stores (the network's constructor arguments and ``"detector"``, the detector's input size or 0),
the model rebuilt from it (a detector, where there is one, is ``model.detector``, its tensors
named ``detector.*``), its cost counted from the numbers alone, and the rules of its verdicts.

Serving code: no training imports here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .detector import BirdDetector, detector_cost
from .model import ResNeXt, network_cost
from .verdict import VerdictRules

if TYPE_CHECKING:  # checkpoint builds on this module
    from .checkpoint import CheckpointInfo

__all__ = ["ARCHITECTURE_FIELDS", "architecture", "architecture_cost", "attach_detector", "build_model", "rules_for"]

# What :func:`architecture` writes and :func:`build_model` (and a checkpoint) may hold.
ARCHITECTURE_FIELDS = frozenset({"layers", "cardinality", "group_depth", "num_classes", "stem_width", "locator",
                                 "bird_head", "detector"})
_OPTIONAL_FIELDS = frozenset({"stem_width", "locator", "bird_head", "detector"})


def attach_detector(model: ResNeXt, size: int) -> ResNeXt:
    """Keep a fresh :class:`~resnext.detector.BirdDetector` of input ``size`` (longer side, pixels)
    beside ``model`` as ``model.detector``, or none for 0; returns ``model``.

    The detector says whether a photo shows a bird and where, from ImageNet features of the whole
    photo; where present, it replaces the bird head and the locator in the verdict and
    find-the-bird. It never changes a species or a heatmap, and it is not trained with the ResNeXt.

    Raises:
        ValueError: ``size`` is not an integer in :data:`~resnext.detector.DETECTOR_SIZES`' range.
    """
    model.detector = BirdDetector(size) if size else None  # after the network's init: its weights are its own
    return model


def build_model(config: dict) -> ResNeXt:
    """Rebuild a model, its detector included, from :func:`architecture` output.

    Raises:
        ValueError: an unknown or a missing field (named), or a value the network or the
            detector refuses.
    """
    unknown = set(config) - ARCHITECTURE_FIELDS
    if unknown:
        raise ValueError(f"unknown architecture fields {sorted(unknown)}")
    missing = ARCHITECTURE_FIELDS - _OPTIONAL_FIELDS - set(config)
    if missing:
        raise ValueError(f"architecture is missing {sorted(missing)}")
    network = ResNeXt(**{k: v for k, v in config.items() if k != "detector"})
    return attach_detector(network, config.get("detector", 0))


def architecture(model: ResNeXt) -> dict:
    """What a checkpoint stores to rebuild ``model``: the network's :meth:`~resnext.model.ResNeXt.config`
    and ``"detector"``, the input size of the detector kept beside it (0: none)."""
    return {**model.config(), "detector": 0 if model.detector is None else model.detector.size}


def architecture_cost(config: dict, input_size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image at ``input_size``) of the model that
    :func:`build_model` would make from ``config``: the network's
    (:func:`~resnext.model.network_cost`) and its detector's, counted without building anything."""
    params, macs = network_cost(config, input_size)
    if config.get("detector"):
        more_params, more_macs = detector_cost(config["detector"])
        params, macs = params + more_params, macs + more_macs
    return params, macs


def rules_for(model: ResNeXt, info: CheckpointInfo) -> VerdictRules:
    """The verdict rules ``info``'s provenance records, for ``model``: the bird check and
    find-the-bird only where the model has a bird score (a locator, a bird head or a detector).

    Raises:
        ValueError: a malformed stored verdict block (see :meth:`VerdictRules.from_provenance`).
    """
    has_bird_score = model.locator is not None or model.bird is not None or model.detector is not None
    return VerdictRules.from_provenance(info.provenance, len(info.classes), has_bird_score)
