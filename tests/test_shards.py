"""Sharded checkpoints (issue #36, item 4): safetensors shards of at most N MiB and an index, as
Hugging Face ``transformers`` writes them. A shard is a stranger's file like any checkpoint: it
gets every check a single file gets, and must be the very file its index lists."""

import errno
import hashlib
import json
import re
import struct
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from resnext import Preprocessing, load_checkpoint, load_classifier, read_metadata, save_checkpoint
from resnext.__main__ import main
from resnext.shards import MAX_SHARDS

from conftest import CLASSES, ROOT, tiny_model

CAP_MB = 0.07  # the tiny model's 198 kB in three shards
MIB = 1024 * 1024
PROVENANCE = {"data": "none (test)", "date": "2025-01-01T00:00:00+00:00"}


def save_both(folder, cap_mb=CAP_MB, model=None):
    """The same model saved as one file and as shards; returns (single file, index)."""
    model = model or tiny_model()
    single = save_checkpoint(folder / "one.safetensors", model, CLASSES, Preprocessing(64, 72), PROVENANCE)
    index = save_checkpoint(folder / "v6.safetensors", model, CLASSES, Preprocessing(64, 72), PROVENANCE, max_shard_mb=cap_mb)
    return single, index


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_both(tmp_path_factory.mktemp("shards"))


@pytest.fixture()
def copy(saved, tmp_path):
    """A private copy of the sharded checkpoint, to damage: (index, its JSON, the shard paths)."""
    for path in saved[1].parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    index = tmp_path / saved[1].name
    data = json.loads(index.read_text())
    return index, data, [tmp_path / name for name in data["shards"]]


def rewrite(index, data):
    index.write_text(json.dumps(data))
    return index


def test_shards_round_trip_bit_exactly(saved):
    single, index = saved
    assert index.name == "v6.safetensors.index.json"
    names = sorted(p.name for p in index.parent.iterdir())
    assert names == ["one.safetensors", "v6-00001-of-00003.safetensors", "v6-00002-of-00003.safetensors",
                     "v6-00003-of-00003.safetensors", "v6.safetensors.index.json"]  # no temp file left
    stored = {}
    for name in names[1:4]:
        stored.update(load_file(index.parent / name))
    reference = load_file(single)  # as stored: fp16 in both, bit for bit
    assert sorted(stored) == sorted(reference)
    assert all(stored[k].dtype == reference[k].dtype and torch.equal(stored[k], reference[k]) for k in reference)
    (one, one_info), (sharded, info) = load_checkpoint(single), load_checkpoint(index)
    expected, got = one.state_dict(), sharded.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert info == one_info and not sharded.training


def test_every_shard_is_within_the_cap_and_a_model_that_fits_is_one_file(tmp_path):
    model = tiny_model()
    for step in range(30):  # caps from 0.07 to 0.157 MiB: shards of every fill, their headers included
        cap_mb = 0.07 + 0.003 * step
        folder = tmp_path / str(step)
        index = save_checkpoint(folder / "v6.safetensors", model, CLASSES, max_shard_mb=cap_mb)
        data = json.loads(index.read_text())
        shards = [folder / name for name in data["shards"]]
        assert len(shards) >= 2 and all(0 < p.stat().st_size <= int(cap_mb * MIB) for p in shards), cap_mb
        assert set(data["weight_map"].values()) == set(data["shards"])
        for path in shards:
            assert re.fullmatch(rf"v6-0000\d-of-0000{len(shards)}\.safetensors", path.name)
            assert data["shards"][path.name]["bytes"] == path.stat().st_size
    whole = save_checkpoint(tmp_path / "fits.safetensors", model, CLASSES, max_shard_mb=1)
    assert whole == tmp_path / "fits.safetensors" and load_checkpoint(whole)[1].classes == CLASSES
    assert not (tmp_path / "fits.safetensors.index.json").exists() and not list(tmp_path.glob("fits-*"))


def test_the_index_alone_gives_the_metadata(copy, saved):
    index, _, shards = copy
    for shard in shards:
        shard.unlink()
    assert read_metadata(index) == read_metadata(saved[0])
    assert read_metadata(index).classes == CLASSES and read_metadata(index).preprocessing == Preprocessing(64, 72)


@pytest.mark.parametrize("where", [0, 9, -1])  # the header's length, the header, the weights
def test_a_shard_changed_by_one_byte_is_refused(copy, where):
    index, _, shards = copy
    raw = bytearray(shards[1].read_bytes())
    raw[where] ^= 0x01
    shards[1].write_bytes(raw)
    with pytest.raises(ValueError, match="v6-00002-of-00003.safetensors: its sha256 is not the one its index "
                                         "v6.safetensors.index.json lists"):
        load_checkpoint(index)


def test_a_shard_cut_short_is_refused_before_hashing(copy, monkeypatch):
    index, _, shards = copy
    shards[0].write_bytes(shards[0].read_bytes()[:-2])
    monkeypatch.setattr("resnext.shards._sha256", lambda path: pytest.fail("hashed a shard of the wrong size"))
    with pytest.raises(ValueError, match=r"v6-00001-of-00003.safetensors: 7\d,\d{3} bytes, its index .* says 7\d,\d{3}"):
        load_checkpoint(index)


def test_a_missing_shard_is_refused(copy):
    index, _, shards = copy
    shards[2].unlink()
    with pytest.raises(FileNotFoundError, match="v6-00003-of-00003.safetensors: shard of v6.safetensors.index.json is missing"):
        load_checkpoint(index)
    with pytest.raises(FileNotFoundError, match="v6-00003-of-00003.safetensors"):
        load_classifier(index)


@pytest.mark.parametrize("name", ["../v6-00001-of-00003.safetensors", "sub/v6-00001-of-00003.safetensors",
                                  "..\\v6-00001-of-00003.safetensors", "/tmp/v6-00001-of-00003.safetensors",
                                  "C:v6-00001-of-00003.safetensors", "..", ".v6-00001-of-00003.safetensors",
                                  "v6-00001-of-00003.pt", ""])
def test_a_shard_name_outside_the_index_folder_is_refused(copy, name):
    index, data, shards = copy
    outside = index.parent / "sub"
    outside.mkdir()
    shutil.copy(shards[0], outside / shards[0].name)  # a real shard there: the name alone is refused
    old = shards[0].name
    data["shards"] = {(name if k == old else k): v for k, v in data["shards"].items()}
    data["weight_map"] = {k: (name if v == old else v) for k, v in data["weight_map"].items()}
    with pytest.raises(ValueError, match=r"v6.safetensors.index.json: shard name .* is not a plain .safetensors file name"):
        load_checkpoint(rewrite(index, data))


def test_a_forged_index_mapping_a_tensor_to_the_wrong_shard_is_refused(copy):
    index, data, shards = copy
    assert data["weight_map"]["fc.weight"] == shards[2].name
    data["weight_map"]["fc.weight"] = shards[0].name
    with pytest.raises(ValueError, match=r"v6-00001-of-00003.safetensors: does not hold the tensors its index .* maps to it "
                                         r"\(not mapped here: \[\], absent: \['fc.weight'\]\)"):
        load_checkpoint(rewrite(index, data))


def test_a_forged_index_swapping_two_shards_entries_is_refused(copy):
    index, data, shards = copy
    first, second = data["shards"][shards[0].name], data["shards"][shards[1].name]
    data["shards"][shards[0].name], data["shards"][shards[1].name] = second, first
    with pytest.raises(ValueError, match="v6-00001-of-00003.safetensors: .*bytes, its index"):
        load_checkpoint(rewrite(index, data))


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: d["weight_map"].pop("fc.bias"), ValueError, r"weight map does not match the architecture \(missing \['fc.bias'\]"),
    (lambda d: d["weight_map"].update({"fc.extra": d["weight_map"]["fc.bias"]}), ValueError, r"unexpected \['fc.extra'\]"),
    (lambda d: d["weight_map"].update({"fc.bias": "v6-00009-of-00009.safetensors"}), ValueError, "not a shard the index lists"),
    (lambda d: d["weight_map"].update({"fc.bias": ["x"]}), ValueError, "not a shard the index lists"),
    (lambda d: d["shards"].update({"idle.safetensors": d["shards"]["v6-00001-of-00003.safetensors"]}), ValueError,
     "shard idle.safetensors holds no tensor"),
    (lambda d: d["shards"]["v6-00001-of-00003.safetensors"].update(bytes=2**40), ValueError,
     "declared as 1,099,511,627,776 bytes; its tensors take at most"),
    (lambda d: d["shards"]["v6-00001-of-00003.safetensors"].update(sha256="00"), ValueError, "64 hex digits"),
    (lambda d: d["shards"]["v6-00001-of-00003.safetensors"].update(bytes=True), ValueError, "its size as 'bytes'"),
    (lambda d: d.pop("weight_map"), ValueError, "not a checkpoint index"),
    (lambda d: d["metadata"].pop("resnext"), ValueError, "no 'resnext' metadata"),
    (lambda d: d["shards"].update({f"s{i}.safetensors": {} for i in range(MAX_SHARDS)}), ValueError,
     "1 to 1,000 shards, got 1,003"),
], ids=["tensor-unmapped", "tensor-extra", "unlisted-shard", "shard-not-a-name", "idle-shard", "declared-too-large",
        "bad-sha256", "bool-bytes", "no-weight-map", "no-metadata", "too-many-shards"])
def test_a_forged_index_is_refused_before_any_shard_is_read(copy, monkeypatch, edit, error, message):
    index, data, _ = copy
    edit(data)
    monkeypatch.setattr("resnext.shards._sha256", lambda path: pytest.fail("read a shard of a forged index"))
    with pytest.raises(error, match=message) as err:
        load_checkpoint(rewrite(index, data))
    assert str(err.value).startswith(str(index)) and "\n" not in str(err.value)


def test_an_index_that_is_too_large_or_not_json_is_refused(copy, monkeypatch):
    index, data, _ = copy
    monkeypatch.setattr("resnext.shards.MAX_INDEX_BYTES", index.stat().st_size - 1)
    with pytest.raises(ValueError, match="v6.safetensors.index.json: a checkpoint index over"):
        read_metadata(index)
    monkeypatch.undo()
    index.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not a checkpoint index .*nested too deeply"):
        load_checkpoint(index)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors.index.json: no such checkpoint index"):
        read_metadata(index.parent / "nothing.safetensors.index.json")


def _header(raw):
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _with_header(raw, edit):
    header, body = _header(raw)
    edit(header)
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data)) + data + body


@pytest.mark.parametrize("forge, message", [
    (lambda raw: _with_header(raw, lambda h: h["fc.weight"].update(shape=[5, 7])),
     r"tensor fc.weight has shape \(5, 7\), the architecture needs \(5, 256\)"),
    (lambda raw: _with_header(raw, lambda h: h["fc.weight"].update(dtype="F64")), "fc.weight is stored as F64"),
    (lambda raw: _with_header(raw, lambda h: h["fc.bias"].update(data_offsets=[0, 10**9])), "do not fit its shape"),
    (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "not a safetensors file, or truncated"),
    (lambda raw: b"\x10" + b"\0" * 7 + b'"not an object"' + b" " * 10, "header is not a JSON object"),
], ids=["wrong-shape", "f64", "bad-offsets", "huge-header-length", "header-not-an-object"])
def test_a_shard_its_index_vouches_for_still_gets_a_single_files_checks(copy, forge, message):
    """A forged shard, with an index rewritten to list its size and sha256, is refused by the
    checks a single file gets, before its weights are read."""
    index, data, shards = copy
    shards[2].write_bytes(forge(shards[2].read_bytes()))
    data["shards"][shards[2].name] = {"bytes": shards[2].stat().st_size,
                                      "sha256": hashlib.sha256(shards[2].read_bytes()).hexdigest()}
    with pytest.raises(ValueError, match=rf"v6-00003-of-00003.safetensors: .*({message})"):
        load_checkpoint(rewrite(index, data))


def test_nan_in_a_shard_is_refused(tmp_path):
    model = tiny_model()
    model.fc.weight.data[0, 0] = float("nan")
    _, index = save_both(tmp_path, model=model)
    with pytest.raises(ValueError, match=r"v6-00003-of-00003.safetensors: tensor fc.weight holds NaN"):
        load_checkpoint(index)


def test_save_refuses_a_bad_cap_and_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    for cap in (0, -1, True, "5", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_shard_mb must be a positive number"):
            save_checkpoint(tmp_path / "m.safetensors", tiny_model(), CLASSES, max_shard_mb=cap)
    with pytest.raises(ValueError, match=r"tensor conv5.0.downsample.0.weight takes 65,536 bytes: it does not fit a shard"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model(), CLASSES, max_shard_mb=0.05)
    _, index = save_both(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import resnext.shards as shards

    real, calls = shards.save_file, []

    def full_on_the_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  'message: "No space left on device" })')
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", full_on_the_second)
    with pytest.raises(OSError, match="v6-00002-of-00003.safetensors: cannot write the model .*No space left") as err:
        save_checkpoint(tmp_path / "v6.safetensors", tiny_model(seed=1), CLASSES, max_shard_mb=CAP_MB)
    assert err.value.errno == errno.ENOSPC and len(calls) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, the old shards intact
    assert load_checkpoint(index)[1].classes == CLASSES


def test_cli_predict_and_info_take_the_index(saved, photo_file, capsys):
    single, index = saved
    run = subprocess.run([sys.executable, "-m", "resnext", "predict", "--checkpoint", str(index), str(photo_file), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert main(["predict", str(photo_file), "--checkpoint", str(single), "--json"]) == 0
    (got,), (expected,) = json.loads(run.stdout), json.loads(capsys.readouterr().out)
    assert got["verdict"] == expected["verdict"] and len(got["predictions"]) == len(CLASSES)  # the single file's answer
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in expected["predictions"]]
    assert got["predictions"][0]["prob"] == pytest.approx(expected["predictions"][0]["prob"], abs=1e-3)
    assert main(["info", str(index)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["classes"] == CLASSES and meta["provenance"] == PROVENANCE and meta["architecture"]["cardinality"] == 4
