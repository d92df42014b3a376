"""Distill mode's batched views (resnext/training/views.py) and its clock schedule (clock.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from resnext.training import TrainConfig
from resnext.training.augment import coverage, cutmix
from resnext.training.clock import JUDGEMENTS, SNAPSHOT_S, Clock
from resnext.training.views import (
    BatchViews, Pool, coverage_batch, crop, load_pool, rrc_boxes, trivial_augment, zoom_out_batch,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG = SimpleNamespace(min_scale=0.25, zoom_out=0.5, min_zoom=0.25, real_negatives=0.7)


def halves(width: int, height: int) -> np.ndarray:
    """A photo red on its left half, blue on its right."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2, 0] = 255
    a[:, width // 2 :, 2] = 255
    return a


@pytest.fixture()
def photos(tmp_path):
    """Non-square photos of both orientations and a square one."""
    paths = []
    for i, (w, h) in enumerate([(120, 60), (60, 120), (80, 80), (200, 90)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(halves(w, h)).save(paths[-1])
    return paths


def test_a_pool_keeps_each_photo_as_a_square_and_its_shape(photos):
    pool = load_pool(photos, 40, torch.device("cpu"))
    assert pool.images.shape == (4, 3, 40, 40) and pool.images.dtype == torch.uint8
    assert pool.aspect.tolist() == pytest.approx([2.0, 0.5, 1.0, 200 / 90], rel=0.02)
    assert load_pool(photos, 40, torch.device("cpu"), stop=lambda: True) is None


def test_crops_keep_the_photos_proportions():
    """A crop is drawn in the photo's own pixels: its aspect (width / height in the photo) is
    3/4..4/3 and its area 1/4..1 of the photo, whatever the photo's shape."""
    g = torch.Generator().manual_seed(0)
    aspect = torch.tensor([2.0, 0.5, 1.0, 3.0]).repeat(250)
    box = rrc_boxes(aspect, (0.25, 1.0), g)
    assert box.min() >= -1e-6 and box.max() <= 1 + 1e-6
    w, h = (box[:, 2] - box[:, 0]) * aspect, box[:, 3] - box[:, 1]  # in units of the photo's height
    assert ((w / h) >= 3 / 4 - 1e-4).all() and ((w / h) <= 4 / 3 + 1e-4).all()
    area = w * h / aspect
    assert (area >= 0.25 - 1e-4).all() and (area <= 1 + 1e-4).all()
    assert ((w / h) - 1).abs().max() > 0.2 and area.std() > 0.1  # drawn at random, not one box


def test_a_whole_photo_crop_is_the_photo_resized():
    image = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    pool = Pool(image, torch.ones(1))
    view = crop(pool, torch.tensor([0]), 32, (1.0, 1.0), torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(image.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    assert view.shape == (1, 3, 32, 32) and (view - expected).abs().max() < 1e-4


def test_a_non_square_photos_crop_shows_its_content(photos):
    """The left half of a wide photo is red: a crop's red share is the share of the box left of the middle."""
    pool = load_pool(photos[:1], 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        state = g.get_state()
        box = rrc_boxes(pool.aspect[:1], (0.25, 1.0), g)[0]
        g.set_state(state)
        view = crop(pool, torch.tensor([0]), 32, (0.25, 1.0), g)[0]
        left, right = box[0].item(), box[2].item()
        red_share = (min(0.5, right) - min(0.5, left)) / (right - left)
        assert (view[0] > 0.5).float().mean().item() == pytest.approx(red_share, abs=0.08)


def test_views_stay_images_under_every_operation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, 24, 24, generator=g)
    out = trivial_augment(x.clone(), g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert 0.75 < changed.float().mean() < 1.0  # identity (1 of 14) and weak strengths leave some as they were


def test_equalize_posterize_and_solarize_match_torchvision():
    import torchvision.transforms.v2.functional as TF

    from resnext.training.views import _equalize, _posterize

    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(4, 3, 20, 20, generator=g) ** 2 * 200).to(torch.uint8)
    x = u8.float() / 255
    assert (_equalize(x) * 255 - TF.equalize(u8).float()).abs().max() <= 1
    assert torch.equal((_posterize(x, torch.full((4,), 3.0)) * 255).round(), TF.posterize(u8, 3).float())


def test_zoom_out_puts_the_view_in_its_box_on_the_scene():
    g = torch.Generator().manual_seed(0)
    n, size = 16, 64
    views = torch.ones(n, 3, size, size)  # white views
    scenes = torch.zeros(n, 3, size, size)  # on black scenes
    scenes[::2] = float("nan")  # every other one on its own edges instead
    canvas, boxes = zoom_out_batch(views, torch.linspace(0.25, 1.0, n), scenes, g)
    assert canvas.shape == (n, 3, size, size) and boxes.shape == (n, 4)
    sides = (boxes[:, 2] - boxes[:, 0]) * size
    assert ((sides - torch.linspace(0.25, 1.0, n) * size).abs() <= 2).all()  # the side, to its 4 px step
    for i in range(n):
        l, t, r, b = (boxes[i] * size).round().long().tolist()
        assert canvas[i, :, t:b, l:r].min() > 0.99  # the view, shrunk, fills its box
        if i % 2:  # on the black scene: nothing of the view outside its box
            assert canvas[i].sum().item() == pytest.approx(canvas[i, :, t:b, l:r].sum().item(), rel=1e-4)
        else:  # its own (white) edges stretched out: white everywhere
            assert canvas[i].min() > 0.99


def test_zoom_out_shrinks_without_aliasing():
    """A fine checkerboard shrunk to a quarter is grey, as it would look from afar."""
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(1, 3, 64, 64).clone()
    canvas, boxes = zoom_out_batch(board, torch.tensor([0.25]), None, torch.Generator().manual_seed(0))
    l, t, r, b = (boxes[0] * 64).round().long().tolist()
    assert (canvas[0, :, t + 1 : b - 1, l + 1 : r - 1] - 0.5).abs().max() < 0.05


def test_coverage_batch_is_coverage_row_by_row():
    boxes = torch.tensor([[0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9], [float("nan")] * 4, [0.5, 0.5, 0.75, 1.0]])
    batched = coverage_batch(boxes, 3)
    for i, box in enumerate(boxes.tolist()):
        expected = coverage(None if math.isnan(box[0]) else tuple(box), 3)
        assert torch.allclose(batched[i], expected, atol=1e-6)


def test_cutmix_pastes_one_rectangle_of_its_partner():
    x = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 3, 20, 30).clone()
    mixed = cutmix(x, 0.7, torch.Generator().manual_seed(1))
    for i in mixed.nonzero()[:, 0].tolist():
        other = x[i, 0] != i
        rows, cols = other.any(1).nonzero()[:, 0], other.any(0).nonzero()[:, 0]
        if len(rows):  # the pasted area is one full rectangle
            assert other[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
            assert other.sum() == len(rows) * len(cols)


def test_a_batch_of_views(photos):
    pools = {"labelled": load_pool(photos, 40, torch.device("cpu")), "unlabelled": load_pool(photos[:2], 40, torch.device("cpu")),
             "negatives": load_pool(photos[2:], 40, torch.device("cpu"))}
    views = BatchViews(pools, 32, CONFIG, MEAN, STD, torch.device("cpu"))
    x, boxes = views.batch(torch.tensor([0, 1, 2, 3, 0, 1]), 3, 4)
    assert x.shape == (13, 3, 32, 32) and boxes.shape == (13, 4)
    assert torch.isnan(boxes[9:]).all() and not torch.isnan(boxes[:9]).any()  # negatives have no bird
    assert boxes[:9].min() >= 0 and boxes[:9].max() <= 1
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4  # normalised images
    zoomed = (boxes[:9, 2] - boxes[:9, 0]) < 1
    assert 0 < zoomed.sum() < 9  # some zoomed out (half, on average), some not


# ----------------------------------------------------------------------------- the clock


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_clock_run_ends_its_schedule_on_time():
    """Whatever the speed, the schedule decays to zero as the minutes run out (within 5 %)."""
    for step_s in (0.37, 2.9, 11.0):
        now = FakeTime()
        clock = Clock(SimpleNamespace(minutes=2, epochs=30, warmup_epochs=1), steps_per_epoch=7, now=now)
        lrs, judged, snapped = [], 0, 0
        for _ in clock.epochs():
            for _ in clock.steps():
                lrs.append(clock.lr_factor())
                now.t += step_s
                clock.tick(8)
            judged += clock.judge_now()
            snapped += clock.snapshot_now()
        assert 120 <= now.t < 120 + step_s  # the first step past the time is the last: within 5 % for steps < 6 s
        assert lrs[-1] <= 0.5 * (1 - math.cos(math.pi * step_s / 120 * 1.1)) and max(lrs) > 0.99
        assert lrs.index(max(lrs)) < len(lrs) * 0.1  # warm-up over the first 1/30 of the time
        assert 2 <= judged <= JUDGEMENTS + 2
        assert snapped == 2  # the first judgement and the end: 3 minutes apart at most (SNAPSHOT_S)
    assert SNAPSHOT_S == 180


def test_an_epoch_run_keeps_its_schedule():
    clock = Clock(SimpleNamespace(minutes=None, epochs=3, warmup_epochs=1), steps_per_epoch=5, now=FakeTime())
    seen = [(e, s) for e in clock.epochs() for s in clock.steps() if not clock.tick(1)]
    assert len(seen) == 15 and seen[-1] == (3, 4)


def test_minutes_belong_to_distill_mode():
    with pytest.raises(ValueError, match="minutes must be more than 0"):
        TrainConfig(mode="distill", teacher="t.pt", minutes=0).resolved()
    with pytest.raises(ValueError, match="quick mode counts epochs"):
        TrainConfig(mode="quick", minutes=3).resolved()


def test_the_gpus_way_gives_the_same_views():
    """On a GPU every TrivialAugment operation runs on every view and each is kept where chosen,
    and zoomed views are placed all at once: the same views as the CPU's way (run here on the CPU)."""
    x = torch.rand(120, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sparse = trivial_augment(x.clone(), torch.Generator().manual_seed(5), dense=False)
    dense = trivial_augment(x.clone(), torch.Generator().manual_seed(5), dense=True)
    assert (sparse - dense).abs().max() < 1e-5
    views = torch.rand(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    views = torch.nn.functional.avg_pool2d(views, 5, 1, 2)  # photo-like: smooth, not per-pixel noise
    ratio = torch.linspace(0.25, 1.0, 24)
    grouped, boxes = zoom_out_batch(views, ratio, None, torch.Generator().manual_seed(2), dense=False)
    at_once, same_boxes = zoom_out_batch(views, ratio, None, torch.Generator().manual_seed(2), dense=True)
    assert torch.equal(boxes, same_boxes) and (grouped - at_once).abs().mean() < 0.01
