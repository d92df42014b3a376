"""Choose a model's verdict rules (see :mod:`resnext.verdict`) on held-out photos.

Each photo is run once through both passes (whole photo, and the crop around where the locator
puts the bird), so every candidate setting of find-the-bird is scored without running the network
again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inference import Classifier
from ..verdict import VerdictRules, choose_unsure, default_unsure

__all__ = ["Passes", "run_passes", "choose_rules", "combined", "refit_locator", "rules_for_fine_tune"]

FIND_BELOW = (0.0, 0.15, 0.25, 0.35, 0.45, 0.55, 0.7)
CROP_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Passes:
    """Both passes' probabilities for N photos: whole (N, K), crop (N, K), bird score and area (N,)."""

    whole: Tensor
    crop: Tensor
    bird: Tensor
    area: Tensor


def run_passes(classifier: Classifier, photos: list, batch_size: int = 32, margin: float = 1.6) -> Passes:
    """Run both passes on decoded photos (the crop pass whatever the locator says; a model
    without a locator gets one pass, and a bird score of 1)."""
    out = {"whole": [], "crop": [], "bird": [], "area": []}
    pre = classifier.preprocessing
    for start in range(0, len(photos), batch_size):
        chunk = photos[start : start + batch_size]
        features = classifier.features(torch.stack([pre(p) for p in chunk]))
        whole = torch.softmax(classifier.logits(features), 1).cpu()
        out["whole"].append(whole)
        cells = classifier.locate(features)
        if cells is None:  # no locator: one pass, no bird score
            out["crop"].append(whole)
            out["bird"] += [1.0] * len(chunk)
            out["area"] += [0.0] * len(chunk)
            continue
        crops = []
        for photo, c in zip(chunk, cells):
            area, box = classifier.bird_crop(photo, c, margin)
            out["bird"].append(float(c.max()))
            out["area"].append(area)
            crops.append(pre(photo.crop(box)))
        out["crop"].append(torch.softmax(classifier.logits(classifier.features(torch.stack(crops))), 1).cpu())
    return Passes(torch.cat(out["whole"]), torch.cat(out["crop"]), torch.tensor(out["bird"]), torch.tensor(out["area"]))


def combined(passes: Passes, rules: VerdictRules) -> Tensor:
    """The probabilities the classifier answers with under ``rules`` (N, K)."""
    use = rules.looks_closer(passes.bird, passes.area)
    return torch.where(use[:, None], rules.mix(passes.whole, passes.crop), passes.whole)


def choose_rules(labelled: dict[str, tuple[Passes, Tensor]], birds: list[Passes], others: Passes | None,
                 num_classes: int, bird_quantile: float = 0.01, margin: float = 1.6) -> tuple[VerdictRules, dict]:
    """Verdict rules from held-out data.

    Args:
        labelled: name -> (passes, labels) of the model's own classes, e.g. plain and wider shots.
        birds: passes of every held-out bird photo (the model's classes and others): the bird
            threshold lets ``bird_quantile`` of them through as "not a bird".
        others: passes of birds of classes the model does not know (should come out unsure).
        margin: the crop margin the passes were run with (recorded in the rules).

    find-the-bird's setting maximises the mean top-1 over ``labelled``; then the unsure threshold
    is chosen by :func:`~resnext.verdict.choose_unsure` on the combined answers.
    Returns the rules and the scores behind them.
    """
    scores = torch.cat([p.bird for p in birds])
    bird_below = round(float(torch.quantile(scores, bird_quantile)), 4)
    table = {}
    for find_below in FIND_BELOW:
        for w in CROP_WEIGHTS if find_below else (0.5,):
            rules = VerdictRules(0.5, bird_below, find_below, w)
            accs = [(combined(p, rules).argmax(1) == y).float().mean().item() for p, y in labelled.values()]
            table[find_below, w] = sum(accs) / len(accs)
    best = max(table, key=lambda key: (round(table[key], 4), -key[0]))  # ties: the cheaper setting
    rules = VerdictRules(0.5, bird_below, *best)
    right, wrong = [], []
    for p, y in labelled.values():
        probs = combined(p, rules)
        top1, pred = probs.max(1)
        right += top1[pred == y].tolist()
        wrong += top1[pred != y].tolist()
    other = combined(others, rules).max(1).values.tolist() if others is not None else None
    unsure, how = choose_unsure(right, wrong, num_classes, other)
    rules = VerdictRules(unsure, bird_below, *best, source=f"held-out validation photos; unsure: {how}",
                         find_margin=margin)
    report = {"find_the_bird_val_top1": {f"find<{f} w={w}": round(a, 4) for (f, w), a in table.items()},
              "best_val_top1": round(table[best], 4), "bird_below_quantile": bird_quantile}
    return rules, report


def rules_for_fine_tune(model, classes: list[str], pre, val: list, start_provenance: dict | None,
                        keep_bird_check: float = 0.9) -> VerdictRules:
    """Verdict rules for a freshly trained model, from its own validation photos ``val``
    (``[(path, label)]``).

    The unsure threshold comes from its right and wrong validation answers (or the default for
    its class count when there are too few). The bird check and find-the-bird settings are the
    start model's, kept only if the model has a locator and at least ``keep_bird_check`` of the
    validation photos pass the bird check: a model fine-tuned on flowers must not call every
    flower "not a bird".
    """
    from ..checkpoint import CheckpointInfo
    from ..transforms import load_image

    info = CheckpointInfo(model.config(), list(classes), pre, {"verdict": (start_provenance or {}).get("verdict")})
    start = VerdictRules.from_provenance(info.provenance, len(classes), model.locator is not None)
    classifier = Classifier(model, info, device="cpu", fast=False)
    photos = [load_image(p) for p, _ in val]
    if not photos:
        return VerdictRules(default_unsure(len(classes)), source="default (no validation photos)")
    passes = run_passes(classifier, photos)
    bird_below = start.bird_below
    if bird_below is not None and float((passes.bird >= bird_below).float().mean()) < keep_bird_check:
        bird_below = None
    rules = VerdictRules(0.5, bird_below, start.find_below if bird_below is not None else 0.0, start.crop_weight,
                         find_margin=start.find_margin)
    probs = combined(passes, rules)
    top1, pred = probs.max(1)
    labels = torch.tensor([y for _, y in val])
    unsure, how = choose_unsure(top1[pred == labels].tolist(), top1[pred != labels].tolist(), len(classes))
    return VerdictRules(unsure, bird_below, rules.find_below, rules.crop_weight, source=f"fine-tune validation; unsure: {how}",
                        find_margin=rules.find_margin)


def refit_locator(classifier: Classifier, birds: list, negatives: list, factors=(1, 2, 3), l2: float = 1e-3,
                  batch_size: int = 32) -> dict:
    """Fit the locator head again on the trained network's frozen conv5 features, with the bird
    photos and the photos without a bird weighted equally.

    During training the locator sees far more bird cells than empty ones (a batch is mostly birds)
    and leans towards "bird"; here every bird photo is also shown as wider shots (``factors``),
    and each conv5 cell is one example whose target is the covered fraction of the cell (zero for
    every cell of a negative). A convex problem (logistic regression, L-BFGS), solved exactly.
    Changes ``classifier.model.locator`` in place; returns the fit's numbers.
    """
    from ..transforms import wider_shot
    from .augment import coverage

    rows, targets, weights = [], [], []
    pre = classifier.preprocessing
    jobs = [(wider_shot(p, f) if f > 1 else p, (0.5 - 0.5 / f, 0.5 - 0.5 / f, 0.5 + 0.5 / f, 0.5 + 0.5 / f))
            for p in birds for f in factors] + [(p, None) for p in negatives]
    n_bird = len(birds) * len(factors)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        features = classifier.features(torch.stack([pre(p) for p, _ in chunk])).float().cpu()  # (B, C, h, w)
        cells = features.shape[-1]
        rows.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
        targets += [coverage(box, cells).flatten() for _, box in chunk]
        weights += [torch.full((cells * cells,), 0.5 / (n_bird if box else len(negatives))) for _, box in chunk]
    x, y, w = torch.cat(rows), torch.cat(targets), torch.cat(weights)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    head = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(1), y, reduction="none")
        loss = (bce * w).sum() / w.sum() + l2 * head.weight.pow(2).sum()  # birds and negatives weigh half each
        loss.backward()
        return loss

    with torch.enable_grad():
        final = float(optimizer.step(closure).detach())
    locator = classifier.model.locator
    with torch.no_grad():  # fold the standardisation into the 1x1 convolution
        weight = head.weight[0] / std
        locator.weight.copy_(weight.view_as(locator.weight).to(locator.weight))
        locator.bias.copy_((head.bias - (weight * mean).sum()).to(locator.bias))
    return {"rows": len(x), "bird_photos": n_bird, "negative_photos": len(negatives), "loss": round(final, 4)}
