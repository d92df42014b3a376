"""The Fine-tune tab's work: gather the visitor's photos, check them, train in the one training
slot, and report honestly. Plain functions and a generator of :class:`TrainView`; no widgets."""

from __future__ import annotations

import html
import os
import shutil
import textwrap
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from resnext import display_name
from resnext.evaluate import TOO_FEW_TO_JUDGE

from .card import plain
from .state import SLOT, Models, StorageFull, disk_full, removed_message, safe_name
from .references import save_references
from .try_it import validation_photos
from .webcam import MAX_PHOTOS_PER_CLASS

MAX_CLASSES_UI = 12
SMALL_VALIDATION = TOO_FEW_TO_JUDGE  # fewer validation photos (or under 5 in a class): say the number is rough
DISK_FULL = "The server's disk is full, so this could not be saved. Try again later."
STAGES = {"features": "Computing features", "train": "Training", "epoch": "Training"}


@dataclass
class TrainRequest:
    """What the Train button (or ``/fine_tune``) asks for."""

    owner: str
    zip_file: object = None
    names: list = field(default_factory=list)
    files: list = field(default_factory=list)
    mode: str = "quick"
    start: str = "current model"  # or "ImageNet", "scratch"
    epochs: int | None = None
    image_size: int | None = None
    new_name: str = ""
    current_model: str | None = None
    api: bool = False  # a /fine_tune call: the model is delivered, never kept or listed


@dataclass
class TrainView:
    """One update of the Fine-tune tab; ``None`` leaves that part as it is."""

    status: str
    report: str | None = None
    history: object = None  # DataFrame(epoch, value, metric) once there is an epoch to draw
    per_class: list | None = None
    figure: object = None
    model_file: str | None = None
    new_model: str | None = None  # the registered name, at the end of a run that saved one
    done: bool = False  # the run's last word (saved or stopped)
    tries: list | None = None  # [(thumbnail, class)]: validation photos for the "Try it" panel


def status_html(text: str, fraction: float | None = None, eta_s: float | None = None) -> str:
    """The one progress display: a sentence, and while training a bar with the time left."""
    parts = [f"<div class='train-line'>{text}</div>"]
    if fraction is not None:
        left = f" · about {eta_s:.0f} s left" if eta_s else ""
        parts.append(f"<progress max='100' value='{100 * fraction:.0f}'></progress>"
                     f"<span class='small-print'> {fraction:.0%}{left}</span>")
    return "".join(parts)


def new_job(registry: Models) -> Path:
    """A fresh job folder's path (removed when the check or run ends; a killed run's at start-up)."""
    return registry.workdir / "jobs" / uuid.uuid4().hex[:12]


def gather_classes(registry: Models, names: list[str], files: list) -> Path:
    """The class-name boxes and their photos -> a class-folder tree in a fresh job folder. The
    counts are checked before anything is written, and each photo is linked, not copied (the same
    30 MB upload named 30 times costs its 30 MB once); a refusal leaves nothing behind."""
    from resnext.data import TrainingLimits

    groups = [((name or "").strip(), group) for name, group in zip(names, files) if group]
    if any(not name for name, _ in groups):
        raise gr.Error("Every class with photos needs a name.")
    if not groups:
        raise gr.Error("Add photos to at least two classes, or upload a zip.")
    fullest = max(groups, key=lambda g: len(g[1]))
    if len(fullest[1]) > MAX_PHOTOS_PER_CLASS:
        raise gr.Error(f"Class {fullest[0][:40]!r} has {len(fullest[1]):,} photos; one class takes at most "
                       f"{MAX_PHOTOS_PER_CLASS}.")
    total, most = sum(len(g) for _, g in groups), TrainingLimits().max_photos
    if total > most:
        raise gr.Error(f"{total:,} photos; one training run takes at most {most:,}.")
    job = new_job(registry)
    try:
        for name, group in groups:
            folder = job / "data" / safe_name(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i, file in enumerate(group):
                src = Path(file if isinstance(file, str) else file.name)
                _link(registry, src, folder / f"{i:04d}{src.suffix.lower()[:8]}")
    except BaseException:
        shutil.rmtree(job, ignore_errors=True)
        raise
    return job / "data"


def _link(registry: Models, src: Path, dest: Path) -> None:
    """``src`` at ``dest`` too: a hard link (no new bytes), else a copy within the disk cap."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise gr.Error(f"A photo did not arrive ({src.name[:60]}); add it again.") from None
    except OSError:  # another file system, or one without links
        with storage(), registry.reserving(src.stat().st_size, "a photo"):
            shutil.copyfile(src, dest)


@contextmanager
def storage():
    """:class:`StorageFull` and a full disk (OSError ENOSPC) as the one-line warning a visitor reads."""
    try:
        yield
    except StorageFull as err:
        raise gr.Error(str(err)) from None
    except OSError as err:
        if not disk_full(err):
            raise
        raise gr.Error(DISK_FULL) from None


def source(registry: Models, zip_file, names, files) -> tuple[Path, Path]:
    """(data source, job folder to delete afterwards)."""
    if zip_file is not None:
        job = new_job(registry)
        job.mkdir(parents=True)
        return Path(zip_file if isinstance(zip_file, str) else zip_file.name), job
    data = gather_classes(registry, names, files)
    return data, data.parent


def load_data(registry: Models, src: Path, job: Path, should_stop=None):
    """The data set (a zip unpacked within the disk cap), or None if ``should_stop`` said stop
    while it was being unpacked or checked."""
    from resnext.data import DataError, LoadingStopped, ZipLimits, load_dataset, unpacked_size

    try:
        if src.suffix.lower() != ".zip":
            return load_dataset(src, should_stop=should_stop)
        declared = min(unpacked_size(src), ZipLimits.max_bytes)
        with storage(), registry.reserving(declared, "unpacking this zip"):
            limits = ZipLimits(max_bytes=declared)  # a zip that lies about its size stops there
            return load_dataset(src, workdir=job / "unzipped", should_stop=should_stop, zip_limits=limits)
    except LoadingStopped:
        return None
    except (DataError, OSError) as err:
        raise gr.Error(str(err)) from None


def check_data(registry: Models, zip_file, names, files) -> str:
    """The data report, before any training (within the server's time limit for a run)."""
    src, job = source(registry, zip_file, names, files)
    deadline = time.monotonic() + registry.limits.train_s
    try:
        data = load_data(registry, src, job, lambda: time.monotonic() > deadline)
        if data is None:
            raise gr.Error(f"Checking these photos took longer than this server allows ({_allowed(registry)}); "
                           "try fewer photos.")
        return report_markdown(data.report)
    finally:
        shutil.rmtree(job, ignore_errors=True)


def report_markdown(report) -> str:
    n_val = sum(report.val_counts.values())
    lines = [f"**{len(report.classes)} classes** · {sum(report.train_counts.values())} training and "
             f"{n_val} validation photos", "", "| class | train | validation |", "|---|---|---|"]
    lines += [f"| {plain(display_name(c))} | {report.train_counts[c]} | {report.val_counts[c]} |" for c in report.classes]
    warning = small_validation_warning(report.val_counts)
    if warning:
        lines += ["", warning]
    if report.skipped:
        lines += ["", f"**Skipped {len(report.skipped)} file(s):**"]
        lines += [f"- <code>{html.escape(f)}</code> — {plain(r)}" for f, r in report.skipped[:30]]
        if len(report.skipped) > 30:
            lines.append(f"- … and {len(report.skipped) - 30} more")
    return "\n".join(lines)


def small_validation_warning(val_counts: dict[str, int]) -> str:
    """A plain warning when the validation set is too small for its accuracy to mean much."""
    n = sum(val_counts.values())
    if n == 0:
        return "⚠️ **No validation photos**: the accuracy cannot be measured. Add more photos per class."
    fewest = min(val_counts.values())
    if n >= SMALL_VALIDATION and fewest >= 5:
        return ""
    return (f"⚠️ **Only {n} validation photo{'s' if n != 1 else ''}** ({fewest} in the smallest class): each one moves "
            f"the accuracy by {100 / n:.0f} points, so read it as a rough sign, not a measurement. "
            "More photos per class give a number that means something.")


def per_class_rows(result, val_counts: dict[str, int]) -> list[list]:
    rows = []
    for c, acc in result.per_class_acc.items():
        n = val_counts.get(c, 0)
        shown = "no validation photos" if acc is None or n == 0 else f"{acc:.0%} ({round(acc * n)} of {n})"
        rows.append([display_name(c), shown, n])
    return rows


def confusion_figure(confusion: list[list[int]], classes: list[str]):
    """The validation confusion matrix with every class's full name (long names wrap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    names = ["\n".join(textwrap.wrap(display_name(c), 22)) or "?" for c in classes]
    side = min(3 + 0.45 * n, 12)
    fig, ax = plt.subplots(figsize=(side + 1.5, side + 1.5))
    ax.imshow(confusion, cmap="Blues")
    # parse_math=False: a class named "$^^$" is a name, not matplotlib's math text (which raised)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(n), names, fontsize=8, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (validation photos)", fontsize=10)
    if n <= 20:
        darkest = max(max(row) for row in confusion) or 1
        for i in range(n):
            for j in range(n):
                if confusion[i][j]:  # white on the darker half of the blues, black on the lighter
                    ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=8,
                            color="white" if confusion[i][j] > darkest / 2 else "black")
    fig.tight_layout()
    return fig


def run_training(registry: Models, request: TrainRequest):
    """Generator of :class:`TrainView`: wait for the slot, train, register the new model as the
    visitor's own. A stop, an error, the server's time limit or a closed page (Gradio then closes
    this generator at its next update, a fraction of a second away) leaves no model and frees the slot."""
    limits = registry.limits
    if request.epochs and request.epochs > limits.max_epochs:
        raise gr.Error(f"This server trains at most {limits.max_epochs} epochs per run; you asked for {request.epochs}.")
    src, job = source(registry, request.zip_file, request.names, request.files)
    stop = SLOT.stop_event(request.owner)
    try:
        yield from _wait_for_slot()
        try:
            # The run's clock and its Stop start with the slot: unpacking and checking the photos count.
            deadline = time.monotonic() + limits.train_s
            should_stop = lambda: stop.is_set() or time.monotonic() > deadline  # noqa: E731
            yield TrainView(status_html("Checking your photos…"))
            model_bytes = registry.path(request.current_model, request.owner).stat().st_size
            with storage(), registry.reserving(model_bytes, "the new model"):
                data = load_data(registry, src, job, should_stop)
                if data is None:
                    yield TrainView(status_html(_stopped(registry, deadline)), done=True)
                    return
                yield from _train(registry, request, data, should_stop, deadline)
        finally:
            SLOT.lock.release()
    finally:
        SLOT.stops.pop(request.owner, None)
        shutil.rmtree(job, ignore_errors=True)


def _wait_for_slot():
    if SLOT.lock.acquire(blocking=False):  # Gradio's queue (concurrency_limit=1) makes waiting rare
        return
    with SLOT.count:
        SLOT.waiting += 1
    try:
        yield TrainView(status_html(f"Busy: another training run is in progress; yours starts when it ends "
                                    f"({SLOT.waiting} waiting)."))
        SLOT.lock.acquire()
    finally:
        with SLOT.count:
            SLOT.waiting -= 1


def _train(registry: Models, request: TrainRequest, data, should_stop, deadline: float):
    import pandas as pd

    from resnext.training import TrainConfig, TrainResult, iter_train

    init = {"current model": str(registry.path(request.current_model, request.owner)),
            "ImageNet": "imagenet", "scratch": "scratch"}[request.start]
    config = TrainConfig(mode=request.mode, init=init, epochs=request.epochs or None, image_size=request.image_size or None,
                         memory_mb=registry.limits.train_memory_mb)
    name = request.new_name or f"fine-tuned {time.strftime('%H%M%S')}"
    out = registry.api_file() if request.api else registry.new_file(request.owner, name)
    report = report_markdown(data.report)
    yield TrainView(status_html(f"Starting ({request.mode} mode)…", 0.0), report=report)
    records, last, result = [], 0.0, None
    try:
        for event in iter_train(data, config, out=out, should_stop=should_stop):
            if isinstance(event, TrainResult):
                result = event
                break
            if event.stage == "cancelled":
                yield TrainView(status_html(_stopped(registry, deadline)), done=True)
                return
            if event.stage == "epoch":
                records += _epoch_records(event)
            if time.perf_counter() - last > 0.5 or event.stage == "epoch":  # quick epochs take milliseconds
                last = time.perf_counter()
                yield TrainView(_progress_line(event, request.mode),
                                history=pd.DataFrame(records) if records and event.stage == "epoch" else None)
    except OSError as err:  # a full disk in plain words; a read-only folder as it is
        raise gr.Error(DISK_FULL if disk_full(err) else str(err)) from None
    except (RuntimeError, ValueError) as err:
        raise gr.Error(str(err)) from None
    except MemoryError:
        raise gr.Error("The server ran out of memory for this run; try fewer or smaller photos, or quick mode.") from None
    if not request.api:
        save_references(out, data.train)  # one of its own photos per class, to compare answers with
    removed = [] if request.api else registry.kept(request.owner, out)  # the visitor's quota
    yield _finished(result, data, records, out, None if request.api else name, removed and removed_message(registry, removed))


def _allowed(registry: Models) -> str:
    seconds = registry.limits.train_s
    return (f"{seconds / 60:g} minute{'s' if seconds != 60 else ''}") if seconds >= 60 else f"{seconds:g} s"


def _stopped(registry: Models, deadline: float) -> str:
    if time.monotonic() > deadline:
        return (f"Stopped: this server allows {_allowed(registry)} per training run. No model was saved; try quick mode, "
                "fewer epochs or fewer photos.")
    return "Stopped. No model was saved."


def _epoch_records(event) -> list[dict]:
    rows = [{"epoch": event.epoch, "value": float(event.loss), "metric": "loss"},
            {"epoch": event.epoch, "value": float(event.train_acc), "metric": "accuracy"}]
    if event.val_acc is not None:
        rows.append({"epoch": event.epoch, "value": float(event.val_acc), "metric": "validation accuracy"})
    return rows


def _progress_line(event, mode: str) -> str:
    what = STAGES.get(event.stage, event.stage)
    if event.epochs:
        what += f" ({mode} mode), epoch {event.epoch}/{event.epochs}"
    if event.val_acc is not None:
        what += f" · validation accuracy {event.val_acc:.0%}"
    fraction = min(1.0, event.step / event.steps) if event.steps else None
    return status_html(html.escape(what), fraction, event.eta_s)


def _finished(result, data, records: list[dict], out: Path, name: str | None, removed: str | None) -> TrainView:
    """The run's last word; ``name`` None: an API delivery, which this server does not keep."""
    import pandas as pd

    counts = data.report.val_counts
    warning = small_validation_warning(counts)
    kept = (f"Saved as <b>{html.escape(out.stem)}</b>." if name else
            f"Saved as {html.escape(out.name)}: the file is yours, and this server keeps no copy.")
    status = f"Done in {result.seconds:.0f} s. Validation: {result.validation_text()}. {kept}"
    if warning:
        status += f"<div class='unsure'>{warning.replace('**', '')}</div>"
    if removed:
        status += f"<div class='unsure'>{html.escape(removed)}</div>"
    return TrainView(status_html(status), history=pd.DataFrame(records) if records else None,
                     per_class=per_class_rows(result, counts), figure=confusion_figure(result.confusion, result.classes),
                     model_file=str(result.checkpoint), new_model=name and out.stem, done=True,
                     tries=validation_photos(data.val, result.classes) if name else None)
