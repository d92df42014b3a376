import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resnext import Preprocessing, load_checkpoint, load_classifier, read_metadata, save_checkpoint
from resnext.composition import architecture

from conftest import CLASSES, tiny_model


def test_round_trip_gives_identical_predictions(tmp_path, photo):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, CLASSES, Preprocessing(64, 72))
    loaded, info = load_checkpoint(path)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model.half().float()(x)  # what fp16 storage keeps
        assert torch.equal(loaded(x), expected)
    assert info.classes == CLASSES and info.preprocessing == Preprocessing(64, 72)
    assert info.architecture == architecture(model) == {**model.config(), "detector": 0}  # the format as it was
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training


def test_fp16_storage_keeps_top1_and_halves_the_file(tmp_path):
    model = tiny_model(num_classes=50)
    path = save_checkpoint(tmp_path / "m.safetensors", model, [f"c{i}" for i in range(50)])
    loaded, _ = load_checkpoint(path)
    x = torch.randn(64, 3, 64, 64)
    with torch.no_grad():
        reference, restored = model(x), loaded(x)
    assert torch.equal(reference.argmax(1), restored.argmax(1))
    assert (reference - restored).abs().max() < 1e-2
    fp32_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if v.is_floating_point())
    assert path.stat().st_size < 0.55 * fp32_bytes


def test_tensor_that_overflows_fp16_stays_fp32(tmp_path):
    model = tiny_model()
    model.conv2[0].bn1.running_var[0] = 1e6  # beyond fp16's 65504
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, CLASSES))
    assert loaded.conv2[0].bn1.running_var[0] == 1e6


def test_metadata_holds_architecture_classes_preprocessing_provenance(tiny_checkpoint):
    info = read_metadata(tiny_checkpoint)
    data = info.to_dict()
    assert data["format"] == 1
    assert data["architecture"]["layers"] == [1, 1, 1, 1] and data["architecture"]["cardinality"] == 4
    assert data["classes"] == CLASSES
    assert data["preprocessing"]["input_size"] == 64 and data["preprocessing"]["resize"] == 72
    assert data["provenance"]["data"] == "none (test)" and data["provenance"]["date"].startswith("20")


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model(), CLASSES)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="2 class names for 5 outputs"):
        save_checkpoint(path, tiny_model(), CLASSES[:2])
    with pytest.raises(ValueError, match="not unique"):
        save_checkpoint(path, tiny_model(), ["a", "a", "b", "c", "d"])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model(), CLASSES)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnext.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, tiny_model(seed=1), CLASSES)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _rewrite(path, out, edit):
    header, body = _header(path)
    edit(header)
    data = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(data)) + data + body)
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_classifier(tmp_path / "nothing.safetensors")


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ValueError, match="model.pt: not a safetensors file"):
        load_checkpoint(path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="evil.pth: not a safetensors file"):
        load_checkpoint(evil)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000])
def test_truncated_file(tiny_checkpoint, tmp_path, keep):
    raw = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:keep])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_checkpoint(cut)


def test_oversized_header_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="header claims more bytes than the file holds; the file has 10") as err:
        load_checkpoint(path)
    assert "1,099,511,627,776" not in str(err.value)  # a visitor reads words, not a 13-digit length


def test_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="plain.safetensors: .*no 'resnext' metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["__metadata__"].update(resnext="{not json"), "malformed checkpoint metadata"),
        (lambda h: h["__metadata__"].update(resnext=json.dumps({"format": 99})), "format version 99"),
        (lambda h: _meta(h, lambda m: m.pop("classes")), "missing field 'classes'"),
        (lambda h: _meta(h, lambda m: m.update(classes=["a", "b"])), "2 class names for 5 outputs"),
        (lambda h: _meta(h, lambda m: m["preprocessing"].update(resize=3)), "resize must be"),
        (lambda h: _meta(h, lambda m: m["architecture"].update(cardinality=0)), "cardinality must be an integer from 1 to 256, got 0"),
        (lambda h: _meta(h, lambda m: m["architecture"].update(group_depth=3)), "shape"),
        (lambda h: _meta(h, lambda m: m["architecture"].update(layers=[1, 2, 1, 1])), "do not match"),
    ],
)
def test_malformed_metadata_or_mismatched_shapes(tiny_checkpoint, tmp_path, edit, message):
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(bad)


def _meta(header, change):
    meta = json.loads(header["__metadata__"]["resnext"])
    change(meta)
    header["__metadata__"]["resnext"] = json.dumps(meta)


def test_wrong_tensor_shape(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, CLASSES)
    header, _ = _header(path)
    tensors = load_checkpoint(path)[0].state_dict()
    tensors = {k: v.half() for k, v in tensors.items() if "num_batches" not in k}
    tensors["fc.weight"] = torch.zeros(5, 7).half()
    save_file(tensors, tmp_path / "shape.safetensors", metadata=header["__metadata__"])
    with pytest.raises(ValueError, match=r"fc.weight has shape \(5, 7\).*\(5, 256\)"):
        load_checkpoint(tmp_path / "shape.safetensors")


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model()
    model.fc.weight.data[0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.safetensors", model, CLASSES)
    with pytest.raises(ValueError, match="fc.weight holds NaN"):
        load_checkpoint(path)


def test_save_writes_beside_its_target_under_a_hidden_temporary_name(tmp_path, monkeypatch):
    """Atomic save: the bytes go to ``.NAME.<random>.tmp`` in the target's own folder (so the rename
    cannot cross file systems, and the app's tidying finds a killed write's leftovers), which may
    be nested folders that do not exist yet; the date is UTC; names are stored as UTF-8, unescaped."""
    import resnext.checkpoint as ck

    written = []
    real = ck.save_file
    monkeypatch.setattr(ck, "save_file", lambda tensors, path, metadata=None: (written.append(path),
                                                                              real(tensors, path, metadata=metadata)))
    target = tmp_path / "a" / "b" / "m.safetensors"
    save_checkpoint(target, tiny_model(), CLASSES[:4] + ["Zaunkönig"])
    (tmp,) = written
    assert Path(tmp).parent == target.parent and Path(tmp).name.startswith(".m.safetensors.") and tmp.endswith(".tmp")
    assert not Path(tmp).exists() and target.is_file()
    header, _ = _header(target)
    assert "Zaunkönig" in header["__metadata__"]["resnext"]
    assert read_metadata(target).provenance["date"].endswith("+00:00")


def test_a_failed_save_reports_its_own_error(tmp_path, monkeypatch):
    """A writer that fails after removing its file: the caller sees that failure, not a second one."""
    import os

    def vanishing(tensors, path, metadata=None):
        os.unlink(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnext.checkpoint.save_file", vanishing)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model(), CLASSES)
    assert list(tmp_path.iterdir()) == []
