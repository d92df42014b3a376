"""The recipe for a ResNeXt that knows more of the world (the next default model, v6): the
teacher's features on every photo we may train on, at a larger input, then v5's bird detector and
verdicts chosen again on held-out photos.

    python -m resnext.recipes.v6 [--shared ../shared] [--epochs 30 | --minutes M] [--image-size 112]
                                 [--teacher-size 224] [--cutmix 0.3] [--out checkpoints/v6.safetensors]
                                 [--pack FILE] [--teacher FILE] [--batch-size 64] [--lr 0.02]
                                 [--only-training] [--max-shard-mb 15]
                                 [--record-test ../shared/data/cub100/test] [--report report.json]

``--pack`` reads phase 1's photos from one file made by ``python -m resnext pack`` instead of
``--shared``'s folders (phase 2 needs the held-out photos of ``--shared``: on a machine without
them, say ``--only-training`` and run ``--skip-training`` where they are). ``--minutes`` trains
by the clock (:mod:`resnext.training.clock`) instead of a number of epochs.

1. ``distill`` (the engine's distill mode), the whole network, from the installed default model:
   labelled photos are ``cub100/train`` minus v4's 5 % validation split; the teacher's features
   (and its probe's answer) are matched on them and, as unlabelled birds and as photos with no
   bird, on every photo :func:`resnext.recipes.detector.splits` lets the detector fit on (never
   the 48 reserved species, the held-out species, the held-out no-bird photos or ``cub100/test``),
   on zoom-outs and birds pasted into scenes, and on CutMixes across them. The teacher sees each
   view at ``--teacher-size``, the student the same view at ``--image-size``. Every epoch's weights
   go to ``<out>.raw.last.safetensors`` (a crash loses one epoch; ``--init`` on that file goes on
   from its weights with a fresh schedule), the best epoch's (plain and 1/3-frame validation) to
   ``<out>.raw.safetensors``.
2. ``recipes.detector`` with ``--heads-from`` the start model: v5's detector, unchanged, on the new
   network, and the verdict rules chosen again on held-out photos only.

The output is written to ``--out``, never over the installed model: compare its validation
numbers (printed, and in ``--report``) with the installed model's before installing it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..data import load_dataset
from ..inference import DEFAULT_CHECKPOINT
from ..training import TrainConfig, train
from .cub100 import CONFIG as V4_CONFIG
from .cub100 import link_folder, show_progress

ROOT = Path(__file__).resolve().parents[2]
CONFIG = TrainConfig(**{
    **V4_CONFIG.__dict__,
    "epochs": 30,
    "image_size": 112,
    "teacher_size": 224,
    "train_layers": "all",
    "lr": 0.02,
    "unlabelled_fraction": 0.25,
    "negative_fraction": 0.15,
    "cutmix": 0.3,
})


def training_config(shared: Path, folder: Path, out: Path, **changes) -> TrainConfig:
    """Phase 1's settings, with the photo pools linked into ``folder``."""
    from .detector import splits

    groups = splits(shared)
    return TrainConfig(**{
        **CONFIG.__dict__,
        "teacher": str(shared / "weights" / "mobilenetv2_imagenet_features.pt"),
        "unlabelled": (str(link_folder(groups["other_fit"], folder / "other-species")),),
        "negatives": (str(link_folder(groups["none_fit"], folder / "no-bird")),),
        "snapshot": str(out.with_suffix(".raw.last.safetensors")),
        **changes,
    })


def phase_one_data(args, folder: Path):
    """The labelled photos (with v4's validation split) and the settings that point at the other
    pools: from ``args.pack`` unpacked into ``folder``, or from ``args.shared``'s folders."""
    changes = {k: v for k, v in {"init": args.init, "epochs": args.epochs, "image_size": args.image_size,
                                 "teacher_size": args.teacher_size, "cutmix": args.cutmix, "minutes": args.minutes,
                                 "batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    if args.teacher:
        changes["teacher"] = str(args.teacher)
    if args.pack is None:
        data = load_dataset(args.shared / "data" / "cub100" / "train", val_split=CONFIG.val_split, seed=CONFIG.seed)
        return data, training_config(args.shared, folder, args.out, **changes)
    from .pack import unpack

    pools = unpack(args.pack, folder)
    data = load_dataset(pools["labelled"], val_split=CONFIG.val_split, seed=CONFIG.seed)
    changes.setdefault("teacher", str(args.shared / "weights" / "mobilenetv2_imagenet_features.pt"))
    return data, TrainConfig(**{**CONFIG.__dict__, "unlabelled": (str(pools["unlabelled"]),),
                                "negatives": (str(pools["negative"]),),
                                "snapshot": str(args.out.with_suffix(".raw.last.safetensors")), **changes})


def name_version(path: Path) -> None:
    """Say in ``path``'s provenance what v6 is (phase 2's recipe describes v5 there)."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(path)
    provenance = {k: v for k, v in info.provenance.items() if k != "v5"}
    provenance["v6"] = ("the whole ResNeXt distilled from the teacher at 224 px (python -m resnext.recipes.v6), starting "
                        "from v5, at 112 px; v5's bird detector unchanged; verdicts chosen again on held-out photos")
    save_checkpoint(path, model, info.classes, info.preprocessing, provenance)


def reshard(single: Path, out: Path, max_shard_mb: float) -> Path:
    """``single``'s checkpoint written again as shards (see :mod:`resnext.shards`); the index's path."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(single)
    return save_checkpoint(out, model, info.classes, info.preprocessing, info.provenance, max_shard_mb=max_shard_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "v6.safetensors")
    parser.add_argument("--init", default="default", help="start point (default: the installed default model)")
    parser.add_argument("--detector-from", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the model whose bird detector the result carries (default: the installed one)")
    parser.add_argument("--epochs", type=int, default=CONFIG.epochs)
    parser.add_argument("--minutes", type=float, help="train this long instead, the schedule by the clock")
    parser.add_argument("--pack", type=Path, metavar="FILE", help="phase 1's photos from this pack (python -m resnext pack)")
    parser.add_argument("--teacher", type=Path, metavar="FILE", help="the teacher's weights (default: in --shared)")
    parser.add_argument("--batch-size", type=int, help=f"(default {CONFIG.batch_size})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {CONFIG.lr})")
    parser.add_argument("--only-training", action="store_true", help="only phase 1 (writes <out>.raw.safetensors)")
    parser.add_argument("--max-shard-mb", type=float, help="write phase 1's result as safetensors shards this large")
    parser.add_argument("--image-size", type=int, default=CONFIG.image_size)
    parser.add_argument("--teacher-size", type=int, default=CONFIG.teacher_size)
    parser.add_argument("--cutmix", type=float, default=CONFIG.cutmix)
    parser.add_argument("--skip-training", action="store_true", help="only phase 2, on <out>.raw.safetensors")
    parser.add_argument("--record-test", type=Path, metavar="DIR", help="then evaluate on this test folder and record it")
    parser.add_argument("--report", type=Path, metavar="JSON", help="write the full report here")
    args = parser.parse_args()
    if args.out.resolve() == DEFAULT_CHECKPOINT.resolve():
        parser.error("--out must not be the installed model: judge the result on validation first")
    raw = args.out.with_suffix(".raw.safetensors")
    if args.skip_training and not raw.is_file() and Path(f"{raw}.index.json").is_file():
        raw = Path(f"{raw}.index.json")  # phase 1 wrote shards
    report: dict = {}
    if not args.skip_training:
        with tempfile.TemporaryDirectory(prefix="recipe-v6-") as tmp:
            data, config = phase_one_data(args, Path(tmp))
            result = train(data, config, out=Path(tmp) / raw.name if args.max_shard_mb else raw, callback=show_progress)
            if args.max_shard_mb:
                raw = reshard(result.checkpoint, raw, args.max_shard_mb)
        report["phase 1"] = {"best_epoch": result.best_epoch, "val_acc": result.val_acc, "minutes": result.seconds / 60,
                             "history": result.history}
        print(f"phase 1: best val {result.val_acc:.2%} at epoch {result.best_epoch}, {result.seconds / 60:.1f} min; "
              f"wrote {raw}", flush=True)
    if args.only_training:
        if args.report:
            args.report.write_text(json.dumps(report, indent=1))
        return
    from .detector import build

    report["phase 2"] = build(raw, args.shared, args.out, log=lambda m: print(m, flush=True), heads_from=args.detector_from)
    name_version(args.out)
    from .cub100 import finish

    finish(report, args.out, args.record_test, args.report)


if __name__ == "__main__":
    main()
