"""Checkpoints: safetensors weights plus JSON metadata in the safetensors header.

safetensors holds only tensors and a JSON header, so loading a stranger's checkpoint cannot run
code, as unpickling a ``.pt`` file can. The header's ``__metadata__`` carries one key,
``resnext``, whose JSON value is enough to rebuild the classifier::

    {"format": 1,
     "architecture": {"layers": [3, 4, 6, 3], "cardinality": 32, "group_depth": 4,
                      "num_classes": 100, "stem_width": 64},
     "classes": ["Black_footed_Albatross", ...],
     "preprocessing": {"input_size": 224, "resize": 256, "mean": [...], "std": [...],
                       "interpolation": "bilinear"},
     "provenance": {"data": ..., "epochs": ..., "metrics": {...}, "date": ...}}

Floating-point weights are stored as fp16 (half the file) and loaded back into fp32.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ResNeXt, build_model
from .transforms import Preprocessing

__all__ = [
    "CheckpointInfo",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "from_torchvision",
    "to_torchvision",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]

FORMAT_VERSION = 1
METADATA_KEY = "resnext"
# A ResNeXt-101's header is ~60 kB; a 100-class list adds a few kB. Anything far larger is not ours.
MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about its model, besides the weights."""

    architecture: dict
    classes: list[str]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
        }


def save_checkpoint(
    path: str | os.PathLike,
    model: ResNeXt,
    classes: list[str],
    preprocessing: Preprocessing | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write ``model`` and its metadata to ``path`` atomically (temp file, then rename).

    Floating-point tensors are stored as fp16, except a tensor whose values would overflow fp16,
    which stays fp32. ``provenance`` gets a ``date`` if it has none.

    Raises:
        ValueError: ``classes`` does not match the model's output count, or is not unique.
    """
    path = Path(path)
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names are not unique: {classes}")
    provenance = dict(provenance or {})
    provenance.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info = CheckpointInfo(model.config(), classes, preprocessing or Preprocessing(), provenance)
    metadata = {METADATA_KEY: json.dumps(info.to_dict(), ensure_ascii=False)}

    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # a training counter; nothing at inference reads it
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            half = tensor.half()
            tensor = half if torch.isfinite(half).all() else tensor.float()
        tensors[name] = tensor.contiguous()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate a checkpoint's metadata without loading its weights.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safetensors file, a damaged header, or missing/malformed metadata.
    """
    path = Path(path)
    header = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata; not a checkpoint of this project")
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported format version {data.get('format')!r}")
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("'classes' must be a list of strings")
        info = CheckpointInfo(
            architecture=dict(data["architecture"]),
            classes=classes,
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            provenance=dict(data.get("provenance") or {}),
        )
        if info.architecture.get("num_classes") != len(classes):
            raise ValueError(
                f"{len(classes)} class names for {info.architecture.get('num_classes')!r} outputs"
            )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{path}: malformed checkpoint metadata: {detail}") from None
    return info


def _read_header(path: Path) -> dict:
    """The safetensors JSON header, checked before anything trusts it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ValueError(
                f"{path}: not a safetensors file, or truncated (header claims {length:,} bytes, "
                f"file has {size:,})"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def load_checkpoint(path: str | os.PathLike) -> tuple[ResNeXt, CheckpointInfo]:
    """Rebuild the model (fp32, eval mode, on the CPU) and its metadata from ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: anything wrong with the file: not safetensors, truncated, malformed
            metadata, or tensors that do not fit the architecture it declares.
    """
    path = Path(path)
    info = read_metadata(path)
    try:
        model = build_model(info.architecture)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: bad architecture in metadata: {err}") from None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: damaged safetensors file ({err})") from None

    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the architecture needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model.eval(), info


# torchvision's name prefix -> ours. ``layerN`` is the article's ``conv{N+1}`` stage.
_TORCHVISION_PREFIXES = [("conv1.", "conv1.0."), ("bn1.", "conv1.1.")] + [(f"layer{i}.", f"conv{i + 1}.") for i in range(1, 5)]


def _rename_prefixes(state_dict: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        for old, new in pairs:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor
    return renamed


def from_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet/ResNeXt state dict to this package's names.

    ``conv1``/``bn1`` become the stem ``conv1.0``/``conv1.1``, ``layer1..4`` become
    ``conv2..conv5``; block internals and ``fc`` keep their names. Load the result with
    ``model.load_state_dict(...)`` into the matching builder, e.g. :func:`resnext50_32x4d`.
    """
    return _rename_prefixes(state_dict, _TORCHVISION_PREFIXES)


def to_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`from_torchvision`: our names back to torchvision's (for references).
    The locator and bird heads, which torchvision's network does not have, are left out."""
    ours = {k: v for k, v in state_dict.items() if not k.startswith(("locator.", "bird."))}
    return _rename_prefixes(ours, [(ours_, theirs) for theirs, ours_ in _TORCHVISION_PREFIXES])
