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
