"""Accuracy of a checkpoint on a class-folder tree (folder names matched to its classes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import IMAGE_EXTENSIONS, DataError
from .inference import Classifier
from .transforms import ImageLoadError

__all__ = ["evaluate"]


def evaluate(classifier: Classifier, folder: str | os.PathLike, batch_size: int = 32) -> dict:
    """Top-1/top-5 accuracy, per-class accuracy and counts, and what was skipped.

    Sub-folders of ``folder`` are matched to the classifier's class names; a folder the model does
    not know is reported in ``unknown_folders`` and skipped, as is an unreadable image.

    Returns:
        ``{"top1", "top5", "n", "per_class": {label: acc}, "counts": {label: n},
        "confusion": [[...]], "mean_confidence_correct", "mean_confidence_wrong",
        "unknown_folders": [...], "skipped": [{"file", "reason"}]}``

    Raises:
        FileNotFoundError: no such folder. DataError: no folder matches a class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    index = {name: i for i, name in enumerate(classifier.classes)}
    items, unknown, skipped = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in index:
            unknown.append(sub.name)
            continue
        items += [(f, index[sub.name]) for f in sorted(sub.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise DataError(f"{folder}: no image in a folder named after one of the model's {len(index)} classes")
    k = min(5, len(index))
    n_classes = len(index)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    top5 = 0
    confidences = {True: [], False: []}
    for start in range(0, len(items), batch_size):
        batch, labels = [], []
        for path, label in items[start : start + batch_size]:
            try:
                batch.append(classifier.preprocess(path))
                labels.append(label)
            except (ImageLoadError, OSError) as err:
                skipped.append({"file": str(path.relative_to(folder)), "reason": str(err)})
        if not batch:
            continue
        probs = torch.softmax(classifier.logits(classifier.features(torch.cat(batch))), dim=1).cpu()
        best = probs.topk(k, dim=1)
        for label, p_row, i_row in zip(labels, best.values, best.indices):
            confusion[label, i_row[0]] += 1
            top5 += int(label in i_row.tolist())
            confidences[bool(i_row[0] == label)].append(p_row[0].item())
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
        "unknown_folders": unknown,
        "skipped": skipped,
    }
