"""The recipes' photo pools: what the next default model may train on never includes what its
verdicts are chosen on or what is reserved for measuring (skipped without ``../shared/data``)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA

needs_data = pytest.mark.skipif(not (SHARED_DATA / "birds525-valid-480" / "reserved.txt").is_file(),
                                reason="needs ../shared/data")


@needs_data
def test_v6_trains_on_nothing_held_out_or_reserved(tmp_path):
    from resnext.recipes.detector import splits
    from resnext.recipes.v6 import training_config

    shared = SHARED_DATA.parent
    config = training_config(shared, tmp_path, tmp_path / "v6.safetensors")
    trained = {os.path.realpath(p) for folder in config.unlabelled + config.negatives for p in (tmp_path / folder).iterdir()}
    groups = splits(shared)
    reserved = {line.strip() for line in (SHARED_DATA / "birds525-valid-480" / "reserved.txt").read_text().splitlines() if line.strip()}
    held = {os.path.realpath(p) for name in ("cub_val", "other_val", "none_val") for p in groups[name]}
    assert len(trained) == len(groups["other_fit"]) + len(groups["none_fit"]) > 4000
    assert not trained & held
    assert not any(os.path.basename(os.path.dirname(p)) in reserved for p in trained)
    assert config.mode == "distill" and config.teacher_size == 224 and config.train_layers == "all"


def test_v6_never_writes_over_the_installed_model():
    done = subprocess.run([sys.executable, "-m", "resnext.recipes.v6", "--out", "checkpoints/resnext50_32x4d_cub100.safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--out must not be the installed model" in done.stderr


def test_the_detectors_verdict_rules_are_chosen_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """recipes.rules.choose_rules on generated photos: every phase runs (the scenes of each kind,
    the wider shots, the candidates, the bird check, the offset, "not sure"), and the rules it
    returns keep the photos as given at least at one pass's top-1, with at most 2 % turned wrong."""
    import numpy as np
    import torch
    from PIL import Image

    from resnext import Preprocessing, load_checkpoint, save_checkpoint
    from resnext.composition import build_model
    from resnext.inference import Classifier
    from resnext.recipes import rules

    from conftest import CLASSES, randomize_batchnorm
    from test_detector import TINY

    torch.manual_seed(0)
    model = randomize_batchnorm(build_model({**TINY, "detector": 96}), 0).eval()
    model.detector.bird.bias.fill_(2.0)
    model.detector.cells.bias.fill_(-1.0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"), {})
    classifier = Classifier(*load_checkpoint(path), device="cpu")
    rng = np.random.default_rng(0)

    def photos(name, count):
        (tmp_path / name).mkdir()
        for i in range(count):
            shape = (int(rng.integers(60, 140)), int(rng.integers(60, 140)), 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
        return sorted((tmp_path / name).iterdir())

    groups = {"cub_val": photos("val", 12), "cub_val_labels": [i % len(CLASSES) for i in range(12)],
              "other_val": photos("other", 6), "none_val": photos("none", 8)}
    monkeypatch.setattr(rules, "MARGINS", (1.0, 1.3))
    chosen, report = rules.choose_rules(classifier, groups, log=lambda message: None)
    assert chosen.find_margin in (1.0, 1.3) and chosen.crop_when in ("always", "surer") and chosen.bird_below is not None
    best = report["best"]
    assert best[0] >= report["plain_one_pass"] and best[-1] <= rules.MOST_TURNED_WRONG
    assert len(best) == 6 and set(report["val_not_a_bird"]) == {"plain", "scenes", "others"}


def test_the_find_the_bird_setting_before_stays_where_another_only_ties_it():
    from resnext.recipes import rules
    from resnext.verdict import VerdictRules

    def candidate(plain, scenes, turned, find_below, weight):
        return ([plain, *scenes], turned, VerdictRules(0.5, 0.5, find_below, weight, find_margin=1.0), None)

    before = candidate(0.78, [0.69, 0.43, 0.76, 0.76], 0.017, 0.3, 0.5)
    tied = candidate(0.79, [0.69, 0.45, 0.72, 0.78], 0.011, 0.25, 0.75)  # the same mean, looks closer less often
    worse = candidate(0.78, [0.69, 0.43, 0.76, 0.75], 0.0, 0.1, 0.5)
    lost = candidate(0.77, [0.90, 0.90, 0.90, 0.90], 0.0, 0.2, 1.0)  # plain photos below one pass: never
    candidates = [worse, tied, before, lost]
    assert rules.choose_find(candidates, 0.78) is tied  # without one: the fewer closer looks
    assert rules.choose_find(candidates, 0.78, incumbent=before[2]) is before
    better = candidate(0.78, [0.70, 0.43, 0.76, 0.76], 0.0, 0.3, 1.0)
    assert rules.choose_find([*candidates, better], 0.78, incumbent=before[2]) is better  # a real gain wins
