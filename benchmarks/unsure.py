"""How often the app says "not sure": on the species a model knows, and on photos of others.

    python benchmarks/unsure.py KNOWN_DIR OTHER_DIR [--checkpoint PATH] [--json]

KNOWN_DIR is a class-folder tree of the model's own classes (e.g. ``cub100/test``); OTHER_DIR holds
photos of anything else (e.g. ``birds525-valid-480``: 480 other bird species). A prediction is
flagged when its top-1 probability is under the checkpoint's ``unsure_below`` threshold (the app's
rule). Reports the flagged fraction of right and wrong answers on KNOWN_DIR and of OTHER_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnext.data import IMAGE_EXTENSIONS  # noqa: E402
from resnext.inference import DEFAULT_CHECKPOINT, load_classifier  # noqa: E402


def top1(classifier, paths: list[Path], batch: int = 64) -> tuple[list[int], list[float]]:
    indices, probs = [], []
    for start in range(0, len(paths), batch):
        x = torch.cat([classifier.preprocess(p) for p in paths[start:start + batch]])
        p = torch.softmax(classifier.logits(classifier.features(x)), dim=1).cpu().max(dim=1)
        indices += p.indices.tolist()
        probs += p.values.tolist()
    return indices, probs


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("known", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    classifier = load_classifier(args.checkpoint, device="cpu")
    threshold = (classifier.info.provenance.get("metrics") or {}).get("unsure_below")
    if threshold is None:
        sys.exit(f"error: {args.checkpoint} records no unsure_below threshold")
    index = {c: i for i, c in enumerate(classifier.classes)}
    known = [(p, index[p.parent.name]) for p in images(args.known) if p.parent.name in index]
    predicted, known_probs = top1(classifier, [p for p, _ in known])
    right = [prob for (_, y), i, prob in zip(known, predicted, known_probs) if i == y]
    wrong = [prob for (_, y), i, prob in zip(known, predicted, known_probs) if i != y]
    _, other_probs = top1(classifier, images(args.other))
    flagged = lambda probs: round(sum(p < threshold for p in probs) / len(probs), 4) if probs else None  # noqa: E731
    result = {
        "threshold": threshold,
        "known_n": len(known), "known_flagged": flagged(known_probs),
        "right_flagged": flagged(right), "wrong_flagged": flagged(wrong),
        "other_n": len(other_probs), "other_flagged": flagged(other_probs),
        "other_mean_confidence": round(sum(other_probs) / len(other_probs), 4),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"threshold {threshold:.3f}: flagged {result['known_flagged']:.1%} of {len(known)} photos of known species "
          f"({result['right_flagged']:.1%} of the right answers, {result['wrong_flagged']:.1%} of the wrong ones); "
          f"{result['other_flagged']:.1%} of {len(other_probs)} photos of other species "
          f"(their mean top-1 probability {result['other_mean_confidence']:.1%})")


if __name__ == "__main__":
    main()
