"""Make ``assets/species/``: one reference photo per species of the default model, the first photo
of each species in ``cub100/train`` (sorted by name), 160 px on its longer side.

    python assets/make_species.py ../shared/data/cub100/train
"""

import sys
from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parent / "species"
SIDE = 160


def main(train: Path) -> None:
    OUT.mkdir(exist_ok=True)
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        first = sorted(folder.glob("*.jpg"))[0]
        with Image.open(first) as image:
            image = image.convert("RGB")
            image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
            image.save(OUT / f"{folder.name}.jpg", quality=82, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
