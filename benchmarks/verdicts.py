"""Accuracy on plain and wider shots, and the verdicts on birds, other species and non-birds.

    python benchmarks/verdicts.py KNOWN_DIR [--zoom 1 2 3] [--other DIR ...] [--nonbird DIR ...]
                                  [--scenes DIR ...] [--kinds rect ellipse ...] [--checkpoint PATH] [--json]

KNOWN_DIR is a class-folder tree of the model's own classes (e.g. ``cub100/test``); each photo is
also made a wider shot (``--zoom 2``: the bird at 1/2 of the frame, its edges stretched outwards
and blurred; see ``resnext.transforms.wider_shot``). ``--other`` folders hold birds of species the
model does not know (they should come out "unsure"), ``--nonbird`` folders photos with no bird
("not_a_bird"). ``--scenes`` folders hold real photos with no bird (of any shape): every 3rd photo
of KNOWN_DIR is pasted into one of them at 1/3 of its shorter side, at a random place (seeded),
once per ``--kinds`` (a rectangle, a feathered ellipse, a blob, a blurred alpha:
``resnext.recipes.pastes``; default rect and ellipse), and the top-1 on those is reported beside the top-1 on the same photos plain, with their ratio and how
often the box find-the-bird classified holds the bird (at least half of it, and IoU > 0.5).
Answers are the classifier's full answers: find-the-bird and verdict included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnext.evaluate import evaluate, verdict_rates  # noqa: E402
from resnext.inference import DEFAULT_CHECKPOINT, load_classifier  # noqa: E402
from resnext.recipes.pastes import KINDS, paste  # noqa: E402
from resnext.training.distill import image_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("known", type=Path)
    parser.add_argument("--zoom", type=float, nargs="+", default=[1, 2, 3])
    parser.add_argument("--other", type=Path, nargs="*", default=[])
    parser.add_argument("--nonbird", type=Path, nargs="*", default=[])
    parser.add_argument("--scenes", type=Path, nargs="*", default=[])
    parser.add_argument("--kinds", nargs="+", default=["rect", "ellipse"], choices=KINDS)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    classifier = load_classifier(args.checkpoint, device="cpu")
    result = {"checkpoint": args.checkpoint.name, "known": {}}
    for zoom in args.zoom:
        start = time.perf_counter()
        report = evaluate(classifier, args.known, zoom_out=zoom)
        result["known"][f"1/{zoom:g}"] = {
            "n": report["n"], "top1": round(report["top1"], 4), "top5": round(report["top5"], 4),
            "verdicts": {k: round(v, 4) for k, v in report["verdicts"].items()},
            "found_bird": round(report["found_bird"], 4), "seconds": round(time.perf_counter() - start, 1),
        }
    for name in ("other", "nonbird"):
        folders = getattr(args, name)
        if folders:
            rates = verdict_rates(classifier, image_files(folders))
            result[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rates.items()}
    if args.scenes:
        result["scenes"] = {kind: in_scenes(classifier, args.known, image_files(args.scenes), kind=kind) for kind in args.kinds}
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {result['checkpoint']}")
    for frame, r in result["known"].items():
        v = r["verdicts"]
        print(f"bird at {frame:>5} of the frame: top-1 {r['top1']:.1%}  top-5 {r['top5']:.1%}  "
              f"species {v['species']:.1%} · unsure {v['unsure']:.1%} · not a bird {v['not_a_bird']:.1%}  "
              f"(looked closer: {r['found_bird']:.1%}; {r['n']} photos)")
    for name, label in (("other", "other species"), ("nonbird", "no bird")):
        if name in result:
            r = result[name]
            print(f"{label:>13}: species {r['species']:.1%} · unsure {r['unsure']:.1%} · not a bird {r['not_a_bird']:.1%}  "
                  f"({r['n']} photos)")
    for kind, r in result.get("scenes", {}).items():
        v = r["verdicts"]
        print(f"bird at 1/3 of a real scene ({kind}): top-1 {r['top1']:.1%} vs {r['plain_top1']:.1%} plain (ratio {r['ratio']:.2f})  "
              f"species {v['species']:.1%} · unsure {v['unsure']:.1%} · not a bird {v['not_a_bird']:.1%}  "
              f"box on the bird {r['box_on_bird']:.1%}  ({r['n']} photos)")


def in_scenes(classifier, known: Path, scenes: list[Path], every: int = 3, seed: int = 0, kind: str = "rect") -> dict:
    """Every ``every``-th photo of ``known`` pasted through a ``kind`` mask at 1/3 of the shorter
    side of a scene, at a random place: the top-1 there and plain, the verdicts, and whether the
    classified box holds the bird."""
    import random

    from resnext.evaluate import _labelled_files
    from resnext.transforms import load_image

    rng = random.Random(seed)
    items = _labelled_files(known, classifier.classes)[0][::every]
    plain = scene = on_bird = 0
    verdicts = {"species": 0, "unsure": 0, "not_a_bird": 0}
    for path, label in items:
        bird = load_image(path)
        photo, box, _ = paste(load_image(rng.choice(scenes), shrink_to=1200), bird, 1 / 3, rng, 0, kind=kind)
        plain += classifier.predict(bird, k=1)[0][0].index == label
        answer = classifier.predict(photo, k=1)[0]
        scene += answer[0].index == label
        verdicts[answer.verdict] += 1
        on_bird += _holds(answer.box, box)
    n = len(items)
    return {"n": n, "top1": scene / n, "plain_top1": plain / n, "ratio": (scene / plain) if plain else 0.0,
            "verdicts": {k: v / n for k, v in verdicts.items()}, "box_on_bird": on_bird / n}


def _holds(box, bird) -> bool:
    """``box`` holds at least half of ``bird`` and overlaps it with IoU over 0.5."""
    w = max(0.0, min(box[2], bird[2]) - max(box[0], bird[0]))
    h = max(0.0, min(box[3], bird[3]) - max(box[1], bird[1]))
    inter, area = w * h, (bird[2] - bird[0]) * (bird[3] - bird[1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + area - inter
    return inter >= 0.5 * area and inter / union > 0.5


if __name__ == "__main__":
    main()
