"""Accuracy of a checkpoint on a class-folder tree (folder names matched to its classes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import IMAGE_EXTENSIONS, DataError
from .inference import Classifier
from .transforms import ImageLoadError, load_image, wider_shot
from .verdict import VERDICTS

__all__ = ["TOO_FEW_TO_JUDGE", "evaluate", "validation_text", "verdict_rates"]

TOO_FEW_TO_JUDGE = 30  # validation photos under which an accuracy is a rough sign, not a measurement


def validation_text(right: int, n: int) -> str:
    """A validation accuracy with its count and what it is worth: "3 of 3 validation photos right
    (100%): too few to judge", never a bare percentage."""
    if not n:
        return "not measured (no validation photos)"
    text = f"{right} of {n} validation photos right ({right / n:.0%})"
    return text + (": too few to judge" if n < TOO_FEW_TO_JUDGE else "")


def evaluate(classifier: Classifier, folder: str | os.PathLike, batch_size: int = 32, zoom_out: float = 1.0,
             find_bird: bool = True) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy and counts, verdicts, and what was skipped.

    Sub-folders of ``folder`` are matched to the classifier's class names; a folder the model does
    not know is reported in ``unknown_folders`` and skipped, as is an unreadable image. Answers
    are the classifier's full answers (:meth:`Classifier.predict`, find-the-bird included unless
    ``find_bird`` is False). ``zoom_out`` > 1 makes every photo a wider shot first
    (:func:`~resnext.transforms.wider_shot`: the bird at 1/``zoom_out`` of the frame).

    Returns:
        ``{"top1", "top5", "n", "per_class": {label: acc}, "counts": {label: n},
        "confusion": [[...]], "mean_confidence_correct", "mean_confidence_wrong",
        "verdicts": {verdict: fraction}, "found_bird": fraction,
        "unknown_folders": [...], "skipped": [{"file", "reason"}]}``

    Raises:
        FileNotFoundError: no such folder. DataError: no folder matches a class.
    """
    folder = Path(folder)
    items, unknown = _labelled_files(folder, classifier.classes)
    skipped = []
    n_classes = len(classifier.classes)
    k = min(5, n_classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    top5 = 0
    confidences = {True: [], False: []}
    verdicts = dict.fromkeys(VERDICTS, 0)
    found = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch, kept, failed = _photos([path for path, _ in chunk], zoom_out)
        skipped += [{"file": str(chunk[i][0].relative_to(folder)), "reason": reason} for i, reason in failed]
        labels = [chunk[i][1] for i in kept]
        for label, answer in zip(labels, classifier.predict(batch, k=k, batch_size=batch_size, find_bird=find_bird) if batch else []):
            confusion[label, answer[0].index] += 1
            top5 += int(label in [p.index for p in answer])
            confidences[answer[0].index == label].append(answer[0].prob)
            verdicts[answer.verdict] += 1
            found += answer.found
    n = int(confusion.sum())
    totals = confusion.sum(1)
    present = [i for i in range(n_classes) if totals[i] > 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "top1": confusion.diag().sum().item() / n,
        "top5": top5 / n,
        "n": n,
        "per_class": {classifier.classes[i]: confusion[i, i].item() / totals[i].item() for i in present},
        "counts": {classifier.classes[i]: int(totals[i]) for i in present},
        "confusion": confusion.tolist(),
        "mean_confidence_correct": mean(confidences[True]),
        "mean_confidence_wrong": mean(confidences[False]),
        "verdicts": {v: c / n for v, c in verdicts.items()},
        "found_bird": found / n,
        "unknown_folders": unknown,
        "skipped": skipped,
    }


def _photos(paths: list, zoom_out: float) -> tuple[list, list[int], list[tuple[int, str]]]:
    """The readable photos among ``paths`` (wider shots when ``zoom_out`` > 1), their positions,
    and (position, reason) for each unreadable file."""
    photos, kept, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            photo = load_image(path)
        except (ImageLoadError, OSError) as err:
            failed.append((i, str(err)))
            continue
        photos.append(wider_shot(photo, zoom_out) if zoom_out > 1 else photo)
        kept.append(i)
    return photos, kept, failed


def _labelled_files(folder: Path, classes: list[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, class index) for every image in a sub-folder named after a class; the other
    sub-folders' names."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    index = {name: i for i, name in enumerate(classes)}
    items, unknown = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in index:
            unknown.append(sub.name)
            continue
        items += [(f, index[sub.name]) for f in sorted(sub.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise DataError(f"{folder}: no image in a folder named after one of the model's {len(index)} classes")
    return items, unknown


def verdict_rates(classifier: Classifier, paths: list, batch_size: int = 32, zoom_out: float = 1.0) -> dict:
    """The share of each verdict over image files of any kind (no labels needed): for birds of
    other species (which should be "unsure") and photos with no bird ("not_a_bird").
    Unreadable files are skipped and counted."""
    verdicts = dict.fromkeys(VERDICTS, 0)
    skipped = 0
    for start in range(0, len(paths), batch_size):
        photos, _, failed = _photos(paths[start : start + batch_size], zoom_out)
        skipped += len(failed)
        for answer in classifier.predict(photos, k=1, batch_size=batch_size) if photos else []:
            verdicts[answer.verdict] += 1
    n = sum(verdicts.values())
    return {"n": n, "skipped": skipped, **{v: (c / n if n else None) for v, c in verdicts.items()}}
