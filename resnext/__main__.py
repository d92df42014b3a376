"""Command line: ``python -m resnext predict|info ...``.

Errors print one line on stderr and exit non-zero: 1 when some input failed (the others are still
processed), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnext", description="ResNeXt bird classifier.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="top-k classes (and Grad-CAM overlays) for images")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--checkpoint", metavar="PATH", help="model file (default: the bird model in checkpoints/)")
    predict.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image (default 5)")
    predict.add_argument("--cam-dir", metavar="DIR", help="write a conv5 Grad-CAM overlay PNG per image here")
    predict.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")

    info = commands.add_parser("info", help="print a checkpoint's metadata as JSON")
    info.add_argument("checkpoint", metavar="CHECKPOINT")

    args = parser.parse_args(argv)
    if args.command == "predict" and args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}")
    try:
        return {"predict": _predict, "info": _info}[args.command](args)
    except (FileNotFoundError, ValueError) as err:  # bad checkpoint, device: nothing to do
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _predict(args: argparse.Namespace) -> int:
    from .inference import load_classifier
    from .transforms import load_image

    classifier = load_classifier(args.checkpoint, device=args.device)
    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    if cam_dir:
        cam_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for number, path in enumerate(args.images):
        try:
            photo = load_image(path)
            if cam_dir:
                explanation = classifier.explain(photo, k=args.topk)
                predictions = explanation.predictions
                out = cam_dir / f"{number:03d}_{Path(path).stem}_cam.png"
                Image.fromarray(explanation.overlay).save(out)
            else:
                predictions = classifier.predict(photo, k=args.topk)[0]
        except (OSError, ValueError) as err:  # ImageLoadError is a ValueError
            failed += 1
            print(f"error: {err}", file=sys.stderr)
            results.append({"image": path, "error": str(err)})
            continue
        result = {"image": path, "predictions": [p._asdict() for p in predictions]}
        if cam_dir:
            result["cam"] = str(out)
        results.append(result)
        if not args.json:
            _print_table(path, predictions)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return EXIT_FAILED if failed else 0


def _print_table(path: str, predictions) -> None:
    from .inference import display_name

    print(path)
    for rank, p in enumerate(predictions, 1):
        print(f"  {rank:>2}. {p.prob:7.2%}  {display_name(p.label)}  [{p.index}]")


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_metadata

    metadata = read_metadata(args.checkpoint).to_dict()
    print(json.dumps(metadata, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
