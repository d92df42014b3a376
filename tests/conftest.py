"""Shared fixtures: tiny models and checkpoints made on the fly; nothing is downloaded."""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resnext import Preprocessing, ResNeXt, resnext_tiny, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the load benchmark and app launcher are tested too
CLASSES = ["Black_footed_Albatross", "Cactus_Wren", "Red_winged_Blackbird", "Barn_Swallow", "Anna_Hummingbird"]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine weights, so eval-mode outputs mean something."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.1
            m.running_mean = torch.randn(n, generator=gen) * 0.1
            m.running_var = torch.rand(n, generator=gen) + 0.5
    return model


def tiny_model(num_classes: int = len(CLASSES), seed: int = 0) -> ResNeXt:
    torch.manual_seed(seed)
    return randomize_batchnorm(resnext_tiny(num_classes), seed).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny 5-class checkpoint with a 64 px input (resize 72, so center-crop is exercised)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, tiny_model(), CLASSES, Preprocessing(input_size=64, resize=72), {"data": "none (test)"})
    return path


@pytest.fixture()
def photo() -> np.ndarray:
    """A 90x120 (HxW) RGB photo with structure: a bright disc on a gradient."""
    yy, xx = np.mgrid[0:90, 0:120]
    img = np.stack([xx * 2, yy * 2, np.full_like(xx, 60)], axis=-1).astype(np.float64)
    img[(yy - 40) ** 2 + (xx - 70) ** 2 < 20**2] = [250, 240, 30]
    return img.astype(np.uint8)


@pytest.fixture()
def photo_file(tmp_path, photo) -> Path:
    from PIL import Image

    path = tmp_path / "bird.png"
    Image.fromarray(photo).save(path)
    return path


SHAPES = ["red disc", "green square", "blue bar", "Wren-ü"]  # spaces, a dash, non-ASCII


def shape_image(kind: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A picture of class ``kind``: a coloured shape at a random place, on noise."""
    image = rng.normal(120, 25, (size, size, 3))
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    r = size // 5
    if kind == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    elif kind == 1:
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif kind == 2:
        mask = abs(yy - cy) < r // 3
    else:
        mask = abs(xx - cx) < r // 3
    colour = [(230, 30, 30), (30, 220, 40), (40, 40, 230), (240, 220, 30)][kind]
    image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_shapes(root: Path, classes: int = 3, per_class: int = 12, seed: int = 0, size: int = 48) -> Path:
    """A class-folder data set of coloured shapes, made in ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in range(classes):
        folder = root / SHAPES[kind]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(shape_image(kind, rng, size)).save(folder / f"{i:03d}.png")
    return root


_MADE = Path(tempfile.mkdtemp(prefix="resnext-test-models-"))  # each model below is trained once per run
atexit.register(shutil.rmtree, _MADE, ignore_errors=True)


def _made_once(make):
    """``make(folder, *args) -> Path``, trained once per test run for each ``args`` (it is
    deterministic): later calls copy the first result into their own folder."""
    done: dict[tuple, Path] = {}

    @functools.wraps(make)
    def once(folder: Path, *args) -> Path:
        key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        if key not in done:
            done[key] = make(Path(tempfile.mkdtemp(dir=_MADE)), *args)
        return Path(shutil.copy2(done[key], Path(folder) / done[key].name))

    return once


@_made_once
def shapes_backbone(folder: Path, classes: list[str]) -> Path:
    """A tiny network that has learnt to see shapes (full mode, 8 epochs on 4 shape classes,
    about 2 s), saved with a fresh head for ``classes``: a start point whose features mean
    something, as a real model's do, so a quick fine-tune from it can be sure of its answers."""
    from resnext.data import load_dataset
    from resnext.training import TrainConfig, train

    start = save_checkpoint(folder / "random.safetensors", tiny_model(len(CLASSES)), CLASSES, Preprocessing(64, 72))
    config = TrainConfig(mode="full", init=str(start), epochs=8, batch_size=16, lr=0.05, augment="flip")
    trained = train(load_dataset(make_shapes(folder / "seen", classes=4, per_class=20)), config).model
    torch.manual_seed(0)
    trained.reset_classifier(len(classes))
    return save_checkpoint(folder / "shapes_backbone.safetensors", trained.eval(), classes, Preprocessing(64, 72))


@_made_once
def red_is_no_bird(folder: Path) -> Path:
    """A start model with a bird check that, like the real model's with flamingos, refuses one kind
    of subject: a :func:`shapes_backbone` whose bird head is fit to call red discs "not a bird"
    (``bird_below`` 0.5) and every other shape a bird."""
    from resnext import load_checkpoint, load_image
    from resnext.training.calibrate import _fit_logistic

    model, info = load_checkpoint(shapes_backbone(folder, SHAPES))
    seen = make_shapes(folder / "bird or not", classes=4, per_class=15, seed=5)
    photos = sorted(seen.rglob("*.png"))
    with torch.no_grad():
        pooled = model.forward_features(torch.stack([info.preprocessing(load_image(p)) for p in photos])).mean((2, 3))
    bird = torch.tensor([0.0 if p.parent.name == "red disc" else 1.0 for p in photos])
    weight, bias, _ = _fit_logistic(pooled, bird, torch.ones(len(photos)), l2=1e-3)
    model.add_bird_head()
    with torch.no_grad():
        model.bird.weight.copy_(weight[None])
        model.bird.bias.copy_(bias.view(1))
    rules = {"unsure_below": 0.3, "bird_below": 0.5, "find_below": 0.0, "crop_weight": 0.5, "source": "test"}
    return save_checkpoint(folder / "red is no bird.safetensors", model, SHAPES, info.preprocessing, {"verdict": rules})


def mostly_not_red(root: Path) -> Path:
    """A visitor's data where the odd class is the one :func:`red_is_no_bird` refuses: 30 photos
    of each of three shapes and 6 red discs (so 13 of the 14 validation photos pass that check)."""
    make_shapes(root, classes=4, per_class=30, seed=11)
    for extra in sorted((root / "red disc").glob("*.png"))[6:]:
        extra.unlink()
    return root


APP_CLASSES = ["Blue_Jay", "Cedar_Waxwing", "Summer_Tanager", "Carolina_Wren", "White_Pelican"]  # the examples' species
APP_MODEL = "resnext50_32x4d_cub100_tiny"  # as long as the real default model's name


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """One real ``app.py`` over HTTP for the whole run (the browser, load and public-server tests
    share it; each start costs about 7 s). It serves a :func:`shapes_backbone` whose classes
    include the example photos' species, so the examples show as they do with the real bird
    model, and a visitor's quick fine-tune from it can be sure of its answers. Runs may be as long
    as a caller asks (``RESNEXT_MAX_EPOCHS``), so that a run whose caller left can be seen stopped."""
    from serve import AppServer

    folder = tmp_path_factory.mktemp("appmodel")
    checkpoint = shapes_backbone(folder, APP_CLASSES).rename(folder / f"{APP_MODEL}.safetensors")
    with AppServer(checkpoint, tmp_path_factory.mktemp("appwork"), timeout=120, device="cpu",
                   extra_env={"RESNEXT_MAX_EPOCHS": "100000"}) as app:
        yield app


OWNER = "0123456789abcdef0123456789abcdef"  # a visitor's token, as the app makes them


@pytest.fixture()
def registry(tiny_checkpoint, tmp_path):
    """The app's model registry on the tiny checkpoint, with a fresh work folder in ``tmp_path/work``."""
    from ui.state import Models

    (tmp_path / "work" / "models").mkdir(parents=True)
    return Models(tiny_checkpoint, "cpu", tmp_path / "work")


def class_inputs(folder: Path, classes: list[str]) -> tuple[list, list]:
    """The Fine-tune tab's class name boxes and photo uploads, filled from ``folder/<class>/*.png``."""
    from ui.training import MAX_CLASSES_UI

    names = classes + [""] * (MAX_CLASSES_UI - len(classes))
    files = [sorted(str(p) for p in (folder / c).glob("*.png")) for c in classes]
    return names, files + [None] * (MAX_CLASSES_UI - len(classes))


def train_request(folder: Path, classes: list[str], **kwargs):
    """A :class:`ui.training.TrainRequest` for the classes in ``folder``, by visitor :data:`OWNER`."""
    from ui.training import TrainRequest

    names, files = class_inputs(folder, classes)
    return TrainRequest(**{"owner": OWNER, "names": names, "files": files, **kwargs})
