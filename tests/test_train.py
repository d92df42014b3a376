import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from resnext import Preprocessing, load_checkpoint, load_classifier, read_metadata, save_checkpoint
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
    assert result.val_acc >= 0.9
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
    assert result.val_acc == max(max(h["val_acc"] for h in result.history), ema_acc)  # the better of the two is kept


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
    assert main(["evaluate", str(shapes), "--checkpoint", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 60 and report["top1"] >= 0.8
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


def test_crop_fraction_and_eval_size_are_shipped(shapes, start):
    data = load_dataset(shapes)
    result = train(data, TrainConfig(mode="full", init=str(start), epochs=1, batch_size=8, image_size=48,
                                     eval_size=56, crop_fraction=1.0))
    assert result.preprocessing.input_size == 56 and result.preprocessing.resize == 56
    with pytest.raises(ValueError, match="crop_fraction"):
        TrainConfig(crop_fraction=0.1).resolved()
