"""The teacher, zoom-out and made-up non-photos, and distill mode end to end on tiny data."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnext import load_classifier, read_metadata
from resnext.data import load_dataset
from resnext.training import TrainConfig, train
from resnext.training import teacher as teacher_module
from resnext.training.augment import coverage, synthetic_nonphoto, zoom_out
from resnext.training.teacher import TEACHER_SHA256, Teacher, load_teacher_backbone

from conftest import SHARED_DATA, make_shapes

SHARED_TEACHER = SHARED_DATA.parent / "weights" / "mobilenetv2_imagenet_features.pt"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A randomly initialised MobileNetV2 feature extractor saved as the real file is: the engine
    accepts it once its hash is the expected one (monkeypatched in the tests that use it)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "mobilenetv2.pt"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), path)
    return path


@pytest.fixture()
def trusted(teacher_file, monkeypatch):
    monkeypatch.setattr(teacher_module, "TEACHER_SHA256", hashlib.sha256(teacher_file.read_bytes()).hexdigest())
    return teacher_file


def test_a_teacher_file_with_another_hash_is_refused(teacher_file):
    with pytest.raises(ValueError, match=f"sha256 .* is not the expected {TEACHER_SHA256}"):
        load_teacher_backbone(teacher_file)


def test_a_file_with_other_tensors_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(teacher_module, "TEACHER_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="1 tensors do not match mobilenet_v2"):
        load_teacher_backbone(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_teacher_backbone(tmp_path / "missing.pt")


@pytest.mark.skipif(not SHARED_TEACHER.is_file(), reason="needs ../shared/weights")
def test_the_shared_teacher_file_is_the_documented_one():
    backbone = load_teacher_backbone(SHARED_TEACHER)
    assert sum(p.numel() for p in backbone.parameters()) == 2_223_872
    out = backbone(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, 1280, 3, 3) and torch.isfinite(out).all()


def test_the_probe_is_fit_on_the_features_device():
    """Distill mode crashed at once on CUDA: the probe was built on the CPU whatever the features'
    device. Here every tensor made without a device lands on PyTorch's meta device, so a probe
    made on the default device, not the features' (CPU), raises."""
    teacher = Teacher(torch.nn.Identity(), num_classes=3)
    labels = torch.arange(30) % 3
    raw = torch.randn(30, 1280, generator=torch.Generator().manual_seed(0))
    raw[:, :3] += 3 * torch.nn.functional.one_hot(labels, 3).float()
    with torch.device("meta"):
        accuracy = teacher.fit_probe(raw, labels)
    assert accuracy == 1.0 and teacher.probe.weight.device.type == "cpu"


def test_probe_fits_separable_features(trusted):
    teacher = Teacher(load_teacher_backbone(trusted), num_classes=3, size=32)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    raw = torch.randn(30, 1280, generator=gen) + 3 * torch.nn.functional.one_hot(labels, 1280).float()
    assert teacher.fit_probe(raw, labels) == 1.0
    assert torch.allclose(teacher.mean, raw.mean(0))


def test_coverage_is_the_covered_fraction_of_each_cell():
    assert torch.allclose(coverage((0, 0, 1, 1), 3), torch.ones(3, 3)) and coverage((0, 0, 1, 1), 3).max() <= 1
    assert torch.equal(coverage(None, 2), torch.zeros(2, 2))
    half = coverage((0.0, 0.0, 0.5, 0.5), 2)
    assert torch.allclose(half, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert coverage((0.25, 0.25, 0.75, 0.75), 3).sum().item() == pytest.approx(0.25 * 9)


def test_zoom_out_shrinks_the_view_into_its_box():
    view = torch.rand(3, 64, 64)
    gen = torch.Generator().manual_seed(1)
    canvas, (left, top, right, bottom) = zoom_out(view, 0.25, generator=gen)
    assert canvas.shape == (3, 64, 64)
    assert right - left == pytest.approx(0.25) and bottom - top == pytest.approx(0.25)
    l, t = round(left * 64), round(top * 64)
    small = torch.nn.functional.interpolate(view[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    assert torch.allclose(canvas[:, t : t + 16, l : l + 16], small)
    canvas, box = zoom_out(view, 0.5, torch.zeros(3, 64, 64), generator=gen)  # on a black scene
    l, t = round(box[0] * 64), round(box[1] * 64)
    inside = canvas[:, t : t + 32, l : l + 32]
    assert inside.min() > 0 and canvas.sum().item() == pytest.approx(inside.sum().item())


def test_made_up_non_photos_are_images():
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = synthetic_nonphoto(40, gen)
        assert x.shape == (3, 40, 40) and 0 <= x.min() and x.max() <= 1


def test_distill_mode_trains_a_locator_and_records_names_only(trusted, tmp_path):
    data = load_dataset(make_shapes(tmp_path / "labelled", classes=3, per_class=8), val_split=0.25)
    unlabelled = make_shapes(tmp_path / "unlabelled", classes=2, per_class=3, seed=1)
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(negatives / f"{i}.png")
    config = TrainConfig(mode="distill", init="scratch", arch="tiny", epochs=2, image_size=32, batch_size=12, lr=0.05,
                         teacher=str(trusted), teacher_size=48, unlabelled=(str(unlabelled),), negatives=(str(negatives),),
                         snapshot=str(tmp_path / "snap.safetensors"), crop_fraction=1.0)
    events = []
    out = tmp_path / "distilled.safetensors"
    result = train(data, config, out=out, callback=events.append)
    assert [len(r) and r["epoch"] for r in result.history] == [1, 2]
    assert all(0 <= r["val_acc_third"] <= 1 and r["locator_loss"] > 0 for r in result.history)
    assert any("1/3-frame validation accuracy" in e.message for e in events if e.stage == "epoch")
    info = read_metadata(out)
    assert info.architecture["locator"] is True and info.provenance["verdict"]["unsure_below"] > 1 / 3
    config_record = info.provenance["config"]
    assert config_record["teacher"] == "mobilenetv2.pt" and config_record["unlabelled"] == ["unlabelled"]
    assert str(tmp_path) not in str(info.provenance)  # no path of this machine in the file
    assert (tmp_path / "snap.safetensors").is_file()
    classifier = load_classifier(out)
    (answer,) = classifier.predict(next(Path(data.root).rglob("*.png")))
    features = classifier.features(classifier.preprocess(next(Path(data.root).rglob("*.png"))))
    bird = classifier.bird_scores(features, classifier.locate(features))
    assert answer.bird == pytest.approx(float(bird[0]), abs=1e-6)  # the answer carries the locator's bird score
    assert answer.verdict == classifier.rules.verdict(answer[0].prob, answer.bird)


def test_distill_mode_needs_a_teacher():
    with pytest.raises(ValueError, match="distill mode needs a teacher"):
        TrainConfig(mode="distill").resolved()


def test_cutmix_pastes_a_box_of_another_view_into_the_chosen_ones():
    from resnext.training.augment import cutmix

    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).clone()  # view i is all i
    mixed = cutmix(x, 0.5, torch.Generator().manual_seed(3))
    assert 0 < int(mixed.sum()) < 8
    for i in range(8):
        values = set(x[i].unique().tolist())
        if mixed[i]:
            assert len(values - {i}) == 1 and len(values) <= 2  # one other view's box (and its own pixels)
        else:
            assert values == {i}  # untouched
    assert not cutmix(x.clone(), 0.0).any()


def test_distill_with_cutmix_across_the_pools_trains(trusted, tmp_path):
    data = load_dataset(make_shapes(tmp_path / "labelled", classes=3, per_class=8), val_split=0.25)
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(negatives / f"{i}.png")
    config = TrainConfig(mode="distill", init="scratch", arch="tiny", epochs=2, image_size=32, batch_size=12, lr=0.05,
                         teacher=str(trusted), teacher_size=48, negatives=(str(negatives),), cutmix=0.5, crop_fraction=1.0)
    result = train(data, config, out=tmp_path / "mixed.safetensors")
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in result.history)
    assert read_metadata(tmp_path / "mixed.safetensors").provenance["config"]["cutmix"] == 0.5


def test_a_loss_over_no_kept_rows_is_zero_and_keeps_the_graph():
    from resnext.training.distill import _mean

    rows = torch.tensor([1.0, 3.0, 5.0], requires_grad=True)
    assert _mean(rows, torch.tensor([True, False, True])).item() == 3.0
    empty = _mean(rows, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_cutmix_is_a_share():
    with pytest.raises(ValueError, match="cutmix must be between 0 and 1"):
        TrainConfig(mode="distill", teacher="t.pt", cutmix=1.5).resolved()
