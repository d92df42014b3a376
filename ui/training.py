"""The Fine-tune tab's work: gather the visitor's photos, check them, train in the one training
slot, and report honestly. Plain functions and a generator of :class:`TrainView`; no widgets."""

from __future__ import annotations

import html
import shutil
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from resnext import display_name
from resnext.evaluate import TOO_FEW_TO_JUDGE

from .card import plain
from .state import SLOT, Models, removed_message, safe_name
from .references import save_references
from .try_it import validation_photos

MAX_CLASSES_UI = 12
SMALL_VALIDATION = TOO_FEW_TO_JUDGE  # fewer validation photos (or under 5 in a class): say the number is rough
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
    """The class-name boxes and their photos -> a class-folder tree in a fresh job folder."""
    job = new_job(registry)
    used = 0
    for name, group in zip(names, files):
        name = (name or "").strip()
        if not group:
            continue
        if not name:
            raise gr.Error("Every class with photos needs a name.")
        folder = job / "data" / safe_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for i, file in enumerate(group):
            src = Path(file if isinstance(file, str) else file.name)
            shutil.copyfile(src, folder / f"{i:04d}{src.suffix.lower()}")
        used += 1
    if used == 0:
        raise gr.Error("Add photos to at least two classes, or upload a zip.")
    return job / "data"


def source(registry: Models, zip_file, names, files) -> tuple[Path, Path]:
    """(data source, job folder to delete afterwards)."""
    if zip_file is not None:
        job = new_job(registry)
        job.mkdir(parents=True)
        return Path(zip_file if isinstance(zip_file, str) else zip_file.name), job
    data = gather_classes(registry, names, files)
    return data, data.parent


def load_data(src: Path, job: Path):
    from resnext.data import DataError, load_dataset

    try:
        return load_dataset(src, workdir=job / "unzipped" if src.suffix == ".zip" else None)
    except (DataError, OSError) as err:
        raise gr.Error(str(err)) from None


def check_data(registry: Models, zip_file, names, files) -> str:
    """The data report, before any training."""
    src, job = source(registry, zip_file, names, files)
    try:
        return report_markdown(load_data(src, job).report)
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
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
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
            deadline = time.monotonic() + limits.train_s
            yield from _train(registry, request, load_data(src, job), stop, deadline)
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


def _train(registry: Models, request: TrainRequest, data, stop, deadline: float):
    import pandas as pd

    from resnext.training import TrainConfig, TrainResult, iter_train

    init = {"current model": str(registry.path(request.current_model, request.owner)),
            "ImageNet": "imagenet", "scratch": "scratch"}[request.start]
    config = TrainConfig(mode=request.mode, init=init, epochs=request.epochs or None, image_size=request.image_size or None)
    name = request.new_name or f"fine-tuned {time.strftime('%H%M%S')}"
    out = registry.api_file() if request.api else registry.new_file(request.owner, name)
    report = report_markdown(data.report)
    yield TrainView(status_html(f"Starting ({request.mode} mode)…", 0.0), report=report)
    records, last, result = [], 0.0, None
    try:
        for event in iter_train(data, config, out=out, should_stop=lambda: stop.is_set() or time.monotonic() > deadline):
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
    except (RuntimeError, ValueError, OSError) as err:  # OSError: a full disk or read-only folder
        raise gr.Error(str(err)) from None
    except MemoryError:
        raise gr.Error("The server ran out of memory for this run; try fewer or smaller photos, or quick mode.") from None
    if not request.api:
        save_references(out, data.train)  # one of its own photos per class, to compare answers with
    removed = [] if request.api else registry.kept(request.owner, out)  # quota and disk cap
    if request.api:
        registry.make_room(keep=out)
    yield _finished(result, data, records, out, None if request.api else name, removed and removed_message(registry, removed))


def _stopped(registry: Models, deadline: float) -> str:
    if time.monotonic() > deadline:
        seconds = registry.limits.train_s
        allowed = f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} s"
        return (f"Stopped: this server allows {allowed} per training run. No model was saved; try quick mode, fewer "
                "epochs or fewer photos.")
    return "Stopped. No model was saved."


def _epoch_records(event) -> list[dict]:
    rows = [{"epoch": event.epoch, "value": float(event.loss), "metric": "training loss"},
            {"epoch": event.epoch, "value": float(event.train_acc), "metric": "training accuracy"}]
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
