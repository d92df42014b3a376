"""The verdict rules of a model with a bird detector, chosen on held-out photos only (phase 3 of
:mod:`resnext.recipes.detector`).

Photos: the ResNeXt's validation split as given, in wider shots (the bird at 1/2 and 1/3 of the
frame, on its own blurred edges) and pasted at 1/3 of held-out no-bird scenes of any shape, both as
a rectangle and through a feathered ellipse (:mod:`resnext.recipes.pastes`); the held-out species;
the held-out no-bird photos.

- Find-the-bird (the crop's margin, when to look closer, the crop's weight, and whether the crop
  counts always or only where it is surer than the whole photo): the most birds right on average
  over the scenes of both kinds and the wider shots, among the settings under which the photos as
  given lose nothing (top-1 at least one pass's, at most 2 % of them turned from right to wrong);
  ties go to the model's setting before, then to the setting that looks closer less often.
- "Not a bird": the whole photo's bird score lets at most 1 % of each group of held-out birds as
  given (CUB, other species) through; the closer look's score counts less ``closer_offset`` logits,
  chosen for the fewest birds in scenes lost plus photos with no bird let through.
- "Not sure": :func:`~resnext.verdict.choose_unsure` over right and wrong answers (as given and in
  scenes) and other species, raised where needed until :data:`RIGHT_WHEN_SAID` of the photos as
  given said plainly are right (in scenes, confident answers are right more often than as given).

Training code: serving never imports this module.
"""

from __future__ import annotations

import math
import random

import torch

from ..verdict import CROP_WHEN
from .pastes import paste

MARGINS = (1.0, 1.3, 1.6)  # the crop's side over the bird's estimated side
FIND_BELOW = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45)  # the share of the photo the first look sees bird in
CROP_WEIGHTS = (0.5, 0.75, 1.0)
SCENE_KINDS = ("rect", "ellipse")
MOST_TURNED_WRONG = 0.02  # of the photos as given, by the closer look
OFFSETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
RIGHT_WHEN_SAID = 0.93  # of the photos as given said plainly (not "not sure"), at least: 92 % aimed at, a point for noise


def held_out_scenes(birds: list, labels: list, scenes: list, copies: int = 3, share: float = 1 / 3, seed: int = 1,
                    kind: str = "rect"):
    """Each held-out bird photo pasted through a ``kind`` mask (:mod:`resnext.recipes.pastes`) at
    ``share`` of the shorter side of ``copies`` held-out scenes (any shape, longer side at least
    480 px): (photos, labels)."""
    from ..transforms import load_image
    from .detector import scene_crop

    rng = random.Random(seed)
    photos, out_labels = [], []
    for path, label in list(zip(birds, labels)) * copies:
        scene = scene_crop(load_image(rng.choice(scenes)), rng)
        photos.append(paste(scene, load_image(path), share, rng, max(480, max(scene.size)), kind=kind)[0])
        out_labels.append(label)
    return photos, torch.tensor(out_labels)


def joined(*passes):
    """Several :class:`~resnext.training.calibrate.Passes` as one."""
    from dataclasses import fields

    names = [f.name for f in fields(passes[0])]
    return type(passes[0])(**{n: None if getattr(passes[0], n) is None else torch.cat([getattr(p, n) for p in passes])
                              for n in names})


def find_candidates(classifier, sets: dict, log=print) -> tuple[list, dict, float]:
    """Every find-the-bird setting scored on ``sets`` (name -> (photos, labels); "plain" first):
    ([(top-1s in ``sets``' order, share of plain photos turned right -> wrong, rules, passes)],
    the table of them, the one-pass top-1 of "plain")."""
    from ..training.calibrate import combined, run_passes
    from ..verdict import VerdictRules

    candidates, table, baseline = [], {}, 0.0
    for margin in MARGINS:
        passes = {name: run_passes(classifier, photos, margin=margin) for name, (photos, _) in sets.items()}
        one_pass = passes["plain"].whole.argmax(1) == sets["plain"][1]
        baseline = one_pass.float().mean().item()
        for find_below in FIND_BELOW:
            for weight in CROP_WEIGHTS:
                for when in CROP_WHEN:
                    rules = VerdictRules(0.5, 0.5, find_below, weight, find_margin=margin, crop_when=when)
                    right = {name: combined(passes[name], rules).argmax(1) == y for name, (_, y) in sets.items()}
                    accs = [r.float().mean().item() for r in right.values()]
                    turned = (one_pass & ~right["plain"]).float().mean().item()
                    table[f"margin {margin} find<{find_below} w={weight} {when}"] = [round(a, 4) for a in accs] + [round(turned, 4)]
                    candidates.append((accs, turned, rules, passes))
        log(f"margin {margin} done")
    return candidates, table, baseline


def choose_find(candidates: list, baseline: float, incumbent=None):
    """The best candidate of :func:`find_candidates` (see the module's text); on a tie, the
    ``incumbent`` rules' find-the-bird setting (the model's before) stays."""

    def setting(rules):
        return None if rules is None else (rules.find_margin, rules.find_below, rules.crop_weight, rules.crop_when)

    kept = [c for c in candidates if c[0][0] >= baseline and c[1] <= MOST_TURNED_WRONG]
    kept = kept or [c for c in candidates if c[2].find_below == min(FIND_BELOW)]  # none keeps them: look closer least
    return max(kept, key=lambda c: (round(sum(c[0][1:]) / len(c[0][1:]), 4), setting(c[2]) == setting(incumbent),
                                    -c[2].find_below, c[2].crop_when == "surer"))


def not_sure(rules, plain: tuple, scenes: tuple, others, num_classes: int) -> tuple[float, str]:
    """The "not sure" threshold under ``rules`` (see the module's text) from the passes and labels
    of the ``plain`` photos and the ``scenes``, and the passes of ``others`` (other species):
    (threshold, how chosen)."""
    from ..training.calibrate import combined
    from ..verdict import choose_unsure, raised_for_precision

    answers = {}
    for name, (p, y) in (("plain", plain), ("scenes", scenes)):
        top1, pred = combined(p, rules).max(1)
        answers[name] = (top1[pred == y].tolist(), top1[pred != y].tolist())
    right, wrong = (answers["plain"][i] + answers["scenes"][i] for i in (0, 1))
    unsure, how = choose_unsure(right, wrong, num_classes, combined(others, rules).max(1).values.tolist())
    raised = raised_for_precision(unsure, *answers["plain"], RIGHT_WHEN_SAID)
    aim = f"{RIGHT_WHEN_SAID:.0%} of the photos as given said plainly right"
    then = f"; no threshold gave {aim}" if raised is None else f"; then raised from {unsure} for {aim}" if raised > unsure else ""
    return raised or unsure, f"{how}, over right and wrong answers (plain and in scenes) and other species{then}"


def choose_rules(classifier, groups: dict[str, list], log=print, incumbent=None) -> tuple:
    """The verdict rules from held-out photos (see the module's text); returns (rules, report).
    ``incumbent``: the model's rules before, whose find-the-bird setting stays where another only ties it."""
    from dataclasses import replace

    from ..training.calibrate import combined, run_passes, verdict_birds
    from ..transforms import load_image, wider_shot

    plain = [load_image(p) for p in groups["cub_val"]]
    labels = torch.tensor(groups["cub_val_labels"])
    sets = {"plain": (plain, labels)}
    for kind in SCENE_KINDS:
        sets[f"scenes {kind}"] = held_out_scenes(groups["cub_val"], groups["cub_val_labels"], groups["none_val"], copies=2,
                                                 kind=kind)
    sets["1/2"], sets["1/3"] = ([wider_shot(p, 2) for p in plain], labels), ([wider_shot(p, 3) for p in plain], labels)
    candidates, table, baseline = find_candidates(classifier, sets, log)
    accs, turned, rules, passes = choose_find(candidates, baseline, incumbent)
    scenes = joined(*(passes[f"scenes {kind}"] for kind in SCENE_KINDS))
    scene_labels = torch.cat([sets[f"scenes {kind}"][1] for kind in SCENE_KINDS])
    others = run_passes(classifier, [load_image(p) for p in groups["other_val"]], margin=rules.find_margin)
    nones = run_passes(classifier, [load_image(p, shrink_to=600) for p in groups["none_val"]], margin=rules.find_margin)
    lowest = min(float(torch.quantile(p.bird, 0.01)) for p in (passes["plain"], others))
    rules = replace(rules, bird_below=math.floor(lowest * 100) / 100)
    costs = {}
    for offset in OFFSETS:
        trial = replace(rules, closer_offset=offset)
        lost = float((verdict_birds(scenes, trial) < rules.bird_below).float().mean())
        passed = float((verdict_birds(nones, trial) >= rules.bird_below).float().mean())
        costs[offset] = round(lost + passed, 4)
    rules = replace(rules, closer_offset=min(costs, key=lambda o: (costs[o], o)))
    unsure, how = not_sure(rules, (passes["plain"], labels), (scenes, scene_labels), others, len(classifier.classes))
    rules = replace(rules, unsure_below=unsure, source=(
        "held-out photos: find-the-bird for the best mean top-1 of birds at 1/3 of real scenes (pasted as rectangles and "
        "through feathered ellipses) and in wider shots, among the settings that keep plain photos at least at one pass's "
        "top-1 with at most 2% turned wrong; not a bird: 1% of held-out birds as given let through, the closer look's "
        f"offset for the fewest scene birds lost plus no-bird photos passed; not sure: {how}"))
    top1, pred = combined(passes["plain"], rules).max(1)
    none_birds = verdict_birds(nones, rules)
    report = {
        "find_the_bird_val_top1 (" + ", ".join(sets) + ", plain turned wrong)": table,
        "best": [round(a, 4) for a in accs] + [round(turned, 4)],
        "plain_one_pass": round(baseline, 4),
        "val_not_a_bird": {k: round(float((verdict_birds(p, rules) < rules.bird_below).float().mean()), 4)
                           for k, p in (("plain", passes["plain"]), ("scenes", scenes), ("others", others))},
        "val_no_bird_caught": round(float((none_birds < rules.bird_below).float().mean()), 4),
        "closer_offset_costs": costs,
        "val_said_plainly": round(float((top1 >= unsure).float().mean()), 4),
        "val_right_when_said": round(float((pred == labels)[top1 >= unsure].float().mean()), 4),
    }
    return rules, report
