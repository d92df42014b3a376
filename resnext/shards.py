"""Sharded checkpoints: the weights in several safetensors files and an index, as Hugging Face
``transformers`` writes them (``save_pretrained(max_shard_size=...)``)::

    v6.safetensors.index.json
        {"metadata": {"resnext": "<the checkpoint's metadata JSON>", "total_size": 49012345},
         "weight_map": {"conv1.0.weight": "v6-00001-of-00004.safetensors", ...},
         "shards": {"v6-00001-of-00004.safetensors": {"bytes": 16776960, "sha256": "9f86d0..."}, ...}}
    v6-00001-of-00004.safetensors ... v6-00004-of-00004.safetensors

Each shard is a complete safetensors file (its metadata ``{"format": "pt"}``, as transformers
writes it). The index carries the metadata a single file carries in its header, so
:func:`resnext.read_metadata` needs the index alone, and the size and sha256 of every shard, so a
shard that was changed, cut short or swapped is refused. Loading checks the index before opening
any shard: plain file names in its own folder, at most :data:`MAX_SHARDS` shards in at most
:data:`MAX_INDEX_BYTES`, every tensor the architecture needs mapped to a listed shard, no other
tensor, and no shard declared larger than its tensors can be. Then each shard in turn: its size,
its sha256, and every check a single-file checkpoint gets (header length, tensor names, shapes and
dtypes against the architecture, finite values), and it must hold exactly the tensors the index
maps to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_SUFFIX, MAX_HEADER_BYTES, STORED_DTYPES, _json, _load_tensors, _read_header, _write_atomic

__all__ = ["MAX_INDEX_BYTES", "MAX_SHARDS", "ShardIndex", "load_shards", "read_index", "save_shards"]

MAX_INDEX_BYTES = 4 * 1024 * 1024  # a ResNeXt-101's index is ~40 kB
MAX_SHARDS = 1000
MIB = 1024 * 1024
SHARD_METADATA = {"format": "pt"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardIndex:
    """A checked index: where it is, its metadata, which shard holds each tensor, and each shard's
    size in bytes and sha256."""

    path: Path
    metadata: dict
    weight_map: dict[str, str]
    shards: dict[str, tuple[int, str]]

    @property
    def header(self) -> dict:
        """The metadata as a single file's safetensors header holds it."""
        return {"__metadata__": self.metadata}


def save_shards(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                max_shard_mb: float) -> Path | None:
    """Write ``tensors`` as shards of at most ``max_shard_mb`` MiB each (file size, header
    included) beside ``path``, named ``<stem>-00001-of-0000N.safetensors``, and the index at
    ``<path>.index.json``; return the index's path, or None when one file of that size holds
    them all with ``metadata`` (the caller then writes that file as usual).

    Every file is written under a temporary name first; the shards are renamed once all are
    written, the index last. A failed save (a full disk) leaves nothing behind, and a reader that
    comes between the renames finds shards that do not match their index, and refuses them.

    Raises:
        ValueError: ``max_shard_mb`` is not a positive number, a tensor does not fit a shard of
            that size, or it would take more than :data:`MAX_SHARDS` shards.
        OSError: a file cannot be written.
    """
    if isinstance(max_shard_mb, bool) or not isinstance(max_shard_mb, (int, float)) or not 0 < max_shard_mb < math.inf:
        raise ValueError(f"max_shard_mb must be a positive number of MiB, got {str(max_shard_mb)[:40]}")
    cap = int(max_shard_mb * MIB)
    if _file_bound(tensors, metadata, cap) <= cap:
        return None
    groups = _plan(tensors, cap, max_shard_mb)
    names = [_plain_name(path, f"{path.stem}-{i:05d}-of-{len(groups):05d}.safetensors") for i in range(1, len(groups) + 1)]
    index_path = path.with_name(path.name + INDEX_SUFFIX)
    temps: list[Path] = []
    try:
        for name, group in zip(names, groups):
            part = {k: tensors[k] for k in group}
            temps.append(_write_atomic(path.parent / name, lambda tmp, part=part: save_file(part, tmp, metadata=SHARD_METADATA),
                                       rename=False))
        index = {"metadata": {**metadata, "total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: name for name, group in zip(names, groups) for k in group},
                 "shards": {name: {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)} for name, tmp in zip(names, temps)}}
        text = json.dumps(index, indent=1, ensure_ascii=False)
        temps.append(_write_atomic(index_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), rename=False))
        for tmp, name in zip(temps, [*names, index_path.name]):
            os.replace(tmp, path.parent / name)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return index_path


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _entry_bound(name: str, tensor: torch.Tensor, cap: int) -> int:
    """The most a tensor can add to a file of at most ``cap`` bytes: its bytes, and its header entry
    with the longest dtype and offsets it could have (its braces stand for the comma between entries)."""
    offset = 10 ** len(str(cap)) - 1
    entry = {name: {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset]}}
    return _nbytes(tensor) + len(json.dumps(entry, separators=(",", ":")).encode())


def _file_bound(tensors: dict[str, torch.Tensor], metadata: dict[str, str], cap: int) -> int:
    """The most a safetensors file of these tensors can take: the length word, the header (JSON
    escapes ``ensure_ascii`` writes are longer than the UTF-8 safetensors writes), its padding to 8
    bytes, and the tensors."""
    header = len(json.dumps({"__metadata__": metadata}, separators=(",", ":")).encode())
    return 8 + header + 7 + sum(_entry_bound(name, t, cap) for name, t in tensors.items())


def _plan(tensors: dict[str, torch.Tensor], cap: int, max_shard_mb: float) -> list[list[str]]:
    """The tensors' names in shards, in the state dict's order, each shard filled while it stays within ``cap``."""
    empty = _file_bound({}, SHARD_METADATA, cap)
    groups: list[list[str]] = [[]]
    size = empty
    for name, tensor in tensors.items():
        need = _entry_bound(name, tensor, cap)
        if empty + need > cap:
            raise ValueError(f"tensor {name} takes {_nbytes(tensor):,} bytes: it does not fit a shard of "
                             f"{max_shard_mb} MiB ({cap:,} bytes)")
        if size + need > cap:
            groups.append([])
            size = empty
        groups[-1].append(name)
        size += need
    if len(groups) > MAX_SHARDS:
        raise ValueError(f"shards of {max_shard_mb} MiB would make {len(groups):,} files; the limit is {MAX_SHARDS:,}")
    return groups


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _plain_name(index: Path, name) -> str:
    """A shard's name: a plain ``.safetensors`` file name, so the shard is in the index's folder."""
    if (not isinstance(name, str) or not 0 < len(name) <= 255 or not name.endswith(".safetensors")
            or name.startswith(".") or any(c in "/\\:" or ord(c) < 32 for c in name)):
        raise ValueError(f"{index}: shard name {str(name)[:80]!r} is not a plain .safetensors file name "
                         f"in the index's folder")
    return name


def read_index(path: Path) -> ShardIndex:
    """Read and check a sharded checkpoint's index (not its shards, nor its metadata, which the
    caller checks as a single file's).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: over :data:`MAX_INDEX_BYTES`, not JSON, a shard name that is not a plain file
            name, more than :data:`MAX_SHARDS` shards, or a weight map and shard list that disagree.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint index")
    with path.open("rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError(f"{path}: a checkpoint index over {MAX_INDEX_BYTES:,} bytes is not one of ours")
    try:
        data = _json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a checkpoint index (not JSON we accept: {err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), dict) for key in ("metadata", "weight_map", "shards")):
        raise ValueError(f"{path}: not a checkpoint index (it needs the objects 'metadata', 'weight_map' and 'shards')")
    if not 1 <= len(data["shards"]) <= MAX_SHARDS:
        raise ValueError(f"{path}: an index must list 1 to {MAX_SHARDS:,} shards, got {len(data['shards']):,}")
    shards = {}
    for name, entry in data["shards"].items():
        _plain_name(path, name)
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int or not 8 <= entry["bytes"] < 2**63
                or not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"])):
            raise ValueError(f"{path}: shard {name} needs its size as 'bytes' and its 'sha256' (64 hex digits)")
        shards[name] = (entry["bytes"], entry["sha256"])
    for tensor, name in data["weight_map"].items():
        if not isinstance(name, str) or name not in shards:
            raise ValueError(f"{path}: tensor {tensor[:60]} is mapped to {str(name)[:80]!r}, "
                             f"which is not a shard the index lists")
    idle = sorted(set(shards) - set(data["weight_map"].values()))
    if idle:
        raise ValueError(f"{path}: shard {idle[0]} holds no tensor of the weight map")
    return ShardIndex(path, data["metadata"], dict(data["weight_map"]), shards)


def load_shards(index: ShardIndex, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Every tensor of the shards ``index`` lists, once the weight map has exactly the names in
    ``expected`` (name -> the shape the architecture needs) and each shard matches its index and
    holds what the map says.

    Raises:
        FileNotFoundError: a shard is missing.
        ValueError: the weight map does not fit the architecture, or a shard does not match its
            index (size, sha256, tensors) or fails a single file's checks.
    """
    mapped = index.weight_map
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{index.path}: the weight map does not match the architecture (missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {[u[:60] for u in unexpected[:3]]}"
                         f"{'...' if len(unexpected) > 3 else ''})")
    held: dict[str, dict[str, tuple]] = {name: {} for name in index.shards}
    for tensor, name in mapped.items():
        held[name][tensor] = expected[tensor]
    widest = max(STORED_DTYPES.values())
    for name, (size, _) in index.shards.items():
        most = 8 + MAX_HEADER_BYTES + sum(math.prod(shape) * widest for shape in held[name].values())
        if size > most:  # checked before any shard is read: a hash of terabytes is a hang
            raise ValueError(f"{index.path}: shard {name} is declared as {size:,} bytes; its tensors take at most {most:,}")
    tensors = {}
    for name in index.shards:
        tensors.update(_load_shard(index, name, held[name]))
    return tensors


def _load_shard(index: ShardIndex, name: str, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """One shard's tensors: its size, then its sha256, then its header against what the index maps to it."""
    path, (size, digest) = index.path.parent / name, index.shards[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard of {index.path.name} is missing")
    if path.stat().st_size != size:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, its index {index.path.name} says {size:,}: "
                         f"the shard was changed or cut short")
    if _sha256(path) != digest:
        raise ValueError(f"{path}: its sha256 is not the one its index {index.path.name} lists: the shard was changed")
    header = _read_header(path)
    declared = {k for k in header if k != "__metadata__"}
    if declared != set(expected):
        stray, absent = sorted(declared - set(expected)), sorted(set(expected) - declared)
        raise ValueError(f"{path}: does not hold the tensors its index {index.path.name} maps to it "
                         f"(not mapped here: {[s[:60] for s in stray[:3]]}, absent: {absent[:3]})")
    return _load_tensors(path, expected, header)
