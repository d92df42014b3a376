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


def save_references(model: Path, train: list) -> None:
    """One training photo per class (the first), shrunk, beside ``model``."""
    folder = refs_folder(model)
    folder.mkdir(exist_ok=True)
    seen = set()
    for path, label in train:
        if label in seen:
            continue
        seen.add(label)
        image = load_image(path, shrink_to=SIDE)
        image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
        image.save(folder / f"{label:05d}.jpg", quality=82)  # by class index: names may not be file names
