"""Unpacking a zip a visitor brings: nothing lands outside its folder, nothing explodes.

Entry count, declared sizes, every entry's path, kind and compression ratio are checked before
anything is written, and the bytes written are counted in case the declared sizes lie. The
errors raised here are the data sets' (:mod:`resnext.data` re-exports them).
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["DataError", "IGNORED", "IMAGE_EXTENSIONS", "LoadingStopped", "ZipLimits", "safe_extract", "unpacked_size"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IGNORED = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


class DataError(ValueError):
    """A data set that cannot be used; the message names the problem."""


class LoadingStopped(DataError):
    """``should_stop`` said stop while the data was being extracted or checked."""


@dataclass(frozen=True)
class ZipLimits:
    """Caps on what a zip may unpack to (zip bombs), checked before and while extracting."""

    max_files: int = 20_000
    max_bytes: int = 2 * 1024**3  # uncompressed total
    max_ratio: int = 200  # uncompressed / compressed, per entry and for the whole zip; JPEGs are ~1, PNGs < 10
    max_depth: int = 16  # folders in an entry's path (class/train/photo.jpg is 2)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, limits: ZipLimits = ZipLimits(),
                 should_stop: Callable[[], bool] | None = None, max_images: int | None = None) -> list[tuple[str, str]]:
    """Extract a zip into ``dest``, refusing anything that could land outside it or explode.

    Absolute paths, ``..`` components, drive letters and symlink entries are refused (the whole
    archive: such a zip is hostile, not merely untidy). Entry count, total declared size and
    per-entry compression ratio are checked first; the bytes actually written are counted too,
    in case the declared sizes lie. Folders named in :data:`IGNORED` are skipped.

    ``max_images``: refuse a zip with more entries named as images (before writing any);
    ``should_stop`` is asked before each entry.

    Returns:
        Entries skipped as harmless (e.g. ``__MACOSX``), as (name, reason).

    Raises:
        DataError: not a zip, a hostile entry, or a limit exceeded.
        LoadingStopped: ``should_stop`` said stop.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, UnicodeDecodeError) as err:
        raise DataError(f"{archive.name}: not a readable zip file ({err})") from None
    skipped = []
    with zf:
        entries = zf.infolist()
        _check_archive(archive, entries, limits)
        images = sum(PurePosixPath(e.filename).suffix.lower() in IMAGE_EXTENSIONS for e in entries)
        if max_images is not None and images > max_images:
            raise DataError(f"{archive.name}: {images:,} photos; one training run takes at most {max_images:,}")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        for entry in entries:
            if should_stop is not None and should_stop():
                raise LoadingStopped(f"{archive.name}: stopped while unpacking")
            parts = PurePosixPath(entry.filename.replace("\\", "/")).parts
            if any(p in IGNORED or p.startswith("._") for p in parts):
                skipped.append((entry.filename, "system file"))
                continue
            target = root.joinpath(*parts)
            if not target.resolve().is_relative_to(root):  # belt and braces after _check_entry
                raise DataError(f"{archive.name}: entry {entry.filename!r} would be written outside the folder")
            try:
                if entry.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(entry) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > limits.max_bytes:
                            raise DataError(f"{archive.name}: unpacks to more than {limits.max_bytes:,} bytes")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, UnicodeDecodeError) as err:
                raise DataError(f"{archive.name}: damaged or unsupported entry {entry.filename!r} ({err})") from None
            except OSError as err:  # a file and a folder of one name, a name too long for the disk...
                raise DataError(f"{archive.name}: cannot extract entry {entry.filename!r} ({err.strerror or err})") from None
    return skipped


def unpacked_size(archive: str | os.PathLike) -> int:
    """The bytes a zip declares it unpacks to (its entries' sizes, read from its directory).

    Raises:
        DataError: not a readable zip.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(entry.file_size for entry in zf.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, UnicodeDecodeError) as err:
        raise DataError(f"{Path(archive).name}: not a readable zip file ({err})") from None


def _check_archive(archive: Path, entries: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    """What the zip declares, before anything is written: entry count, total size, every entry,
    and the expansion of the whole (many small entries, each under the per-entry check)."""
    if len(entries) > limits.max_files:
        raise DataError(f"{archive.name}: {len(entries):,} entries; the limit is {limits.max_files:,}")
    declared = sum(e.file_size for e in entries)
    if declared > limits.max_bytes:
        raise DataError(f"{archive.name}: unpacks to {declared:,} bytes; the limit is {limits.max_bytes:,}")
    for entry in entries:
        _check_entry(archive.name, entry, limits)
    compressed = max(1, archive.stat().st_size)
    if declared > 16 * 1024**2 and declared / compressed > limits.max_ratio:
        raise DataError(f"{archive.name}: {compressed:,} bytes that unpack to {declared:,} "
                        f"({declared // compressed}x); refusing a likely zip bomb")


def _check_entry(name: str, entry: zipfile.ZipInfo, limits: ZipLimits) -> None:
    if not entry.filename:  # zipfile cuts a name at a NUL byte; an empty one breaks ZipInfo.is_dir
        raise DataError(f"{name}: an entry has no name; refusing the zip")
    filename = entry.filename.replace("\\", "/")
    path = PurePosixPath(filename)
    if path.is_absolute() or ".." in path.parts or (len(filename) > 1 and filename[1] == ":"):
        raise DataError(f"{name}: entry {entry.filename!r} points outside the folder; refusing the zip")
    if len(path.parts) > limits.max_depth + 1:
        raise DataError(f"{name}: entry {entry.filename[:80]!r}... is {len(path.parts) - 1} folders deep; "
                        f"the limit is {limits.max_depth}")
    mode = entry.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DataError(f"{name}: entry {entry.filename!r} is a symbolic link; refusing the zip")
    if entry.flag_bits & 0x1:
        raise DataError(f"{name}: entry {entry.filename!r} is encrypted; upload a zip without a password")
    if entry.compress_size and entry.file_size / entry.compress_size > limits.max_ratio and entry.file_size >= 1 << 16:
        raise DataError(
            f"{name}: entry {entry.filename!r} expands {entry.file_size // entry.compress_size}x; "
            "refusing a likely zip bomb"
        )
