import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from resnext.__main__ import main

from conftest import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_predict_json_shape(tiny_checkpoint, photo_file, capsys):
    assert main(["predict", str(photo_file), str(photo_file), "--checkpoint", str(tiny_checkpoint), "--topk", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2
    for item in out:
        assert item["image"] == str(photo_file)
        assert len(item["predictions"]) == 3
        for p in item["predictions"]:
            assert set(p) == {"label", "index", "prob"}
            assert p["label"] == CLASSES[p["index"]] and 0 <= p["prob"] <= 1
        probs = [p["prob"] for p in item["predictions"]]
        assert probs == sorted(probs, reverse=True)


def test_predict_table(tiny_checkpoint, photo_file, capsys):
    assert main(["predict", str(photo_file), "--checkpoint", str(tiny_checkpoint), "--topk", "9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # A random tiny model is never sure: the default threshold for 5 classes is 0.47.
    assert lines[0] == f"{photo_file}  [not sure: maybe a species it does not know]"
    assert len(lines) == 1 + len(CLASSES)  # k clamped to the class count
    assert lines[1].strip().startswith("1.") and "%" in lines[1]


def test_bad_images_fail_alone_and_exit_non_zero(tiny_checkpoint, photo_file, tmp_path, capsys):
    text = tmp_path / "note.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    code = main(["predict", str(text), str(photo_file), str(missing), "--checkpoint", str(tiny_checkpoint), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    out = json.loads(captured.out)
    assert [("error" in item) for item in out] == [True, False, True]
    assert "note.jpg" in out[0]["error"] and "missing.jpg" in out[2]["error"]
    assert len(out[1]["predictions"]) == 5
    assert out[1]["verdict"] in ("species", "unsure") and out[1]["bird"] is None  # no locator, no bird check
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)


def test_cam_dir_writes_one_overlay_per_image(tiny_checkpoint, photo_file, tmp_path, capsys):
    cams = tmp_path / "cams"
    assert main(["predict", str(photo_file), "--checkpoint", str(tiny_checkpoint), "--cam-dir", str(cams), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    written = sorted(cams.iterdir())
    assert [Path(item["cam"]) for item in out] == written
    assert Image.open(written[0]).size == Image.open(photo_file).size


def test_info_prints_metadata(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["classes"] == CLASSES and meta["architecture"]["cardinality"] == 4


def test_bad_checkpoint_is_one_line_and_exit_1(tmp_path, photo_file, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("nope")
    assert main(["predict", str(photo_file), "--checkpoint", str(bogus)]) == 1
    assert main(["info", str(tmp_path / "none.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "bogus.safetensors" in err[0] and "none.safetensors" in err[1]


def test_usage_errors_exit_2(tiny_checkpoint, photo_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(photo_file), "--checkpoint", str(tiny_checkpoint), "--topk", "0"])
    assert exit_info.value.code == 2


def test_module_runs_as_a_program(tiny_checkpoint, photo_file):
    run = subprocess.run(
        [sys.executable, "-m", "resnext", "predict", str(photo_file), "--checkpoint", str(tiny_checkpoint), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0]["predictions"][0]["label"] in CLASSES
    bad = subprocess.run(
        [sys.executable, "-m", "resnext", "predict", "nowhere.jpg", "--checkpoint", str(tiny_checkpoint)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.strip() == "error: nowhere.jpg: no such file"
