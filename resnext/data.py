"""Training data from class folders or zips: safe extraction, validation, splits, a report.

A data set is a folder with one sub-folder per class (class names are folder names, spaces,
dashes and non-ASCII letters included), optionally inside one wrapping folder, optionally split
into ``train/`` and ``val/`` (or ``test/``). A ``.zip`` of such a folder is extracted first, with
limits that stop zip-slip and zip bombs. Every file that is not used is listed in the report with
the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .checkpoint import LIMITS as CHECKPOINT_LIMITS
from .archive import IGNORED, IMAGE_EXTENSIONS, DataError, LoadingStopped, ZipLimits, safe_extract, unpacked_size
from .imagefile import ImageLoadError, load_image, probe_image

__all__ = [
    "DataError",
    "Dataset",
    "DataReport",
    "IMAGE_EXTENSIONS",
    "LoadingStopped",
    "TrainingLimits",
    "ZipLimits",
    "load_dataset",
    "safe_extract",
    "unpacked_size",
]

MIN_SIDE = 16  # smaller images carry no usable detail
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}


@dataclass(frozen=True)
class TrainingLimits:
    """What one training run's photos may cost, counted from the files' headers before any of them
    is decoded: a zip of 20,000 PNGs of 64 megapixels each is 5 MB, and decoding it took hours."""

    max_photos: int = 6_000  # 12 classes of 500, the most the app's class boxes take
    # Pixels decoded over the run; a JPEG counts a sixteenth of its pixels, as training decodes it
    # at a quarter of its sides or less (6,000 phone photos of 12 MP are 4.5 billion).
    max_decoded_pixels: int = 6_000_000_000


@dataclass
class DataReport:
    """What was found: classes, images per class and split, and every skipped file with why."""

    classes: list[str]
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split: str = "random"  # "random" (seeded, stratified) or "folders" (train/ + val/)

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "train_counts": self.train_counts,
            "val_counts": self.val_counts,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "split": self.split,
        }

    def summary(self) -> str:
        lines = [
            f"{len(self.classes)} classes, {sum(self.train_counts.values())} training and "
            f"{sum(self.val_counts.values())} validation images ({self.split} split)"
        ]
        for name in self.classes:
            lines.append(f"  {name}: {self.train_counts[name]} train, {self.val_counts[name]} val")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {f}: {r}" for f, r in self.skipped[:50]]
            if len(self.skipped) > 50:
                lines.append(f"  ... and {len(self.skipped) - 50} more")
        return "\n".join(lines)


@dataclass
class Dataset:
    """Image paths with class indices, split into train and validation."""

    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    report: DataReport
    root: Path


def _class_root(folder: Path) -> Path:
    """Step into a single wrapping folder (``birds/Cardinal/...`` inside a zip, for instance)."""
    while True:
        children = [c for c in folder.iterdir() if c.name not in IGNORED and not c.name.startswith(".")]
        dirs = [c for c in children if c.is_dir()]
        files = [c for c in children if c.is_file()]
        if len(dirs) == 1 and not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
            inner = dirs[0]
            if any(d.is_dir() for d in inner.iterdir()):  # its children are class folders
                folder = inner
                continue
        return folder


class _Budget:
    """The run's photos and decoded pixels so far, against :class:`TrainingLimits`, and the stop
    request: asked before each photo is looked at."""

    def __init__(self, where: str, limits: TrainingLimits, should_stop: Callable[[], bool] | None):
        self.where, self.limits, self.should_stop = where, limits, should_stop or (lambda: False)
        self.photos = self.pixels = 0

    def count(self, files: list[Path]) -> None:
        """Files about to be looked at (before any is opened): those named as images are photos."""
        self.photos += sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)
        if self.photos > self.limits.max_photos:
            raise DataError(f"{self.where}: {self.photos:,} photos or more; one training run takes at most "
                            f"{self.limits.max_photos:,}")

    def spend(self, pixels: int) -> None:
        self.pixels += pixels
        if self.pixels > self.limits.max_decoded_pixels:
            raise DataError(f"{self.where}: the photos add up to over {self.limits.max_decoded_pixels / 1e6:,.0f} megapixels "
                            "to decode (JPEGs count a sixteenth), the most one training run decodes here; use fewer or "
                            "smaller photos")

    def check_stop(self) -> None:
        if self.should_stop():
            raise LoadingStopped(f"{self.where}: stopped while checking the photos")


def _check_image(path: Path, budget: _Budget) -> str | None:
    """Why ``path`` cannot be a training image, or None if it can. Its header is read first, and
    its decoding cost counted against ``budget``, before a pixel is decoded: a PNG is then only
    verified (its chunks' checksums), anything else decoded small (a JPEG at 1/8 scale)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image (extension)"
    try:
        header = probe_image(path)
        budget.spend(header.decode_cost(reduced=True))
        if header.format == "PNG":
            with Image.open(path) as image:
                image.verify()
            size = header.size
        else:
            size = load_image(path, shrink_to=4 * MIN_SIDE).size
    except (ImageLoadError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = str(err).split(": ", 1)[-1]
        return reason if "too large" in reason or "too long" in reason else f"unreadable ({reason})"
    if min(header.size) < MIN_SIDE or min(size) < MIN_SIDE:
        return f"too small ({header.size[0]}x{header.size[1]}, needs {MIN_SIDE} px per side)"
    return None


def _scan_classes(folder: Path, skipped: list[tuple[str, str]], base: Path, budget: _Budget,
                  limit: int | None = None) -> dict[str, list[Path]]:
    """Class name -> usable images (recursively under each class folder); the first ``limit`` classes."""
    classes: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name in IGNORED or entry.name.startswith("."):
            continue
        if limit is not None and entry.is_dir() and len(classes) >= limit:
            break
        if not entry.is_dir():
            skipped.append((str(entry.relative_to(base)), "file outside any class folder"))
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file()
                       and not any(part in IGNORED or part.startswith(".") for part in p.relative_to(entry).parts))
        budget.count(files)
        images = []
        for path in files:
            budget.check_stop()
            reason = _check_image(path, budget)
            if reason:
                skipped.append((str(path.relative_to(base)), reason))
            else:
                images.append(path)
        classes[entry.name] = images
    return classes


def _validate(classes: dict[str, list[Path]], where: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{where}: found {len(classes)} class folder(s); at least 2 are needed")
    longest = max(classes, key=len)
    if len(longest) > CHECKPOINT_LIMITS.max_class_name:  # a model could be saved, then never loaded
        raise DataError(f"{where}: the class name {longest[:40]!r}… has {len(longest)} characters; a class name has at "
                        f"most {CHECKPOINT_LIMITS.max_class_name}")
    empty = [name for name, images in classes.items() if not images]
    if empty:
        raise DataError(f"{where}: class {empty[0]!r} has no usable image" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    folded = Counter(name.casefold() for name in classes)
    clashes = sorted(name for name in classes if folded[name.casefold()] > 1)
    if clashes:
        if len(clashes) > 6:
            named = ", ".join(f"'{name}'" for name in clashes[:5]) + f", … ({len(clashes)} names)"
        else:
            named = ", ".join(f"'{name}'" for name in clashes[:-1]) + f" and '{clashes[-1]}'"
        raise DataError(f"{where}: class names differ only by upper and lower case: {named}; rename one, "
                        "or put their photos in one folder")


def _random_split(classes: dict[str, list[Path]], val_split: float, seed: int):
    """Stratified: ``val_split`` of each class (at least one image when a class has 2 or more)."""
    rng = random.Random(seed)
    train, val = {}, {}
    for name, images in classes.items():
        images = list(images)
        rng.shuffle(images)
        n_val = round(len(images) * val_split)
        if val_split > 0 and len(images) >= 2:
            n_val = min(max(n_val, 1), len(images) - 1)
        val[name], train[name] = images[:n_val], images[n_val:]
    return train, val


def load_dataset(
    source: str | os.PathLike,
    val_split: float = 0.15,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    max_classes: int | None = None,
    limits: TrainingLimits = TrainingLimits(),
    should_stop: Callable[[], bool] | None = None,
    zip_limits: ZipLimits = ZipLimits(),
) -> Dataset:
    """Find, check and split a data set.

    Args:
        source: a class-folder tree, or a ``.zip`` of one (extracted into ``workdir``).
        val_split: fraction of each class held out for validation when there are no
            ``train/`` and ``val/`` (or ``test/``) folders.
        seed: for the split.
        workdir: where a zip is extracted (default: a new temporary folder; the caller removes it,
            it is ``Dataset.root``'s top).
        max_classes: use only the first N class folders (in name order), e.g. to try a big set.
        limits: photos and decoded pixels, counted from headers before anything is decoded.
        should_stop: asked before each zip entry and each photo; True ends with :class:`LoadingStopped`.
        zip_limits: what a zip may unpack to (:func:`safe_extract`).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataError: fewer than 2 classes, an empty class, case-clashing or too long names, a bad
            zip, too many photos or pixels.
        LoadingStopped: ``should_stop`` said stop.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or zip file")
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")
    skipped: list[tuple[str, str]] = []
    folder, made = source, False
    if source.is_file():
        if source.suffix.lower() != ".zip":
            raise DataError(f"{source.name}: expected a folder or a .zip file")
        made = workdir is None
        folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="resnext-data-"))
    try:
        if folder is not source:
            skipped += safe_extract(source, folder, zip_limits, should_stop=should_stop, max_images=limits.max_photos)
        try:
            return _split(source, folder, val_split, seed, skipped, max_classes, _Budget(source.name, limits, should_stop))
        except RecursionError:  # a folder tree thousands deep
            raise DataError(f"{source.name}: folders nested too deeply") from None
    except BaseException:
        if made:  # nobody else knows this folder exists
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _split(source: Path, folder: Path, val_split: float, seed: int, skipped: list[tuple[str, str]],
           max_classes: int | None, budget: _Budget) -> Dataset:
    """Scan the class folders under ``folder`` and split them (by sub-folders, or at random)."""
    root = _class_root(folder)
    splits = {SPLIT_NAMES[d.name.lower()]: d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES}
    if "train" in splits and "val" in splits:
        train = _scan_classes(splits["train"], skipped, folder, budget, max_classes)
        val = _scan_classes(splits["val"], skipped, folder, budget)
        _validate(train, f"{source.name}/{splits['train'].name}")
        unknown = sorted(set(val) - set(train))
        for name in unknown:
            skipped.append((f"{splits['val'].name}/{name}", "validation class absent from train/"))
        val = {name: val.get(name, []) for name in train}
        split = "folders"
    else:
        train, val = _random_split(_scan_classes(root, skipped, folder, budget, max_classes), val_split, seed)
        _validate({n: train[n] + val[n] for n in train}, source.name)
        split = "random"
    classes = list(train)
    index = {name: i for i, name in enumerate(classes)}
    report = DataReport(
        classes=classes,
        train_counts={n: len(train[n]) for n in classes},
        val_counts={n: len(val[n]) for n in classes},
        skipped=skipped,
        split=split,
    )
    return Dataset(
        classes=classes,
        train=[(p, index[n]) for n in classes for p in train[n]],
        val=[(p, index[n]) for n in classes for p in val[n]],
        report=report,
        root=folder,
    )
