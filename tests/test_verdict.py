"""Verdicts, find-the-bird and the locator head (resnext.verdict, Classifier with a locator)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from resnext import Classifier, Preprocessing, load_checkpoint, save_checkpoint
from resnext.__main__ import main
from resnext.composition import build_model
from resnext.transforms import wider_shot
from resnext.verdict import VerdictRules, bird_box, choose_unsure, default_unsure, raised_for_precision

from conftest import CLASSES, tiny_model


def test_default_unsure_lets_a_three_class_model_be_unsure():
    assert default_unsure(3) == 0.556  # a third of the way from chance (0.33) to certainty, to 3 digits
    assert default_unsure(100) == 0.34 and default_unsure(7) == 0.429
    assert default_unsure(1) == 1.0 and default_unsure(0) == 1.0  # one class: chance is certainty
    assert default_unsure(3) > 1 / 3 and default_unsure(2) > 1 / 2


def test_verdict_thresholds_are_strict():
    """At the threshold itself: a bird, and sure (``<``, not ``<=``)."""
    rules = VerdictRules(unsure_below=0.4, bird_below=0.1)
    assert rules.verdict(0.4, 0.1) == "species"
    assert rules.verdict(0.39999, 0.1) == "unsure" and rules.verdict(0.4, 0.09999) == "not_a_bird"


def test_mix_weights_the_crop():
    whole, crop = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])
    assert torch.allclose(VerdictRules(0.3, crop_weight=0.25).mix(whole, crop), torch.tensor([0.3, 0.7]))


def test_choose_unsure_at_its_edges():
    right, wrong = [0.9] * 5, [0.1] * 5
    assert choose_unsure(right, wrong, 10) == (0.11, "validation (minimum summed error rate)")  # 5 of each: enough
    assert choose_unsure(right[:4], wrong, 10)[0] == default_unsure(10)
    assert choose_unsure(right, wrong[:4], 10)[0] == default_unsure(10)
    assert choose_unsure(right, wrong, 10, others=[0.5] * 5)[0] == 0.51  # unknown species push it above them
    assert choose_unsure([0.5] * 5, [0.49] * 5, 10)[0] == 0.5  # a right answer at the threshold is not flagged


@pytest.mark.parametrize("top1, bird, expected", [
    (0.9, 0.9, "species"), (0.2, 0.9, "unsure"), (0.9, 0.05, "not_a_bird"), (0.2, 0.05, "not_a_bird"), (0.9, None, "species"),
])
def test_verdict_rules(top1, bird, expected):
    assert VerdictRules(unsure_below=0.4, bird_below=0.1).verdict(top1, bird) == expected


def test_rules_without_a_bird_check_never_say_not_a_bird():
    assert VerdictRules(unsure_below=0.4).verdict(0.9, 0.0) == "species"


@pytest.mark.parametrize("field, value, allowed", [
    ("unsure_below", 1.5, "[0, 1]"), ("crop_weight", -0.1, "[0, 1]"), ("crop_weight", 1.5, "[0, 1]"),
    ("find_below", 1.5, "[0, 1]"), ("find_margin", 4.5, "[0.5, 4]"), ("find_margin", 0.4, "[0.5, 4]"),
    ("bird_below", 2.0, "[0, 1] or null"), ("unsure_below", "x" * 100, "[0, 1]"),
])
def test_bad_rules_name_the_value(field, value, allowed):
    kwargs = {"unsure_below": 0.3, field: value}
    shown = repr(str(value)[:40])  # long values are cut to 40 characters
    with pytest.raises(ValueError) as err:
        VerdictRules(**kwargs)
    assert str(err.value) == f"verdict {field} must be a number in {allowed}, got {shown}"


def test_rules_at_the_edges_of_their_ranges_are_accepted():
    rules = VerdictRules(unsure_below=0.0, bird_below=1.0, find_below=1.0, crop_weight=1.0, find_margin=4.0)
    assert rules.find_margin == 4.0 and VerdictRules(1.0, None, 0.0, 0.0, find_margin=1.0).bird_below is None
    with pytest.raises(ValueError) as err:
        VerdictRules(0.3, source=["a" * 50])
    assert str(err.value) == f"verdict source must be text, got {str(['a' * 50])[:40]!r}"
    with pytest.raises(ValueError) as err:
        VerdictRules.from_provenance({"verdict": "x" * 60}, 3, True)
    assert str(err.value) == f"the verdict rules must be an object, got {'x' * 40!r}"


def test_a_closer_look_counts_less_its_offset_in_logits():
    import math

    rules = VerdictRules(0.3, bird_below=0.5, closer_offset=math.log(99))  # 0.99 -> logit 4.595 -> 0.5
    assert rules.closer_bird(0.2, 0.99) == pytest.approx(0.5, abs=1e-6)
    assert rules.closer_bird(0.7, 0.99) == pytest.approx(0.7)  # the whole photo's score when it is higher
    assert VerdictRules(0.3).closer_bird(0.2, 0.99) == pytest.approx(0.99)  # no offset: the higher one
    both = rules.closer_bird(torch.tensor([0.2, 0.7]), torch.tensor([0.99, 0.1]))
    assert torch.allclose(both, torch.tensor([0.5, 0.7]), atol=1e-6)
    with pytest.raises(ValueError, match=r"closer_offset must be a number in \[0, 20\]"):
        VerdictRules(0.3, closer_offset=-1)


def test_looks_closer_only_at_a_bird_that_covers_less_than_find_below():
    rules = VerdictRules(0.3, bird_below=0.2, find_below=0.5)
    assert rules.looks_closer(0.2, 0.3)  # a bird exactly at the bird threshold is a bird
    assert not rules.looks_closer(0.9, 0.0)  # no bird found: nothing to look at
    assert not rules.looks_closer(0.9, 0.5)  # at find_below: big enough already
    assert not rules.looks_closer(0.9, 0.9) and not rules.looks_closer(0.1, 0.3)


def test_rules_from_provenance():
    stored = {"verdict": {"unsure_below": 0.4, "bird_below": 0.2, "find_below": 0.5, "crop_weight": 0.75, "source": "x"}}
    assert VerdictRules.from_provenance(stored, 100, has_bird_score=True) == VerdictRules(0.4, 0.2, 0.5, 0.75, "x")
    # a model with neither a locator nor a bird head keeps the unsure threshold only
    assert VerdictRules.from_provenance(stored, 100, has_bird_score=False) == VerdictRules(0.4, source="x")
    # an older checkpoint: its unsure_below metric, unless it is at or under chance
    assert VerdictRules.from_provenance({"metrics": {"unsure_below": 0.3}}, 100, False).unsure_below == 0.3
    assert VerdictRules.from_provenance({"metrics": {"unsure_below": 0.3}}, 3, False).unsure_below == default_unsure(3)
    legacy = VerdictRules.from_provenance({"metrics": {"unsure_below": 0.3}}, 5, False)  # chance 0.2: above it
    assert legacy == VerdictRules(0.3, source="metrics.unsure_below")
    assert VerdictRules.from_provenance({"metrics": {"unsure_below": 0.5}}, 2, False).unsure_below == default_unsure(2)
    assert VerdictRules.from_provenance({"metrics": {"unsure_below": 0.9}}, 1, False).unsure_below == 1.0


def test_bird_box_in_numbers():
    """One half-covered cell of a 4x4 map: the centroid is that cell's centre, the side is the
    default margin (1.6) x sqrt(area), or min_side; the box is pushed inside the frame."""
    cells = torch.zeros(4, 4)
    cells[0, 3] = 0.5
    area, box = bird_box(cells)
    assert area == pytest.approx(0.5 / 16)
    side = max(0.3, (0.5 / 16) ** 0.5 * 1.6)  # 0.3: min_side wins
    assert box == pytest.approx((1.0 - side, 0.0, 1.0, side))  # right edge: cx 0.875 would overflow
    cells = torch.full((4, 4), -3.0)  # logits, not probabilities: clamped to 0 ...
    cells[1, 1] = 5.0  # ... and 1
    area, box = bird_box(cells, min_side=0.1)
    assert area == pytest.approx(1 / 16)
    assert box == pytest.approx((0.375 - 0.2, 0.375 - 0.2, 0.375 + 0.2, 0.375 + 0.2))  # side 1.6 x 0.25, centred
    assert bird_box(torch.full((2, 2), 0.25e-6)) == (0.0, (0.0, 0.0, 1.0, 1.0))  # 1e-6 in all: nothing there
    cells = torch.zeros(4, 4)
    cells[2, 1] = 0.5  # half covered, away from the edges: the centroid (0.375, 0.625) is not scaled by the total
    assert bird_box(cells)[1] == pytest.approx((0.375 - 0.15, 0.625 - 0.15, 0.375 + 0.15, 0.625 + 0.15))


def test_bird_box_centres_on_the_covered_cells():
    cells = torch.zeros(3, 3)
    cells[0, 2] = 1.0  # the top-right cell holds the bird
    area, (left, top, right, bottom) = bird_box(cells, margin=1.0, min_side=0.1)
    assert area == pytest.approx(1 / 9)
    assert (left, top, right, bottom) == pytest.approx((2 / 3, 0.0, 1.0, 1 / 3), abs=1e-6)
    area, box = bird_box(torch.ones(3, 3))
    assert area == pytest.approx(1.0) and box == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert bird_box(torch.zeros(4, 4)) == (0.0, (0.0, 0.0, 1.0, 1.0))


def test_the_unsure_threshold_raised_for_a_share_right_when_said():
    right, wrong = [0.4] * 8 + [0.9] * 8, [0.1] * 20 + [0.4] * 2 + [0.7]
    assert choose_unsure(right, wrong, 10)[0] == 0.11  # summed error 3/23; 16 of 19 said right (84 %)
    assert raised_for_precision(0.11, right, wrong, 0.8) == 0.11  # already there: not raised
    assert raised_for_precision(0.11, right, wrong, 0.85) == 0.41  # 8 of 9 said right
    assert raised_for_precision(0.11, right, wrong, 0.9) == 0.71  # 8 of 8
    assert raised_for_precision(0.72, right, wrong, 0.9) == 0.72  # never lowered
    assert raised_for_precision(0.11, right, [0.95] * 5, 0.9) is None  # wrong answers surer than any right one


def test_choose_unsure_separates_right_from_wrong():
    right = [0.9, 0.8, 0.85, 0.7, 0.95, 0.75]
    wrong = [0.2, 0.3, 0.25, 0.35, 0.1, 0.3]
    threshold, how = choose_unsure(right, wrong, 100)
    assert 0.35 < threshold <= 0.7 and how.startswith("validation")
    threshold, how = choose_unsure(right, wrong[:2], 3)  # too few wrong answers to choose on
    assert threshold == default_unsure(3) and how.startswith("default")


def tiny_with_locator(bias: float):
    """A tiny 5-class model whose locator gives the same bird logit ``bias`` everywhere."""
    model = tiny_model()
    model.add_locator()
    torch.nn.init.zeros_(model.locator.weight)
    torch.nn.init.constant_(model.locator.bias, bias)
    return model


@pytest.fixture()
def located(tmp_path):
    """A checkpoint whose locator is a constant: the verdict depends only on the rules."""
    path = tmp_path / "located.safetensors"
    rules = {"unsure_below": 0.0, "bird_below": 0.5, "find_below": 1.0, "crop_weight": 1.0}
    save_checkpoint(path, tiny_with_locator(3.0), CLASSES, Preprocessing(64, 64), {"verdict": rules})
    return path


def test_locator_round_trips_through_a_checkpoint(located):
    model, info = load_checkpoint(located)
    assert info.architecture["locator"] is True and model.locator is not None
    assert build_model(info.architecture).config() == model.config()
    cells = model.forward_locator(model.forward_features(torch.zeros(2, 3, 64, 64)))
    assert cells.shape == (2, 2, 2) and torch.allclose(torch.sigmoid(cells), torch.tensor(0.9526), atol=1e-4)


def test_a_bird_is_named_and_a_non_bird_is_said(located, photo):
    model, info = load_checkpoint(located)
    (answer,) = Classifier(model, info, device="cpu").predict(photo, k=3, find_bird=False)
    assert answer.verdict == "species" and answer.bird == pytest.approx(0.9526, abs=1e-4) and not answer.found
    torch.nn.init.constant_(model.locator.bias, -3.0)  # now no cell looks like a bird
    (answer,) = Classifier(model, info, device="cpu").predict(photo, k=3)
    assert answer.verdict == "not_a_bird" and answer.bird < 0.5 and not answer.found


def test_find_the_bird_classifies_a_crop_and_draws_its_box(located, photo):
    model, info = load_checkpoint(located)
    classifier = Classifier(model, info, device="cpu")
    cells = torch.full((1, 2, 2), -8.0)  # only the top-left conv5 cell sees a bird: a small bird, top left
    cells[0, 0, 0] = 8.0
    classifier.model.forward_locator = lambda features: cells.expand(len(features), 2, 2)
    (answer,) = classifier.predict(photo, k=3)
    assert answer.found and answer.verdict == "species"
    left, top, right, bottom = answer.box
    seen = classifier.preprocessing.crop_box(120, 90)  # the centre square the first pass saw
    # a quarter of the cells covered: a box of side sqrt(1/4) x 1.6 (the margin), in the top-left corner
    assert (left, top) == pytest.approx(seen[:2]) and right - left == pytest.approx(0.8 * (seen[2] - seen[0]), rel=0.01)
    explanation = classifier.explain(photo)
    assert explanation.found and explanation.box == answer.box
    drawn = explanation.overlay_with(0.0)  # opacity 0: only the outline differs from the photo
    assert (np.abs(drawn.astype(int) - photo.astype(int)).sum(-1) > 0).sum() > 0
    assert tuple(drawn[round(top) + 1, round((left + right) / 2)]) == (20, 160, 60)
    (plain,) = classifier.predict(photo, k=3, find_bird=False)
    assert not plain.found and plain.box == pytest.approx(seen)


def test_wider_shot_puts_the_photo_in_the_middle_of_its_own_edges():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    wide = wider_shot(photo, 3)
    assert wide.size == (120, 90)
    assert np.array_equal(np.asarray(wide)[30:60, 40:80], np.asarray(photo))
    with pytest.raises(ValueError, match="factor.*0.5"):
        wider_shot(photo, 0.5)


def test_cli_evaluate_reports_verdicts_and_zoom_out(located, tmp_path, capsys, photo):
    for name in CLASSES[:2]:
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(photo).save(tmp_path / "data" / name / "a.png")
    assert main(["evaluate", str(tmp_path / "data"), "--checkpoint", str(located), "--zoom-out", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and sum(report["verdicts"].values()) == pytest.approx(1.0)
    assert report["verdicts"]["species"] == 1.0  # bird score 0.95 everywhere, unsure threshold 0
    assert main(["evaluate", str(tmp_path / "data"), "--checkpoint", str(located), "--zoom-out", "0.5"]) == 2
    assert "--zoom-out must be at least 1, got 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_a_fine_tune_keeps_the_bird_check_only_for_birds(located, tmp_path, mode):
    """The start model's rules (bird check, find-the-bird and its margin) and its bird head survive
    a fine-tune whose validation photos pass the bird check; the rules are dropped when they do not."""
    from resnext.data import load_dataset
    from resnext.training import TrainConfig, train

    from conftest import make_shapes

    data = load_dataset(make_shapes(tmp_path / "shapes", classes=3, per_class=8))
    out = tmp_path / "ft.safetensors"
    rules = {"unsure_below": 0.3, "bird_below": 0.5, "find_below": 0.4, "crop_weight": 1.0, "find_margin": 1.3}
    model, info = load_checkpoint(located)
    model.add_bird_head()  # bird score 0.98 everywhere
    torch.nn.init.constant_(model.bird.bias, 3.0)  # 0.95
    save_checkpoint(located, model, info.classes, info.preprocessing, {"verdict": rules})
    train(data, TrainConfig(mode=mode, init=str(located), epochs=2, batch_size=8), out=out)
    tuned, tuned_info = load_checkpoint(out)
    assert tuned.bird is not None
    if mode == "quick":  # the backbone and its heads stay as they were
        assert float(tuned.bird.bias.detach()) == 3.0
    kept = tuned_info.provenance["verdict"]
    assert kept["bird_below"] == 0.5 and kept["find_below"] == 0.4 and kept["find_margin"] == 1.3
    assert kept["unsure_below"] > 1 / 3  # 3 classes: never under chance
    torch.nn.init.constant_(model.bird.bias, -3.0)  # now nothing looks like a bird to it
    save_checkpoint(located, model, info.classes, info.preprocessing, {"verdict": rules})
    train(data, TrainConfig(mode=mode, init=str(located), epochs=2, batch_size=8), out=out)
    dropped = load_checkpoint(out)[1].provenance["verdict"]
    assert dropped["bird_below"] is None and dropped["find_below"] == 0.0


def scenes(seed: int = 0):
    """Tiny "photos": a bright disc (the bird) or none, on noise."""
    rng = np.random.default_rng(seed)

    def scene(bird: bool) -> Image.Image:
        image = rng.normal(110, 30, (64, 64, 3))
        if bird:
            yy, xx = np.mgrid[0:64, 0:64]
            image[(yy - 32) ** 2 + (xx - 32) ** 2 < 26**2] = [250, 230, 40]
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

    return scene


def classifier_of(model) -> Classifier:
    from resnext.checkpoint import CheckpointInfo

    info = CheckpointInfo(architecture=model.config(), classes=CLASSES, preprocessing=Preprocessing(64, 64), provenance={})
    return Classifier(model, info, device="cpu", fast=False)


def test_refit_locator_learns_to_tell_birds_from_empty_scenes():
    """The recipe's phase 2: a constant locator, refit on frozen features, scores the "bird"
    photos (a bright disc) above the photos without one (noise), whole and at a third of the frame."""
    from resnext.training.calibrate import refit_locator

    scene = scenes()
    classifier = classifier_of(tiny_with_locator(0.0))
    birds, empty = [scene(True) for _ in range(24)], [scene(False) for _ in range(24)]
    fit = refit_locator(classifier, birds, empty)
    assert fit["bird_photos"] == 72 and fit["negative_photos"] == 24

    def score(photos):
        return classifier.locate(classifier.features(torch.stack([classifier.preprocessing(p) for p in photos])))

    new_birds, new_empty = [scene(True) for _ in range(12)], [scene(False) for _ in range(12)]
    assert score(new_birds).amax((1, 2)).min() > score(new_empty).amax((1, 2)).max()
    assert score([wider_shot(p, 3) for p in new_birds]).amax((1, 2)).mean() > score(new_empty).amax((1, 2)).mean()


def test_both_fits_take_the_bird_maps_computed_once():
    """The recipe computes the bird photos' conv5 maps once for both fits: the heads come out as
    if each fit had computed them itself, and maps of the wrong count are refused."""
    from resnext.training.calibrate import bird_shot_maps, fit_bird_head, refit_locator

    scene = scenes(2)
    birds, empty = [scene(True) for _ in range(8)], [scene(False) for _ in range(8)]
    alone, shared = classifier_of(tiny_with_locator(0.0)), classifier_of(tiny_with_locator(0.0))
    shared.model.load_state_dict(alone.model.state_dict())
    maps = bird_shot_maps(shared, birds, factors=(1, 3))
    assert maps.shape[:2] == (16, shared.model.num_features)
    for fit in (refit_locator, fit_bird_head):
        assert fit(alone, birds, empty, factors=(1, 3)) == fit(shared, birds, empty, factors=(1, 3), bird_maps=maps)
    for name, head in (("locator", alone.model.locator), ("bird", alone.model.bird)):
        other = getattr(shared.model, name)
        assert torch.allclose(head.weight, other.weight, atol=1e-5) and torch.allclose(head.bias, other.bias, atol=1e-5)
    with pytest.raises(ValueError, match="bird_maps has 16 maps; 8 photos x 3 framings"):
        fit_bird_head(shared, birds, empty, factors=(1, 2, 3), bird_maps=maps)


def test_fit_bird_head_adds_a_head_that_tells_birds_from_empty_scenes():
    """A model without a bird head gets one, fit on frozen pooled features; new "bird" photos
    (whole and at half the frame) then score above new empty scenes, and the answers' bird score
    and verdict are the head's."""
    from resnext.training.calibrate import fit_bird_head, negative_views

    scene = scenes(1)
    classifier = classifier_of(tiny_with_locator(3.0))  # the locator alone would call everything a bird
    assert classifier.model.bird is None
    empty = [scene(False) for _ in range(12)]
    views = negative_views(empty, views=4, seed=0)
    assert len(views) == 48 and views[:1] == empty[:1] and all(v.width == v.height <= 64 for v in views[1:4])
    fit = fit_bird_head(classifier, [scene(True) for _ in range(24)], views, factors=(1, 2))
    assert fit["bird_photos"] == 48 and fit["negative_photos"] == 48
    assert fit["loss"] < 0.1  # the loss it ends at: it starts from zero weights, at ln 2 = 0.693
    assert classifier.model.config()["bird_head"] is True

    def score(photos):
        features = classifier.features(torch.stack([classifier.preprocessing(p) for p in photos]))
        return classifier.bird_scores(features, classifier.locate(features))

    new_birds, new_empty = [scene(True) for _ in range(12)], [scene(False) for _ in range(12)]
    assert score(new_birds).min() > score(new_empty).max()
    assert score([wider_shot(p, 2) for p in new_birds]).min() > score(new_empty).max()
    classifier.rules = VerdictRules(0.0, bird_below=float(score(new_empty).max()) + 1e-4)
    answers = classifier.predict(new_birds[:2] + new_empty[:2], k=1, find_bird=False)
    assert [a.verdict for a in answers] == ["species", "species", "not_a_bird", "not_a_bird"]
    assert answers[2].bird == pytest.approx(float(score(new_empty[:1])[0]), abs=1e-5)


def test_a_bird_head_round_trips_and_outranks_the_locator(located, tmp_path, photo):
    """With a bird head the verdict follows it, not the locator's best cell; the head travels in
    the checkpoint, and a model with a bird head alone (no locator) keeps its bird check."""
    model, info = load_checkpoint(located)  # locator: 0.95 everywhere, bird_below 0.5
    model.add_bird_head()
    with torch.no_grad():  # a new head says "bird" until it is fit
        assert float(torch.sigmoid(model.forward_bird(model.forward_features(torch.zeros(1, 3, 64, 64))))) == pytest.approx(0.982, abs=1e-3)
    torch.nn.init.constant_(model.bird.bias, -5.0)
    path = save_checkpoint(tmp_path / "head.safetensors", model, info.classes, info.preprocessing, info.provenance)
    loaded, loaded_info = load_checkpoint(path)
    assert loaded_info.architecture["bird_head"] is True and float(loaded.bird.bias.detach()) == -5.0
    (answer,) = Classifier(loaded, loaded_info, device="cpu").predict(photo, k=3)
    assert answer.verdict == "not_a_bird" and answer.bird == pytest.approx(float(torch.sigmoid(torch.tensor(-5.0))), abs=1e-5)
    loaded.locator = None  # the bird head alone still gives a bird score and its rules
    classifier = Classifier(loaded, loaded_info, device="cpu")
    assert classifier.rules.bird_below == 0.5
    assert classifier.predict(photo, k=3)[0].verdict == "not_a_bird"
    with pytest.raises(ValueError, match="no bird head"):
        tiny_model().forward_bird(torch.zeros(1, 64, 2, 2))


@pytest.mark.parametrize("height, width", [(120, 160), (200, 120)])  # landscape and portrait
def test_find_the_bird_classifies_the_crop_it_reports(tmp_path, height, width):
    """The second pass sees exactly the box the answer reports (and the app draws), inside the
    part of the photo the network saw, whichever way the photo stands."""
    model = tiny_model()
    model.add_locator()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.locator.weight, std=2.0)  # a bird score that differs from cell to cell
    torch.nn.init.constant_(model.locator.bias, -1.0)
    rules = {"unsure_below": 0.0, "bird_below": None, "find_below": 1.0, "crop_weight": 1.0, "find_margin": 1.0}
    path = save_checkpoint(tmp_path / "m.safetensors", model, CLASSES, Preprocessing(64, 72), {"verdict": rules})
    classifier = Classifier(*load_checkpoint(path), device="cpu", fast=False)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    (answer,) = classifier.predict(photo, k=5)
    whole = classifier.preprocessing.crop_box(*photo.size)
    assert answer.found and answer.box != tuple(whole)
    left, top, right, bottom = answer.box
    assert whole[0] - 1e-6 <= left < right <= whole[2] + 1e-6 and whole[1] - 1e-6 <= top < bottom <= whole[3] + 1e-6
    assert right - left == pytest.approx(bottom - top, rel=1e-6)  # a square crop, on a portrait photo too
    (direct,) = classifier.predict(photo.crop(answer.box), k=5, find_bird=False)
    assert [p.label for p in answer] == [p.label for p in direct]
    assert np.allclose([p.prob for p in answer], [p.prob for p in direct], atol=1e-6)


def test_choose_rules_lets_at_most_one_percent_of_each_bird_group_through():
    """The bird threshold holds for every group of held-out birds, not just for their total: birds
    of other species, which score lower, are not sacrificed to the model's own."""
    from resnext.training.calibrate import Passes, choose_rules

    def passes(bird: torch.Tensor) -> tuple[Passes, torch.Tensor]:
        labels = torch.arange(len(bird)) % len(CLASSES)
        probs = torch.nn.functional.one_hot(labels, len(CLASSES)).float() * 0.9 + 0.02
        return Passes(probs, probs, bird, torch.zeros(len(bird))), labels

    own, own_labels = passes(torch.linspace(0.6, 1.0, 400))
    others, _ = passes(torch.linspace(0.2, 1.0, 100))
    rules, _ = choose_rules({"plain": (own, own_labels)}, [own, others], others, len(CLASSES))
    for group in (own, others):
        assert float((group.bird < rules.bird_below).float().mean()) <= 0.01
    assert 0.2 < rules.bird_below < 0.22  # their 1% quantile; 1% of all 500 (0.232) would let 5% of them through


def test_a_fine_tunes_unsure_threshold_falls_between_its_right_and_wrong_answers(monkeypatch):
    """With 5 right and 5 wrong validation answers the threshold is chosen on them: right answers
    at 80-90 % and wrong ones at 40-48 % put it between the two (given the two lists swapped, it
    fell to the lowest possible, 0.05; no fine-tune in the suite had 5 of each)."""
    import resnext.training.calibrate as calibrate
    from conftest import tiny_model

    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    right = [0.80, 0.82, 0.84, 0.86, 0.90]
    wrong = [0.40, 0.42, 0.44, 0.46, 0.48]  # over 1/3: each still the top-1 among three
    probs = torch.full((10, 3), 0.0)
    for i, (y, p) in enumerate(zip(labels, right + wrong)):
        top = y if i < 5 else (y + 1) % 3  # the first five right, the last five wrong
        probs[i] = (1 - p) / 2
        probs[i, top] = p
    monkeypatch.setattr(calibrate, "run_passes", lambda classifier, photos: None)
    monkeypatch.setattr(calibrate, "combined", lambda passes, rules: probs)
    monkeypatch.setattr(calibrate, "_bird_check", lambda classifier, below, photos: (None, "off"))
    val = [(f"photo{i}.png", y) for i, y in enumerate(labels)]
    rules = calibrate.rules_for_fine_tune(tiny_model(3), ["a", "b", "c"], Preprocessing(64, 72), val, None)
    assert 0.48 < rules.unsure_below <= 0.80, rules.unsure_below
    assert "validation" in rules.source


def test_a_crop_counts_always_or_only_where_it_is_surer():
    always, surer = VerdictRules(0.3), VerdictRules(0.3, crop_when="surer")
    assert always.crop_counts(0.9, 0.2) and surer.crop_counts(0.4, 0.6) and not surer.crop_counts(0.6, 0.6)
    whole, crop = torch.tensor([0.9, 0.4, 0.5]), torch.tensor([0.2, 0.6, 0.5])
    assert always.crop_counts(whole, crop).tolist() == [True] * 3 and surer.crop_counts(whole, crop).tolist() == [False, True, False]
    with pytest.raises(ValueError) as err:
        VerdictRules(0.3, crop_when="sometimes")
    assert str(err.value) == "verdict crop_when must be one of ('always', 'surer'), got 'sometimes'"
    assert VerdictRules.from_provenance({"verdict": {"unsure_below": 0.3}}, 3, True).crop_when == "always"  # older files


def test_logistic_fit_standardises_in_blocks_as_over_all_rows(monkeypatch):
    """The heads' fits standardise their rows a block at a time (the detector's fine rows are
    ~4 GB): the same mean and deviation as over all rows at once, and the same fit."""
    import resnext.training.calibrate as calibrate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=gen) * torch.tensor([1.0, 3.0, 0.1, 10.0, 1.0, 0.0]) + 5
    y = (x[:, 0] + 0.1 * torch.randn(5000, generator=gen) > 5).float()
    whole = calibrate._fit_logistic(x, y, torch.ones(5000), l2=1e-3)
    monkeypatch.setattr(calibrate, "_ROWS", 333)  # blocks that do not divide the rows
    mean, std = calibrate._mean_std(x)
    assert torch.allclose(mean, x.mean(0)) and torch.allclose(std, x.std(0).clamp_min(1e-6), rtol=1e-5)
    weight, bias, loss = calibrate._fit_logistic(x, y, torch.ones(5000), l2=1e-3)
    assert torch.allclose(weight, whole[0], atol=1e-4) and abs(float(bias - whole[1])) < 1e-3
    assert ((x @ weight + bias > 0).float() == y).float().mean() > 0.95  # it still separates
