"""Reference photos, one per class, so a visitor can compare an answer with what each species
looks like (as Merlin shows "best match / also possible"): the default model's ship in
``assets/species/`` (one CUB training photo per species, under the example photos' terms); a
fine-tune keeps one of its own training photos per class beside its file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from resnext import Classifier, load_image

from .state import refs_folder

SPECIES = Path(__file__).resolve().parents[1] / "assets" / "species"
SIDE = 160


def reference(classifier: Classifier, label: str) -> Path | None:
    """A photo of class ``label``: the model's own (a fine-tune's), else the shipped one of that
    species, else None."""
    own = classifier.path and label in classifier.classes
    candidates = [refs_folder(classifier.path) / f"{classifier.classes.index(label):05d}.jpg"] if own else []
    candidates.append(SPECIES / f"{label}.jpg")
    return next((p for p in candidates if p.is_file()), None)


def thumbnails(photos: list, per_class: int, side: int, most: int | None = None) -> list[tuple[Image.Image, int]]:
    """The first ``per_class`` photos of each class in ``photos`` (``[(path, label)]``), at most
    ``most`` in all, shrunk to ``side`` pixels: ``[(thumbnail, label)]``."""
    out, per = [], {}
    for path, label in photos:
        if per.get(label, 0) >= per_class or (most is not None and len(out) >= most):
            continue
        image = load_image(path, shrink_to=side)
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out.append((image, label))
        per[label] = per.get(label, 0) + 1
    return out


def save_references(model: Path, train: list) -> None:
    """One training photo per class (the first), shrunk, beside ``model``."""
    folder = refs_folder(model)
    folder.mkdir(exist_ok=True)
    for image, label in thumbnails(train, per_class=1, side=SIDE):
        image.save(folder / f"{label:05d}.jpg", quality=82)  # by class index: names may not be file names
