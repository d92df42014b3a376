"""Birds pasted into scenes for the detector's fits (resnext.recipes.pastes)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from resnext.recipes.pastes import KINDS, mask_coverage, mask_of, paste


@pytest.mark.parametrize("kind", KINDS)
def test_a_soft_mask_fades_out_before_the_bird_photos_edges(kind):
    for seed in range(20):
        for width, height in ((120, 80), (40, 90), (300, 300)):
            mask = np.asarray(mask_of(kind, width, height, random.Random(seed)), dtype=np.float32)
            assert mask.shape == (height, width)
            edges = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
            if kind == "rect":
                assert mask.min() == 255
            else:  # no straight edge for a detector to learn: the border is (almost) empty, the middle full
                assert edges.max() <= 40, (seed, width, height, edges.max())
                assert mask[height // 2, width // 2] >= 150 and 0.1 <= mask.mean() / 255 <= 0.8


def test_paste_puts_the_bird_where_its_mask_says():
    scene = Image.new("RGB", (400, 200), (0, 0, 255))
    bird = Image.new("RGB", (90, 60), (255, 0, 0))
    for kind in KINDS:
        photo, box, mask = paste(scene, bird, 0.5, random.Random(1), 0, kind=kind)
        assert photo.size == mask.size == (400, 200) and box[2] - box[0] == 100 and box[3] - box[1] == 67
        red, m = np.asarray(photo)[..., 0].astype(float), np.asarray(mask).astype(float)
        assert np.abs(red - m).max() <= 2  # red where the mask is, in proportion
        cover = mask_coverage(mask, 2, 4)
        assert cover.shape == (2, 4) and float(cover.mean()) == pytest.approx(m.mean() / 255, abs=1e-4)
    with pytest.raises(ValueError, match="unknown paste kind 'star'"):
        mask_of("star", 10, 10, random.Random(0))


def test_a_harmonised_paste_moves_the_birds_colour_toward_the_scene():
    scene, bird = Image.new("RGB", (300, 300), (20, 120, 20)), Image.new("RGB", (100, 100))
    bird.putdata([(200 + (i % 7), 40, 40) for i in range(100 * 100)])
    moved = 0
    for seed in range(10):
        photo, box, mask = paste(scene, bird, 0.5, random.Random(seed), 0, harmonise=True)
        inside = np.asarray(photo.crop(box), dtype=np.float32).reshape(-1, 3).mean(0)
        assert inside[0] <= 207 and inside[1] >= 38  # never past the scene's colour
        moved += inside[0] < 195
    assert moved >= 3  # most of the time part of the way
    assert torch.equal(mask_coverage(Image.new("L", (64, 32), 0), 2, 2), torch.zeros(2, 2))
