import json
import re
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from resnext import Preprocessing, load_checkpoint, load_classifier, load_image, read_metadata, save_checkpoint
from resnext.__main__ import main
from resnext.data import load_dataset
from resnext.training import Progress, TrainConfig, TrainingCancelled, iter_train, load_start_point, train

from conftest import CLASSES, SHAPES, make_shapes, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", classes=3, per_class=20)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny checkpoint to start from (the 5 bird classes of conftest; the data has 3 others)."""
    path = tmp_path_factory.mktemp("start") / "tiny.safetensors"
    return save_checkpoint(path, tiny_model(), CLASSES, Preprocessing(64, 72))


def test_quick_mode_learns_a_separable_problem(shapes, start, tmp_path):
    data = load_dataset(shapes)
    events = []
    out = tmp_path / "quick.safetensors"
    result = train(data, TrainConfig(mode="quick", init=str(start)), out=out, callback=events.append)
    assert result.val_acc >= 0.85  # chance is 1/3; the last epoch is kept, not the luckiest on 9 photos
    assert result.best_epoch == 60 and result.epoch_choice.startswith("the last one: 9 validation photos")
    assert result.checkpoint == out and out.is_file()
    assert {e.stage for e in events} >= {"features", "epoch", "done"}
    features = [e for e in events if e.stage == "features"]
    assert features[-1].steps == len(data.train) * 4 + len(data.val)  # 4 views per training image
    model, info = load_checkpoint(out)
    assert info.classes == data.classes
    assert info.provenance["mode"] == "quick" and info.provenance["metrics"]["val_acc"] == result.val_acc
    assert info.provenance["init"] == info.provenance["config"]["init"] == "tiny.safetensors"  # no machine path
    assert str(start.parent) not in json.dumps(info.provenance)
    assert info.provenance["started_from"]["date"] == read_metadata(start).provenance["date"]
    original, _ = load_checkpoint(start)
    for name, tensor in original.state_dict().items():  # quick mode trains the head only
        if not name.startswith("fc."):
            assert torch.equal(tensor, model.state_dict()[name]), name
    assert sum(sum(row) for row in result.confusion) == len(data.val)
    assert set(result.per_class_acc) == set(data.classes)


def test_full_mode_lowers_the_loss(shapes, start):
    data = load_dataset(shapes)
    config = TrainConfig(mode="full", init=str(start), epochs=6, batch_size=8, lr=0.02, augment="flip", ema=0.9)
    result = train(data, config)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6
    assert min(losses[-2:]) < losses[0]
    assert result.checkpoint is None  # no out: nothing written
    ema_acc, n_val = result.history[-1]["ema_val_acc"], len(data.val)  # the weight average, judged after the last epoch
    assert abs(ema_acc * n_val - round(ema_acc * n_val)) < 1e-9  # a count of right photos over the validation set
    # 9 validation photos are too few to choose an epoch on: the end of the run, the average, is kept
    assert result.val_acc == ema_acc and result.best_epoch == 6


def test_full_mode_conv5_only_keeps_earlier_stages(shapes, start):
    data = load_dataset(shapes)
    result = train(data, TrainConfig(mode="full", init=str(start), epochs=1, batch_size=8, train_layers="conv5"))
    original, _ = load_checkpoint(start)
    trained = result.model.state_dict()
    for name, tensor in original.state_dict().items():
        if name.startswith(("conv1", "conv2", "conv3", "conv4")):
            assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(original.conv5[0].conv2.weight, trained["conv5.0.conv2.weight"])


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_cancel_stops_and_leaves_no_file(shapes, start, tmp_path, mode):
    data = load_dataset(shapes)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5

    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(TrainingCancelled):
        train(data, TrainConfig(mode=mode, init=str(start), epochs=50, batch_size=4), out=out, should_stop=should_stop)
    assert len(calls) == 6  # stopped at the first check that said so
    assert list(tmp_path.iterdir()) == []


def test_closing_the_generator_writes_nothing(shapes, start, tmp_path):
    out = tmp_path / "closed.safetensors"
    events = iter_train(load_dataset(shapes), TrainConfig(mode="full", init=str(start), epochs=3, batch_size=4), out=out)
    assert isinstance(next(events), Progress)
    events.close()
    assert list(tmp_path.iterdir()) == []


def test_same_classes_keep_the_head(shapes, tmp_path):
    """The engine's run context keeps the start point's head for the same classes (in the same
    order) and makes a new one otherwise."""
    from resnext.training.engine import _context

    data = load_dataset(shapes)
    torch.manual_seed(3)
    model = tiny_model(num_classes=3)
    start = save_checkpoint(tmp_path / "same.safetensors", model, data.classes, Preprocessing(64, 72))
    ctx, info = _context(data, TrainConfig(init=str(start), device="cpu"), None)
    assert info.classes == data.classes
    assert torch.equal(ctx.model.fc.weight, model.fc.weight.half().float())
    other = save_checkpoint(tmp_path / "other.safetensors", model, data.classes[::-1], Preprocessing(64, 72))
    ctx, _ = _context(data, TrainConfig(init=str(other), device="cpu"), None)
    assert ctx.model.fc.weight.shape == (3, model.num_features)
    assert not torch.allclose(ctx.model.fc.weight, model.fc.weight.half().float(), atol=1e-2)  # a fresh head


def test_imagenet_without_network_says_how_to_place_the_file(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights.*resnext50_32x4d-1a0047aa.pth"):
        load_start_point("imagenet")


def test_bad_config_and_start_points():
    with pytest.raises(ValueError, match="mode must be"):
        TrainConfig(mode="slow").resolved()
    with pytest.raises(ValueError, match="image_size must be between"):
        TrainConfig(image_size=8).resolved()
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_start_point("nothing.safetensors")
    with pytest.raises(ValueError, match="unknown arch"):
        load_start_point("scratch", arch="vgg")


def test_train_and_evaluate_commands(shapes, start, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["train", str(shapes), "--out", str(out), "--init", str(start), "--epochs", "20"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "3 classes" in captured.err
    # the validation accuracy with its count and its worth, and the rule that chose the epoch
    assert re.search(r"validation: \d of 9 validation photos right \(\d+%\): too few to judge; kept epoch 20, "
                     r"the last one: 9 validation photos are too few", captured.out), captured.out
    assert main(["evaluate", str(shapes), "--checkpoint", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 60 and report["top1"] >= 0.7  # chance: 1/3
    assert set(report["per_class"]) == set(SHAPES[:3])
    # 20 photos per class: the overall accuracy is the mean of the per-class ones
    assert abs(report["top1"] - sum(report["per_class"].values()) / 3) < 1e-9
    photo = next(shapes.rglob("*.png"))
    assert main(["predict", str(photo), "--checkpoint", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    (expected,) = load_classifier(out).predict(photo, k=1)  # the CLI prints what the library answers
    assert printed["label"] == expected[0].label and abs(printed["prob"] - expected[0].prob) < 1e-6


def test_evaluate_reports_unknown_folders(shapes, start, tmp_path, capsys):
    (tmp_path / "eval" / "Dodo").mkdir(parents=True)
    for src in (shapes / SHAPES[0]).glob("*.png"):
        (tmp_path / "eval" / "Dodo" / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "m.safetensors"
    data = load_dataset(shapes)
    save_checkpoint(out, tiny_model(num_classes=3), data.classes, Preprocessing(64, 72))
    (tmp_path / "eval" / SHAPES[1]).mkdir()
    (tmp_path / "eval" / SHAPES[1] / "a.png").write_bytes(next((shapes / SHAPES[1]).glob("*.png")).read_bytes())
    assert main(["evaluate", str(tmp_path / "eval"), "--checkpoint", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 1
    assert "'Dodo' is not one of the model's classes" in captured.err


def test_train_refuses_bad_data_in_one_line(tmp_path, start, capsys):
    make_shapes(tmp_path / "one", classes=1, per_class=3)
    assert main(["train", str(tmp_path / "one"), "--out", str(tmp_path / "x.safetensors"), "--init", str(start)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: one: found 1 class folder(s); at least 2 are needed"]
    assert not (tmp_path / "x.safetensors").exists()


def test_torchrun_with_two_gloo_processes(shapes, start, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "resnext", "train",
         str(shapes), "--out", str(out), "--mode", "full", "--init", str(start), "--epochs", "2", "--batch-size", "8"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = read_metadata(out)
    assert info.classes == load_dataset(shapes).classes
    assert info.provenance["world_size"] == 2
    trained, started = load_checkpoint(out)[0], load_checkpoint(start)[0]
    assert not torch.equal(trained.conv5[0].conv2.weight, started.conv5[0].conv2.weight)  # the two ranks trained it
    assert run.stdout.count("wrote ") == 1  # one process writes
    # each validation photo judged once across the two ranks (a wrong shard reported "7 of 10" for 9)
    judged = re.search(r"validation: (\d+) of (\d+) validation photos", run.stdout)
    assert judged and int(judged.group(2)) == len(load_dataset(shapes).val), run.stdout[-500:]


def test_crop_fraction_and_eval_size_are_shipped(shapes, start):
    data = load_dataset(shapes)
    result = train(data, TrainConfig(mode="full", init=str(start), epochs=1, batch_size=8, image_size=48,
                                     eval_size=56, crop_fraction=1.0))
    assert result.preprocessing.input_size == 56 and result.preprocessing.resize == 56
    with pytest.raises(ValueError, match="crop_fraction"):
        TrainConfig(crop_fraction=0.1).resolved()


def _record(epoch: int, acc: float, loss: float) -> dict:
    return {"epoch": epoch, "loss": 1.0, "val_acc": acc, "val_loss": loss}


@pytest.mark.parametrize("n_val, kept", [(3, 4), (29, 4), (30, 2), (300, 2)])
def test_an_epoch_is_chosen_by_validation_only_with_enough_photos(n_val, kept):
    from resnext.training.context import CHOOSE_EPOCH_FROM, Best

    best = Best(n_val)
    # epoch 1 reaches the best accuracy first; epoch 2 ties it at a lower loss; epoch 4 is the end
    for epoch, acc, loss in [(1, 1.0, 0.9), (2, 1.0, 0.5), (3, 1.0, 0.7), (4, 0.67, 0.4)]:
        best.offer(epoch, _record(epoch, acc, loss), {"w": torch.tensor([float(epoch)])}, torch.eye(2) * epoch)
    assert best.epoch == kept and best.state["w"].item() == kept and best.confusion[0, 0].item() == kept
    assert best.by_validation == (n_val >= CHOOSE_EPOCH_FROM)
    assert best.how.startswith("chosen by the best score" if n_val >= 30 else f"the last one: {n_val} validation")


def test_validation_is_stated_with_its_count_and_its_worth():
    from resnext.training.config import TrainResult

    def text(confusion):
        n = sum(map(sum, confusion))
        acc = sum(confusion[i][i] for i in range(len(confusion))) / n if n else None
        return TrainResult([], [], 1, acc, {}, confusion, None, 0.0, None, None).validation_text()

    assert text([[2, 0], [0, 1]]) == "3 of 3 validation photos right (100%): too few to judge"
    assert text([[20, 5], [3, 12]]) == "32 of 40 validation photos right (80%)"
    assert text([[0, 0], [0, 0]]) == "not measured (no validation photos)"


class _Scores:
    """A stand-in classifier for the bird check: a photo's bird score is its mean brightness / 255."""

    preprocessing = staticmethod(lambda image: torch.tensor(float(np.asarray(image).mean()) / 255))
    model = type("NoDetector", (), {"detector": None})  # the ResNeXt's own bird score, read from its features

    def features(self, batch):
        return batch

    def looks(self, photos, features):
        from resnext.inference import Look

        return [Look(float(f), 0.0, None) for f in features]


def _grey_photos(tmp_path, levels) -> list:
    from PIL import Image

    out = []
    for i, level in enumerate(levels):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (level,) * 3).save(path)
        out.append((path, 0))
    return out


def test_a_fine_tune_never_calls_its_own_photos_not_a_bird(tmp_path):
    from resnext.training.calibrate import _bird_check

    start = 0.5
    # every photo passes: the start model's threshold stays
    assert _bird_check(_Scores(), start, _grey_photos(tmp_path, [200, 255]))[0] == start
    # most pass (birds the start model finds odd, e.g. flamingos): lowered below the lowest, to half of it
    below, how = _bird_check(_Scores(), start, _grey_photos(tmp_path, [51, 200, 255]))
    assert below == pytest.approx(0.1, abs=1e-6) and "lowered to 0.10 so that all 3" in how and "(67% of them passed" in how
    # fewer than half pass: the classes are not birds, and the check is off
    below, how = _bird_check(_Scores(), start, _grey_photos(tmp_path, [10, 20, 255]))
    assert below is None and how.startswith("off (33% of 3")
    assert _bird_check(_Scores(), None, _grey_photos(tmp_path, [255]))[0] is None  # the start had none


def test_the_bird_check_reads_at_most_a_bounded_spread_of_photos(tmp_path, monkeypatch):
    from resnext.training import calibrate

    monkeypatch.setattr(calibrate, "MAX_CHECKED_PHOTOS", 4)
    photos = _grey_photos(tmp_path, [255, 0] * 4)  # 8 photos; every other one is read: the bright ones
    below, how = calibrate._bird_check(_Scores(), 0.5, photos)
    assert below == 0.5 and "all 4 of the visitor's photos" in how


def test_a_quick_fine_tune_is_sure_of_the_photos_it_was_taught(tmp_path):
    """From a start whose features mean something, the photos of a 3 x 6 data set (training and
    validation) comes back as its own class, said plainly ("species"), not "not sure" (17 of 18 here;
    keeping the first epoch that hit the best score on 3 validation photos gave 0 of 18)."""
    from conftest import shapes_backbone

    start = shapes_backbone(tmp_path, CLASSES)
    data = load_dataset(make_shapes(tmp_path / "mine", classes=3, per_class=6))
    result = train(data, TrainConfig(mode="quick", init=str(start)), out=tmp_path / "mine.safetensors")
    classifier = load_classifier(result.checkpoint)
    photos = data.train + data.val
    answers = classifier.predict([load_image(p) for p, _ in photos], k=1)
    plainly_right = sum(a.verdict == "species" and a[0].label == data.classes[y] for a, (_, y) in zip(answers, photos))
    assert plainly_right >= 15, [(a.verdict, a[0].label, round(a[0].prob, 2)) for a in answers]  # measured: 17 of 18


def test_a_fine_tune_never_calls_a_kind_it_was_taught_not_a_bird(tmp_path):
    """The start model's bird check refuses red discs (as the real one refuses flamingos); the
    visitor teaches red discs among other shapes. Keeping the start's check because 13 of 14
    validation photos passed it called all 6 red discs "not a bird"; now every photo passes, and
    each is answered with its own class."""
    from conftest import mostly_not_red, red_is_no_bird

    start = load_classifier(red_is_no_bird(tmp_path))
    data = load_dataset(mostly_not_red(tmp_path / "mine"))
    photos = data.train + data.val
    images = [load_image(p) for p, _ in photos]
    reds = [i for i, (_, y) in enumerate(photos) if data.classes[y] == "red disc"]
    assert all(a.verdict == "not_a_bird" for a in (start.predict([images[i] for i in reds], k=1)))
    result = train(data, TrainConfig(mode="quick", init=str(start.path)), out=tmp_path / "mine.safetensors")
    classifier = load_classifier(result.checkpoint)
    assert classifier.rules.bird_below is not None and "so that all 96 of the visitor's photos pass it" in classifier.rules.source
    answers = classifier.predict(images, k=1)
    assert [a.verdict for a in answers].count("not_a_bird") == 0
    assert sum(a.verdict == "species" and a[0].label == data.classes[y] for a, (_, y) in zip(answers, photos)) >= 90


def test_a_fine_tune_carries_the_start_models_detector_unchanged(shapes, tmp_path):
    """The detector travels in the fine-tune's file: downloaded and loaded elsewhere, it keeps its verdicts."""
    from test_detector import tiny_with_detector

    model = tiny_with_detector()
    start = save_checkpoint(tmp_path / "start.safetensors", model, CLASSES, Preprocessing(64, 64, framing="whole"),
                            {"verdict": {"unsure_below": 0.3, "bird_below": 0.01, "find_below": 0.5, "crop_weight": 1.0}})
    for mode in ("quick", "full"):
        result = train(load_dataset(shapes), TrainConfig(mode=mode, init=str(start), epochs=1, batch_size=8),
                       out=tmp_path / f"{mode}.safetensors")
        tuned, info = load_checkpoint(result.checkpoint)
        assert info.architecture["detector"] == 96 and info.preprocessing.framing == "whole"
        original = load_checkpoint(start)[0].detector.state_dict()
        for name, tensor in tuned.detector.state_dict().items():
            assert torch.equal(tensor, original[name]), (mode, name)


def test_quick_mode_keeps_the_head_of_the_epoch_it_reports():
    """With 30+ validation photos the best epoch is chosen on them: the head returned must be that
    epoch's, not the last one's (no run in the suite had 30 validation photos, so keeping the last
    head while reporting the best epoch's accuracy went unseen). Here the head starts right on
    every validation photo and is then taught the wrong names: best epoch 1, last epoch 0 %."""
    import time
    from types import SimpleNamespace

    from torch import nn

    from resnext.training import quick
    from resnext.training.context import summarise

    gen = torch.Generator().manual_seed(0)
    prototypes = torch.zeros(3, 16)
    prototypes[:, :3] = 5 * torch.eye(3)
    y_val, y_train = torch.arange(36) % 3, torch.arange(72) % 3
    x_val = prototypes[y_val] + 0.1 * torch.randn(36, 16, generator=gen)
    x_train = prototypes[y_train] + 0.1 * torch.randn(72, 16, generator=gen)
    fc = nn.Linear(16, 3)
    with torch.no_grad():
        fc.weight.copy_(prototypes / 5)
        fc.bias.zero_()
    config = SimpleNamespace(lr=0.05, weight_decay=0.0, batch_size=16, epochs=12, warmup_epochs=0.0,
                             label_smoothing=0.0, seed=0)
    ctx = SimpleNamespace(config=config, classes=["a", "b", "c"], model=SimpleNamespace(fc=fc), stop=lambda: False,
                          progress=lambda *a, **k: None, start=time.perf_counter())
    run = quick._train_head(ctx, x_train, (y_train + 1) % 3, x_val, y_val)
    with pytest.raises(StopIteration) as done:
        while True:
            next(run)
    head, history, best = done.value.value
    assert history[0]["val_acc"] == 1.0 and history[-1]["val_acc"] == 0.0 and best.epoch == 1
    with torch.no_grad():
        kept = (head(x_val).argmax(1) == y_val).float().mean().item()
    assert kept == summarise(best.confusion, ctx.classes)[0] == 1.0
