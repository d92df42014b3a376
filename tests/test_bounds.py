"""Safe in public, second round: every upload bounded in memory, time and disk before it is
decoded (issue 33). One test per attack; each failed on the code before the fix."""

from __future__ import annotations

import errno
import io
import re
import shutil
import threading
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageFile

from resnext import ImageLoadError, Preprocessing, display_name, load_image, save_checkpoint
from resnext.data import DataError, TrainingLimits, load_dataset
from resnext.imagefile import DEEP_STRIP_ROWS, MAX_JPEG_SCANS, jpeg_scans, probe_image

from conftest import OWNER, make_shapes, tiny_model, train_request

from ui.state import SLOT, Limits, Models
from ui.training import check_data, run_training


# ----------------------------------------------------------------------------- decoding


def scan_bomb(side: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until the file holds ``scans`` scans: every
    one is decoded again over the whole image (3,000 of them cost 43 s at 64 MP)."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", progressive=True, quality=75)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda"):end]
    extra = scans - jpeg_scans(data)
    return data[:end] + last * extra + b"\xff\xd9"


def test_a_progressive_jpeg_with_too_many_scans_is_refused_before_decoding(tmp_path):
    bomb = scan_bomb(600, 300)
    assert jpeg_scans(bomb) == 300
    with pytest.raises(ImageLoadError, match=f"more than {MAX_JPEG_SCANS} passes \\(scans\\)"):
        load_image(bomb)
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb)
    with pytest.raises(ImageLoadError, match="passes"):
        probe_image(path)  # the training data check reads only the header, and refuses it too
    ordinary = scan_bomb(600, MAX_JPEG_SCANS)  # at the limit: a photo like any other
    assert load_image(ordinary).size == (600, 600)


def test_scans_are_counted_by_markers_not_by_bytes_that_look_like_one():
    """0xFFDA inside an EXIF thumbnail (a JPEG of its own) or a stuffed entropy byte is not a scan."""
    photo = Image.effect_noise((64, 64), 80).convert("RGB")
    buf = io.BytesIO()
    photo.save(buf, "JPEG", progressive=True)
    plain = jpeg_scans(buf.getvalue())
    thumb = io.BytesIO()
    photo.save(thumb, "JPEG", progressive=True)
    exif = Image.Exif()
    buf2 = io.BytesIO()
    photo.save(buf2, "JPEG", progressive=True, exif=exif.tobytes() + thumb.getvalue() * 3)
    assert plain > 1 and jpeg_scans(buf2.getvalue()) == plain
    assert jpeg_scans(buf.getvalue(), stop_after=2) == 3  # counting stops past the limit


@pytest.mark.parametrize("mode,values,top", [("F", (0.0, 3000.0), 65535), ("I", (0, 200), 255), ("I;16", (0, 60000), 65535)])
def test_deep_images_are_turned_to_8_bits_a_strip_at_a_time(mode, values, top, monkeypatch):
    """A 32-bit float TIFF of 64 MP cost 10-24 s and 2 GB as a float64 array; now Pillow converts
    strips of rows, and the values are what the whole-image conversion gave."""
    height, width = 3 * DEEP_STRIP_ROWS + 7, 40
    rng = np.random.default_rng(0)
    array = rng.uniform(*values, size=(height, width))
    if mode == "F":
        image = Image.fromarray(array.astype(np.float32), "F")
    elif mode == "I":
        image = Image.fromarray(array.astype(np.int32), "I")
    else:
        image = Image.fromarray(array.astype(np.int32), "I").convert("I;16")
    expected = np.clip(np.asarray(image, dtype=np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8)
    converted = []
    real = Image.Image.point

    def spy(self, *args, **kwargs):
        converted.append(self.size)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "point", spy)
    rgb = np.asarray(load_image(image))
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    assert converted and max(h for _, h in converted) <= DEEP_STRIP_ROWS  # never the whole image at once
    assert sum(h for _, h in converted) == height


def test_upright_photos_are_not_copied_to_stand_them_upright(tmp_path, monkeypatch):
    """Pillow's exif_transpose returned a copy of every photo, rotated or not: a 64 MP image took
    512 MB instead of 256 (four float TIFFs at once took the server to 2.6 GB)."""
    path = tmp_path / "upright.png"
    Image.new("RGB", (600, 400), (10, 20, 30)).save(path)
    copies = []
    real = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(self.size) or real(self))
    assert load_image(path).size == (600, 400)
    assert (600, 400) not in copies


# ----------------------------------------------------------------------------- training data


def long_thin_photos(folder: Path, per_class: int, size=(2000, 100)) -> Path:
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * i % 255, 90, 200 if cls == "a" else 20)).save(folder / cls / f"{i}.png")
    return folder


def test_full_mode_refuses_photos_that_would_not_fit_in_memory_before_decoding_any(registry, tmp_path, monkeypatch):
    """Each 20:1 photo was kept at 1.3x the training size on its shorter side only (0.94 MB); a
    zip of 19,000 took the server from 2.9 to 8.2 GB. Now both sides are bounded, and the whole
    pool is checked against the server's limit from the headers first."""
    import resnext.training.context as context
    from resnext.training.context import kept_bytes

    long_thin_photos(tmp_path / "d", 20)
    one = tmp_path / "d" / "a" / "0.png"
    assert kept_bytes(one, 291) == 3 * 582 * 29  # 2x the side on the longer side (was 3 x 5820 x 291)
    decoded = []
    monkeypatch.setattr(context, "decode_one", lambda *a: decoded.append(a) or pytest.fail("decoded"))
    registry.limits = Limits(train_memory_mb=1)
    request = train_request(tmp_path / "d", ["a", "b"], mode="full", start="scratch", epochs=1)
    with pytest.raises(gr.Error, match=r"full mode keeps every photo in memory, and these 40 would take \d+ MB at "
                                       r"\d+ px; this server allows 1 MB\. Use quick mode"):
        for _ in run_training(registry, request):
            pass
    assert decoded == [] and not SLOT.lock.locked()


def test_a_zip_of_huge_pngs_is_refused_from_their_headers_in_seconds(registry, tmp_path, monkeypatch):
    """19,988 PNGs of 64 MP (7.8 kB each) passed every zip check and were decoded one by one
    while holding the slot (1.4-3.5 hours). Their headers alone now refuse them."""
    big = io.BytesIO()
    Image.new("1", (8000, 8000)).save(big, "PNG")
    archive = tmp_path / "huge.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(120):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", big.getvalue())
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real(self))
    with pytest.raises(DataError, match="megapixels to decode"):
        load_dataset(archive, workdir=tmp_path / "x", limits=TrainingLimits(max_decoded_pixels=4_000_000_000))
    assert decoded == []  # headers and checksums only
    with pytest.raises(gr.Error, match="megapixels to decode"):
        check_data(registry, str(archive), [], [])


def test_data_loading_honours_stop_and_frees_the_slot(registry, tmp_path, monkeypatch):
    """Loading the data is part of the run: Stop (or the time limit) ends it between photos."""
    import resnext.data as data

    make_shapes(tmp_path / "d", classes=2, per_class=30)
    checked = []
    real = data._check_image

    def slow_check(path, budget):
        checked.append(path)
        if len(checked) == 5:
            SLOT.stop(OWNER)  # the visitor presses Stop while their photos are being checked
        return real(path, budget)

    monkeypatch.setattr(data, "_check_image", slow_check)
    views = list(run_training(registry, train_request(tmp_path / "d", ["green square", "red disc"])))
    assert views[-1].done and "Stopped. No model was saved." in views[-1].status
    assert len(checked) == 5 and not SLOT.lock.locked() and registry.own(OWNER) == {}


def test_class_photo_lists_are_bounded_and_share_one_copy(registry, tmp_path):
    """The same 30 MB upload named 30 times filled the jobs folder with 848 MB; named 10,000 times it
    left 10,000 files behind."""
    from ui.training import gather_classes
    from ui.webcam import MAX_PHOTOS_PER_CLASS

    make_shapes(tmp_path / "d", classes=2, per_class=2)
    photo = next((tmp_path / "d" / "red disc").glob("*.png"))
    big = tmp_path / "big.png"
    big.write_bytes(photo.read_bytes() + b"\0" * 3_000_000)  # 3 MB (a PNG ignores what follows its end)
    names = ["one", "two"]
    before = registry.disk_use()
    data = gather_classes(registry, names, [[str(big)] * 30, [str(photo)] * 2])
    assert len(list((data / "one").iterdir())) == 30
    assert registry.disk_use() - before < 3_100_000  # links: the 3 MB is there once, not 30 times
    shutil.rmtree(data.parent)
    with pytest.raises(gr.Error, match=f"Class 'one' has 10,000 photos; one class takes at most {MAX_PHOTOS_PER_CLASS}"):
        gather_classes(registry, names, [[str(big)] * 10_000, [str(photo)]])
    with pytest.raises(gr.Error, match="A photo did not arrive"):  # half-way through: nothing stays
        gather_classes(registry, names, [[str(big)] * 30, [str(tmp_path / "gone.png")]])
    assert list((registry.workdir / "jobs").iterdir()) == []


# ----------------------------------------------------------------------------- names


def test_names_that_would_be_refused_on_loading_are_refused_on_saving(tmp_path):
    """250-character class names made a model the app's own 200-character limit refused to load
    (it stayed listed and failed when chosen)."""
    long = "x" * 250
    with pytest.raises(ValueError, match="must have 1 to 200 characters"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model(), [long, "b", "c", "d", "e"])
    assert list(tmp_path.iterdir()) == []
    make_shapes(tmp_path / "d", classes=2, per_class=3)
    (tmp_path / "d" / "red disc").rename(tmp_path / "d" / long)
    with pytest.raises(DataError, match="the class name 'x{40}'… has 250 characters; a class name has at most 200"):
        load_dataset(tmp_path / "d")


def test_a_class_named_like_math_text_draws_in_the_confusion_plot():
    """A folder named ``$^^$`` broke matplotlib's math text after the model was saved."""
    from ui.training import confusion_figure

    figure = confusion_figure([[2, 1], [0, 3]], ["$^^$", "$x_1$ wren"])
    figure.savefig(io.BytesIO(), format="png")  # raised ValueError: the names were parsed as TeX
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == [display_name("$^^$"), display_name("$x_1$ wren")]


def test_class_names_reach_the_answer_as_text_not_markup(tmp_path, photo_file):
    """``<img src="x">`` became an element and ``**bold**`` rendered in the answer's caption, the
    top-3 captions and the Try-it verdict."""
    from resnext import load_classifier
    from ui.answers import classify, verdict_message
    from ui.try_it import answer

    evil = ['<img src="x">', "**bold**", "[a](javascript:x)", "`code`", "_e_"]
    path = save_checkpoint(tmp_path / "evil.safetensors", tiny_model(), evil, Preprocessing(input_size=64, resize=72))
    classifier = load_classifier(path, device="cpu")
    shown = classify(classifier, str(photo_file), top_k=5)
    (top,) = classifier.predict(load_image(photo_file), k=5)
    texts = [shown.caption, verdict_message(classifier, top), *(text for _, text in shown.top3)]
    registry = Models(path, "cpu", tmp_path / "work")
    texts.append(answer(_Ctx(registry), OWNER, "evil", str(photo_file))[1])
    for text in texts:
        assert "<img" not in text and "**bold**" not in text and "](javascript" not in text, text
    assert any("&lt;img src=\"x\"&gt;" in t or "\\*\\*bold\\*\\*" in t for t in texts)


class _Ctx:
    def __init__(self, registry):
        self.registry = registry


# ----------------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_half_written_answer_image(tmp_path, monkeypatch):
    import ui.fixes as fixes

    monkeypatch.setattr(fixes.os, "replace", _no_space)
    with pytest.raises(gr.Error, match="The server's disk is full, so the answer's pictures cannot be sent"):
        fixes.save_pil_to_cache(Image.new("RGB", (20, 20)), str(tmp_path), "image", "jpeg")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # no .image.* left


def test_the_cli_says_what_a_forged_header_length_means(tmp_path, photo_file, capsys):
    from resnext.__main__ import main

    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(b"\xff" * 8 + b"{}")
    assert main(["predict", str(photo_file), "--checkpoint", str(forged)]) == 1
    err = capsys.readouterr().err.strip()
    assert "its header claims more bytes than the file holds" in err and not re.search(r"\d{7}", err.replace(",", ""))


def test_uploads_over_the_disk_cap_are_refused_as_they_arrive(tiny_checkpoint, tmp_path):
    """The real app over HTTP: twenty uploads at once were all accepted against the cap, which was
    only checked every five minutes. Now each is let in only while there is room for it."""
    import httpx
    from serve import AppServer

    cap = 40 * 1024**2
    payload = np.random.default_rng(0).bytes(6 * 1024**2)
    with AppServer(tiny_checkpoint, tmp_path / "work", timeout=120, device="cpu",
                   extra_env={"RESNEXT_DISK_GB": str(cap / 1024**3)}) as app:
        used = Models(None, "cpu", app.workdir).disk_use()
        answers: list = []

        def upload(i):
            response = httpx.post(app.url + "gradio_api/upload", files={"files": (f"p{i}.jpg", payload)}, timeout=60)
            answers.append((response.status_code, response.text))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = sum(code == 200 for code, _ in answers)
        refused = [text for code, text in answers if code == 413]
        assert accepted + len(refused) == 12 and 1 <= accepted <= (cap - used) // len(payload)
        assert all(text.startswith("The server's storage is full: this upload needs 6 MB") for text in refused)
        assert Models(None, "cpu", app.workdir).disk_use() <= cap
        assert "Traceback" not in app.output()
