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

Floating-point weights are stored as fp16 (half the file) and loaded back into fp32. Sharded
checkpoints (several files and an index with the same metadata): :mod:`resnext.shards`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .composition import ARCHITECTURE_FIELDS, architecture, architecture_cost, build_model
from .detector import DETECTOR_SIZES
from .model import ResNeXt
from .transforms import Preprocessing
from .verdict import VerdictRules

__all__ = ["CheckpointInfo", "CheckpointLimits", "FORMAT_VERSION", "MAX_HEADER_BYTES", "from_torchvision", "to_torchvision",
           "load_checkpoint", "read_metadata", "save_checkpoint"]

FORMAT_VERSION = 1
METADATA_KEY = "resnext"
# A ResNeXt-101's header is ~60 kB; a 100-class list adds a few kB. Anything far larger is not ours.
MAX_HEADER_BYTES = 4 * 1024 * 1024
STORED_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}  # what a floating-point weight may be stored as
INDEX_SUFFIX = ".index.json"  # a path ending so names a sharded checkpoint's index


@dataclass(frozen=True)
class CheckpointLimits:
    """What a checkpoint may declare. A file is checked against these before anything is built
    from it: its metadata alone (a few hundred bytes) could otherwise ask for a network of
    terabytes. Every real ResNeXt passes: torchvision's resnext101_32x8d with 1,000 classes at
    448 px is 89 M parameters and 66 G multiply-accumulates per image."""

    max_blocks: int = 64  # per stage (ResNet-152's conv4 has 36)
    max_cardinality: int = 256
    max_group_depth: int = 512
    max_stem_width: int = 256
    max_classes: int = 25_000  # ImageNet-21k has 21,843
    max_class_name: int = 200  # characters
    max_parameters: int = 200_000_000
    max_macs: int = 100_000_000_000  # per image, at the checkpoint's input size


LIMITS = CheckpointLimits()


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
    max_shard_mb: float | None = None,
) -> Path:
    """Write ``model`` and its metadata to ``path`` atomically (temp file, then rename).

    Floating-point tensors are stored as fp16, except a tensor whose values would overflow fp16,
    which stays fp32. ``provenance`` gets a ``date`` if it has none. With ``max_shard_mb``, weights
    over that many MiB go to shards and an index, whose path is returned (:func:`.shards.save_shards`).

    Raises:
        ValueError: ``classes`` does not match the model's output count, is not unique, or has a
            name the loader would refuse (empty, or over ``max_class_name`` characters), or
            ``max_shard_mb`` is not a positive number or is too small for a tensor.
        OSError: the file cannot be written (a full disk: nothing is left behind).
    """
    path = Path(path)
    # The loader's own checks: a file this writes is one that loads (a 250-character class name
    # was saved, listed, then refused when chosen).
    classes = _check_classes([str(c) for c in classes], model.num_classes, LIMITS)
    provenance = dict(provenance or {})
    provenance.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info = CheckpointInfo(architecture(model), classes, preprocessing or Preprocessing(), provenance)
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
    if max_shard_mb is not None:
        from .shards import save_shards  # imported here: shards builds on this module
        if (index := save_shards(path, tensors, metadata, max_shard_mb)) is not None:
            return index
    return _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _write_atomic(path: Path, write, rename: bool = True) -> Path:
    """``write(tmp)`` to a hidden file beside ``path``, then renamed over it; with ``rename=False``, its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if rename:
            os.replace(tmp, path)
    except BaseException as err:  # nothing is left behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, SafetensorError):  # a full disk, as safetensors words it
            raise OSError(errno.ENOSPC if "No space" in str(err) else errno.EIO, f"{path.name}: cannot write the model ({err})") from None
        raise
    return path if rename else Path(tmp)


def read_metadata(path: str | os.PathLike, limits: CheckpointLimits = LIMITS) -> CheckpointInfo:
    """Read and validate a checkpoint's metadata without loading its weights: every declared
    number is checked for its type and against ``limits``, and the verdict rules it carries are
    read, so a file that passes can be built without surprises (from a sharded checkpoint's index alone).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safetensors file, a damaged header, missing or malformed metadata, or a
            declared size over a limit; the message names the field and the limit.
    """
    from .shards import read_index  # imported here: shards builds on this module
    path = Path(path)
    header = read_index(path).header if path.name.endswith(INDEX_SUFFIX) else _read_header(path)
    return _parse_metadata(path, header, limits)


def _parse_metadata(path: Path, header: dict, limits: CheckpointLimits) -> CheckpointInfo:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if raw is None:
        raise ValueError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata; not a checkpoint of this project")
    try:
        data = _json(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported format version {data.get('format') if isinstance(data, dict) else data!r}")
        architecture = _check_architecture(data["architecture"], limits)
        classes = _check_classes(data["classes"], architecture["num_classes"], limits)
        if not isinstance(data["preprocessing"], dict):
            raise ValueError("'preprocessing' must be an object")
        info = CheckpointInfo(architecture, classes, Preprocessing.from_dict(data["preprocessing"]),
                              _check_provenance(data.get("provenance") or {}))
        _check_cost(architecture, info.preprocessing.input_size, limits)
        VerdictRules.from_provenance(info.provenance, len(classes), has_bird_score=False)  # checks every stored field
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{path}: malformed checkpoint metadata: {detail}") from None
    return info


def _json(text) -> object:
    """JSON from a string a stranger wrote: no NaN or infinity, no nesting deep enough to crash."""
    def no_constants(name):
        raise ValueError(f"{name} is not a number a checkpoint may hold")

    try:
        return json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _integer(name: str, value, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # not bool, not 1e300, not "3"
        raise ValueError(f"{name} must be an integer from {low} to {high:,}, got {str(value)[:40]}")
    return value


def _check_architecture(arch, limits: CheckpointLimits) -> dict:
    """The architecture block, its types and sizes checked; returns a copy."""
    if not isinstance(arch, dict):
        raise ValueError("'architecture' must be an object")
    arch = dict(arch)
    unknown = set(arch) - ARCHITECTURE_FIELDS
    if unknown:
        raise ValueError(f"unknown architecture fields {sorted(str(f)[:40] for f in unknown)[:5]}")
    layers = arch.get("layers")
    if not isinstance(layers, list) or len(layers) != 4:
        raise ValueError(f"layers must be a list of 4 block counts (conv2..conv5), got {str(layers)[:60]}")
    for i, blocks in enumerate(layers):
        _integer(f"layers[{i}] (blocks of conv{i + 2})", blocks, 1, limits.max_blocks)
    for name, high in (("cardinality", limits.max_cardinality), ("group_depth", limits.max_group_depth),
                       ("num_classes", limits.max_classes), ("stem_width", limits.max_stem_width)):
        if name in arch or name != "stem_width":
            _integer(name, arch.get(name), 1, high)
    for name in ("locator", "bird_head"):
        if not isinstance(arch.get(name, False), bool):
            raise ValueError(f"{name} must be true or false, got {str(arch[name])[:40]}")
    if arch.get("detector", 0) != 0:
        _integer("detector (its input size)", arch["detector"], *DETECTOR_SIZES)
    return arch


def _check_cost(arch: dict, input_size: int, limits: CheckpointLimits) -> None:
    params, macs = architecture_cost(arch, input_size)
    if params > limits.max_parameters:
        raise ValueError(f"the architecture has {params:,} parameters; the limit is {limits.max_parameters:,}")
    if macs > limits.max_macs:
        raise ValueError(f"the architecture needs {macs:,} multiply-accumulates per image at {input_size} px; "
                         f"the limit is {limits.max_macs:,}")


def _check_classes(classes, num_classes: int, limits: CheckpointLimits) -> list[str]:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("'classes' must be a list of strings")
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} outputs")
    for c in classes:
        if not 1 <= len(c) <= limits.max_class_name:
            raise ValueError(f"class name {c[:40]!r} must have 1 to {limits.max_class_name} characters")
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})[:3]
        raise ValueError(f"class names are not unique: {twice}")
    return classes


def _check_provenance(provenance) -> dict:
    """Where a model comes from. Free-form, but the numbers the app shows must be numbers."""
    if not isinstance(provenance, dict):
        raise ValueError("'provenance' must be an object")
    metrics = provenance.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError("provenance 'metrics' must be an object")
    for name, value in (metrics or {}).items():
        if name in ("val_acc", "test_top1", "test_top5", "unsure_below") and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ValueError(f"provenance metrics.{name} must be a number from 0 to 1, got {str(value)[:40]!r}")
    photos = (metrics or {}).get("val_photos")
    if photos is not None and (isinstance(photos, bool) or not isinstance(photos, int) or not 0 <= photos <= 10**8):
        raise ValueError(f"provenance metrics.val_photos must be a whole number from 0 to 10^8, got {str(photos)[:40]!r}")
    return dict(provenance)


def _read_header(path: Path, kind: str = "checkpoint", what: str = "a safetensors file", error=ValueError,
                 limit: int | None = None) -> dict:
    """The safetensors JSON header, checked before anything trusts it (a photo pack's too)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: not {what} (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > (limit or MAX_HEADER_BYTES) or length > size - 8:
            # A stranger's first 8 bytes, read as a length, are often a 19-digit number: say what
            # it means instead of printing it.
            claim = f"{length:,} bytes" if length <= size else "more bytes than the file holds"
            raise error(f"{path}: not {what}, or truncated (its header claims {claim}; the file has {size:,})")
        try:
            header = _json(f.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise error(f"{path}: not {what} (header is not JSON we accept: {err})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not {what} (header is not a JSON object)")
    return header


def load_checkpoint(path: str | os.PathLike, limits: CheckpointLimits = LIMITS) -> tuple[ResNeXt, CheckpointInfo]:
    """Rebuild the model (fp32, eval mode, on the CPU) and its metadata from ``path``.

    Nothing is allocated before the metadata has passed :func:`read_metadata`'s checks and every
    tensor the header declares has the name, shape and dtype the architecture needs (in every
    shard of a sharded checkpoint, which must also have the size and sha256 its index lists).

    Raises:
        FileNotFoundError: no file at ``path`` (or no shard its index names).
        ValueError: anything wrong with the file: not safetensors, truncated, malformed
            metadata, a size over ``limits``, or tensors that do not fit the architecture it declares.
    """
    from .shards import load_shards, read_index  # imported here: shards builds on this module
    path = Path(path)
    index = read_index(path) if path.name.endswith(INDEX_SUFFIX) else None
    header = index.header if index is not None else _read_header(path)
    info = _parse_metadata(path, header, limits)
    with torch.device("meta"):  # shapes only: no memory is allocated
        expected = {k: tuple(v.shape) for k, v in build_model(info.architecture).state_dict().items()
                    if not k.endswith("num_batches_tracked")}
    tensors = load_shards(index, expected) if index is not None else _load_tensors(path, expected, header)
    model = build_model(info.architecture)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model.eval(), info


def _load_tensors(path: Path, expected: dict[str, tuple], header: dict) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, once its ``header`` declares what ``expected`` needs."""
    _check_declared_tensors(path, header, expected)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: damaged safetensors file ({err})") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")
    return tensors


def _check_declared_tensors(path: Path, header: dict, expected: dict[str, tuple]) -> None:
    """The header's tensor table against the architecture: names, shapes, dtypes and byte ranges."""
    declared = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {[u[:60] for u in unexpected[:3]]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, entry in declared.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or tuple(shape) != expected[name]:
            shown = str(tuple(shape) if isinstance(shape, list) else shape)[:60]
            raise ValueError(f"{path}: tensor {name} has shape {shown}, the architecture needs {expected[name]}")
        size = STORED_DTYPES.get(entry.get("dtype"))
        if size is None:
            raise ValueError(f"{path}: tensor {name} is stored as {str(entry.get('dtype'))[:20]}; "
                             f"weights must be one of {sorted(STORED_DTYPES)}")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or offsets[1] - offsets[0] != math.prod(shape) * size):
            raise ValueError(f"{path}: tensor {name} declares {str(offsets)[:60]} as its bytes, which do not fit its shape")


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
    The locator and bird heads and the detector, which torchvision's network does not have, are left out."""
    ours = {k: v for k, v in state_dict.items() if not k.startswith(("locator.", "bird.", "detector."))}
    return _rename_prefixes(ours, [(ours_, theirs) for theirs, ours_ in _TORCHVISION_PREFIXES])
