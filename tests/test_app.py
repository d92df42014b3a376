import os
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

import app
from resnext import display_name
from resnext.verdict import VerdictRules

from conftest import CLASSES, class_inputs, make_shapes


def test_classify_returns_label_overlay_top3_and_caption(registry, photo):
    label, overlay, trio, caption, explanation = app.classify(registry.get(None), photo, 3)
    assert len(label) == 3 and all(0 <= p <= 1 for p in label.values())
    assert set(label) <= {display_name(c) for c in CLASSES}  # readable names, not folder names
    assert overlay.shape == photo.shape and overlay.dtype == np.uint8
    assert len(trio) == 3 and all(img.shape == photo.shape for img, _ in trio)
    assert [cap.split(" · ")[0] for _, cap in trio] == list(label)[:3]
    assert "Where the model looked" in caption and "CPU" in caption and " ms" in caption
    assert np.array_equal(app.reblend(explanation, 0.0), photo)  # opacity 0: the photo itself


def test_without_top3_the_same_answer_and_no_gallery(registry, photo):
    full = app.classify(registry.get(None), photo, 3)
    lean = app.classify(registry.get(None), photo, 3, top3=False)
    assert lean[0] == full[0] and np.array_equal(lean[1], full[1]) and lean[2] == []


def test_unsure_predictions_say_so(registry, photo, monkeypatch):
    classifier = registry.get(None)
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=1.0))
    assert "Not sure" in app.classify(classifier, photo, 3)[3]
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0))
    assert "Not sure" not in app.classify(classifier, photo, 3)[3]


def test_not_a_bird_is_said_instead_of_a_species(registry, photo, monkeypatch):
    classifier = registry.get(None)
    locator = torch.nn.Conv2d(classifier.model.num_features, 1, 1)
    torch.nn.init.zeros_(locator.weight)
    torch.nn.init.zeros_(locator.bias)  # a bird score of exactly 0.5 everywhere
    monkeypatch.setattr(classifier.model, "locator", locator)
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0, bird_below=0.99))
    label, _, _, caption, explanation = app.classify(classifier, photo, 3)
    assert explanation.verdict == "not_a_bird" and label == "No bird found"
    assert "does not look like a bird photo" in caption
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0, bird_below=0.01))
    label, _, _, caption, _ = app.classify(classifier, photo, 3)
    assert isinstance(label, dict) and "bird photo" not in caption


def test_explain_another_class_and_method(registry, photo):
    _, _, _, caption, explanation = app.classify(registry.get(None), photo, 5, "Cactus Wren", "gradcam++")
    assert explanation.label == "Cactus_Wren" and "Cactus Wren" in caption and "Grad-CAM++" in caption
    with pytest.raises(gr.Error, match="unknown class"):
        app.classify(registry.get(None), photo, 5, "Dodo")


def test_big_photos_are_shrunk_for_display(registry):
    big = np.zeros((3000, 2000, 3), np.uint8)
    overlay = app.classify(registry.get(None), big, 1)[1]
    assert overlay.shape == (1280, 853, 3)


def test_empty_and_bad_input_give_plain_messages(registry, tmp_path):
    with pytest.raises(gr.Error, match="Add a photo"):
        app.classify(registry.get(None), None)
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    with pytest.raises(gr.Error, match="Could not read that image: bad.jpg: not an image") as err:
        app.classify(registry.get(None), str(bad))
    assert str(tmp_path) not in err.value.message  # the server's folders stay private


def test_classify_many_writes_a_csv_and_marks_bad_files(registry, photo_file, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    rows, csv_path = app.classify_many(registry.get(None), [str(photo_file), str(bad)])
    assert rows[0][0] == "bird.png" and rows[0][1] in ("species", "not sure") and rows[0][2] in {display_name(c) for c in CLASSES}
    assert len(rows[0]) == len(rows[1]) == len(app.BATCH_HEADERS)
    assert rows[1][0] == "broken.png" and rows[1][1].startswith("unreadable: ") and str(tmp_path) not in rows[1][1]
    assert Path(csv_path).parent == registry.workdir / "exports"
    text = Path(csv_path).read_text().splitlines()
    assert text[0] == ",".join(app.BATCH_HEADERS) and len(text) == 3


def test_exported_csvs_expire_after_an_hour(registry, photo_file):
    exports = registry.workdir / "exports"
    exports.mkdir()
    old, recent = exports / "predictions-old.csv", exports / "predictions-recent.csv"
    for path, age in ((old, app.KEEP_FILES_S + 60), (recent, 60)):
        path.write_text("file\n")
        os.utime(path, (time.time() - age,) * 2)
    _, csv_path = app.classify_many(registry.get(None), [str(photo_file)])
    assert sorted(p.name for p in exports.iterdir()) == sorted([Path(csv_path).name, recent.name])


def test_model_card_shows_the_stages(registry):
    card = app.model_card(registry.get(None))
    for stage in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"):
        assert f"| {stage} |" in card
    assert "4 x 2d = 8" in card  # conv2's grouped 3x3: cardinality 4, group depth 2
    assert "Black-footed Albatross" in card


def test_upload_refuses_pickles_and_broken_files_and_keeps_the_model(registry, tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"a": 1}, pt)
    with pytest.raises(gr.Error, match="Only .safetensors"):
        app.upload_model(str(pt), registry.default)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(gr.Error, match="not a usable model"):
        app.upload_model(str(broken), registry.default)
    assert registry.names() == [registry.default]


def test_upload_and_select_a_model(registry, tiny_checkpoint, tmp_path):
    copy = tmp_path / "other birds.safetensors"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    name, picker, *_ = app.upload_model(str(copy), registry.default)
    assert name == "other birds" and name in registry.names() and picker["value"] == name
    assert registry.get(name).classes == CLASSES


def test_check_data_reports_or_refuses(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=5)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    report = app.check_data(None, *class_inputs(tmp_path / "d", classes))
    assert "**2 classes**" in report
    with pytest.raises(gr.Error, match="at least two classes|at least 2"):
        app.check_data(None, *class_inputs(tmp_path / "d", classes[:1]))
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(gr.Error, match="points outside"):
        app.check_data(str(archive), *([""] * app.MAX_CLASSES_UI + [None] * app.MAX_CLASSES_UI))
    assert list((registry.workdir / "jobs").iterdir()) == []  # job folders are removed


def test_training_from_the_ui_registers_a_new_model(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=3, per_class=8)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    updates = list(app.run_training(None, "quick", "current model", 10, None, "my shapes", registry.default, "s1",
                                    *class_inputs(tmp_path / "d", classes), progress=lambda *a, **k: None))
    status, report, history, per_class, figure, download, *_ = updates[-1]
    assert "Saved as **my shapes**" in status
    assert "my shapes" in registry.names()
    assert registry.get("my shapes").classes == classes
    assert len(per_class) == 3 and figure is not None
    assert Path(download["value"]).is_file()
    assert set(history["metric"]) >= {"training loss", "validation accuracy"}
    assert list((registry.workdir / "jobs").iterdir()) == []


def test_stop_ends_a_run_without_a_model(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    run = app.run_training(None, "full", "current model", 50, None, "stopped", registry.default, "s2",
                           *class_inputs(tmp_path / "d", classes), progress=lambda *a, **k: None)
    next(run)
    app.stop_training("s2")
    last = list(run)[-1]
    assert last[0].startswith("Stopped")
    assert "stopped" not in registry.names()
    assert not list((registry.workdir / "models").glob("stopped*"))


def test_build_demo_without_launching(registry):
    demo = app.build_demo(registry)
    assert isinstance(demo, gr.Blocks)
    public = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility", "public") == "public"}
    assert {"classify", "classify_many", "fine_tune"} <= public


def test_output_images_are_cached_once_never_rewritten_in_place(tmp_path):
    """Two requests returning the same image must not rewrite the file a third is downloading."""
    from gradio import processing_utils
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    first = Path(processing_utils.save_pil_to_cache(image, str(tmp_path)))
    assert Image.open(first).size == (40, 30)
    first.write_bytes(b"being downloaded")  # stands for the copy someone is reading right now
    again = Path(processing_utils.save_pil_to_cache(image.copy(), str(tmp_path)))
    assert again == first and first.read_bytes() == b"being downloaded"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging file left
