"""Few-shot fine-tunes as a visitor makes them: N episodes of K random species x 4 photos.

Each episode copies 4 photos of each of K random species of ``birds525-valid-480`` into a class
folder tree (the 5th photo of each is held out), trains through the command line the app uses
(``python -m resnext train --mode quick``), then asks the new model about

- the held-out photos: top-1 accuracy;
- its own training photos: the share it answers "species" (a model should be sure of what it was
  taught), "unsure" and "not a bird".

    python benchmarks/finetune_episodes.py ../shared/data/birds525-valid-480 --episodes 16

Prints one line per episode and the totals as JSON. Needs the data set (not shipped).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def episode(source: Path, species: list[str], work: Path, mode: str, extra: list[str]) -> dict:
    from resnext import load_classifier
    from resnext.transforms import load_image

    data = work / "data"
    held = []
    for name in species:
        photos = sorted((source / name).glob("*.jpg"))
        (data / name).mkdir(parents=True)
        for p in photos[:4]:
            shutil.copy(p, data / name / p.name)
        held += [(p, name) for p in photos[4:5]]
    out = work / "model.safetensors"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "resnext", "train", str(data), "--out", str(out), "--mode", mode, *extra],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    classifier = load_classifier(out)
    own = [(p, p.parent.name) for p in sorted(data.rglob("*.jpg"))]
    answers = classifier.predict([load_image(p) for p, _ in held + own], k=1)
    held_right = sum(a[0].label == y for a, (_, y) in zip(answers[: len(held)], held))
    verdicts = [a.verdict for a in answers[len(held):]]
    own_right = sum(a[0].label == y for a, (_, y) in zip(answers[len(held):], own))
    return {"held_out": len(held), "held_out_right": held_right, "own": len(own), "own_right": own_right,
            **{v: verdicts.count(v) for v in ("species", "unsure", "not_a_bird")},
            "unsure_below": classifier.rules.unsure_below, "bird_check": classifier.rules.bird_below is not None,
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="birds525-valid-480 (one folder of 5 photos per species)")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--species", type=int, default=5)
    parser.add_argument("--mode", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    sys.path.insert(0, str(ROOT))
    names = sorted(d.name for d in args.data.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 5)
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.episodes):
        with tempfile.TemporaryDirectory() as work:
            row = episode(args.data, rng.sample(names, args.species), Path(work), args.mode, extra)
        rows.append(row)
        print(json.dumps({"episode": i, **row}), flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("held_out", "held_out_right", "own", "own_right", "species",
                                                  "unsure", "not_a_bird")}
    print(json.dumps({
        "episodes": len(rows), "held_out_top1": round(total["held_out_right"] / total["held_out"], 4),
        "own_top1": round(total["own_right"] / total["own"], 4),
        "own_species": round(total["species"] / total["own"], 4), "own_unsure": round(total["unsure"] / total["own"], 4),
        "own_not_a_bird": round(total["not_a_bird"] / total["own"], 4),
        "mean_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 1), **total}))


if __name__ == "__main__":
    main()
