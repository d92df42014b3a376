"""One packed training set: every photo a recipe reads, in one small file a GPU machine copies.

    python -m resnext pack [--shared ../shared] --out FILE [--max-mb 48]

A safetensors file (opening a stranger's runs no code): ``jpeg`` uint8 (L,), every photo's JPEG
bytes one after the other; ``offsets`` int64 (N+1,), photo i is ``jpeg[offsets[i]:offsets[i+1]]``;
``labels`` int64 (N,), -1 where unlabelled; ``roles`` uint8 (N,), indices into :data:`ROLES`; and
``__metadata__``: ``format``, ``version``, ``classes``, ``names``, ``roles`` (JSON lists), ``side``, ``quality``.

Each photo keeps its shorter side at most ``side``, its longer at most twice that (as training keeps
photos: ``KEPT_ASPECT``). The teacher sees views at 224 px, the student at 112: :func:`write_pack`
starts at side 224, quality 90 and steps down until the photos fit the cap. :func:`unpack` writes
class folders back, so every loader reads them unchanged (the same names: the same seeded split).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save

from ..archive import IGNORED, IMAGE_EXTENSIONS, DataError
from ..checkpoint import LIMITS as CHECKPOINT_LIMITS, _json
from ..checkpoint import _read_header as _safetensors_header
from ..data import MIN_SIDE
from ..imagefile import load_image
from ..training.context import KEPT_ASPECT

__all__ = ["FORMAT", "PackEntry", "PackError", "PackResult", "PhotoPack", "ROLES", "pack_entries", "read_pack",
           "unpack", "write_pack"]

FORMAT, VERSION = "resnext-photo-pack", 1
ROLES = ("labelled", "unlabelled", "negative")
SIDES = (224, 192, 176, 160, 144, 128, 112, 96)  # the last is the floor: below it the teacher sees mush
QUALITIES = (90, 85, 80, 75)
MIB, MAX_PHOTOS = 1024 * 1024, 100_000
MAX_HEADER_BYTES, MAX_JPEG_BYTES = 32 * MIB, 2048 * MIB  # the header: 100,000 names of 200 characters, and room
MAX_NAME, MAX_CLASSES = 200, CHECKPOINT_LIMITS.max_classes
SAMPLE = 24  # photos per role encoded to estimate a setting's size
TABLE = {"jpeg": ("U8", 1), "offsets": ("I64", 8), "labels": ("I64", 8), "roles": ("U8", 1)}


class PackError(DataError):
    """A pack that cannot be written or read; the message names the bad value."""


@dataclass(frozen=True)
class PackEntry:
    """A photo to pack: its file, its name in the pack, its role and (labelled only) its class index."""

    path: Path
    name: str
    role: str
    label: int = -1


@dataclass(frozen=True)
class PackResult:
    path: Path
    counts: dict[str, int]
    side: int
    quality: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.path}: {', '.join(f'{n:,} {r}' for r, n in self.counts.items())} photos at side "
                f"{self.side}, quality {self.quality}, {self.bytes / MIB:.1f} MB ({self.seconds:.0f} s)")


@dataclass(frozen=True)
class PhotoPack:
    """A pack read and checked by :func:`read_pack`; ``roles`` holds each photo's role name."""

    classes: list[str]
    names: list[str]
    labels: list[int]
    roles: list[str]
    side: int
    quality: int
    data: bytes = field(repr=False)
    offsets: list[int] = field(repr=False)

    def jpeg(self, i: int) -> bytes:
        """Photo ``i``'s JPEG bytes."""
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def image(self, i: int) -> Image.Image:
        """Photo ``i`` decoded (RGB) by the project's bounded reader."""
        return load_image(self.jpeg(i))


def _decode(path: Path, side: int) -> Image.Image:
    return load_image(path, shrink_to=side, max_side=KEPT_ASPECT * side)  # a JPEG decoded at a reduced scale


def _encode(image: Image.Image, quality: int) -> bytes:
    image.save(buffer := io.BytesIO(), "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _serialise(blobs: list[bytes], entries: list[PackEntry], classes: list[str], side: int, quality: int) -> bytes:
    """The whole file's bytes."""
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    tensors = {"jpeg": np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8),
               "offsets": offsets, "labels": np.array([e.label for e in entries], dtype=np.int64),
               "roles": np.array([ROLES.index(e.role) for e in entries], dtype=np.uint8)}
    metadata = {"format": FORMAT, "version": str(VERSION), "classes": json.dumps(classes, ensure_ascii=False),
                "names": json.dumps([e.name for e in entries], ensure_ascii=False), "roles": json.dumps(list(ROLES)),
                "side": str(side), "quality": str(quality)}
    return save(tensors, metadata=metadata)


def _first_fit(entries: list[PackEntry], steps: list, start: int, pool, fixed: int, scale: float, cap: int):
    """(the first step from ``start`` whose estimated file bytes fit ``cap``, or None; that estimate,
    or the last step's): each role's photos counted at the mean of a seeded sample, times ``scale``."""
    rng, estimate = random.Random(0), 0.0
    groups = [[e for e in entries if e.role == role] for role in ROLES]
    samples = [rng.sample(g, min(SAMPLE, len(g))) for g in groups]
    decoded: dict[int, list] = {}
    for i in range(start, len(steps)):
        side, quality = steps[i]
        if side not in decoded:
            decoded = {side: [list(pool.map(lambda e: _decode(e.path, side), s)) for s in samples]}
        sizes = [list(pool.map(lambda im: len(_encode(im, quality)), images)) for images in decoded[side]]
        estimate = fixed + scale * sum(len(g) * sum(s) / max(1, len(s)) for g, s in zip(groups, sizes))
        if estimate <= cap:
            return i, estimate
    return None, estimate


def _encode_all(entries: list[PackEntry], side: int, quality: int, pool) -> list[bytes]:
    def one(entry: PackEntry) -> bytes:
        image = _decode(entry.path, side)
        if entry.role == "labelled" and min(image.size) < MIN_SIDE:  # the loader would skip it: another split
            raise PackError(f"{entry.path}: {image.size[0]}x{image.size[1]} at side {side}, under the {MIN_SIDE} px "
                            "a training photo needs; its shape is too long and thin to pack")
        return _encode(image, quality)

    return list(pool.map(one, entries))


def write_pack(out: str | os.PathLike, entries: list[PackEntry], classes: list[str], max_mb: float = 48, *,
               sides: tuple[int, ...] = SIDES, qualities: tuple[int, ...] = QUALITIES, workers: int = 2) -> PackResult:
    """Pack ``entries`` into ``out`` (written atomically), at most ``max_mb`` MB (MiB). Settings are
    tried best first, each side with each quality: the first whose estimate (a sample of each role)
    fits is encoded in full; if still over, the next, the estimates scaled by how far the last was off.

    Raises:
        PackError: a bad cap, entry, name or class; no setting fits (down to the last side and quality).
        ImageLoadError, FileNotFoundError: a photo that cannot be read.
    """
    start_time, out = time.perf_counter(), Path(out)
    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb > 0):
        raise PackError(f"the size cap must be a positive number of MB, got {max_mb!r}")
    _check_index(classes, [e.name for e in entries], [e.label for e in entries],
                 [ROLES.index(e.role) if e.role in ROLES else -1 for e in entries], "the photos to pack")
    cap, steps = int(max_mb * MIB), [(s, q) for s in sides for q in qualities]
    fixed = len(_serialise([], entries, classes, sides[0], qualities[0])) + 8 * len(entries)  # all but the JPEGs
    start, scale, size = 0, 1.0, 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        while True:
            fit, estimate = _first_fit(entries, steps, start, pool, fixed, scale, cap)
            if fit is None:
                raise PackError(f"{len(entries):,} photos do not fit in {max_mb:g} MB: even at side {steps[-1][0]} "
                                f"and quality {steps[-1][1]} they take about {max(estimate, size) / MIB:,.1f} MB")
            side, quality = steps[fit]
            data = _serialise(_encode_all(entries, side, quality, pool), entries, classes, side, quality)
            if (size := len(data)) <= cap:
                break
            scale *= (size - fixed) / max(1.0, estimate - fixed)
            start = fit + 1
    _write_atomic(out, data)
    counts = {role: sum(e.role == role for e in entries) for role in ROLES}
    return PackResult(out, counts, side, quality, size, time.perf_counter() - start_time)


def _write_atomic(out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)  # readers see the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_entries(shared: str | os.PathLike) -> tuple[list[PackEntry], list[str]]:
    """What the v6 recipe trains on (:func:`resnext.recipes.detector.splits`): ``cub100/train``
    whole (the recipe splits off its validation when it loads it), ``other_fit`` as unlabelled birds
    and ``none_fit`` as photos with no bird. Returns (entries, classes)."""
    from .detector import splits

    shared = Path(shared)
    groups, data, train = splits(shared), shared / "data", shared / "data" / "cub100" / "train"
    named = [(p, p.relative_to(train).as_posix()) for p in groups["cub_fit"] + groups["cub_val"]]
    classes = sorted({name.split("/")[0] for _, name in named})  # load_dataset's order: folder names sorted
    labelled = sorted((PackEntry(p, name, "labelled", classes.index(name.split("/")[0])) for p, name in named),
                      key=lambda e: (e.label, e.name))
    others = [PackEntry(p, p.relative_to(data).as_posix(), role)
              for key, role in (("other_fit", "unlabelled"), ("none_fit", "negative")) for p in groups[key]]
    return labelled + others, classes


def read_pack(path: str | os.PathLike) -> PhotoPack:
    """Read a pack, checked as a stranger's file: the header's length, every declared dtype and shape,
    the offsets, labels, roles, names and each JPEG's declared size, before anything is decoded.
    Raises FileNotFoundError (no file) or PackError (anything wrong: the message names the value)."""
    path = Path(path)
    header, start, size = _read_header(path)
    meta = _check_metadata(path, header.get("__metadata__"))
    n = _check_table(path, header, size - start)
    arrays = {}
    with path.open("rb") as f:
        for name, (dtype, _) in TABLE.items():
            f.seek(start + header[name]["data_offsets"][0])
            raw = f.read(header[name]["data_offsets"][1] - header[name]["data_offsets"][0])
            arrays[name] = raw if name == "jpeg" else np.frombuffer(raw, dtype={"U8": np.uint8, "I64": "<i8"}[dtype])
    offsets, data = arrays["offsets"], arrays["jpeg"]
    if len(meta["names"]) != n:
        raise PackError(f"{path}: {len(meta['names']):,} names for {n:,} photos")
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
        raise PackError(f"{path}: photo offsets must rise from 0 to the data's {len(data):,} bytes; they run "
                        f"from {offsets[0]} to {offsets[-1]} (rising: {bool(np.all(np.diff(offsets) > 0))})")
    labels, roles = arrays["labels"].tolist(), arrays["roles"].tolist()
    _check_index(meta["classes"], meta["names"], labels, roles, str(path))
    offsets = offsets.tolist()
    for i, name in enumerate(meta["names"]):
        size = _jpeg_size(data[offsets[i]:offsets[i + 1]])
        if size is None or not 1 <= min(size) <= max(size) <= KEPT_ASPECT * meta["side"]:
            raise PackError(f"{path}: photo {name[:60]!r} " + ("is not a JPEG with one frame header" if size is None else
                            f"declares {size[0]}x{size[1]} pixels; this pack's are at most {KEPT_ASPECT * meta['side']} a side"))
    return PhotoPack(meta["classes"], meta["names"], labels, [ROLES[r] for r in roles], meta["side"], meta["quality"],
                     data, offsets)


def _read_header(path: Path) -> tuple[dict, int, int]:
    """The safetensors JSON header (bounded before it is read), where the data starts, the file's size."""
    header = _safetensors_header(path, "pack", "a photo pack", PackError, MAX_HEADER_BYTES)
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return header, 8 + length, path.stat().st_size


def _check_metadata(path: Path, meta) -> dict:
    """format, version, side, quality and the JSON lists, each of the type it must be."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else None
        raise PackError(f"{path}: not a {FORMAT} of version {VERSION} (its format and version: {str(got)[:80]})")
    out = {}
    for key, low, high in (("side", MIN_SIDE, 1024), ("quality", 1, 100)):
        text = meta.get(key)
        if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 4 and low <= int(text) <= high):
            raise PackError(f"{path}: {key} must be an integer from {low} to {high}, got {str(text)[:20]!r}")
        out[key] = int(text)
    for key in ("classes", "names", "roles"):
        try:
            out[key] = _json(meta.get(key))
        except (TypeError, ValueError) as err:
            raise PackError(f"{path}: {key} is not JSON ({str(err)[:80]})") from None
        if not isinstance(out[key], list) or not all(isinstance(v, str) for v in out[key]):
            raise PackError(f"{path}: {key} must be a JSON list of strings")
    if out["roles"] != list(ROLES):
        raise PackError(f"{path}: roles must be {list(ROLES)}, got {str(out['roles'])[:80]}")
    return out


def _check_table(path: Path, header: dict, data_bytes: int) -> int:
    """The four tensors' dtypes, shapes and byte ranges; returns the number of photos."""
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(TABLE):
        raise PackError(f"{path}: a photo pack holds the tensors {sorted(TABLE)}, this one {str(names)[:100]}")
    shapes = {}
    for name, (dtype, itemsize) in TABLE.items():
        entry = header[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0):
            raise PackError(f"{path}: tensor {name} has shape {str(shape)[:40]}; it must be one-dimensional")
        if entry.get("dtype") != dtype:
            raise PackError(f"{path}: tensor {name} is stored as {str(entry.get('dtype'))[:20]}; it must be {dtype}")
        span = entry.get("data_offsets")
        if not (isinstance(span, list) and len(span) == 2 and all(type(o) is int for o in span)
                and 0 <= span[0] <= span[1] <= data_bytes and span[1] - span[0] == shape[0] * itemsize):
            raise PackError(f"{path}: tensor {name} declares bytes {str(span)[:60]}, which do not fit its shape "
                            f"or the file's {data_bytes:,} bytes of data")
        shapes[name] = shape[0]
    n = shapes["labels"]
    if n > MAX_PHOTOS or shapes["roles"] != n or shapes["offsets"] != n + 1:
        raise PackError(f"{path}: {n:,} labels, {shapes['roles']:,} roles and {shapes['offsets']:,} offsets; "
                        f"a pack holds N, N and N+1, N at most {MAX_PHOTOS:,}")
    if shapes["jpeg"] > MAX_JPEG_BYTES:
        raise PackError(f"{path}: {shapes['jpeg']:,} bytes of photos; a pack holds at most {MAX_JPEG_BYTES:,}")
    return n


def _check_index(classes: list, names: list, labels: list, roles: list, where: str) -> None:
    """Classes, then each photo's role, label and name (unique in its role, case folded)."""
    if len(classes) > MAX_CLASSES or len(names) > MAX_PHOTOS:
        raise PackError(f"{where}: {len(classes):,} classes and {len(names):,} photos; at most {MAX_CLASSES:,} and {MAX_PHOTOS:,}")
    if len({c.casefold() for c in classes if isinstance(c, str)}) != len(classes):
        raise PackError(f"{where}: class names repeat (or differ only by case)")
    for c in classes:
        if not (isinstance(c, str) and len(c) <= CHECKPOINT_LIMITS.max_class_name and _plain(c)):
            raise PackError(f"{where}: class name {str(c)[:60]!r} is not a plain folder name of 1 to 200 characters")
    seen: set[tuple[int, str]] = set()
    for name, label, role in zip(names, labels, roles):
        if not 0 <= role < len(ROLES):
            raise PackError(f"{where}: photo {str(name)[:60]!r} has role {role}; roles are 0 to {len(ROLES) - 1}")
        if ROLES[role] == "labelled" and not 0 <= label < len(classes):
            raise PackError(f"{where}: photo {str(name)[:60]!r} has label {label}; there are {len(classes)} classes")
        if ROLES[role] != "labelled" and label != -1:
            raise PackError(f"{where}: {ROLES[role]} photo {str(name)[:60]!r} has label {label}; it must be -1")
        _check_name(name, ROLES[role], classes[label] if label >= 0 else None, where)
        if (role, name.casefold()) in seen:
            raise PackError(f"{where}: the name {name[:60]!r} is there twice (case folded)")
        seen.add((role, name.casefold()))


def _plain(part: str) -> bool:
    """A file or folder name every loader reads: no separator, control character, or hidden or ignored name."""
    return (bool(part) and not part.startswith(".") and part not in IGNORED
            and not any(c in "/\\" or ord(c) < 32 for c in part))


def _check_name(name, role: str, class_name: str | None, where: str) -> None:
    parts = name.split("/") if isinstance(name, str) else []
    for wrong, problem in (
            (not (isinstance(name, str) and len(name) <= MAX_NAME and all(_plain(p) for p in parts)),
             f"must be a relative path of plain names (no '..', no hidden part), 1 to {MAX_NAME} characters"),
            (Path(str(name)).suffix.lower() not in IMAGE_EXTENSIONS, "does not end in an image extension"),
            (role == "labelled" and (len(parts) != 2 or parts[0] != class_name), f"must be {class_name!s:.60}/<file>"),
            (len(parts) > 3, "has more than two folder levels")):
        if wrong:
            raise PackError(f"{where}: {role} photo name {str(name)[:80]!r} {problem}")


def _jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's one frame header, read marker by marker up to its first scan;
    None if it is no JPEG, is cut short, or declares more than one frame before its scan."""
    if blob[:2] != b"\xff\xd8":
        return None
    i, size = 2, None
    while i + 4 <= len(blob):
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(blob[i + 2:i + 4], "big")
        if marker == 0x01 or 0xD0 <= marker <= 0xD9 or length < 2:  # no such marker before a scan
            return None
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if size is not None or i + 9 > len(blob):
                return None
            size = (int.from_bytes(blob[i + 7:i + 9], "big"), int.from_bytes(blob[i + 5:i + 7], "big"))
        elif marker == 0xDA:
            return size
        i += 2 + length
    return None


def unpack(path: str | os.PathLike, folder: str | os.PathLike) -> dict[str, Path]:
    """Write the pack's photos under ``folder`` (``labelled/<class>/<file>``, ``unlabelled/...``,
    ``negative/...``, each folder made new) for :func:`resnext.data.load_dataset` and ``image_files``;
    returns ``{role: folder/role}``. Raises as :func:`read_pack`, or PackError if a folder exists."""
    pack, folder = read_pack(path), Path(folder)
    out = {role: folder / role for role in ROLES}
    if any(where.exists() for where in out.values()):
        raise PackError(f"{folder}: holds {'/, '.join(ROLES)}/ already; unpack into a new folder")
    for where in out.values():
        where.mkdir(parents=True)
    for i, (name, role) in enumerate(zip(pack.names, pack.roles)):
        (out[role] / name).parent.mkdir(parents=True, exist_ok=True)
        with (out[role] / name).open("xb") as f:  # never over a file: names were checked unique
            f.write(pack.jpeg(i))
    return out
