"""The recipe of the default bird model: ResNeXt-50 32x4d on CUB-100, taught by an ImageNet
MobileNetV2, with a locator head and verdicts.

    python -m resnext.recipes.cub100 [--shared ../shared] [--out checkpoints/...]

0. The start point: the previous default model (``--init``, default: the installed one). Model
   v3 was made in three calls, because a session's time ran out in between (see the model card):
   ``--epochs 40`` from v2, stopped after epoch 7; ``--init <its .raw.last snapshot> --epochs 36``;
   ``--raw <that run's .raw.last> --skip-training`` (phase 2 on the last epoch's weights).
1. ``distill``: the engine's distill mode (settings in :data:`CONFIG`) on CUB-100's train split
   minus a seeded 5% validation split, with birds of 480 other species (4 of each 5 photos) as
   unlabelled photos and 2 of every 3 non-bird photos as negatives. conv1..conv3 stay frozen.
2. ``calibrate``: the locator is fit again on the trained network's frozen conv5 features with
   bird photos (as given and as wider shots) and photos without a bird weighted equally (in
   training they are a tenth of each batch, and the head leans towards "bird"), and a bird head
   is fit on the same photos' pooled features (the non-birds also in 7 random framings each): it
   gives the bird score of the verdict, the locator only finds the bird; then, on held-out
   data only (the 5% validation split, the 5th photo of half of the other species), choose
   find-the-bird's margin, threshold and weight and the verdict thresholds, and write them into
   the checkpoint. Every 3rd non-bird photo and the other half of the other species are held out
   for reporting only.

Report accuracy afterwards with ``python -m resnext evaluate .../cub100/test``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ..data import load_dataset
from ..inference import DEFAULT_CHECKPOINT
from ..training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
FIND_MARGINS = (1.0, 1.05, 1.1, 1.2)  # v2 chose 1.3 of (1.3, 1.6, 2.0): the smallest won
CONFIG = TrainConfig(
    mode="distill",
    init="default",
    epochs=36,
    image_size=96,
    crop_fraction=1.0,  # the whole photo
    batch_size=64,
    lr=0.03,
    weight_decay=5e-5,
    warmup_epochs=1,
    label_smoothing=0.1,
    train_layers="conv4",
    min_scale=0.25,
    val_split=0.05,  # the same split as recipe v1's: the start point never trained on it
    seed=0,
    teacher_size=160,
    unlabelled_fraction=0.15,
    negative_fraction=0.1,
)


def held_out(shared: Path) -> dict[str, list[Path]]:
    """The other species' 5th photos and every 3rd non-bird photo: never trained on."""
    from ..training.distill import image_files

    birds = image_files([shared / "data" / "birds525-valid-480"])
    nonbirds = image_files([shared / "data" / "nonbird"])
    return {
        "other_species_train": [p for p in birds if p.stem != "5"],
        "other_species_val": [p for p in birds if p.stem == "5"],
        "nonbird_train": [p for i, p in enumerate(nonbirds) if i % 3],
        "nonbird_val": [p for i, p in enumerate(nonbirds) if not i % 3],
    }


def link_folder(paths: list[Path], folder: Path) -> Path:
    """A folder of symbolic links to ``paths`` (names made unique), for the engine's folder options."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        os.symlink(path.resolve(), folder / f"{i:05d}{path.suffix.lower()}")
    return folder


def _refit_photos(data, splits: dict[str, list[Path]], birds: int = 600, others: int = 300, made_up: int = 200):
    """Training photos for the locator's refit and the bird head: a seeded sample of the labelled
    and the other species' training photos; every non-bird training photo, and made-up non-photos."""
    import random

    import torch
    from torchvision.transforms.functional import to_pil_image

    from ..training.augment import synthetic_nonphoto
    from ..transforms import load_image

    rng = random.Random(CONFIG.seed)
    positives = [p for p, _ in rng.sample(data.train, birds)] + rng.sample(splits["other_species_train"], others)
    g = torch.Generator().manual_seed(CONFIG.seed)
    made = [to_pil_image(synthetic_nonphoto(CONFIG.teacher_size, g)) for _ in range(made_up)]
    return [load_image(p) for p in positives], [load_image(p) for p in splits["nonbird_train"]], made


def training_provenance(raw: Path, provenance: dict) -> dict:
    """The run's provenance for ``raw``. A per-epoch snapshot (``--raw ....raw.last.safetensors``)
    records only its epoch; the rest is in the best epoch's file next to it."""
    if "snapshot" not in provenance or "config" in provenance:
        return dict(provenance)
    from ..checkpoint import load_checkpoint

    record = provenance["snapshot"]
    best = load_checkpoint(raw.with_name(raw.name.replace(".raw.last.", ".raw.")))[1].provenance
    metrics = {k: v for k, v in (best.get("metrics") or {}).items() if k != "per_class_val_acc"}
    return {**best, "best_epoch": record["epoch"], "metrics": {**metrics, "val_acc": record["val_acc"]},
            "selected": f"the last epoch ({record['epoch']}), not the best-scored one ({best.get('best_epoch')}): "
                        "higher validation top-1 with find-the-bird in phase 2"}


def calibrate(raw: Path, data, splits: dict[str, list[Path]], out: Path, margins=FIND_MARGINS) -> dict:
    """Phase 2: choose the verdict rules on held-out photos and write the shipped checkpoint.

    The other species' held-out photos are halved by species: the first half helps choose the
    unsure threshold, the second half is only reported. Non-birds are never used to choose: the
    bird threshold lets at most 1% of each group of held-out birds (plain, 1/2 and 1/3 of the frame,
    other species) through as "not a bird"."""
    import torch

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..evaluate import verdict_rates
    from ..inference import Classifier
    from ..training.calibrate import bird_shot_maps, choose_rules, fit_bird_head, negative_views, refit_locator, run_passes
    from ..transforms import load_image, wider_shot

    model, info = load_checkpoint(raw)
    classifier = Classifier(model, info, device="cpu")
    birds, nonbirds, made_up = _refit_photos(data, splits)
    bird_maps = bird_shot_maps(classifier, birds)  # the frozen network's view of them, for both fits
    refit = refit_locator(classifier, birds, nonbirds + made_up, bird_maps=bird_maps)
    bird_head = fit_bird_head(classifier, birds, negative_views(nonbirds, views=8, seed=CONFIG.seed) + made_up,
                              bird_maps=bird_maps)
    del bird_maps
    photos = [load_image(p) for p, _ in data.val]
    labels = torch.tensor([y for _, y in data.val])
    others = splits["other_species_val"]
    choose_others, report_others = others[: len(others) // 2], others[len(others) // 2 :]
    other_photos = [load_image(p) for p in choose_others]
    candidates = []
    for margin in margins:  # the crop's margin, chosen like the rest on validation
        labelled = {f"1/{f}": (run_passes(classifier, [wider_shot(p, f) if f > 1 else p for p in photos], margin=margin), labels)
                    for f in (1, 2, 3)}
        other_passes = run_passes(classifier, other_photos, margin=margin)
        birds = [p for p, _ in labelled.values()] + [other_passes]
        candidates.append(choose_rules(labelled, birds, other_passes, len(info.classes), margin=margin))
    rules, table = max(candidates, key=lambda c: c[1]["best_val_top1"])
    table["by_margin"] = {c[0].find_margin: c[1]["best_val_top1"] for c in candidates}
    provenance = training_provenance(raw, info.provenance)
    provenance["verdict"] = rules.to_dict()
    provenance["verdict_selection"] = table
    provenance["locator_refit"] = refit
    provenance["bird_head_fit"] = bird_head
    save_checkpoint(out, model, info.classes, info.preprocessing, provenance)
    shipped = Classifier(*load_checkpoint(out), device="cpu")
    rates = {
        "other_species_reported_half": verdict_rates(shipped, report_others),
        "nonbird_val": verdict_rates(shipped, splits["nonbird_val"]),
    }
    return {"rules": rules.to_dict(), **table, **rates}


def record_test(out: Path, test: Path) -> dict:
    """Evaluate the shipped checkpoint on the test split as given and as wider shots (the bird at
    1/2 and 1/3 of the frame) and record the numbers in its metadata (recorded only: nothing is
    chosen on them). Returns the full reports."""
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..evaluate import evaluate
    from ..inference import Classifier

    model, info = load_checkpoint(out)
    classifier = Classifier(model, info, device="cpu")
    reports = {f: evaluate(classifier, test, zoom_out=f) for f in (1, 2, 3)}
    metrics = dict(info.provenance.get("metrics") or {})
    plain = reports[1]
    metrics.update(test_top1=plain["top1"], test_top5=plain["top5"], test_n=plain["n"])
    metrics["test_by_frame"] = {f"1/{f}": {"top1": round(r["top1"], 4), "top5": round(r["top5"], 4),
                                           "verdicts": {k: round(v, 4) for k, v in r["verdicts"].items()},
                                           "found_bird": round(r["found_bird"], 4)} for f, r in reports.items()}
    save_checkpoint(out, model, info.classes, info.preprocessing, {**info.provenance, "metrics": metrics})
    return {f"1/{f}": r for f, r in reports.items()}


def finish(report: dict, out: Path, test: Path | None, report_path: Path | None) -> None:
    """A recipe's last steps: with ``test``, :func:`record_test` (its headline numbers printed as
    one JSON line, the full reports under ``report["test"]``); with ``report_path``, the report."""
    if test:
        report["test"] = record_test(out, test)
        print(json.dumps({k: {m: r[m] for m in ("top1", "top5", "n", "verdicts", "found_bird")}
                          for k, r in report["test"].items()}), flush=True)
    if report_path:
        report_path.write_text(json.dumps(report, indent=1, default=str))


def show_progress(event) -> None:
    """A training run's progress for a log: each epoch as a JSON line, every 20th step, messages."""
    if event.stage == "epoch":
        print(json.dumps({"epoch": event.epoch, "loss": round(event.loss, 4), "train_acc": round(event.train_acc, 4),
                          "val_acc": event.val_acc, "note": event.message, "img_s": round(event.images_per_s or 0, 1),
                          "elapsed_s": round(event.elapsed_s)}), flush=True)
    elif event.stage != "train":
        print(event.message, flush=True)
    elif event.step % 20 == 0:
        print(f"step {event.step}/{event.steps} loss {event.loss:.3f} {event.images_per_s:.1f} img/s "
              f"eta {event.eta_s / 60:.0f} min", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--raw", type=Path, help="phase 1's checkpoint (default: next to --out, .raw)")
    parser.add_argument("--init", default=CONFIG.init, help="start point (default: the installed default model)")
    parser.add_argument("--epochs", type=int, default=CONFIG.epochs)
    parser.add_argument("--teacher-size", type=int, default=CONFIG.teacher_size)
    parser.add_argument("--skip-training", action="store_true", help="only calibrate --raw")
    parser.add_argument("--find-margins", type=float, nargs="+", default=FIND_MARGINS,
                        help="crop margins to choose from on validation (default: %(default)s)")
    parser.add_argument("--record-test", type=Path, metavar="DIR",
                        help="then evaluate on this test folder and record the result in the metadata")
    parser.add_argument("--report", type=Path, metavar="JSON", help="write phase 2's and the test's full reports here")
    args = parser.parse_args()
    raw = args.raw or args.out.with_suffix(".raw.safetensors")
    data = load_dataset(args.shared / "data" / "cub100" / "train", val_split=CONFIG.val_split, seed=CONFIG.seed)
    splits = held_out(args.shared)

    if not args.skip_training:
        with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
            config = TrainConfig(**{
                **CONFIG.__dict__, "init": args.init, "epochs": args.epochs, "teacher_size": args.teacher_size,
                "teacher": str(args.shared / "weights" / "mobilenetv2_imagenet_features.pt"),
                "unlabelled": (str(link_folder(splits["other_species_train"], Path(tmp) / "other-species")),),
                "negatives": (str(link_folder(splits["nonbird_train"], Path(tmp) / "nonbird")),),
                "snapshot": str(raw.with_suffix(".last.safetensors")),
            })
            result = train(data, config, out=raw, callback=show_progress)
        print(f"phase 1: best val {result.val_acc:.2%} at epoch {result.best_epoch}, {result.seconds / 60:.1f} min", flush=True)
    report = {"phase 2": calibrate(raw, data, splits, args.out, tuple(args.find_margins))}
    print(json.dumps(report["phase 2"], indent=1), flush=True)
    finish(report, args.out, args.record_test, args.report)


if __name__ == "__main__":
    main()
