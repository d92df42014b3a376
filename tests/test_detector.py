"""The bird detector (resnext.detector): stored with the model, frozen, framed whole, and fast."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from resnext import Preprocessing, load_checkpoint, read_metadata, save_checkpoint
from resnext.detector import BirdDetector, crop_boxes, square_around
from resnext.fast import onednn_usable
from resnext.inference import Classifier
from resnext.composition import architecture_cost, build_model

from conftest import CLASSES, randomize_batchnorm

TINY = {"layers": [1, 1, 1, 1], "cardinality": 4, "group_depth": 2, "num_classes": len(CLASSES), "stem_width": 8}


def tiny_with_detector(size: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_batchnorm(build_model({**TINY, "detector": size}), seed).eval()
    for head in (model.detector.bird, model.detector.cells, model.detector.zoom):
        head.weight.normal_(0, 0.05)
        head.bias.normal_(0, 0.5)
    return model


def test_a_checkpoint_with_a_detector_keeps_it_and_one_without_has_none(tmp_path):
    model = tiny_with_detector()
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"))
    info = read_metadata(path)
    assert info.architecture["detector"] == 96 and info.preprocessing.framing == "whole"
    loaded, _ = load_checkpoint(path)
    for name, tensor in model.detector.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.allclose(loaded.detector.state_dict()[name], tensor.half().float()), name
    plain = save_checkpoint(tmp_path / "p.safetensors", build_model(TINY), CLASSES)
    assert load_checkpoint(plain)[0].detector is None and read_metadata(plain).preprocessing.framing == "crop"
    params, _ = architecture_cost({**TINY, "detector": 96}, 64)
    assert params == sum(p.numel() for p in model.parameters())


def test_a_checkpoint_missing_the_detector_it_declares_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "p.safetensors", build_model(TINY), CLASSES)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["resnext"])
    meta["architecture"]["detector"] = 96  # declares a detector, holds none
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(path), str(forged), metadata={"resnext": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"missing \['detector\."):
        load_checkpoint(forged)


def test_the_detector_stays_frozen_in_training_mode_and_through_batchnorm_recalibration():
    from resnext.training.context import recalibrate_batchnorm

    model = tiny_with_detector()
    before = copy.deepcopy(model.detector.state_dict())
    model.train()
    assert not model.detector.training and model.conv1.training
    assert not any(p.requires_grad for p in model.detector.parameters())
    batches = [(torch.randn(4, 3, 64, 64), torch.zeros(4))]
    recalibrate_batchnorm(model, batches, torch.device("cpu"), None)
    after = model.detector.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.conv1[1].running_mean, torch.zeros(8))  # the ResNeXt's own BN did change


def test_whole_framing_shows_the_network_every_side_of_a_wide_photo():
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[:, :20] = (255, 0, 0)  # a red left edge and a blue right edge: a centre crop loses both
    photo[:, -20:] = (0, 0, 255)
    image = Image.fromarray(photo)
    whole = np.asarray(Preprocessing(96, 96, framing="whole").crop(image)).astype(int)
    crop = np.asarray(Preprocessing(96, 96).crop(image)).astype(int)
    assert whole[48, 1, 0] > 200 and whole[48, -2, 2] > 200  # both edges are in the square
    assert crop[48, 1, 0] < 50 and crop[48, -2, 2] < 50
    assert Preprocessing(96, 96, framing="whole").crop_box(300, 200) == (0.0, -50.0, 300.0, 250.0)
    # The square above and below the photo is its own edge rows, blurred: no black bars.
    assert whole[2, 48].sum() == pytest.approx(whole[30, 48].sum(), abs=30)


def test_square_around_stays_inside_the_photo():
    assert square_around((5, 5), 50, (300, 200)) == (0.0, 0.0, 50.0, 50.0)
    assert square_around((299, 199), 50, (300, 200)) == (250.0, 150.0, 300.0, 200.0)
    assert square_around((150, 100), 1000, (300, 200)) == (50.0, 0.0, 250.0, 200.0)  # at most the shorter side


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("shape", [(1, 3, 192, 288), (1, 3, 224, 224), (1, 3, 320, 32)])
def test_the_packed_detector_computes_what_the_eager_one_does(shape):
    detector = randomize_batchnorm(BirdDetector(96), seed=1)
    x = torch.randn(shape)
    with torch.inference_mode():
        middle, last = detector._backbone(x)
        assert detector.use_fast_path()
        fast_middle, fast_last = detector._backbone(x)
    assert fast_middle.shape == middle.shape and fast_last.shape == last.shape
    assert torch.allclose(fast_last, last, rtol=1e-3, atol=1e-3 * float(last.abs().max()))
    assert torch.allclose(fast_middle, middle, rtol=1e-3, atol=1e-3 * float(middle.abs().max()))
    assert copy.deepcopy(detector)._fast is None  # packed kernels are not copied with the model


@pytest.mark.parametrize("bird_bias, batches", [(10.0, [9]), (-10.0, [3])])
def test_one_batched_resnext_pass_classifies_the_photos_and_their_crops(tmp_path, bird_bias, batches):
    """The detector looks (and looks closer) first; then one ResNeXt pass takes the whole photos and
    the crops (two squares per bird) together, and no crop is classified where the bird check
    already said "not a bird"."""
    model = tiny_with_detector()
    model.detector.bird.bias.fill_(bird_bias)
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"),
                           {"verdict": {"unsure_below": 0.2, "bird_below": 0.5, "find_below": 1.0, "crop_weight": 0.5}})
    classifier = Classifier(*load_checkpoint(path), device="cpu")
    rng = np.random.default_rng(3)
    photos = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in [(200, 300, 3), (240, 160, 3), (99, 99, 3)]]
    seen, features = [], classifier.features
    classifier.features = lambda batch: (seen.append(len(batch)), features(batch))[1]
    answers = classifier.predict(photos, k=3)
    assert seen == batches
    for photo, answer in zip(photos, answers):  # the same answers as one photo at a time
        alone = classifier.predict(photo, k=3)[0]
        assert answer.found == (bird_bias > 0) and answer.found == alone.found and answer.box == alone.box
        assert [p.index for p in answer] == [p.index for p in alone]
        assert [p.prob for p in answer] == pytest.approx([p.prob for p in alone], abs=1e-5)


@pytest.mark.parametrize("bird_bias", [10.0, -10.0])
def test_a_classifier_with_a_detector_answers_from_it(tmp_path, bird_bias):
    model = tiny_with_detector()
    model.detector.bird.bias.fill_(bird_bias)  # a bird everywhere, or nowhere
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"),
                           {"verdict": {"unsure_below": 0.2, "bird_below": 0.5, "find_below": 1.0, "crop_weight": 1.0}})
    classifier = Classifier(*load_checkpoint(path), device="cpu")
    assert "detector" in classifier.fast_path or not onednn_usable()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    answer = classifier.predict(photo)[0]
    sighting = classifier.model.detector.look(photo)
    closer, box = classifier.model.detector.look_closer(photo, sighting.region, classifier.rules.find_margin)
    assert answer.bird == pytest.approx(max(sighting.bird, closer), abs=1e-5)
    if bird_bias > 0:  # find_below 1: every photo is looked at closer, and answered from the crop alone
        crop = classifier.predict(photo.crop(box), find_bird=False)[0]
        assert answer.verdict != "not_a_bird" and answer.found and answer.box == pytest.approx(box)
        assert [p.label for p in answer] == [p.label for p in crop]
    else:  # no bird: the whole photo's answer, and no box drawn on what was not a bird
        assert answer.verdict == "not_a_bird" and not answer.found
        assert answer.box == pytest.approx(classifier.preprocessing.crop_box(300, 200))


def test_the_spot_of_one_hot_corner_cell_is_that_cells_centre():
    """A bird low at the left of a wide photo: only the bottom-left cell of a 3 x 5 map is hot.
    Its centre is (50, 250) in a 500 x 300 photo (width and height swapped, it was (30, 417))."""
    from resnext.detector import _spot

    cells = torch.full((3, 5), -20.0)
    cells[2, 0] = 20.0
    share, (cx, cy) = _spot(cells, (500, 300))
    assert (cx, cy) == pytest.approx((50.0, 250.0), abs=0.01) and share == pytest.approx(1 / 15, abs=1e-3)
    cells = torch.full((5, 3), -20.0)  # a portrait photo, its top-right cell
    cells[0, 2] = 20.0
    assert _spot(cells, (300, 500))[1] == pytest.approx((250.0, 50.0), abs=0.01)


def test_boxes_move_by_at_most_a_pixel_when_the_detectors_maps_move_by_1e_3():
    """The region and the box are continuous in the maps, snapped to whole pixels: noise of 1e-3
    (what another thread count or device gives) moves them by at most 1 px, on 1000 random maps
    of photos of every shape, half of them with a cell right at a cut-off (the most bird-like
    cell less 2 logits, or the closer look's 20 % floor), where a hard step dropped a whole cell."""
    from resnext.detector import box_of, region_of

    gen, moves = torch.Generator().manual_seed(0), []
    for i in range(1000):
        width, height = (int(v) for v in torch.randint(120, 1600, (2,), generator=gen))
        rows, cols = max(1, round(9 * height / max(width, height))), max(1, round(9 * width / max(width, height)))
        cells = torch.randn(rows, cols, generator=gen) * 3 - 2
        fine = torch.randn(14, 14, generator=gen) * 3 - 2
        if i % 2:
            cells.view(-1)[int(torch.randint(cells.numel(), (1,), generator=gen))] = cells.max() - 2.0
            fine.view(-1)[int(torch.randint(fine.numel(), (1,), generator=gen))] = math.log(0.2 / 0.8)
        share, region = region_of(cells, (width, height))
        moved = region_of(cells + 1e-3 * torch.randn(cells.shape, generator=gen), (width, height))[1]
        box = box_of(fine, region, 1.6, (width, height))
        box_moved = box_of(fine + 1e-3 * torch.randn(fine.shape, generator=gen), region, 1.6, (width, height))
        assert all(v == round(v) for v in region + box)  # whole pixels
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        moves.append(max(abs(a - b) for a, b in zip(region + box, moved + box_moved)))
    assert max(moves) <= 1.0, sorted(moves)[-5:]


def surer_crop(classifier, photo) -> tuple[tuple, list]:
    """(box, answer) of the surer of find-the-bird's two squares, each classified on its own."""
    detector = classifier.model.detector
    box = detector.look_closer(photo, detector.look(photo).region, classifier.rules.find_margin)[1]
    tight, wide = crop_boxes(box, photo.size)
    answers = [classifier.predict(photo.crop(b), k=3, find_bird=False)[0] for b in (tight, wide)]
    return (wide, answers[1]) if answers[1][0].prob > answers[0][0].prob else (tight, answers[0])


def test_crop_boxes_are_the_closer_looks_box_and_a_wider_square_around_it_inside_the_photo():
    tight, wide = crop_boxes((100.0, 40.0, 150.0, 90.0), (400, 300))
    assert tight == (100.0, 40.0, 150.0, 90.0) and wide == (85.0, 25.0, 165.0, 105.0)  # 1.6 x 50 px, the same centre
    assert crop_boxes((0.0, 0.0, 50.0, 50.0), (400, 300))[1] == (0.0, 0.0, 80.0, 80.0)  # moved inside, still holding it
    assert crop_boxes((0.0, 0.0, 250.0, 250.0), (400, 300))[1] == (0.0, 0.0, 300.0, 300.0)  # at most the shorter side


def always_finding(tmp_path, **verdict) -> Classifier:
    """A tiny classifier whose detector always sees a bird, looking closer at every photo, its
    crop's answer standing alone (``verdict`` adds or overrides rules)."""
    model = tiny_with_detector()
    model.detector.bird.bias.fill_(10.0)
    rules = {"unsure_below": 0.2, "bird_below": 0.5, "find_below": 1.0, "crop_weight": 1.0, **verdict}
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"), {"verdict": rules})
    return Classifier(*load_checkpoint(path), device="cpu")


def noise_photos(count: int, seed: int) -> list:
    """``count`` photos of noise, each of its own shape (80-300 px a side)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (int(rng.integers(80, 300)), int(rng.integers(80, 300)), 3), dtype=np.uint8))
            for _ in range(count)]


def test_find_the_bird_answers_from_the_surer_of_two_squares_and_shows_that_one(tmp_path):
    """The crop's answer is the surer of the closer look's box and the square WIDER times it, each
    classified as it would be alone, and the box shown is the one answered from; both happen."""
    classifier = always_finding(tmp_path, find_margin=1.0)
    photos = noise_photos(16, seed=7)
    answers, wider = classifier.predict(photos, k=3), set()
    for photo, answer in zip(photos, answers):
        box, expected = surer_crop(classifier, photo)
        tight = classifier.model.detector.look_closer(photo, classifier.model.detector.look(photo).region, 1.0)[1]
        wider.add(box != tight)
        assert answer.found and answer.box == pytest.approx(box)
        assert [p.index for p in answer] == [p.index for p in expected]
        assert [p.prob for p in answer] == pytest.approx([p.prob for p in expected], abs=1e-5)
    assert wider == {True, False}


def test_a_crop_less_sure_than_the_whole_photo_leaves_the_whole_photos_answer(tmp_path):
    """crop_when "surer": each photo is answered from its crop where the crop's top-1 is surer
    than the whole photo's, else from the whole photo (no box found); a batch answers as alone."""
    classifier = always_finding(tmp_path, crop_when="surer")
    photos = noise_photos(12, seed=5)
    answers, kinds = classifier.predict(photos, k=3), set()
    for photo, answer in zip(photos, answers):
        whole = classifier.predict(photo, k=3, find_bird=False)[0]
        box, crop = surer_crop(classifier, photo)
        expected = crop if crop[0].prob > whole[0].prob else whole
        kinds.add(expected is crop)
        assert answer.found == (expected is crop) and [p.index for p in answer] == [p.index for p in expected]
        assert [p.prob for p in answer] == pytest.approx([p.prob for p in expected], abs=1e-5)
        assert answer.box == pytest.approx(box if expected is crop else classifier.preprocessing.crop_box(*photo.size))
    assert kinds == {True, False}  # both happened


@pytest.mark.parametrize("crop_weight", [0.5, 1.0])
def test_the_heatmap_of_a_crop_is_drawn_inside_the_whole_photos(tmp_path, crop_weight):
    """Find-the-bird classified a crop: the heatmap is the crop's inside the box and the whole
    photo's (the same class) around it, the whole photo tinted and the box drawn."""
    from resnext.explain import conv5_cams, heatmap_on_photo

    model = tiny_with_detector()
    model.detector.bird.bias.fill_(10.0)
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"),
                           {"verdict": {"unsure_below": 0.2, "bird_below": 0.5, "find_below": 1.0, "crop_weight": crop_weight}})
    classifier = Classifier(*load_checkpoint(path), device="cpu")
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (160, 260, 3), dtype=np.uint8))
    e = classifier.explain(photo)
    assert e.found and e.whole_cam is not None and e.whole_box == classifier.preprocessing.crop_box(260, 160)
    whole = classifier.features(classifier.preprocessing(photo)[None])
    expected = conv5_cams(classifier.model, whole, [e.target], "gradcam", (64, 64))[0]
    assert np.allclose(e.whole_cam, expected, atol=1e-5)
    left, top, right, bottom = (round(v) for v in e.box)
    inside, around = heatmap_on_photo(e.cam, (260, 160), e.box), heatmap_on_photo(expected, (260, 160), e.whole_box)
    assert np.allclose(e.heatmap[top:bottom, left:right], inside[top:bottom, left:right])
    outside = np.ones((160, 260), bool)
    outside[top:bottom, left:right] = False
    assert np.allclose(e.heatmap[outside], around[outside]) and around[outside].max() > 0.1
    tinted = np.abs(e.overlay_with(0.5).astype(int) - np.asarray(photo).astype(int)).sum(2)
    assert (tinted[outside] > 0).mean() > 0.9  # the photo around the box is tinted too
    assert classifier.explain(photo, find_bird=False).whole_cam is None


def test_a_batch_takes_one_detector_pass_per_look_off_the_packed_path(tmp_path):
    """Without the CPU's packed kernels (a GPU, or fast=False): the first looks of a batch take one
    detector pass per photo shape, the closer looks one pass for all, with the same answers as
    one photo at a time."""
    model = tiny_with_detector()
    model.detector.bird.bias.fill_(10.0)
    path = save_checkpoint(tmp_path / "d.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"),
                           {"verdict": {"unsure_below": 0.2, "bird_below": 0.5, "find_below": 1.0, "crop_weight": 0.5}})
    classifier = Classifier(*load_checkpoint(path), device="cpu", fast=False)
    detector, calls = classifier.model.detector, []
    forward, closer = detector.forward, detector.closer
    detector.forward = lambda x: (calls.append(("first", len(x))), forward(x))[1]
    detector.closer = lambda x: (calls.append(("closer", len(x))), closer(x))[1]
    rng = np.random.default_rng(4)
    shapes = [(200, 300, 3), (240, 160, 3), (200, 300, 3), (99, 99, 3)]
    photos = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in shapes]
    answers = classifier.predict(photos, k=3)
    assert sorted(calls) == [("closer", 4), ("first", 1), ("first", 1), ("first", 2)]
    for photo, answer in zip(photos, answers):
        alone = classifier.predict(photo, k=3)[0]
        assert answer.found and answer.box == alone.box and [p.index for p in answer] == [p.index for p in alone]
        assert [p.prob for p in answer] == pytest.approx([p.prob for p in alone], abs=1e-5)
        assert answer.bird == pytest.approx(alone.bird, abs=1e-6)
