"""Choose a model's verdict rules (see :mod:`resnext.verdict`) on held-out photos.

Each photo is run once through both passes (whole photo, and the crop around where the locator
puts the bird), so every candidate setting of find-the-bird is scored without running the network
again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..detector import crop_boxes
from ..imagefile import ANSWER_SIDE, load_image
from ..inference import Classifier
from ..verdict import VerdictRules, choose_unsure, default_unsure

__all__ = ["Passes", "run_passes", "choose_rules", "combined", "bird_shot_maps", "fit_bird_head", "refit_locator", "rules_for_fine_tune"]

FIND_BELOW = (0.0, 0.15, 0.25, 0.35, 0.45, 0.55, 0.7)
CROP_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Passes:
    """Both passes' probabilities for N photos: whole (N, K), crop (N, K); the bird score, the
    bird's estimated area and, with a detector, its closer look's bird score (N,)."""

    whole: Tensor
    crop: Tensor
    bird: Tensor
    area: Tensor
    closer: Tensor | None = None  # the closer look's bird score; None: no detector


def run_passes(classifier: Classifier, photos: list, batch_size: int = 32, margin: float = 1.6) -> Passes:
    """Run both passes on decoded photos (the crop pass whatever the bird finder says; a model
    with no finder gets one pass; one with no bird score at all, a bird score of 1). With a
    detector, ``closer`` is the closer look's own bird score (``bird`` the whole photo's); how
    they combine is the rules' (:func:`verdict_birds`)."""
    out = {"whole": [], "crop": [], "bird": [], "area": [], "closer": []}
    pre, detector = classifier.preprocessing, classifier.model.detector is not None
    for start in range(0, len(photos), batch_size):
        chunk = photos[start : start + batch_size]
        features = classifier.features(torch.stack([pre(p) for p in chunk]))
        whole = torch.softmax(classifier.logits(features), 1).cpu()
        out["whole"].append(whole)
        looks = classifier.looks(chunk, features, margin)
        birds = [1.0 if look.bird is None else look.bird for look in looks]
        out["bird"] += birds
        if looks[0].where is None:  # no finder: one pass
            out["crop"].append(whole)
            out["area"] += [0.0] * len(chunk)
            out["closer"] += birds
            continue
        closer = classifier.closer_looks(chunk, looks, margin)
        out["area"] += [look.area for look in looks]
        out["closer"] += [bird if c is None else c for bird, (c, _) in zip(birds, closer)]
        squares = [crop_boxes(box, photo.size) if detector else (box,) for photo, (_, box) in zip(chunk, closer)]
        crops = [pre(photo.crop(b)) for photo, boxes in zip(chunk, squares) for b in boxes]
        probs = torch.softmax(classifier.logits(classifier.features(torch.stack(crops))), 1).cpu()
        if len(crops) > len(chunk):  # a detector's two squares: the surer, as the classifier answers
            tight, wide = probs[0::2], probs[1::2]
            probs = torch.where((wide.amax(1) > tight.amax(1))[:, None], wide, tight)
        out["crop"].append(probs)
    closer = torch.tensor(out["closer"]) if detector else None
    return Passes(torch.cat(out["whole"]), torch.cat(out["crop"]), torch.tensor(out["bird"]), torch.tensor(out["area"]), closer)


def combined(passes: Passes, rules: VerdictRules) -> Tensor:
    """The probabilities the classifier answers with under ``rules`` (N, K)."""
    use = looked_closer(passes, rules) & rules.crop_counts(passes.whole.max(1).values, passes.crop.max(1).values)
    return torch.where(use[:, None], rules.mix(passes.whole, passes.crop), passes.whole)


def looked_closer(passes: Passes, rules: VerdictRules) -> Tensor:
    """Which photos find-the-bird takes a closer look at under ``rules`` (N,): with a detector,
    every small bird it finds; else only where the whole photo's bird score passes the check."""
    return rules.looks_closer(passes.bird if passes.closer is None else None, passes.area)


def verdict_birds(passes: Passes, rules: VerdictRules) -> Tensor:
    """The bird score each verdict is given under ``rules`` (N,): the closer look's where one was taken."""
    if passes.closer is None:
        return passes.bird
    return torch.where(looked_closer(passes, rules), rules.closer_bird(passes.bird, passes.closer), passes.bird)


def choose_rules(labelled: dict[str, tuple[Passes, Tensor]], birds: list[Passes], others: Passes | None,
                 num_classes: int, bird_quantile: float = 0.01, margin: float = 1.6) -> tuple[VerdictRules, dict]:
    """Verdict rules from held-out data.

    Args:
        labelled: name -> (passes, labels) of the model's own classes, e.g. plain and wider shots.
        birds: passes of held-out bird photos in groups (e.g. the model's classes as given and as
            wider shots, birds of other species): the bird threshold lets at most
            ``bird_quantile`` of each group through as "not a bird".
        others: passes of birds of classes the model does not know (should come out unsure).
        margin: the crop margin the passes were run with (recorded in the rules).

    find-the-bird's setting maximises the mean top-1 over ``labelled``; then the unsure threshold
    is chosen by :func:`~resnext.verdict.choose_unsure` on the combined answers.
    Returns the rules and the scores behind them.
    """
    bird_below = round(min(float(torch.quantile(p.bird, bird_quantile)) for p in birds), 4)
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


BIRD_CHECK_SHARE = 0.5  # of the visitor's photos that must pass the start model's bird check to keep it
MAX_CHECKED_PHOTOS = 240  # the visitor's photos the bird check is measured on, at most (spread over classes)


def rules_for_fine_tune(model, classes: list[str], pre, val: list, start_provenance: dict | None,
                        train: list = ()) -> VerdictRules:
    """Verdict rules for a freshly trained model, from the visitor's own photos: ``val`` and
    ``train`` (``[(path, label)]``).

    - **Unsure**: the threshold that best separates the validation photos' right and wrong
      answers (:func:`~resnext.verdict.choose_unsure`), or, with fewer than 5 of either, the
      stated default for the class count (:func:`~resnext.verdict.default_unsure`).
    - **Not a bird**: the start model's bird check answers "is this like the birds I was taught",
      so it would call the visitor's own flamingos "not a bird". It is kept only where at least
      half of the visitor's photos pass it (their classes are birds), and then lowered until every
      one of them passes: a fine-tune never refuses what it was taught. Otherwise (flowers,
      cars) it is off: such a model cannot say "not a bird".
    - Find-the-bird keeps the start model's settings where the bird check stays.
    """
    from ..checkpoint import CheckpointInfo
    from ..composition import architecture

    info = CheckpointInfo(architecture(model), list(classes), pre, {"verdict": (start_provenance or {}).get("verdict")})
    classifier = Classifier(model, info, device="cpu", fast=False)
    start = classifier.rules  # the start model's, as its checkpoint records them
    bird_below, bird_how = _bird_check(classifier, start.bird_below, list(val) + list(train))
    rules = VerdictRules(0.5, bird_below, start.find_below if bird_below is not None else 0.0, start.crop_weight,
                         find_margin=start.find_margin)
    if val:
        probs = combined(run_passes(classifier, _Photos([p for p, _ in val])), rules)
        top1, pred = probs.max(1)
        labels = torch.tensor([y for _, y in val])
        unsure, how = choose_unsure(top1[pred == labels].tolist(), top1[pred != labels].tolist(), len(classes))
    else:
        unsure, how = default_unsure(len(classes)), "default (no validation photos)"
    return VerdictRules(unsure, bird_below, rules.find_below, rules.crop_weight,
                        source=f"fine-tune; unsure: {how}; not a bird: {bird_how}", find_margin=rules.find_margin)


class _Photos(Sequence):
    """A fine-tune's photos, decoded a batch at a time as :func:`run_passes` asks for them, at the
    size the app answers them at (all of them at once, at full size, could not fit in memory)."""

    def __init__(self, paths: list):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [load_image(p, max_side=ANSWER_SIDE) for p in self.paths[index]]
        return load_image(self.paths[index], max_side=ANSWER_SIDE)


def _bird_check(classifier: Classifier, start_below: float | None, photos: list) -> tuple[float | None, str]:
    """(bird_below, how it was set) for a fine-tune, from the bird scores of the visitor's photos."""
    if start_below is None:
        return None, "off (the start model has no bird check)"
    if not photos:
        return None, "off (no photos to check it on)"
    step = max(1, -(-len(photos) // MAX_CHECKED_PHOTOS))
    checked = photos[::step]
    scores = []
    for i in range(0, len(checked), 32):
        images = _Photos([p for p, _ in checked[i : i + 32]])[:]
        features = None  # a detector looks on its own; the ResNeXt's heads read its conv5 features
        if classifier.model.detector is None:
            features = classifier.features(torch.stack([classifier.preprocessing(x) for x in images]))
        scores += [1.0 if look.bird is None else look.bird for look in classifier.looks(images, features)]
    scores = torch.tensor(scores)
    passed = float((scores >= start_below).float().mean())
    if passed < BIRD_CHECK_SHARE:
        return None, f"off ({passed:.0%} of {len(checked)} of the visitor's photos look like birds to the start model)"
    lowest = float(scores.min())
    if lowest >= start_below:
        return start_below, f"the start model's; all {len(checked)} of the visitor's photos pass it"
    below = math.floor(lowest / 2 * 1e6) / 1e6
    return below, (f"the start model's {start_below:.2f}, lowered to {below:.2f} so that all {len(checked)} of the "
                   f"visitor's photos pass it ({passed:.0%} of them passed the start model's)")


def _conv5(classifier: Classifier, photos: list, batch_size: int = 32, pooled: bool = False) -> Tensor:
    """The frozen network's conv5 activations for decoded photos, (N, C, h, w) fp32 on the CPU,
    or (N, C) averaged over the map when ``pooled``."""
    pre = classifier.preprocessing
    out = []
    for i in range(0, len(photos), batch_size):
        features = classifier.features(torch.stack([pre(p) for p in photos[i : i + batch_size]])).float().cpu()
        out.append(features.mean(dim=(2, 3)) if pooled else features)
    return torch.cat(out)


_ROWS = 65536  # rows standardised at a time


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and (unbiased) standard deviation of each column of ``x``, computed in blocks of
    rows (no temporary as large as ``x``); the deviation at least 1e-6."""
    mean = x.mean(0)
    squares = torch.zeros_like(mean, dtype=torch.float64)
    for start in range(0, len(x), _ROWS):
        squares += (x[start : start + _ROWS] - mean).double().pow(2).sum(0)
    return mean, (squares / max(1, len(x) - 1)).sqrt().to(x.dtype).clamp_min(1e-6)


def _fit_logistic(x: Tensor, y: Tensor, w: Tensor, l2: float) -> tuple[Tensor, Tensor, float]:
    """Weighted logistic regression of targets ``y`` in [0, 1] on rows ``x``, standardised first;
    a convex problem, solved with L-BFGS from zero (the result does not depend on the random
    state). Returns the weight (C,) and bias () for the raw rows (the standardisation folded in)
    and the final loss."""
    mean, std = _mean_std(x)
    z = torch.empty_like(x)  # one copy of ``x`` at a time (the detector's fine rows are ~4 GB)
    for start in range(0, len(x), _ROWS):
        torch.div(x[start : start + _ROWS] - mean, std, out=z[start : start + _ROWS])
    head = torch.nn.Linear(x.shape[1], 1)
    torch.nn.init.zeros_(head.weight)  # the same start every time
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(head(z).squeeze(1), y, reduction="none")
        return (bce * w).sum() / w.sum() + l2 * head.weight.pow(2).sum()

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)  # returns the loss it started from
    with torch.no_grad():
        final = float(loss())
    weight = head.weight.detach()[0] / std
    return weight, head.bias.detach()[0] - (weight * mean).sum(), final


def bird_shot_maps(classifier: Classifier, birds: list, factors=(1, 2, 3), batch_size: int = 32) -> Tensor:
    """The frozen network's conv5 maps of every bird photo as given and as wider shots (the bird at
    1/f of the frame for each of ``factors``, photo by photo), (N * len(factors), C, h, w): what
    :func:`refit_locator` and :func:`fit_bird_head` compute; give them ``bird_maps`` to do it once."""
    from ..transforms import wider_shot

    return _conv5(classifier, [wider_shot(p, f) if f > 1 else p for p in birds for f in factors], batch_size)


def _given_or_computed(classifier: Classifier, birds: list, factors, batch_size: int, bird_maps: Tensor | None) -> Tensor:
    if bird_maps is None:
        return bird_shot_maps(classifier, birds, factors, batch_size)
    if len(bird_maps) != len(birds) * len(factors):
        raise ValueError(f"bird_maps has {len(bird_maps)} maps; {len(birds)} photos x {len(factors)} framings "
                         f"= {len(birds) * len(factors)} expected (see bird_shot_maps)")
    return bird_maps


def refit_locator(classifier: Classifier, birds: list, negatives: list, factors=(1, 2, 3), l2: float = 1e-3,
                  batch_size: int = 32, bird_maps: Tensor | None = None) -> dict:
    """Fit the locator head again on the trained network's frozen conv5 features, with the bird
    photos and the photos without a bird weighted equally.

    During training the locator sees far more bird cells than empty ones (a batch is mostly birds)
    and leans towards "bird"; here every bird photo is also shown as wider shots (``factors``),
    and each conv5 cell is one example whose target is the covered fraction of the cell (zero for
    every cell of a negative). ``bird_maps``: :func:`bird_shot_maps` of ``birds``, if at hand.
    Changes ``classifier.model.locator`` in place; returns the fit's numbers.
    """
    from .augment import coverage

    shots = _given_or_computed(classifier, birds, factors, batch_size, bird_maps)
    negative_maps = _conv5(classifier, list(negatives), batch_size)
    c, cells = shots.shape[1], shots.shape[-1]
    x = torch.cat([shots, negative_maps]).permute(0, 2, 3, 1).reshape(-1, c)  # one row per cell
    # The photo covers the middle 1/f of a wider shot: each cell's target is the share of it covered.
    covered = [coverage((0.5 - 0.5 / f, 0.5 - 0.5 / f, 0.5 + 0.5 / f, 0.5 + 0.5 / f), cells).flatten() for f in factors]
    y = torch.cat(covered * len(birds) + [torch.zeros(len(negatives) * cells * cells)])
    w = torch.cat([torch.full((len(shots) * cells * cells,), 0.5 / len(shots)),
                   torch.full((len(negatives) * cells * cells,), 0.5 / len(negatives))])
    weight, bias, final = _fit_logistic(x, y, w, l2)
    locator = classifier.model.locator
    with torch.no_grad():
        locator.weight.copy_(weight.view_as(locator.weight).to(locator.weight))
        locator.bias.copy_(bias.view_as(locator.bias).to(locator.bias))
    return {"rows": len(x), "bird_photos": len(shots), "negative_photos": len(negatives), "loss": round(final, 4)}


def negative_views(photos: list, views: int = 8, seed: int = 0) -> list:
    """Each photo with no bird, and ``views - 1`` random square parts of it (a third to all of its
    short side, some mirrored): more ways a scene without a bird can be framed."""
    import random

    rng = random.Random(seed)
    out = []
    for photo in photos:
        out.append(photo)
        w, h = photo.size
        for _ in range(views - 1):
            side = max(1, round(min(w, h) * rng.uniform(0.33, 1.0)))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            part = photo.crop((x, y, x + side, y + side))
            out.append(part.transpose(0) if rng.random() < 0.5 else part)
    return out


def fit_bird_head(classifier: Classifier, birds: list, negatives: list, factors=(1, 2, 3), l2: float = 1e-3,
                  batch_size: int = 32, bird_maps: Tensor | None = None) -> dict:
    """Fit the network's ``bird`` head (added if missing) on its frozen, pooled conv5 features:
    bird photos as given and as wider shots against photos with no bird (pass them through
    :func:`negative_views` for more framings), the two sides weighted equally.

    Measured for model v4's recipe on held-out photos, at the threshold that lets 1% of held-out
    birds through: it caught more non-birds than the locator's best cell did (see the model card).
    ``bird_maps``: :func:`bird_shot_maps` of ``birds``, if at hand. Changes ``classifier.model`` in
    place; returns the fit's numbers.
    """
    shots = _given_or_computed(classifier, birds, factors, batch_size, bird_maps).mean(dim=(2, 3))
    x = torch.cat([shots, _conv5(classifier, list(negatives), batch_size, pooled=True)])
    y = torch.cat([torch.ones(len(shots)), torch.zeros(len(negatives))])
    w = torch.cat([torch.full((len(shots),), 0.5 / len(shots)), torch.full((len(negatives),), 0.5 / len(negatives))])
    weight, bias, final = _fit_logistic(x, y, w, l2)
    model = classifier.model
    if model.bird is None:
        model.add_bird_head()
        model.bird.requires_grad_(False)
    with torch.no_grad():
        model.bird.weight.copy_(weight[None].to(model.bird.weight))
        model.bird.bias.copy_(bias.view(1).to(model.bird.bias))
    return {"bird_photos": len(shots), "negative_photos": len(negatives), "loss": round(final, 4)}
