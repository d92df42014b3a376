"""Accuracy on plain and wider shots, and the verdicts on birds, other species and non-birds.

    python benchmarks/verdicts.py KNOWN_DIR [--zoom 1 2 3] [--other DIR ...] [--nonbird DIR ...]
                                  [--checkpoint PATH] [--json]

KNOWN_DIR is a class-folder tree of the model's own classes (e.g. ``cub100/test``); each photo is
also made a wider shot (``--zoom 2``: the bird at 1/2 of the frame, its edges stretched outwards
and blurred; see ``resnext.transforms.wider_shot``). ``--other`` folders hold birds of species the
model does not know (they should come out "unsure"), ``--nonbird`` folders photos with no bird
("not_a_bird"). Answers are the classifier's full answers: find-the-bird and verdict included.
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
from resnext.training.distill import image_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("known", type=Path)
    parser.add_argument("--zoom", type=float, nargs="+", default=[1, 2, 3])
    parser.add_argument("--other", type=Path, nargs="*", default=[])
    parser.add_argument("--nonbird", type=Path, nargs="*", default=[])
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


if __name__ == "__main__":
    main()
