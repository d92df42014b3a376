"""Faults: killed runs, failed writes, two trainers at once, models switched under load.

Nothing half-written may reach the model list, a failed write keeps the previous file, one
training run holds the slot while the other says it waits, and every classify request is answered
by one model, whole, however the model list changes meanwhile.
"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest

import app
from resnext import Preprocessing, display_name, load_checkpoint, save_checkpoint
from ui.answers import classify
from ui.context import Ctx
from ui.state import SLOT, Models
from ui.training import run_training

from conftest import OWNER, make_shapes, tiny_model, train_request

ROOT = Path(__file__).resolve().parents[1]


def test_killed_training_leaves_nothing_in_the_model_list(tmp_path, tiny_checkpoint):
    """A training run killed while it writes its model (the one moment a file is on disk): the
    model list never shows it, and the next start-up removes what it left."""
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    work = tmp_path / "work"
    out = work / "models" / "killed.safetensors"
    script = (
        "import os, sys, time, safetensors.torch as st\n"
        "import resnext.checkpoint as ck\n"
        "from resnext.__main__ import main\n"
        "def stalled_save(tensors, path, metadata=None):\n"
        "    st.save_file(tensors, path, metadata=metadata)\n"
        "    with open(path, 'r+b') as f: f.truncate(os.path.getsize(path) // 2)\n"
        "    print('SAVING', flush=True)\n"
        "    time.sleep(120)  # killed here, half-way through the write\n"
        "ck.save_file = stalled_save\n"
        f"main(['train', {str(tmp_path / 'd')!r}, '--out', {str(out)!r}, '--mode', 'full', '--init', "
        f"{str(tiny_checkpoint)!r}, '--epochs', '2'])\n"
    )
    train = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in train.stdout:  # wait until it is writing the model
            if "SAVING" in line:
                break
        assert train.poll() is None, "training ended before it could be killed"
    finally:
        train.send_signal(signal.SIGKILL)
        train.wait(timeout=30)
    assert len(list(out.parent.glob(".*.tmp"))) == 1  # killed mid-write, under a temporary name
    assert not out.exists()
    assert Models(None, "cpu", work).names() == []
    app.tidy_workdir(work)
    assert list(out.parent.iterdir()) == []


def test_a_write_killed_halfway_leaves_a_temp_file_that_is_never_listed_and_is_tidied(tmp_path, tiny_checkpoint):
    work = tmp_path / "work"
    previous = work / "models" / "birds.safetensors"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(tiny_checkpoint.read_bytes())
    script = (
        "import os, sys, safetensors.torch as st\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import tiny_model, CLASSES\n"
        "import resnext.checkpoint as ck\n"
        "def dying_save(tensors, path, metadata=None):\n"
        "    st.save_file(tensors, path, metadata=metadata)\n"
        "    with open(path, 'r+b') as f: f.truncate(os.path.getsize(path) // 2)\n"
        "    os._exit(9)  # the process dies between writing and renaming\n"
        "ck.save_file = dying_save\n"
        f"ck.save_checkpoint({str(previous)!r}, tiny_model(seed=1), CLASSES)\n"
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert died.returncode == 9
    leftovers = list(previous.parent.glob(".*.tmp"))
    assert len(leftovers) == 1  # the half-written file never took the real name ...
    assert previous.read_bytes() == tiny_checkpoint.read_bytes()  # ... so the previous model is intact
    assert Models(None, "cpu", work).names() == ["birds"]
    app.tidy_workdir(work)
    assert list(previous.parent.glob(".*.tmp")) == [] and previous.is_file()


def test_a_full_disk_during_fine_tuning_is_a_plain_error_and_keeps_the_models(registry, tmp_path, monkeypatch):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    before = {name: registry.path(name, OWNER).read_bytes() for name in registry.names(OWNER)}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("resnext.checkpoint.save_file", full_disk)
    run = run_training(registry, train_request(tmp_path / "d", ["green square", "red disc"], epochs=5, new_name="doomed"))
    with pytest.raises(gr.Error, match="The server's disk is full, so this could not be saved"):
        list(run)
    assert registry.names(OWNER) == list(before) and "doomed" not in registry.names(OWNER)
    assert {name: registry.path(name, OWNER).read_bytes() for name in registry.names(OWNER)} == before
    assert list(registry.folder(OWNER).iterdir()) == []  # no temp file either
    assert list((registry.workdir / "jobs").iterdir()) == []
    assert not SLOT.lock.locked()  # the slot is free for the next run


def test_two_trainers_get_one_run_and_one_busy_message(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    classes = ["green square", "red disc"]
    other = "e" * 32  # a second visitor
    first = run_training(registry, train_request(tmp_path / "d", classes, owner=other, mode="full", epochs=100,
                                                 new_name="first"))
    assert "Checking your photos" in next(first).status  # holds the slot now: the check is part of the run
    second = run_training(registry, train_request(tmp_path / "d", classes, epochs=5, new_name="second"))
    assert "Busy: another training run is in progress" in next(second).status
    assert SLOT.waiting == 1
    views = []
    waiter = threading.Thread(target=lambda: views.extend(second))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and views == []  # waiting, not training
    SLOT.stop(other)
    assert "Stopped" in list(first)[-1].status
    waiter.join(timeout=120)
    assert not waiter.is_alive()
    assert views[-1].new_model == "second"
    assert registry.names(OWNER) == [registry.default, "second"] and SLOT.waiting == 0
    assert registry.names(other) == [registry.default]


def test_a_waiting_trainer_that_leaves_frees_its_place(registry, tmp_path):
    make_shapes(tmp_path / "d", classes=2, per_class=6)
    SLOT.lock.acquire()  # somebody else's run
    try:
        waiting = run_training(registry, train_request(tmp_path / "d", ["green square", "red disc"], epochs=5,
                                                       new_name="gone"))
        assert "Busy" in next(waiting).status
        waiting.close()  # the visitor closed the page
        assert SLOT.waiting == 0
    finally:
        SLOT.lock.release()
    assert list((registry.workdir / "jobs").iterdir()) == []


def test_switching_models_under_load_answers_each_request_with_one_model(registry, tmp_path, photo):
    other_classes = ["Tufted Puffin", "Snowy Owl", "Mallard"]
    folder = registry.folder(OWNER)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "owls.safetensors", tiny_model(len(other_classes), seed=3), other_classes,
                    Preprocessing(input_size=64, resize=72))
    registry._cache_size = 1  # every switch evicts and reloads: the harshest case
    expected = {name: {display_name(c) for c in load_checkpoint(registry.path(name, OWNER))[1].classes}
                for name in registry.names(OWNER)}
    ctx = Ctx(registry)

    def request(i: int):
        name = ["owls", registry.default][i % 2]
        label, overlay, trio, caption, explanation = classify(registry.get(name, OWNER), photo, top_k=3)
        return name, set(label), explanation.label

    def switcher(stop: threading.Event):
        while not stop.is_set():
            for name in registry.names(OWNER):
                ctx.select(OWNER, name)

    stop = threading.Event()
    flipping = threading.Thread(target=switcher, args=(stop,))
    flipping.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(request, range(40)))
    finally:
        stop.set()
        flipping.join()
    for name, labels, explained in answers:
        assert len(labels) == 3 and labels <= expected[name], (name, labels)
        assert display_name(explained) in expected[name]
