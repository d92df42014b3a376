"""The UI's handlers without a browser: answers, batch table, model tab, training reports."""

import os
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import ui
from resnext import Preprocessing, display_name, save_checkpoint
from resnext.verdict import VerdictRules
from ui import answers
from ui.card import model_card
from ui.fixes import Unreadable, photo_input
from ui.model_tab import upload_model
from ui.state import SLOT, valid_owner
from ui.training import check_data, confusion_figure, run_training, small_validation_warning

from conftest import CLASSES, OWNER, SHAPES, class_inputs, make_shapes, tiny_model, train_request


def test_classify_returns_label_overlay_top3_and_caption(registry, photo):
    label, overlay, trio, caption, explanation = answers.classify(registry.get(), photo, 3)
    assert len(label) == 3 and all(0 <= p <= 1 for p in label.values())
    assert set(label) <= {display_name(c) for c in CLASSES}  # readable names, not folder names
    assert overlay.shape == photo.shape and overlay.dtype == np.uint8
    assert len(trio) == 3 and all(img.size == (photo.shape[1], photo.shape[0]) for img, _ in trio)
    assert [cap.split(" · ")[0] for _, cap in trio] == list(label)[:3]
    assert "Where the model looked" in caption and "CPU" in caption and " ms" in caption
    assert np.array_equal(answers.reblend(explanation, 0.0), photo)  # opacity 0: the photo itself


def test_top3_tiles_are_small_copies(registry):
    big = np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    _, overlay, trio, _, _ = answers.classify(registry.get(), big, 3)
    assert overlay.shape == big.shape
    assert all(img.size == (answers.TOP3_SIDE, 360) for img, _ in trio)


def test_top3_tiles_are_the_overlays_shrunk(registry, photo):
    """Each tile is drawn on a small copy of the photo, its map where the full-size overlay has it."""
    big = np.asarray(Image.fromarray(photo).resize((1200, 900), Image.Resampling.BILINEAR))
    shown = answers.classify(registry.get(), big, 3)
    for (tile, _), e in zip(shown.top3, answers.gpu_explain(registry.get(), big, None, "gradcam", 3)[1:]):
        expected = Image.fromarray(e.overlay_with(0.5)).resize(tile.size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        assert np.abs(np.asarray(tile, dtype=float) - np.asarray(expected, dtype=float)).mean() < 3.0


def test_a_phone_photo_gets_the_same_answer_alone_and_in_the_batch_table(registry, photo, tmp_path):
    """Both read a 12-megapixel JPEG the same way (decoded at half size, shown at 1,280 px)."""
    path = tmp_path / "phone.jpg"
    Image.fromarray(photo).resize((4032, 3024), Image.Resampling.BILINEAR).save(path, quality=90)
    label = answers.classify(registry.get(), str(path), 3).label
    rows, csv_path = answers.classify_many(registry.get(), [str(path)], tmp_path / "exports")
    row = Path(csv_path).read_text().splitlines()[1].split(",")
    assert row[2::2] == list(label)[:3]
    assert [float(p) for p in row[3::2]] == pytest.approx(list(label.values())[:3], abs=1e-4)
    record = answers.answer_record(registry.get(), str(path), 3)
    assert record["box"][2] <= 4032 and record["box"][3] <= 3024  # in the file's pixels, not the shrunk photo's
    assert max(record["box"][2] - record["box"][0], record["box"][3] - record["box"][1]) > 1280


def test_without_top3_the_same_answer_and_no_gallery(registry, photo):
    full = answers.classify(registry.get(), photo, 3)
    lean = answers.classify(registry.get(), photo, 3, top3=False)
    assert lean.label == full.label and np.array_equal(lean.overlay, full.overlay) and lean.top3 == []


def test_a_drawn_box_is_classified_alone_and_drawn(registry, photo):
    classifier = registry.get()
    boxed = answers.classify(classifier, photo, 3, box=(20, 10, 100, 80))
    alone = answers.classify(classifier, photo[10:80, 20:100], 3)
    assert boxed.label == alone.label  # the same answer as for the cut-out part
    assert boxed.explanation.boxed and "inside the box you drew" in boxed.caption
    assert boxed.overlay.shape == photo.shape
    assert np.array_equal(boxed.overlay[5, 5], photo[5, 5])  # outside the box: the photo, untinted
    with pytest.raises(gr.Error, match="at least 8x8"):
        answers.classify(classifier, photo, 3, box=(0, 0, 4, 4))


def test_a_box_on_a_photo_wider_than_the_display_is_scaled_to_it(registry):
    """Phone photos are wider than the 1,280 px the page shows: a box in the uploaded photo's
    pixels must land on the same part of the shown (shrunk) photo."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (1920, 2560, 3), dtype=np.uint8)  # shown at 1280 x 960: half
    drawn = (800, 400, 1600, 1200)
    boxed = answers.classify(registry.get(), big, 3, box=drawn)
    assert boxed.overlay.shape == (960, 1280, 3)
    left, top, right, bottom = boxed.explanation.box  # in the shown photo's pixels
    assert 400 <= left < right <= 800 and 200 <= top < bottom <= 600
    assert right - left > 0.8 * 400  # the network saw (most of) the drawn part, at the shown scale


def test_unsure_predictions_say_so(registry, photo, monkeypatch):
    classifier = registry.get()
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=1.0))
    assert "Not sure" in answers.classify(classifier, photo, 3).caption
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0))
    assert "Not sure" not in answers.classify(classifier, photo, 3).caption


def test_the_species_is_the_heading_only_when_the_model_is_sure(registry, photo, monkeypatch):
    classifier = registry.get()
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=1.0))
    unsure = answers.page_label(answers.classify(classifier, photo, 3))
    assert unsure.show_heading is False and unsure.label.startswith("Not sure")
    assert len(unsure.value["confidences"]) == 3  # the closest species are still listed
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0))
    sure = answers.page_label(answers.classify(classifier, photo, 3))
    assert sure.show_heading is True and sure.label == "Prediction"
    assert sure.value["label"] == sure.value["confidences"][0]["label"]
    empty = answers.page_label()
    assert empty.value == {} and empty.label == "Prediction" and empty.show_heading is True


def test_the_answer_as_data_has_the_verdict_and_the_box_in_the_given_photos_pixels(registry, monkeypatch):
    classifier = registry.get()
    big = np.random.default_rng(1).integers(0, 255, (1800, 2400, 3), dtype=np.uint8)  # shrunk to 1280 px inside
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=1.0))
    record = answers.answer_record(classifier, big, 3)
    assert record["verdict"] == "unsure" and record["found_bird"] is False and record["boxed"] is False
    assert [p["label"] for p in record["predictions"]] == [p.label for p in classifier.predict(big, k=3)[0]]
    seen = classifier.preprocessing.crop_box(2400, 1800)  # the centre crop the network saw, in the photo given
    assert record["box"] == pytest.approx(list(seen), abs=2) and seen[2] - seen[0] > 1280
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0))
    assert answers.answer_record(classifier, big, 99)["verdict"] == "species"
    assert len(answers.answer_record(classifier, big, 99)["predictions"]) == len(classifier.classes)
    with pytest.raises(gr.Error, match="Add a photo first"):
        answers.answer_record(classifier, None)
    for answer in (answers.answer_record, answers.classify):  # the API's two photo endpoints
        with pytest.raises(gr.Error, match="That file cannot be used: this is text, not a photo"):
            answer(classifier, Unreadable("this is text, not a photo"))


def test_not_a_bird_is_said_instead_of_a_species(registry, photo, monkeypatch):
    classifier = registry.get()
    locator = torch.nn.Conv2d(classifier.model.num_features, 1, 1)
    torch.nn.init.zeros_(locator.weight)
    torch.nn.init.zeros_(locator.bias)  # a bird score of exactly 0.5 everywhere
    monkeypatch.setattr(classifier.model, "locator", locator)
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0, bird_below=0.99))
    label, _, top3, caption, explanation = answers.classify(classifier, photo, 3)
    assert explanation.verdict == "not_a_bird" and label == "No bird found"
    assert "does not look like a bird photo" in caption
    # nothing else talks of a species or a bird: no species tiles, no "looked to decide <species>"
    assert top3 == [] and "decide" not in caption and "there is no species to explain" in caption
    assert "🚫" not in caption  # an empty box where there are no emoji fonts
    monkeypatch.setattr(classifier, "rules", VerdictRules(unsure_below=0.0, bird_below=0.01))
    label, _, top3, caption, _ = answers.classify(classifier, photo, 3)
    assert isinstance(label, dict) and "bird photo" not in caption and len(top3) == 3 and "decide" in caption


def test_explain_another_class_and_method(registry, photo):
    shown = answers.classify(registry.get(), photo, 5, "Cactus Wren", "gradcam++")
    assert shown.explanation.label == "Cactus_Wren" and "Cactus Wren" in shown.caption and "Grad-CAM++" in shown.caption
    with pytest.raises(gr.Error, match="unknown class"):
        answers.classify(registry.get(), photo, 5, "Dodo")


def test_eigencam_caption_does_not_claim_a_class(registry, photo):
    caption = answers.classify(registry.get(), photo, 5, "Cactus Wren", "eigencam").caption
    assert "Eigen-CAM" in caption and "to decide" not in caption and "whichever class" in caption


def test_big_photos_are_shrunk_for_display(registry):
    big = np.zeros((3000, 2000, 3), np.uint8)
    overlay = answers.classify(registry.get(), big, 1).overlay
    assert overlay.shape == (1280, 853, 3)


@pytest.mark.parametrize("content, reason", [(b"", "the file is empty"), (b"my notes\n", "this is text, not a photo"),
                                             (b"\x00\x01\x02garbage",
                                              "not a photo in a format this app reads (JPEG, PNG, WebP, GIF, BMP or TIFF)")])
def test_bad_files_are_named_in_plain_words(registry, tmp_path, content, reason):
    with pytest.raises(gr.Error, match="Add a photo"):
        answers.classify(registry.get(), None)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(gr.Error) as err:
        answers.classify(registry.get(), str(bad))
    assert err.value.message == f"That file cannot be used: {reason}."  # no folder, no library, no exception name


def test_the_photo_input_hands_over_a_reason_not_an_exception(tmp_path):
    from gradio.data_classes import FileData

    bad = tmp_path / "notes.jpg"
    bad.write_text("just text")
    component = photo_input()
    assert component.preprocess(FileData(path=str(bad))) == Unreadable("this is text, not a photo")


def test_classify_many_writes_a_csv_and_marks_bad_files(registry, photo_file, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    rows, csv_path = answers.classify_many(registry.get(), [str(photo_file), str(bad)], registry.workdir / "exports")
    assert rows[0][0] == "bird.png" and rows[0][1] in ("species", "not sure") and rows[0][2] in {display_name(c) for c in CLASSES}
    assert rows[0][3].endswith("%") and 0 <= int(rows[0][3][:-1]) <= 100  # percentages on the page
    assert len(rows[0]) == len(rows[1]) == len(answers.BATCH_HEADERS)
    assert rows[1][0] == "broken.png" and rows[1][1].startswith("unreadable: ") and str(tmp_path) not in rows[1][1]
    assert Path(csv_path).parent == registry.workdir / "exports"
    text = Path(csv_path).read_text().splitlines()
    assert text[0] == ",".join(answers.BATCH_HEADERS) and len(text) == 3
    assert 0 <= float(text[1].split(",")[3]) <= 1  # probabilities as numbers in the CSV


def test_exported_csvs_expire_after_an_hour(registry, photo_file):
    exports = registry.workdir / "exports"
    exports.mkdir()
    old, recent = exports / "predictions-old.csv", exports / "predictions-recent.csv"
    for path, age in ((old, answers.KEEP_FILES_S + 60), (recent, 60)):
        path.write_text("file\n")
        os.utime(path, (time.time() - age,) * 2)
    _, csv_path = answers.classify_many(registry.get(), [str(photo_file)], exports)
    assert sorted(p.name for p in exports.iterdir()) == sorted([Path(csv_path).name, recent.name])


def test_model_card_shows_the_stages(registry):
    card = model_card(registry.get())
    for stage in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"):
        assert f"| {stage} |" in card
    assert "4 x 2d = 8" in card  # conv2's grouped 3x3: cardinality 4, group depth 2
    assert "Black-footed Albatross" in card


def test_upload_refuses_pickles_and_broken_files_and_keeps_the_model(registry, tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"a": 1}, pt)
    with pytest.raises(gr.Error, match="Only .safetensors"):
        upload_model(registry, OWNER, str(pt))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(gr.Error, match="not a usable model"):
        upload_model(registry, OWNER, str(broken))
    assert registry.names(OWNER) == [registry.default]
    assert not registry.folder(OWNER).exists()  # no half-kept file, not even an empty folder
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(b"\xff" * 8 + b"x" * 192)  # its first 8 bytes declare a header of 18 quintillion bytes
    with pytest.raises(gr.Error) as err:
        upload_model(registry, OWNER, str(noise))
    assert err.value.message == ("That file is not a usable model: not a safetensors file, or truncated (its header "
                                 "claims more bytes than the file holds; the file has 200)")  # words, not 19 digits


def test_an_uploaded_model_is_its_owners_only(registry, tiny_checkpoint, tmp_path):
    copy = tmp_path / "other birds.safetensors"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    name, removed = upload_model(registry, OWNER, str(copy))
    assert name == "other birds" and removed == [] and registry.names(OWNER) == [registry.default, name]
    assert registry.get(name, OWNER).classes == CLASSES
    someone_else = "f" * 32
    assert registry.names(someone_else) == registry.names() == [registry.default]
    for owner in (someone_else, None, "../" + OWNER, OWNER.upper()):
        with pytest.raises(gr.Error, match="Unknown model"):
            registry.get(name, owner)


def test_visitor_tokens_are_checked():
    assert valid_owner(OWNER) == OWNER
    for bad in (None, 3, "", "../x", OWNER + "0", OWNER[:-1] + "g", OWNER.upper()):
        assert valid_owner(bad) is None


def test_check_data_reports_or_refuses(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=5)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    report = check_data(registry, None, *class_inputs(tmp_path / "d", classes))
    assert "**2 classes**" in report and "Only 2 validation photos" in report
    with pytest.raises(gr.Error, match="at least two classes|at least 2"):
        check_data(registry, None, *class_inputs(tmp_path / "d", classes[:1]))
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(gr.Error, match="points outside"):
        check_data(registry, str(archive), [], [])
    assert list((registry.workdir / "jobs").iterdir()) == []  # job folders are removed


def test_small_validation_sets_are_called_rough():
    assert "Only 3 validation photos" in small_validation_warning({"a": 1, "b": 1, "c": 1})
    assert "each one moves the accuracy by 33 points" in small_validation_warning({"a": 1, "b": 1, "c": 1})
    assert "No validation photos" in small_validation_warning({"a": 0, "b": 0})
    assert small_validation_warning({"a": 20, "b": 20}) == ""
    assert "Only 44" in small_validation_warning({"a": 40, "b": 4})  # enough in all, too few in one


def test_training_from_the_ui_registers_a_new_model_for_its_owner_only(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=3, per_class=8)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    views = list(run_training(registry, train_request(tmp_path / "d", classes, epochs=10, new_name="my shapes")))
    final = views[-1]
    assert "Saved as <b>my shapes</b>" in final.status and final.new_model == "my shapes"
    assert "Only 3 validation photos" in final.status
    assert registry.names(OWNER) == [registry.default, "my shapes"] and registry.names() == [registry.default]
    assert registry.get("my shapes", OWNER).classes == classes
    assert [row[0] for row in final.per_class] == [display_name(c) for c in classes]
    assert all(row[1].endswith("(1 of 1)") or row[1].endswith("(0 of 1)") for row in final.per_class)
    assert Path(final.model_file).is_file()
    assert set(final.history["metric"]) >= {"loss", "accuracy", "validation accuracy"}
    assert all(v.history is None or len(v.history) > 0 for v in views)  # the plot is never sent an empty table
    assert list((registry.workdir / "jobs").iterdir()) == []


def test_stop_ends_a_run_without_a_model(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    classes = sorted(p.name for p in (tmp_path / "d").iterdir())
    run = run_training(registry, train_request(tmp_path / "d", classes, mode="full", epochs=50, new_name="stopped"))
    next(run)
    SLOT.stop(OWNER)
    last = list(run)[-1]
    assert "Stopped" in last.status and last.new_model is None
    assert registry.names(OWNER) == [registry.default]
    assert not list(registry.folder(OWNER).glob("stopped*"))


def test_confusion_matrix_shows_full_names():
    names = ["African_Crowned_Crane_Balearica_Regulorum", "Blue_Jay"]
    figure = confusion_figure([[1, 0], [0, 1]], names)
    labels = [t.get_text().replace("\n", " ") for t in figure.axes[0].get_xticklabels()]
    assert labels == ["African Crowned Crane Balearica Regulorum", "Blue Jay"]


def test_confusion_counts_are_readable_on_dark_and_light_cells(registry):
    figure = confusion_figure([[9, 1], [2, 8]], ["a", "b"])
    colours = {t.get_text(): t.get_color() for t in figure.axes[0].texts}
    assert colours == {"9": "white", "8": "white", "1": "black", "2": "black"}  # not black on navy
    # its title is in the figure, not Gradio's floating label, which covered a cell on a phone
    assert figure.axes[0].get_title() == "Confusion matrix (validation photos)"
    demo = ui.build_demo(registry)
    plot = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "confusion")
    assert plot["props"]["show_label"] is False


def test_build_demo_without_launching(registry):
    demo = ui.build_demo(registry)
    assert isinstance(demo, gr.Blocks)
    public = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility", "public") == "public"}
    assert public == {"classify", "answer", "classify_many", "fine_tune"}


def test_output_images_are_cached_once_never_rewritten_in_place(tmp_path):
    """Two requests returning the same image must not rewrite the file a third is downloading."""
    from gradio import processing_utils
    from PIL import Image

    ui.install()
    try:
        image = Image.new("RGB", (40, 30), (200, 10, 10))
        first = Path(processing_utils.save_pil_to_cache(image, str(tmp_path)))
        assert Image.open(first).size == (40, 30)
        first.write_bytes(b"being downloaded")  # stands for the copy someone is reading right now
        again = Path(processing_utils.save_pil_to_cache(image.copy(), str(tmp_path)))
        assert again == first and first.read_bytes() == b"being downloaded"
        assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging file left
    finally:
        ui.fixes.uninstall()


def test_visitors_folders_expire_a_week_after_their_last_model(registry):
    from ui.state import KEEP_VISITOR_S

    old, recent = registry.folder("a" * 32), registry.folder("b" * 32)
    for folder, age in ((old, KEEP_VISITOR_S + 60), (recent, 60)):
        folder.mkdir(parents=True)
        os.utime(folder, (time.time() - age,) * 2)
    registry.tidy()
    assert not old.exists() and recent.is_dir()


def test_the_signing_key_is_made_once_and_private_and_signs_only_issued_tokens(tmp_path):
    from ui.state import signature, signed_owner

    key = ui.signing_key(tmp_path / "new" / "work")  # a work folder that does not exist yet
    assert len(key) == 32 and ui.signing_key(tmp_path / "new" / "work") == key
    assert (tmp_path / "new" / "work" / ".visitor-key").stat().st_mode & 0o077 == 0
    issued = {"owner": OWNER, "sig": signature(key, OWNER), "model": None}
    assert signed_owner(key, issued) == OWNER
    other_key = bytes(32)
    for forged in ({"owner": OWNER}, {"owner": OWNER, "sig": "0" * 64}, {"owner": OWNER, "sig": signature(other_key, OWNER)},
                   {"owner": "f" * 32, "sig": issued["sig"]}, {"owner": OWNER.upper(), "sig": issued["sig"]}, None, "x",
                   {"owner": OWNER, "sig": 5}):
        assert signed_owner(key, forged) is None, forged


def test_two_clicks_make_a_box_whichever_corners_they_are():
    from ui.classify_tab import corner

    first, hint = corner(None, 300, 40)
    assert first == {"first": [300, 40]} and "opposite corner" in hint
    assert corner(first, 100, 200)[0] == {"box": [100, 40, 300, 200]}  # top-right, then bottom-left
    assert corner({"box": [1, 2, 3, 4]}, 5, 6)[0] == {"first": [5, 6]}  # a third click starts again


def test_a_webcam_shot_joins_the_chosen_class_and_bad_ones_are_refused_in_one_line(photo_file, tmp_path, monkeypatch):
    from ui import webcam
    from ui.fixes import Unreadable

    uploads = [[str(photo_file)], None, None]
    assert webcam.add_shot(1, str(photo_file), uploads) == (1, [str(photo_file)])
    assert webcam.add_shot(0, str(photo_file), uploads) == (0, [str(photo_file)] * 2)
    text = tmp_path / "note.png"
    text.write_text("not a photo")
    for index, shot, words in [(0, None, "Take a photo first"), (0, Unreadable("the file is empty"), "the file is empty"),
                               (3, str(photo_file), "Pick one of the 3 classes"), (True, str(photo_file), "Pick one"),
                               (0, str(text), "That photo cannot be used: ")]:
        with pytest.raises(gr.Error) as err:
            webcam.add_shot(index, shot, uploads)
        assert words in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(webcam, "MAX_PHOTOS_PER_CLASS", 2)
    with pytest.raises(gr.Error, match="Class 1 already has 2 photos"):
        webcam.add_shot(0, str(photo_file), [[str(photo_file)] * 2])


def test_the_page_says_in_plain_words_what_it_does_and_which_species_it_knows(registry):
    from ui.card import in_short, model_card
    from ui.context import species_list

    demo = ui.build_demo(registry)
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    header = next(t for t in texts if isinstance(t, str) and t.startswith("# "))
    assert "names its species" in header and "knows the 5 species listed here" in header
    assert not any(word in header for word in ("ResNeXt", "Grad-CAM", "conv5"))  # no jargon up front
    assert species_list(registry.get().classes) in texts  # the list, under the header
    assert species_list(["Cactus_Wren", "Blue_Jay"]) == "2 classes: Blue Jay, Cactus Wren"
    card = model_card(registry.get(), shipped=True)
    assert card.startswith("**In short.** Names **5 bird species**") and "non-commercial" in card
    assert card.index("In short") < card.index("### ResNeXt")  # the summary first, then the architecture
    other = in_short(registry.get(), shipped=False)
    assert "Names **5 classes**: Black-footed Albatross, Cactus Wren" in other and "not measured" in other and "Terms" not in other


def test_reference_photos_shipped_kept_with_a_fine_tune_and_removed_with_it(registry, tmp_path):
    from ui.references import SPECIES, reference, save_references
    from ui.state import refs_folder

    classifier = registry.get()  # a tiny model with CUB class names: the shipped photos serve it
    assert reference(classifier, "Cactus_Wren") == SPECIES / "Cactus_Wren.jpg"
    assert len(list(SPECIES.glob("*.jpg"))) == 100  # one per species of the default model
    assert reference(classifier, "Dodo") is None
    # a visitor's model: one of its own training photos per class, beside its file
    data = make_shapes(tmp_path / "mine", classes=2, per_class=3)
    train = [(p, i) for i, name in enumerate(SHAPES[:2]) for p in sorted((data / name).glob("*.png"))]
    model = registry.new_file(OWNER, "shapes")
    save_checkpoint(model, tiny_model(2), SHAPES[:2], Preprocessing(64, 72))
    save_references(model, train)
    mine = registry.get("shapes", OWNER)
    assert reference(mine, "green square") == refs_folder(model) / "00001.jpg"
    assert max(Image.open(reference(mine, "green square")).size) <= 160
    registry.forget(model)
    assert not refs_folder(model).exists()  # removed with the model (quota, disk cap)


def test_a_photo_with_no_bird_names_no_species_alone_or_in_the_batch_table(tmp_path):
    """The single answer and the batch table (and its CSV) agree on "not a bird", and neither
    names a species for it ("my closest guess, Gadwall at 32 %" read as an answer)."""
    import csv

    from conftest import red_is_no_bird
    from ui.state import Models

    (tmp_path / "m").mkdir()
    registry = Models(red_is_no_bird(tmp_path / "m"), "cpu", tmp_path / "work")
    classifier = registry.get()
    photos = make_shapes(tmp_path / "p", classes=4, per_class=1, seed=3)
    red = photos / "red disc" / "000.png"
    single = answers.classify(classifier, str(red), 3)
    assert single.explanation.verdict == "not_a_bird" and single.label == "No bird found"
    named = [display_name(c) for c in classifier.classes]
    assert not any(name in single.caption for name in named), single.caption
    files = sorted(str(p) for p in photos.rglob("*.png"))
    rows, csv_path = answers.classify_many(classifier, files, registry.workdir / "exports")
    with open(csv_path, newline="") as f:
        table = list(csv.reader(f))[1:]
    verdicts = [answers.classify(classifier, path, 3).explanation.verdict for path in files]
    assert "not_a_bird" in verdicts and set(verdicts) - {"not_a_bird"}  # both kinds in the batch
    for row, line, verdict in zip(rows, table, verdicts):
        assert row[1] == line[1] == answers.VERDICT_WORDS[verdict]  # the table says what the single answer says
        if verdict == "not_a_bird":
            assert row[2:] == line[2:] == [""] * 6
        else:
            assert row[2] in named and line[2] in named


def test_the_card_gives_its_verdict_thresholds_in_round_words(tmp_path):
    """A fine-tuned card said "not a bird under 0.381476"."""
    from conftest import red_is_no_bird
    from resnext import load_checkpoint, load_classifier

    (tmp_path / "m").mkdir()
    model, info = load_checkpoint(red_is_no_bird(tmp_path / "m"))
    rules = {"unsure_below": 0.3127, "bird_below": 0.381476, "find_below": 0.0, "crop_weight": 0.5, "source": "test"}
    path = save_checkpoint(tmp_path / "odd.safetensors", model, info.classes, info.preprocessing, {"verdict": rules})
    card = model_card(load_classifier(path, device="cpu"))
    assert "0.381476" not in card and "bird score is under **0.38** (of 1)" in card
    assert "\"not sure\" when its first answer is under **31%**" in card
