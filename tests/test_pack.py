"""The packed training set (``python -m resnext pack``): what goes in, what comes back, the cap,
and a stranger's pack refused before anything is decoded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from resnext.__main__ import main
from resnext.data import load_dataset
from resnext.imagefile import ImageLoadError, load_image
from resnext.recipes.pack import PackError, pack_entries, read_pack, unpack, write_pack
from resnext.recipes.detector import splits
from resnext.training.distill import image_files

CUB = {"Blue_Jay": [(300, 200), (120, 260), (600, 150), (64, 64), (300, 400), (90, 140)],
       "Cactus_Wren": [(227, 227)] * 5 + [(400, 300)],
       "Red-winged Blackbird": [(160, 120)] * 6}  # a space and a dash in a class name
SPECIES = [f"SPECIES {c}" for c in "ABCDEFG"]  # C reserved; of the other six, A and G held out (every 5th)
NONBIRD = {"food": [(500, 375)] * 3, "objects": [(375, 500), (640, 200), (300, 300)]}
NONBIRD_MORE = {"cats": [(160, 107)] * 5, "tench": [(160, 160)] * 5}


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random picture with some grain: every photo distinct, compressible like a photo."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(base) + grain, 0, 255).astype(np.uint8))


def _fill(folder, sizes, names, seed: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for size, name in zip(sizes, names):
        _photo(size, seed).save(folder / name, quality=92)
        seed += 1
    return seed


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny ``shared`` folder laid out as ``../shared/data``: 18 training photos in 3 classes,
    test photos, 7 other species (one reserved), and two folders of photos with no bird."""
    root, seed = tmp_path_factory.mktemp("shared"), 0
    data = root / "data"
    for name, sizes in CUB.items():
        seed = _fill(data / "cub100" / "train" / name, sizes, [f"{name}_{i:04d}_{i + 7}.jpg" for i in range(len(sizes))], seed)
        seed = _fill(data / "cub100" / "test" / name, sizes[:2], [f"test_{i:04d}.jpg" for i in range(2)], seed)
    birds = data / "birds525-valid-480"
    for species in SPECIES:
        seed = _fill(birds / species, [(224, 224), (224, 180), (200, 224), (224, 224), (300, 224)],
                     [f"{i}.jpg" for i in range(1, 6)], seed)
    (birds / "reserved.txt").write_text("SPECIES C\n")
    for group, sizes in NONBIRD.items():
        seed = _fill(data / "nonbird" / group, sizes, [f"n0{i}_{group}{i}.JPEG" for i in range(len(sizes))], seed)
    for category, sizes in NONBIRD_MORE.items():
        seed = _fill(data / "nonbird-more" / category, sizes, [f"{category}.{i}.jpg" for i in range(len(sizes))], seed)
    return root


@pytest.fixture(scope="module")
def packed(shared, tmp_path_factory):
    """The fake shared folder packed under a roomy cap: (path, result, entries, classes)."""
    entries, classes = pack_entries(shared)
    out = tmp_path_factory.mktemp("pack") / "train.safetensors"
    return out, write_pack(out, entries, classes, max_mb=48), entries, classes


def test_round_trip_keeps_names_labels_roles_and_each_photo_shrunk(shared, packed):
    out, result, entries, classes = packed
    assert (result.side, result.quality) == (224, 90)  # roomy: the recipe's own need
    pack = read_pack(out)
    assert pack.classes == classes == sorted(CUB)
    assert pack.names == [e.name for e in entries] and "Blue_Jay/Blue_Jay_0001_8.jpg" in pack.names
    assert pack.labels == [e.label for e in entries] and pack.roles == [e.role for e in entries]
    assert result.counts == {"labelled": 18, "unlabelled": 20, "negative": 12}
    assert out.stat().st_size == result.bytes
    shapes = set()
    for i, entry in enumerate(entries):
        photo = pack.image(i)
        assert min(photo.size) <= 224 and max(photo.size) <= 448, (entry.name, photo.size)
        original = load_image(entry.path)
        scale = min(1.0, 224 / min(original.size), 448 / max(original.size))
        assert photo.size == tuple(max(1, round(s * scale)) for s in original.size), entry.name
        expected = np.asarray(load_image(entry.path, shrink_to=224, max_side=448), dtype=np.float32)
        assert np.abs(np.asarray(photo, dtype=np.float32) - expected).mean() < 6, entry.name  # this photo, not another
        shapes.add(photo.size)
    assert {(448, 112), (299, 224), (224, 299), (448, 140)} <= shapes  # long ones capped at 2x, big ones at 224


def test_only_what_the_recipe_trains_on_is_packed(shared, packed):
    _, _, entries, _ = packed
    groups, data = splits(shared), shared / "data"
    by_role = {role: {e.name for e in entries if e.role == role} for role in ("labelled", "unlabelled", "negative")}
    train = data / "cub100" / "train"
    assert by_role["labelled"] == {p.relative_to(train).as_posix() for p in image_files([train])}
    assert by_role["unlabelled"] == {p.relative_to(data).as_posix() for p in groups["other_fit"]}
    assert by_role["negative"] == {p.relative_to(data).as_posix() for p in groups["none_fit"]}
    names = set().union(*by_role.values())
    held = {p.relative_to(data).as_posix() for p in groups["other_val"] + groups["none_val"]}
    assert len(held) == 10 + 4 and not names & held
    assert {n.split("/")[1] for n in by_role["unlabelled"]} == {"SPECIES B", "SPECIES D", "SPECIES E", "SPECIES F"}
    assert not any("SPECIES C" in n or "test_" in n for n in names)  # reserved species, cub100/test


def test_unpacked_labelled_folder_gives_the_same_split(shared, packed, tmp_path):
    out, _, _, _ = packed
    folders = unpack(out, tmp_path / "unpacked")
    assert folders == {r: tmp_path / "unpacked" / r for r in ("labelled", "unlabelled", "negative")}
    before = load_dataset(shared / "data" / "cub100" / "train", val_split=0.05, seed=0)
    after = load_dataset(folders["labelled"], val_split=0.05, seed=0)

    def named(data, items):
        return [(p.relative_to(data.root).as_posix(), y) for p, y in items]

    assert after.classes == before.classes and not after.report.skipped
    assert named(after, after.val) == named(before, before.val) and len(before.val) == 3
    assert named(after, after.train) == named(before, before.train)
    assert len(image_files([folders["unlabelled"]])) == 20 and len(image_files([folders["negative"]])) == 12
    with pytest.raises(PackError, match="already"):
        unpack(out, tmp_path / "unpacked")


def test_a_tight_cap_steps_down_and_an_impossible_one_is_refused(shared, packed, tmp_path):
    _, result, entries, classes = packed
    cap = 0.55 * result.bytes / 2**20
    smaller = write_pack(tmp_path / "small.safetensors", entries, classes, max_mb=cap)
    assert (smaller.side < 224 or smaller.quality < 90) and smaller.side >= 96
    assert (tmp_path / "small.safetensors").stat().st_size == smaller.bytes <= cap * 2**20
    pack = read_pack(tmp_path / "small.safetensors")
    assert pack.side == smaller.side and all(min(pack.image(i).size) <= smaller.side for i in range(len(entries)))
    with pytest.raises(PackError) as refused:
        write_pack(tmp_path / "none.safetensors", entries, classes, max_mb=0.01)
    message = str(refused.value)
    assert "\n" not in message and "50 photos" in message and "0.01 MB" in message and "side 96" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors"]  # nothing half-written left


@pytest.fixture()
def small_pack(shared, tmp_path):
    """A valid pack of three photos (one of each role), and a way to write a forged copy of it."""
    entries, classes = pack_entries(shared)
    chosen = [next(e for e in entries if e.role == r) for r in ("labelled", "unlabelled", "negative")]
    path = write_pack(tmp_path / "good.safetensors", chosen, classes).path
    with safe_open(path, "numpy") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def forge(**changes):
        t, m = {k: v.copy() for k, v in tensors.items()}, dict(metadata)
        for key, change in changes.items():
            if key in t:
                t[key] = change(t[key])
            else:
                m[key] = change(m[key])
        save_file(t, tmp_path / "forged.safetensors", metadata=m)
        return tmp_path / "forged.safetensors"

    return path, forge


def _refused(path, *words):
    with pytest.raises(PackError) as refused:
        read_pack(path)
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_a_valid_small_pack_reads(small_pack):
    path, forge = small_pack
    assert read_pack(path).roles == ["labelled", "unlabelled", "negative"]
    assert read_pack(forge()).labels == [0, -1, -1]  # the forger alone changes nothing


def test_offsets_past_the_data_are_refused(small_pack):
    _, forge = small_pack

    def past(offsets):
        offsets[-1] += 10
        return offsets

    _refused(forge(offsets=past), "offsets", "rise")


def test_a_label_out_of_range_is_refused(small_pack):
    _, forge = small_pack

    def wrong(labels):
        labels[0] = 3  # three classes: 0 to 2
        return labels

    _refused(forge(labels=wrong), "label 3", "3 classes")


@pytest.mark.parametrize("index, name", [(1, "../evil.jpg"), (0, "Blue_Jay/../../evil.jpg"), (2, "/tmp/evil.jpg")])
def test_a_name_leaving_its_folder_is_refused_and_unpack_writes_nothing(small_pack, tmp_path, index, name):
    _, forge = small_pack

    def rename(names):
        names = json.loads(names)
        names[index] = name
        return json.dumps(names)

    forged = forge(names=rename)
    _refused(forged, repr(name))
    with pytest.raises(PackError):
        unpack(forged, tmp_path / "out" / "deeper")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.jpg").exists()


def test_a_jpeg_declaring_a_huge_size_is_refused(small_pack):
    path, forge = small_pack
    first = read_pack(path).jpeg(0)
    sof = first.index(b"\xff\xc0")  # FFC0, length, precision, height, width

    def huge(jpeg):
        jpeg[sof + 5:sof + 9] = np.frombuffer((60000).to_bytes(2, "big") * 2, dtype=np.uint8)
        return jpeg

    _refused(forge(jpeg=huge), "60000x60000", "at most 448")
    with pytest.raises(ImageLoadError, match="too large"):  # the forgery declares what it should
        load_image(bytes(huge(np.frombuffer(first, dtype=np.uint8).copy())))


def test_a_header_claiming_too_much_and_a_wrong_dtype_are_refused(small_pack, tmp_path):
    path, forge = small_pack
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])
    _refused(liar, "header claims")
    _refused(forge(offsets=lambda o: o.astype(np.int32)), "offsets", "I32", "I64")
    _refused(forge(side=lambda s: "99999"), "side", "99999")


def test_cli_writes_a_pack(shared, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["pack", "--shared", str(shared), "--out", str(out), "--max-mb", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "18 labelled, 20 unlabelled, 12 negative photos at side 224, quality 90" in lines[0]
    assert len(read_pack(out).names) == 50


@pytest.mark.parametrize("cap", ["0", "-5", "nan"])
def test_cli_refuses_a_bad_cap_in_one_line(shared, tmp_path, capsys, cap):
    out = tmp_path / "bad.safetensors"
    assert main(["pack", "--shared", str(shared), "--out", str(out), "--max-mb", cap]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-mb" in err[0] and not out.exists()


def test_the_v6_recipe_trains_from_a_pack_by_the_clock_and_writes_shards(shared, packed, tmp_path, monkeypatch):
    """recipes.v6 --pack --minutes --max-shard-mb: phase 1 from the pack alone, its schedule by the
    clock, the result in shards that load as a classifier (the GPU run's path, at test scale)."""
    import hashlib
    import sys

    import torch
    import torchvision

    from resnext import load_classifier, read_metadata
    from resnext.recipes import v6
    from resnext.training import teacher as teacher_module

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), teacher)
    monkeypatch.setattr(teacher_module, "TEACHER_SHA256", hashlib.sha256(teacher.read_bytes()).hexdigest())
    out = tmp_path / "run" / "v6.safetensors"
    monkeypatch.setattr(sys, "argv", ["recipes.v6", "--pack", str(packed[0]), "--teacher", str(teacher), "--minutes", "0.05",
                                      "--init", "scratch", "--image-size", "32", "--teacher-size", "48", "--batch-size", "8",
                                      "--only-training", "--max-shard-mb", "15", "--out", str(out),
                                      "--report", str(tmp_path / "report.json"), "--shared", str(tmp_path / "nowhere")])
    v6.main()
    index = out.with_suffix(".raw.safetensors.index.json")
    shards = sorted(index.parent.glob("v6.raw-*-of-*.safetensors"))
    assert index.is_file() and len(shards) == 4 and all(p.stat().st_size <= 15 * 2**20 for p in shards)
    info = read_metadata(index)
    assert info.classes == packed[3] and info.provenance["config"]["minutes"] == 0.05
    assert info.provenance["config"]["unlabelled"] == ["unlabelled"] and info.provenance["config"]["negatives"] == ["negative"]
    report = json.loads((tmp_path / "report.json").read_text())["phase 1"]
    assert report["history"] and report["minutes"] >= 0.05  # the schedule ran its 3 s to the end
    (answer,) = load_classifier(index).predict(next((shared / "data" / "cub100" / "test").rglob("*.jpg")))
    assert answer[0].label in packed[3]
