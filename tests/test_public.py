"""Safe in public: what one visitor or API caller can take from the server (memory, disk, the
training slot) is bounded, every failure is one plain line, and nothing is left half-saved."""

import json
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from resnext import save_checkpoint

from conftest import CLASSES, OWNER, ROOT, make_shapes, tiny_model, train_request

from ui.api import api_fine_tune
from ui.card import model_card
from ui.context import Ctx
from ui.model_tab import upload_model
from ui.state import KEEP_VISITOR_S, SLOT, Limits, Models
from ui.training import report_markdown, run_training

SHAPE_CLASSES = ["green square", "red disc"]


def hostile_header(path: Path, **changes) -> Path:
    meta = {"format": 1, "architecture": {"layers": [1, 1, 1, 1], "cardinality": 4, "group_depth": 2, "num_classes": 5,
                                          "stem_width": 8}, "classes": CLASSES,
            "preprocessing": {"input_size": 64, "resize": 72}, "provenance": {}}
    meta.update(changes)
    data = json.dumps({"__metadata__": {"resnext": json.dumps(meta)}}).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    return path


@pytest.mark.parametrize("changes, reason", [
    ({"architecture": {"layers": [1.5, 2.5, 1e300, 1], "cardinality": 4, "group_depth": 2, "num_classes": 5}}, "layers"),
    ({"architecture": {"layers": [1, 1, 1, 10**9], "cardinality": 4, "group_depth": 2, "num_classes": 5}}, "layers"),
    ({"preprocessing": {"input_size": 6000, "resize": 6000}}, "input_size"),
    ({"provenance": {"metrics": {"val_acc": "ninety"}}}, "val_acc"),
    ({"provenance": {"verdict": {"bird_below": "x"}}}, "unsure_below"),
])
def test_model_tab_refuses_a_hostile_file_and_keeps_nothing(registry, tmp_path, changes, reason):
    path = hostile_header(tmp_path / "evil.safetensors", **changes)
    with pytest.raises(gr.Error, match=f"That file is not a usable model: .*{reason}") as err:
        upload_model(registry, OWNER, str(path))
    assert "\n" not in err.value.message
    assert registry.names(OWNER) == [registry.default]
    assert not registry.folder(OWNER).exists()  # no .tmp, no empty folder
    assert path.exists()  # not an upload in Gradio's cache: the caller's own file is left alone


def test_an_uploads_cached_copy_is_removed_once_read(registry, tiny_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    upload = cache / "0123abcd" / "birds.safetensors"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(tiny_checkpoint.read_bytes())
    name, _ = upload_model(registry, OWNER, str(upload))
    assert name == "birds" and not upload.parent.exists()
    bad = cache / "4567" / "bad.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"nonsense")
    with pytest.raises(gr.Error):
        upload_model(registry, OWNER, str(bad))
    assert not bad.parent.exists()


def test_each_visitor_keeps_a_few_models_the_oldest_goes(tiny_checkpoint, tmp_path):
    registry = Models(tiny_checkpoint, "cpu", tmp_path / "work", limits=Limits(models_per_visitor=3))
    for i in range(5):
        copy = tmp_path / f"m{i}.safetensors"
        copy.write_bytes(tiny_checkpoint.read_bytes())
        registry.get(upload_model(registry, OWNER, str(copy))[0], OWNER)  # in the cache too
        os.utime(registry.own(OWNER)[f"m{i}"], (time.time() - 100 + i,) * 2)
    assert list(registry.own(OWNER)) == ["m2", "m3", "m4"]
    assert {p.stem for p in registry._cache} == {"m2", "m3", "m4"}  # removed models are not served either
    copy = tmp_path / "m5.safetensors"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    assert upload_model(registry, OWNER, str(copy)) == ("m5", ["m2"])
    assert registry.names("f" * 32) == [registry.default]  # another visitor sees none of it


def test_a_write_over_the_cap_is_refused_and_no_visitors_model_goes_for_it(tiny_checkpoint, tmp_path):
    """The cap holds when a file is written: old copies go first; visitors' saved models never go
    to make room for anyone (an upload by a stranger once evicted another visitor's model)."""
    from ui.state import StorageFull

    work = tmp_path / "work"
    size = tiny_checkpoint.stat().st_size
    registry = Models(tiny_checkpoint, "cpu", work, limits=Limits(disk_bytes=int(3.5 * size)))
    now = time.time()
    files = []
    for i, owner in enumerate(["a" * 32, "b" * 32, "c" * 32]):
        path = registry.folder(owner) / "m.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(tiny_checkpoint.read_bytes())
        os.utime(path, (now - 10_000 + i,) * 2)
        files.append(path)
    cached = work / "gradio-cache" / "aa" / "old-upload.jpg"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * (size // 2))
    os.utime(cached, (now - 1000,) * 2)
    with registry.reserving(size // 2):  # room only once the old copy is gone
        assert not cached.exists()
    with pytest.raises(StorageFull, match="storage is full: this needs .* are free"):
        with registry.reserving(size):
            pass
    assert all(p.exists() for p in files)
    registry.make_room(now=now + 10**6)  # and not when the folder is tidied either
    assert all(p.exists() for p in files)


def test_reservations_add_up(tiny_checkpoint, tmp_path):
    """Twenty uploads at once each see the room the others already took."""
    from ui.state import StorageFull

    registry = Models(None, "cpu", tmp_path / "work", limits=Limits(disk_bytes=1000))
    granted = []
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            try:
                stack.enter_context(registry.reserving(300))
                granted.append(1)
            except StorageFull:
                granted.append(0)
    assert granted == [1, 1, 1] + [0] * 17
    with registry.reserving(1000):  # all released
        pass


def test_tidy_removes_old_deliveries_and_cached_copies_while_running(registry):
    from ui.state import KEEP_CACHE_S

    work = registry.workdir
    old, recent = work / "gradio-cache" / "aa" / "old.png", work / "gradio-cache" / "bb" / "new.png"
    delivered = work / "api" / "fine-tuned-x.safetensors"
    for path, age in ((old, KEEP_CACHE_S + 60), (recent, 60), (delivered, KEEP_CACHE_S + 60)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age,) * 2)
    empty = work / "gradio-cache" / "tmp1234"
    empty.mkdir()
    os.utime(empty, (time.time() - 600,) * 2)
    registry.tidy()
    assert not old.exists() and not delivered.exists() and recent.exists() and not empty.exists()


def test_names_a_visitor_chose_reach_the_page_as_text(registry, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    make_shapes(tmp_path / "d", classes=2, per_class=4)
    (tmp_path / "d" / SHAPE_CLASSES[0] / f"{evil}.txt").write_text("x")
    from resnext.data import load_dataset

    report = report_markdown(load_dataset(tmp_path / "d").report)
    assert "<img" not in report and "&lt;img src=x onerror=alert(1)&gt;.txt</code> — not an image" in report
    path = save_checkpoint(tmp_path / "xss.safetensors", tiny_model(), [evil, "b", "c", "d", "e"])
    name, _ = upload_model(registry, OWNER, str(path))
    card = model_card(registry.get(name, OWNER))
    assert "<img" not in card and "&lt;img" in card


def test_epochs_over_the_servers_limit_are_refused_before_anything_runs(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    with pytest.raises(gr.Error, match="at most 100 epochs per run; you asked for 300"):
        next(run_training(registry, train_request(tmp_path / "d", SHAPE_CLASSES, epochs=300)))
    assert not SLOT.lock.locked() and not (registry.workdir / "jobs").exists()


def test_a_run_stops_at_the_servers_time_limit_and_frees_the_slot(tiny_checkpoint, tmp_path):
    registry = Models(tiny_checkpoint, "cpu", tmp_path / "work", limits=Limits(train_s=0.5))
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    views = list(run_training(registry, train_request(tmp_path / "d", SHAPE_CLASSES, mode="full", epochs=100)))
    assert views[-1].status.count("Stopped: this server allows 0.5 s per training run") == 1
    assert views[-1].new_model is None and registry.names(OWNER) == [registry.default]
    assert not SLOT.lock.locked()


def test_a_closed_run_frees_the_slot_and_saves_nothing(registry, tmp_path):
    """Gradio closes a handler's generator when its client leaves: the run must end there."""
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    run = run_training(registry, train_request(tmp_path / "d", SHAPE_CLASSES, mode="full", epochs=100))
    for view in run:
        if "epoch 2/" in view.status:
            break
    assert SLOT.lock.locked()
    run.close()
    assert not SLOT.lock.locked() and registry.names(OWNER) == [registry.default]
    assert not list((registry.workdir / "jobs").iterdir())


def test_api_fine_tune_delivers_its_model_and_keeps_no_copy(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (tmp_path / "d").rglob("*.png"):
            zf.write(p, p.relative_to(tmp_path / "d"))
    ctx = Ctx(registry, b"k" * 32)
    for _ in range(3):
        *progress, (status, model) = list(api_fine_tune(ctx, str(archive), "quick", 5, "mine"))
        assert all(file is None for _, file in progress) and "Saved as" in status and "keeps no copy" in status
        assert not Path(model).exists()  # removed once delivered (Gradio has its own copy by then)
    assert not (registry.workdir / "visitors").exists() and list((registry.workdir / "api").iterdir()) == []
    with pytest.raises(gr.Error, match="mode must be 'quick' or 'full'"):
        next(api_fine_tune(ctx, str(archive), "distill", 5, "x"))


def test_the_server_hides_its_key_and_stops_a_run_whose_client_left(app_server, tmp_path):
    """The real app over HTTP: the signing key is in no page or config, and a /fine_tune caller
    killed mid-run frees the training slot (the run's job folder goes when the run ends)."""
    import httpx

    make_shapes(tmp_path / "d", classes=2, per_class=6)
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (tmp_path / "d").rglob("*.png"):
            zf.write(p, p.relative_to(tmp_path / "d"))
    app, work, jobs = app_server, app_server.workdir, app_server.workdir / "jobs"
    key = (work / ".visitor-key").read_text().strip()
    for path in ("", "config", "gradio_api/info"):
        text = httpx.get(app.url + path, timeout=60).text
        assert key not in text and key[:16] not in text
    before, logged = _entries(jobs), len(app.output())  # the server is shared: judge only this run
    caller = subprocess.Popen([sys.executable, "-c", (
        "from gradio_client import Client, handle_file\n"
        f"Client({app.url!r}, verbose=False).predict(handle_file({str(archive)!r}), 'full', 100000, 'long', "
        "api_name='/fine_tune')")], cwd=ROOT)
    _wait(lambda: _entries(jobs) - before, 120, "the run never started")
    ours = _entries(jobs) - before
    time.sleep(1.0)  # training now
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    _wait(lambda: not ours & _entries(jobs), 60, "the run went on after its caller left")  # normal: ~1 s
    assert "Traceback" not in app.output()[logged:]


def _entries(folder) -> set:
    return set(folder.iterdir()) if folder.is_dir() else set()


def _wait(condition, seconds: float, failure: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def test_a_request_before_the_pages_first_load_gets_an_owner():
    """The Train button (or an upload) can beat the page-load step that gives a session its token."""
    from ui.finetune_tab import request
    from ui.state import valid_owner

    first = request(None, None, None, "quick", "current model", 0, 0, "")
    assert valid_owner(first.owner) and request(None, None, None, "quick", "current model", 0, 0, "").owner != first.owner
    assert request(OWNER, None, None, "quick", "current model", 0, 0, "").owner == OWNER


def test_limits_from_the_environment():
    env = {"RESNEXT_MODELS_PER_VISITOR": "2", "RESNEXT_DISK_GB": "0.5", "RESNEXT_MAX_EPOCHS": "7",
           "RESNEXT_TRAIN_MINUTES": "1.5"}
    assert Limits.from_env(env) == Limits(models_per_visitor=2, disk_bytes=2**29, max_epochs=7, train_s=90.0)
    assert Limits.from_env({}) == Limits()
    for var, bad in (("RESNEXT_MAX_EPOCHS", "many"), ("RESNEXT_DISK_GB", "-1"), ("RESNEXT_MODELS_PER_VISITOR", "0")):
        with pytest.raises(ValueError, match=f"{var} must be a positive number, got '{bad}'"):
            Limits.from_env({var: bad})


def test_limits_from_the_environment_keep_their_units():
    limits = Limits.from_env({"RESNEXT_DISK_GB": "0.5", "RESNEXT_TRAIN_MINUTES": "0.01"})
    assert type(limits.disk_bytes) is int and limits.disk_bytes == 2**29
    assert limits.train_s == pytest.approx(0.6)  # not rounded to whole seconds


def test_new_names_never_clash(tiny_checkpoint, tmp_path):
    registry = Models(tiny_checkpoint, "cpu", tmp_path / "absent" / "work")  # folders made on first use
    assert registry.api_file().parent == tmp_path / "absent" / "work" / "api"
    with pytest.raises(ValueError, match="not a visitor token: '../x'"):
        registry.folder("../x")
    shared = registry.default
    first = registry.new_file(OWNER, shared)  # a shared model's name is taken too
    assert first.name == f"{shared} (2).safetensors"
    names = []
    for _ in range(3):
        path = registry.new_file(OWNER, "birds")
        path.write_bytes(tiny_checkpoint.read_bytes())
        names.append(path.stem)
    assert names == ["birds", "birds (2)", "birds (3)"]
    import re

    assert re.fullmatch(r"fine-tuned-[0-9a-f]{12}\.safetensors", registry.api_file().name)
    assert registry.api_file() != registry.api_file()


def test_quota_reports_only_what_it_removed_and_forgets_it(tiny_checkpoint, tmp_path):
    registry = Models(tiny_checkpoint, "cpu", tmp_path / "work", cache_size=10, limits=Limits(models_per_visitor=2))
    results = []
    for i in range(3):
        copy = tmp_path / f"m{i}.safetensors"
        copy.write_bytes(tiny_checkpoint.read_bytes())
        name, removed = upload_model(registry, OWNER, str(copy))
        registry.get(name, OWNER)
        os.utime(registry.own(OWNER)[name], (time.time() - 100 + i,) * 2)
        results.append(removed)
    assert results == [[], [], ["m0"]]
    assert {p.stem for p in registry._cache} == {"m1", "m2"}  # m0 is no longer served (with room for 10)
    registry.forget(tmp_path / "never-there.safetensors")  # forgetting what is gone is no error


def test_tidy_at_its_edges(registry):
    from ui.state import FRESH_S, KEEP_CACHE_S

    work, now = registry.workdir, time.time()
    visitor = registry.folder("a" * 32)
    visitor.mkdir(parents=True)
    os.utime(visitor, (now - KEEP_VISITOR_S,) * 2)  # exactly a week: kept until it is older
    cached = work / "gradio-cache" / "aa" / "x.png"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    os.utime(cached, (now - KEEP_CACHE_S,) * 2)
    uploading = work / "gradio-cache" / "tmp-upload"  # an empty folder a running upload just made
    uploading.mkdir()
    registry.tidy(now=now)
    assert visitor.is_dir() and cached.exists() and uploading.is_dir()
    registry.tidy(now=now + FRESH_S + 1)
    assert not visitor.exists() and not cached.exists() and not uploading.exists()


def test_tidy_keeps_the_cap_as_of_its_own_clock(tiny_checkpoint, tmp_path):
    registry = Models(tiny_checkpoint, "cpu", tmp_path / "work", limits=Limits(disk_bytes=10))
    copy = registry.workdir / "exports" / "answers.csv"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(tiny_checkpoint.read_bytes())  # over the cap, but fresh now
    registry.tidy()
    assert copy.exists()
    registry.tidy(now=time.time() + 600)  # ten minutes on: no longer fresh, and over the cap
    assert not copy.exists()


def test_safe_names_keep_letters_of_any_alphabet_and_nothing_else():
    from ui.state import safe_name

    assert safe_name("Zaunkönig's <birds>/../ 2") == "Zaunkönigs birds 2"
    assert safe_name("x" * 70) == "x" * 60
    assert safe_name("///") == safe_name(None) == "model"


def test_operators_models_are_shared_and_visitors_see_theirs_oldest_first(tiny_checkpoint, tmp_path):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "owls.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    (work / "models" / "notes.txt").write_text("not a model")
    registry = Models(tiny_checkpoint, "cpu", work, cache_size=2)
    assert registry.names() == ["tiny", "owls"]
    folder = registry.folder(OWNER)
    folder.mkdir(parents=True)
    for name, age in (("b", 30), ("a", 10), ("c", 20)):
        (folder / f"{name}.safetensors").write_bytes(tiny_checkpoint.read_bytes())
        os.utime(folder / f"{name}.safetensors", (time.time() - age,) * 2)
    assert list(registry.own(OWNER)) == ["b", "c", "a"]  # by age, not by name
    for name in ("tiny", "owls", "tiny", "b"):  # b evicts the least recently used: owls
        registry.get(name, OWNER)
    assert [p.stem for p in registry._cache] == ["tiny", "b"]
    assert registry.get("b", OWNER).device.type == "cpu"


def test_make_room_counts_every_folder_it_may_empty(tiny_checkpoint, tmp_path):
    work = tmp_path / "work"
    now = time.time()
    files = []
    for i, (folder, size) in enumerate((("api", 1500), ("exports", 500), ("gradio-cache/aa", 1000),
                                        ("visitors/" + OWNER, 1000))):
        path = work / folder / f"f{i}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (now - 1000 + i,) * 2)  # api oldest ... visitors newest; the sizes differ on purpose
        files.append(path)
    registry = Models(None, "cpu", work, limits=Limits(disk_bytes=2000))
    registry.make_room(now=now)  # oldest first, whatever their size, until the folder fits
    assert [p.exists() for p in files] == [False, False, True, True]
    registry.make_room(now=now)  # exactly at the cap: nothing more goes
    assert registry.disk_use() == 2000
    registry.make_room(0, now=now)  # room for everything: every copy goes, the visitor's model stays
    assert [p.exists() for p in files] == [False, False, False, True]


def test_cached_copies_of_the_examples_are_never_tidied_away(registry):
    """Gradio serves the example photos from its cache, copied with the assets' dates: on a Space
    whose files are old the tidy removed them at once, and every example became a broken image."""
    from ui.state import ASSETS

    asset = sorted(ASSETS.glob("*.jpg"))[0]
    copy = registry.workdir / "gradio-cache" / ("a" * 64) / asset.name
    other = registry.workdir / "gradio-cache" / ("b" * 64) / "upload.jpg"
    for path in (copy, other):
        path.parent.mkdir(parents=True)
        shutil.copyfile(asset, path)
        os.utime(path, (time.time() - 10 * 365 * 86400,) * 2)  # dated years back
    registry.tidy()
    assert copy.exists() and not other.exists()
    registry.make_room(0)  # nor to make room
    assert copy.exists()


def test_disk_use_passes_over_folders_removed_while_it_walks(registry, monkeypatch):
    """A finished run removes its job folder while another request counts the work folder (a
    waiting trainer then failed with FileNotFoundError from Path.rglob)."""
    jobs = registry.workdir / "jobs"
    for job in ("a", "b"):
        (jobs / job / "data").mkdir(parents=True)
        (jobs / job / "data" / "p.png").write_bytes(b"x" * 100)
    real = os.scandir

    def scandir(path="."):
        if Path(path) == jobs / "b" / "data":  # listed by its parent, gone when its turn comes
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert registry.disk_use() == 100
    registry.make_room(0)  # and the same walk makes room
