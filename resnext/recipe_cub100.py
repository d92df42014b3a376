"""The recipe of the default bird model: ResNeXt-50 32x4d from scratch on CUB-100's train split.

    python -m resnext.recipe_cub100 [--data ../shared/data/cub100/train] [--out checkpoints/...]

1. ``train``: the engine's full mode from scratch (settings in :data:`CONFIG`), best epoch by
   accuracy on a seeded 5% validation split carved out of ``train``.
1b. ``polish``: a second, short cosine cycle from phase 1's best weights (:data:`POLISH`), kept
   only if its best epoch beats phase 1 on that validation split.
2. ``select``: the shipped input size is chosen on that same validation split (never on
   ``test``): a network trained on random-resized crops sees birds larger than a whole-image
   view at the same size shows them, so a somewhat larger test size usually wins (Touvron et al.,
   2019, "FixRes"). The checkpoint is written with that preprocessing.

Report accuracy afterwards with ``python -m resnext evaluate .../cub100/test --checkpoint ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .data import load_dataset
from .evaluate import evaluate
from .inference import DEFAULT_CHECKPOINT, Classifier
from .train import TrainConfig, train
from .transforms import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(
    mode="full",
    init="scratch",
    arch="resnext50_32x4d",
    epochs=75,
    image_size=96,
    crop_fraction=1.0,  # CUB-100's photos are already bird-centred crops: use the whole photo
    batch_size=64,
    optimizer="sgd",
    lr=0.1,
    backbone_lr_scale=1.0,  # from scratch: one learning rate for everything
    weight_decay=5e-5,
    warmup_epochs=3,
    label_smoothing=0.1,
    augment="trivialaugment",
    min_scale=0.25,
    val_split=0.05,
    seed=0,
)
# Phase 1b: a second, short cosine cycle at a fifth of the learning rate, from phase 1's best
# weights; kept only if it beats phase 1 on validation.
POLISH = {"epochs": 15, "lr": 0.02, "warmup_epochs": 0}
EVAL_SIZES = (96, 112, 128, 144)


def recalibrated(model, data, pre: Preprocessing, config: TrainConfig = CONFIG):
    """A copy of ``model`` with BN statistics recomputed on the training split (see
    ``train._recalibrate_batchnorm``): averaged (EMA) weights need statistics of their own."""
    import copy

    import torch

    from .train import _autocast_dtype, _recalibrate_batchnorm, augmented_training_set

    dataset = augmented_training_set(data, config.image_size, pre, config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(config.seed))
    copy_ = copy.deepcopy(model).to(memory_format=torch.channels_last)
    _recalibrate_batchnorm(copy_, loader, torch.device("cpu"), _autocast_dtype(torch.device("cpu"), "auto"))
    return copy_


def select_input_size(raw: Path, data, out: Path, sizes=EVAL_SIZES, test: Path | None = None) -> dict:
    """Evaluate ``raw`` on the validation split at each size, as trained and with its BN statistics
    recomputed (:func:`recalibrated`); write ``out`` with the best pair.

    Also records the "unsure" threshold the app uses (the mean top-1 probability of the wrong
    validation predictions: below it, a prediction looks like a typical mistake) and, with
    ``test``, the test accuracy at the chosen size (recorded only; nothing is chosen on it)."""
    model, info = load_checkpoint(raw)
    val_dir = Path(tempfile.mkdtemp(prefix="cub100-val-"))
    try:
        for path, label in data.val:  # the engine's own validation split, as a class-folder tree
            target = val_dir / data.classes[label] / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        reports = {}
        candidates = {"as trained": model, "BN recomputed": recalibrated(model, data, info.preprocessing)}
        for variant, candidate in candidates.items():
            for size in sizes:
                classifier = Classifier(candidate, info, device="cpu")
                classifier.preprocessing = info.preprocessing.with_size(size)
                reports[variant, size] = evaluate(classifier, val_dir)
    finally:
        shutil.rmtree(val_dir, ignore_errors=True)
    scores = {key: r["top1"] for key, r in reports.items()}
    variant, best = max(scores, key=lambda k: (scores[k], k[0] == "as trained", -k[1]))
    model = candidates[variant].float().eval()
    provenance = dict(info.provenance)
    provenance["input_size_selection"] = {
        "val_top1": {f"{v}, {s} px": round(t, 4) for (v, s), t in scores.items()},
        "chosen": best,
        "batchnorm": variant,
    }
    best = (variant, best)
    metrics = dict(provenance.get("metrics") or {})
    metrics["val_top1"] = scores[best]
    metrics["val_top5"] = reports[best]["top5"]
    metrics["unsure_below"] = round(reports[best]["mean_confidence_wrong"] or 0.3, 3)
    size = best[1]
    if test is not None:
        classifier = Classifier(model, info, device="cpu")
        classifier.preprocessing = info.preprocessing.with_size(size)
        result = evaluate(classifier, test)
        metrics["test_top1"], metrics["test_top5"], metrics["test_n"] = result["top1"], result["top5"], result["n"]
    provenance["metrics"] = metrics
    save_checkpoint(out, model, info.classes, info.preprocessing.with_size(size), provenance)
    return provenance["input_size_selection"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cub100" / "train")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--raw", type=Path, help="phase 1's checkpoint (default: next to --out, .raw)")
    parser.add_argument("--skip-training", action="store_true", help="only select the input size for --raw")
    parser.add_argument("--epochs", type=int, default=CONFIG.epochs)
    parser.add_argument("--polish-epochs", type=int, default=POLISH["epochs"], help="phase 1b's epochs (0: skip it)")
    parser.add_argument("--record-test", type=Path, metavar="DIR",
                        help="also evaluate on this test folder and record the result in the metadata")
    args = parser.parse_args()
    raw = args.raw or args.out.with_suffix(".raw.safetensors")
    data = load_dataset(args.data, val_split=CONFIG.val_split, seed=CONFIG.seed)

    def show(event):
        if event.stage == "epoch":
            print(json.dumps({"epoch": event.epoch, "loss": round(event.loss, 4), "train_acc": round(event.train_acc, 4),
                              "val_acc": event.val_acc, "img_s": round(event.images_per_s or 0, 1),
                              "elapsed_s": round(event.elapsed_s)}), flush=True)

    if not args.skip_training:
        result = train(data, TrainConfig(**{**CONFIG.__dict__, "epochs": args.epochs}), out=raw, callback=show)
        print(f"phase 1: best val {result.val_acc:.2%} at epoch {result.best_epoch}, {result.seconds / 60:.1f} min", flush=True)
    if args.polish_epochs:
        polished = raw.with_name(raw.name.replace(".raw.", ".polished.raw."))
        config = TrainConfig(**{**CONFIG.__dict__, **POLISH, "init": str(raw), "epochs": args.polish_epochs})
        result = train(data, config, out=polished, callback=show)
        before = read_metadata(raw).provenance["metrics"]["val_acc"]
        print(f"phase 1b: best val {result.val_acc:.2%} at epoch {result.best_epoch} (phase 1: {before:.2%}), "
              f"{result.seconds / 60:.1f} min", flush=True)
        if result.val_acc > before:
            raw = polished
    chosen = select_input_size(raw, data, args.out, test=args.record_test)
    print(f"phase 2: validation top-1 {chosen['val_top1']}; shipping {chosen['chosen']} px, "
          f"BN {chosen['batchnorm']} -> {args.out}")


if __name__ == "__main__":
    main()
