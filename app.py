"""ResNeXt bird classifier: the Gradio app (Classify, Fine-tune and Model tabs).

    python app.py [--checkpoint PATH] [--host H] [--port P] [--share] [--device auto|cpu|cuda]
                  [--workdir DIR]

The UI only: every tensor lives in the ``resnext`` package. Nothing heavy happens at import time;
``main()`` loads the model and launches. Writable files (uploads being trained on, fine-tuned
models) live under the work folder (``--workdir`` or ``RESNEXT_WORKDIR``).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network at start-up

import gradio as gr  # noqa: E402
from gradio import processing_utils  # noqa: E402
from PIL import Image  # noqa: E402

from resnext import Classifier, ImageLoadError, display_name, load_classifier, load_image  # noqa: E402
from resnext.inference import DEFAULT_CHECKPOINT  # noqa: E402

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
MAX_PHOTO_SIDE = 1280  # photos are shrunk to this for display and heatmaps (the network sees 224 px)
KEEP_FILES_S = 3600  # uploads, heatmaps and CSVs served to a visitor are deleted after an hour
TOP1 = "Top-1 prediction"
METHOD_NAMES = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
    "hirescam": "HiResCAM", "eigencam": "Eigen-CAM", "finercam": "Finer-CAM (contrast with look-alikes)",
}
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = ".small-print {font-size: 0.8em; opacity: 0.75} .unsure {border-left: 4px solid #e8a33d; padding-left: 8px}"

try:  # Hugging Face ZeroGPU: GPU-bound functions must be wrapped; elsewhere a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


def gpu_explain(classifier: Classifier, photo, target, method, k):
    """The chosen class's map and the top-3's, from one forward pass (the GPU-bound part)."""
    return classifier.explain_classes(photo, [target], method, k, top=3)


gpu_explain = gpu(gpu_explain)


def photo_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` handing over the uploaded file's path, whose own peek at the file (Gradio
    opens every upload) ends in a plain message instead of a bare "Error". The method is wrapped
    on the instance: a subclass would be taken for a custom component with no front end."""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)  # Gradio only reads the header
    preprocess = component.preprocess

    def friendly(payload):
        try:
            return preprocess(payload)
        except Exception as err:  # noqa: BLE001 - any failure here means "not an image we can read"
            raise gr.Error(f"Could not read that image: not an image file PIL can open ({type(err).__name__}).") from None

    component.preprocess = friendly
    return component


def _save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """gradio 6.31's ``processing_utils.save_pil_to_cache``, written without its race.

    Gradio names a cached output image by the hash of its bytes and rewrites that file in place on
    every call, so when two requests return the same image at once (two visitors clicking one
    example) one of them can be served a file truncated mid-rewrite (measured: 1 % of requests in
    ``benchmarks/load.py``). Here the file is written once, through a temporary name and a rename,
    as Gradio already does for files (``save_file_to_cache``)."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    target = (folder / f"{name}.{format}").resolve()
    if target.exists():
        os.utime(target)  # delete_cache ages files by time: a reused file starts a new hour
        return str(target)
    fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(staging, target)
    return str(target)


processing_utils.save_pil_to_cache = _save_pil_to_cache  # every image output goes through it


# ----------------------------------------------------------------------------- models


class Models:
    """The models this app serves, by name: the default, fine-tuned ones, uploaded ones.

    Loaded classifiers are cached (a few at a time) and shared by all sessions; which one a
    session uses is that session's own choice, so nobody's training or upload changes another
    user's model.
    """

    def __init__(self, default: Path | None, device: str, workdir: Path, cache_size: int = 3):
        self.device = device
        self.workdir = workdir
        self.paths: dict[str, Path] = {}
        self._cache: OrderedDict[Path, Classifier] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        if default is not None:
            self.paths[self.display(default)] = default
        for path in sorted((workdir / "models").glob("*.safetensors")):
            self.paths.setdefault(self.display(path), path)

    @staticmethod
    def display(path: Path) -> str:
        return Path(path).stem

    @property
    def default(self) -> str | None:
        return next(iter(self.paths), None)

    def names(self) -> list[str]:
        return list(self.paths)

    def get(self, name: str | None) -> Classifier:
        name = name or self.default
        if name not in self.paths:
            raise gr.Error(f"Unknown model {name!r}; pick one in the Model tab.")
        path = self.paths[name]
        with self._lock:
            if path not in self._cache:
                self._cache[path] = load_classifier(path, device=self.device)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(path)
            return self._cache[path]

    def add(self, path: Path, name: str | None = None) -> str:
        """Register a checkpoint (already validated) under a unique name."""
        base = name or self.display(path)
        name, n = base, 2
        while name in self.paths and self.paths[name] != path:
            name, n = f"{base} ({n})", n + 1
        self.paths[name] = path
        return name


MODELS: Models | None = None  # set by main() or by tests


def models() -> Models:
    if MODELS is None:
        raise gr.Error("No model is loaded.")
    return MODELS


# ----------------------------------------------------------------------------- classify


def _open_photo(image) -> Image.Image:
    """Whatever Gradio hands us -> an upright RGB photo of at most MAX_PHOTO_SIDE pixels."""
    if image is None:
        raise gr.Error("Add a photo first: upload one, paste it, or use the webcam.")
    try:
        photo = load_image(image)
    except (ImageLoadError, FileNotFoundError) as err:
        raise gr.Error(f"Could not read that image: {_without_folder(err, image)}") from None
    photo = photo.copy()
    photo.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE), Image.Resampling.BILINEAR)
    return photo


def _without_folder(err: Exception, source) -> str:
    """A loading error naming only the file, not the server's folder it was uploaded to."""
    if isinstance(source, (str, os.PathLike)):
        return str(err).replace(str(source), Path(source).name, 1)
    return str(err)


def classify(classifier: Classifier, image, top_k: int = 5, target: str | None = None, method: str = "gradcam",
             opacity: float = 0.5, top3: bool = True):
    """Top-k, the conv5 heatmap over the photo, the top-3 heatmaps, a caption.

    Returns ``({species: probability}, overlay, [(overlay, caption)] * 3, caption markdown,
    explanation)``; the explanation is kept so the opacity slider can re-blend without recomputing.
    ``top3=False`` leaves the top-3 overlays undrawn (an empty list), for callers that drop them.
    """
    photo = _open_photo(image)
    k = max(1, min(int(top_k), len(classifier.classes)))
    start = time.perf_counter()
    chosen = None if target in (None, "", TOP1) else target
    try:
        explanations = gpu_explain(classifier, photo, chosen, method, k)
    except ValueError as err:  # unknown class or method
        raise gr.Error(str(err)) from None
    elapsed = (time.perf_counter() - start) * 1000
    main, trio = explanations[0], explanations[1:]
    label = {display_name(p.label): p.prob for p in main.predictions}
    gallery = [(e.overlay_with(opacity), f"{display_name(e.label)} · {e.prob:.0%}") for e in trio] if top3 else []
    lines = [verdict_message(classifier, main.predictions)] if main.verdict != "species" else []
    if main.verdict == "not_a_bird":
        label = "No bird found"
    if main.found:
        lines.append("The bird looked small, so I also looked closer at the boxed part of the photo (the green box).")
    lines.append(f"Where the model looked to decide **{display_name(main.label)}** ({main.prob:.0%}), "
                 f"{METHOD_NAMES.get(main.method, main.method)} on conv5.")
    lines.append(f"<span class='small-print'>{elapsed:.0f} ms · {classifier.device.type.upper()} · "
                 f"{classifier.fast_path}</span>")
    return label, main.overlay_with(opacity), gallery, "\n\n".join(lines), main


def verdict_message(classifier: Classifier, answer) -> str:
    """A plain sentence for an answer that is not a confident species."""
    best = answer[0]
    if answer.verdict == "not_a_bird":
        return ("<div class='unsure'>🚫 <b>This does not look like a bird photo.</b> If there is a bird, try a "
                f"photo where it is larger (my closest guess, {display_name(best.label)} at {best.prob:.0%}, "
                "would not mean much).</div>\n")
    return (f"<div class='unsure'>⚠️ <b>Not sure</b> — my best guess is {display_name(best.label)} at only "
            f"{best.prob:.0%}. This may not be one of the {len(classifier.classes)} species I know.</div>\n")


def reblend(explanation, opacity: float):
    """The opacity slider: blend the kept heatmap again, no network pass."""
    if explanation is None:
        return gr.skip()
    return explanation.overlay_with(float(opacity))


def classify_many(classifier: Classifier, files) -> tuple[list[list], str | None]:
    """Several photos at once: one row per photo with its top-3, and a CSV of the same."""
    if not files:
        raise gr.Error("Add one or more photos first.")
    rows, problems = [], 0
    for file in files:
        path = Path(file if isinstance(file, str) else file.name)
        try:
            (top,) = classifier.predict(load_image(path), k=3)
        except (ImageLoadError, FileNotFoundError) as err:
            problems += 1
            rows.append([path.name, f"unreadable: {_without_folder(err, path).removeprefix(path.name + ': ')}"]
                        + [""] * (len(BATCH_HEADERS) - 2))
            continue
        row = [path.name, VERDICT_WORDS[top.verdict]]
        for p in top + [None] * (3 - len(top)):
            row += [display_name(p.label), round(p.prob, 4)] if p else ["", ""]
        rows.append(row)
    if problems:
        gr.Warning(f"{problems} file(s) could not be read; they are marked in the table.")
    out = _export_path("predictions", ".csv")
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BATCH_HEADERS)
        writer.writerows(rows)
    return rows, str(out)


BATCH_HEADERS = ["file", "verdict", "1st", "p1", "2nd", "p2", "3rd", "p3"]
VERDICT_WORDS = {"species": "species", "unsure": "not sure", "not_a_bird": "not a bird"}


def _export_path(stem: str, suffix: str) -> Path:
    """A fresh file name under the work folder's ``exports/``, whose files older than
    :data:`KEEP_FILES_S` are removed on the way (Gradio serves its own copy of each)."""
    folder = models().workdir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - KEEP_FILES_S
    for old in folder.iterdir():
        if old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
    return folder / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


# ----------------------------------------------------------------------------- model tab


def model_card(classifier: Classifier) -> str:
    """Markdown: the architecture stage by stage, the classes, where the model comes from."""
    from resnext.summary import stage_table

    info = classifier.info
    arch = info.architecture
    size = classifier.preprocessing.input_size
    rows = stage_table(classifier.model, size)
    lines = [
        f"### ResNeXt, layers {arch['layers']}, cardinality {arch['cardinality']}, group depth {arch['group_depth']}",
        f"{len(classifier.classes)} classes · input {size} px (resize {classifier.preprocessing.resize}, "
        f"centre crop) · runs on {classifier.device.type.upper()} ({classifier.fast_path})",
        "",
        "| stage | output | channels | blocks | grouped 3x3 (cardinality x width) | parameters | MACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grouped = f"{r['cardinality']} x {r['width'] // r['cardinality']}d = {r['width']}" if r["cardinality"] else ""
        lines.append(f"| {r['stage']} | {r['output']} | {r['channels']} | {r['blocks'] or ''} | {grouped} | "
                     f"{r['params']:,} | {_si(r['macs'])} |")
    total_p, total_m = sum(r["params"] for r in rows), sum(r["macs"] for r in rows)
    lines.append(f"| **total** | | | | | **{total_p:,}** | **{_si(total_m)}** |")
    lines.append("\n`conv1` is the 7x7/2 stem with its 3x3/2 max-pool; Grad-CAM maps come from `conv5`'s output.")
    prov = info.provenance
    if prov:
        metrics = prov.get("metrics") or {}
        facts = [f"{k}: {v}" for k, v in (("mode", prov.get("mode")), ("start", prov.get("init")),
                                           ("epochs", prov.get("epochs")), ("date", prov.get("date"))) if v]
        if metrics.get("val_acc") is not None:
            facts.append(f"validation accuracy: {metrics['val_acc']:.1%}")
        if metrics.get("test_top1") is not None:
            facts.append(f"test top-1 / top-5: {metrics['test_top1']:.1%} / {metrics.get('test_top5', 0):.1%}")
        lines += ["", "**Provenance** — " + " · ".join(facts)]
    names = ", ".join(display_name(c) for c in classifier.classes[:100])
    more = f" … and {len(classifier.classes) - 100} more" if len(classifier.classes) > 100 else ""
    lines += ["", f"**Classes** — {names}{more}"]
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "G" else f"{n / size:,.0f} {unit}"
    return f"{n:.0f}"


def upload_model(file, current: str):
    """Register an uploaded .safetensors; a bad file changes nothing."""
    if file is None:
        raise gr.Error("Choose a .safetensors file first.")
    path = Path(file if isinstance(file, str) else file.name)
    if path.suffix.lower() != ".safetensors":
        raise gr.Error("Only .safetensors checkpoints are accepted (a pickled .pt/.pth file could run code).")
    registry = models()
    target = registry.workdir / "uploads" / f"{uuid.uuid4().hex[:8]}_{_safe_name(path.stem)}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    try:
        load_classifier(target, device="cpu", fast=False)  # full check: shapes, values
    except (ValueError, FileNotFoundError) as err:
        target.unlink(missing_ok=True)
        raise gr.Error(f"That file is not a usable model: {str(err).split(': ', 1)[-1]}") from None
    name = registry.add(target, _safe_name(path.stem))
    gr.Info(f"Model {name!r} added and selected.")
    return select_model(name)


def select_model(name: str):
    """The Model tab's and Classify tab's model pickers, the card, the explain-class list."""
    registry = models()
    classifier = registry.get(name)
    choices = registry.names()
    classes = [TOP1] + sorted(display_name(c) for c in classifier.classes)
    return (
        name,
        gr.update(choices=choices, value=name),
        gr.update(choices=choices, value=name),
        model_card(classifier),
        gr.update(choices=classes, value=TOP1),
        gr.update(maximum=min(10, len(classifier.classes)), value=min(5, len(classifier.classes))),
    )


def _safe_name(text: str) -> str:
    name = re.sub(r"[^\w\- ]+", "", text, flags=re.UNICODE).strip()[:60]
    return name or "model"


# ----------------------------------------------------------------------------- fine-tune


class TrainingSlot:
    """One training run per app; others wait in Gradio's queue and see how many are ahead."""

    def __init__(self):
        self.lock = threading.Lock()  # held by the run in progress
        self.count = threading.Lock()  # guards ``waiting``
        self.stops: dict[str, threading.Event] = {}
        self.waiting = 0

    def status(self) -> str:
        if self.lock.locked():
            return f"A training run is in progress; {self.waiting} waiting." if self.waiting else "A training run is in progress."
        return "No training run in progress."


SLOT = TrainingSlot()
MAX_CLASSES_UI = 12


def gather_classes(names: list[str], files: list) -> Path:
    """The Teachable-Machine-style inputs -> a class-folder tree in a fresh job folder."""
    job = models().workdir / "jobs" / uuid.uuid4().hex[:12]
    used = 0
    for name, group in zip(names, files):
        name = (name or "").strip()
        if not group:
            continue
        if not name:
            raise gr.Error("Every class with photos needs a name.")
        folder = job / "data" / _safe_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for i, file in enumerate(group):
            src = Path(file if isinstance(file, str) else file.name)
            shutil.copyfile(src, folder / f"{i:04d}{src.suffix.lower()}")
        used += 1
    if used == 0:
        raise gr.Error("Add photos to at least two classes, or upload a zip.")
    return job / "data"


def _source(zip_file, names, files) -> tuple[Path, Path]:
    """(data source, job folder to delete afterwards)."""
    if zip_file is not None:
        job = models().workdir / "jobs" / uuid.uuid4().hex[:12]
        job.mkdir(parents=True)
        return Path(zip_file if isinstance(zip_file, str) else zip_file.name), job
    data = gather_classes(names, files)
    return data, data.parent


def check_data(zip_file, *class_inputs):
    """The data report, before any training."""
    from resnext.data import DataError, load_dataset

    names, files = class_inputs[:MAX_CLASSES_UI], class_inputs[MAX_CLASSES_UI:]
    source, job = _source(zip_file, names, files)
    try:
        data = load_dataset(source, workdir=job / "unzipped" if source.suffix == ".zip" else None)
        return _report_markdown(data.report)
    except (DataError, OSError) as err:
        raise gr.Error(str(err)) from None
    finally:
        shutil.rmtree(job, ignore_errors=True)


def _report_markdown(report) -> str:
    lines = [f"**{len(report.classes)} classes** · {sum(report.train_counts.values())} training and "
             f"{sum(report.val_counts.values())} validation images", "", "| class | train | val |", "|---|---|---|"]
    lines += [f"| {c} | {report.train_counts[c]} | {report.val_counts[c]} |" for c in report.classes]
    if report.skipped:
        lines += ["", f"**Skipped {len(report.skipped)} file(s):**"]
        lines += [f"- `{f}` — {r}" for f, r in report.skipped[:30]]
        if len(report.skipped) > 30:
            lines.append(f"- … and {len(report.skipped) - 30} more")
    return "\n".join(lines)


def run_training(zip_file, mode, start, epochs, image_size, new_name, current_model, session_id, *class_inputs,
                 progress=gr.Progress()):
    """Generator: (status, report, history plot data, per-class table, confusion figure, download,
    model pickers...) updates while training; the new model is registered at the end."""
    import pandas as pd

    from resnext.data import DataError, load_dataset
    from resnext.training import TrainConfig, TrainResult, iter_train

    registry = models()
    names, files = class_inputs[:MAX_CLASSES_UI], class_inputs[MAX_CLASSES_UI:]
    source, job = _source(zip_file, names, files)
    stop = SLOT.stops.setdefault(session_id, threading.Event())
    stop.clear()
    try:
        if not SLOT.lock.acquire(blocking=False):  # Gradio's queue (concurrency_limit=1) makes this rare
            with SLOT.count:
                SLOT.waiting += 1
            try:
                yield (f"Busy: another training run is in progress; yours starts when it ends ({SLOT.waiting} waiting).",
                       "", None, None, None, gr.update(visible=False), gr.skip(), gr.skip())
                SLOT.lock.acquire()
            finally:
                with SLOT.count:
                    SLOT.waiting -= 1
        try:
            try:
                data = load_dataset(source, workdir=job / "unzipped" if source.suffix == ".zip" else None)
            except (DataError, OSError) as err:
                raise gr.Error(str(err)) from None
            init = {"current model": str(registry.paths[current_model or registry.default]),
                    "ImageNet": "imagenet", "scratch": "scratch"}[start]
            config = TrainConfig(mode=mode, init=init, epochs=int(epochs) if epochs else None,
                                 image_size=int(image_size) if image_size else None)
            name = _safe_name(new_name or f"fine-tuned {time.strftime('%H%M%S')}")
            out = registry.workdir / "models" / f"{name}.safetensors"
            if out.exists():
                out = out.with_name(f"{name} {uuid.uuid4().hex[:4]}.safetensors")
            report = _report_markdown(data.report)
            records: list[dict] = []
            history = pd.DataFrame({"epoch": pd.Series(dtype=int), "value": pd.Series(dtype=float),
                                    "metric": pd.Series(dtype=str)})
            yield ("Starting…", report, history, None, None, gr.update(visible=False), gr.skip(), gr.skip())
            last = 0.0
            try:
                for event in iter_train(data, config, out=out, should_stop=stop.is_set):
                    if isinstance(event, TrainResult):
                        result = event
                        break
                    if event.stage == "cancelled":
                        yield ("Stopped. No model was saved.", report, history, None, None, gr.update(visible=False),
                               gr.skip(), gr.skip())
                        return
                    if event.steps:
                        eta = f" · about {event.eta_s:.0f} s left" if event.eta_s else ""
                        desc = {"features": "Computing features", "train": f"Epoch {event.epoch}/{event.epochs}",
                                "epoch": f"Epoch {event.epoch}/{event.epochs}"}.get(event.stage, event.stage)
                        progress(min(1.0, event.step / event.steps), desc=desc + eta)
                    if event.stage == "epoch":
                        records += [{"epoch": event.epoch, "value": float(event.loss), "metric": "training loss"},
                                    {"epoch": event.epoch, "value": float(event.train_acc), "metric": "training accuracy"}]
                        if event.val_acc is not None:
                            records.append({"epoch": event.epoch, "value": float(event.val_acc), "metric": "validation accuracy"})
                        history = pd.DataFrame(records)
                    if time.perf_counter() - last > 0.5:  # quick mode's epochs take milliseconds: don't flood the page
                        last = time.perf_counter()
                        status = f"Training ({mode} mode): {event.message or event.stage}"
                        if event.val_acc is not None:
                            status += f" · validation accuracy {event.val_acc:.0%}"
                        yield (status, report, history, None, None, gr.update(visible=False), gr.skip(), gr.skip())
            except (RuntimeError, ValueError, OSError) as err:  # OSError: a full disk or read-only folder
                raise gr.Error(str(err)) from None
            registered = registry.add(result.checkpoint, name)
            per_class = [[display_name(c), "" if a is None else round(a, 3), data.report.val_counts[c]]
                         for c, a in result.per_class_acc.items()]
            acc = f"{result.val_acc:.0%}" if result.val_acc is not None else "n/a (no validation images)"
            choices = registry.names()
            yield (f"Done in {result.seconds:.0f} s: validation accuracy {acc}. Saved as **{registered}** — "
                   f"it is now selectable in the Classify and Model tabs.",
                   report, history, per_class, confusion_figure(result.confusion, result.classes),
                   gr.update(value=str(result.checkpoint), visible=True),
                   gr.update(choices=choices), gr.update(choices=choices))
        finally:
            SLOT.lock.release()
    finally:
        shutil.rmtree(job, ignore_errors=True)


def stop_training(session_id):
    event = SLOT.stops.get(session_id)
    if event is not None:
        event.set()
    return "Stopping after the current step…"


def confusion_figure(confusion: list[list[int]], classes: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 10), min(2 + 0.5 * n, 10)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), [display_name(c)[:18] for c in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [display_name(c)[:18] for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i][j]:
                    ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- layout


def examples() -> list[str]:
    return sorted(str(p) for p in ASSETS.glob("*.jpg")) if ASSETS.is_dir() else []


def build_demo(registry: Models) -> gr.Blocks:
    """The app's Blocks, built without launching."""
    global MODELS
    MODELS = registry
    first = registry.get(registry.default)
    n_classes = len(first.classes)
    with gr.Blocks(title="ResNeXt bird classifier", delete_cache=(KEEP_FILES_S // 4, KEEP_FILES_S)) as demo:
        model_name = gr.State(registry.default)
        explanation = gr.State(None)
        session_id = gr.State(lambda: uuid.uuid4().hex)
        gr.Markdown("# ResNeXt bird classifier\nUpload a bird photo: the model names the species and shows "
                    "**where it looked** (Grad-CAM from the network's conv5 stage).")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column(scale=1):
                    photo = photo_input(label="Photo", sources=["upload", "webcam", "clipboard"], height=360,
                                       elem_id="photo")
                    with gr.Row():
                        classify_model = gr.Dropdown(registry.names(), value=registry.default, label="Model", scale=2,
                                                     elem_id="classify-model")
                        top_k = gr.Slider(1, min(10, n_classes), value=min(5, n_classes), step=1, label="Top-k", scale=1)
                    button = gr.Button("Classify", variant="primary")
                    with gr.Accordion("Explanation options", open=False):
                        target = gr.Dropdown([TOP1] + sorted(display_name(c) for c in first.classes), value=TOP1,
                                             label="Explain which class", filterable=True)
                        method = gr.Dropdown([(v, k) for k, v in METHOD_NAMES.items()], value="gradcam", label="CAM method")
                    if examples():
                        gr.Examples(examples(), inputs=photo, label="Example photos (click one)")
                with gr.Column(scale=1):
                    label = gr.Label(label="Prediction", show_heading=True, elem_id="prediction")
                    overlay = gr.Image(label="Where the model looked (conv5)", type="numpy", interactive=False, height=360,
                                       elem_id="overlay")
                    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity")
                    caption = gr.Markdown(elem_id="caption")
            trio = gr.Gallery(label="Top-3 classes side by side: why the model hesitates", columns=3, height="auto",
                              object_fit="contain", elem_id="top3")
            with gr.Accordion("Several photos at once", open=False):
                many = gr.File(file_count="multiple", file_types=["image"], label="Photos")
                many_button = gr.Button("Classify all")
                table = gr.Dataframe(headers=BATCH_HEADERS, interactive=False, wrap=True)
                csv_file = gr.File(label="Download as CSV", interactive=False)

        with gr.Tab("Fine-tune"):
            gr.Markdown("Teach the model your own classes. Upload a **zip** with one folder per class, "
                        "or name classes below and add photos to each. *Quick* mode trains a new head on "
                        "frozen features (seconds to a minute on a CPU); *full* mode fine-tunes the network.")
            with gr.Row():
                with gr.Column():
                    zip_file = gr.File(file_types=[".zip"], label="Zip of class folders (optional)", elem_id="zip-upload")
                    visible_classes = gr.State(2)
                    names, uploads, groups = [], [], []
                    for i in range(MAX_CLASSES_UI):
                        with gr.Group(visible=i < 2) as group:
                            names.append(gr.Textbox(label=f"Class {i + 1} name", placeholder="e.g. Robin"))
                            uploads.append(gr.File(file_count="multiple", file_types=["image"], label="Photos", height=120))
                        groups.append(group)
                    with gr.Row():
                        add_class = gr.Button("+ Add class", size="sm")
                        remove_class = gr.Button("− Remove class", size="sm")
                with gr.Column():
                    mode = gr.Radio(["quick", "full"], value="quick", label="Mode")
                    start = gr.Radio(["current model", "ImageNet", "scratch"], value="current model", label="Start from")
                    with gr.Row():
                        epochs = gr.Number(value=0, label="Epochs (0 = automatic: 60 quick, 10 full)", precision=0,
                                           minimum=0, maximum=300)
                        image_size = gr.Number(value=0, label="Image size in px (0 = the model's own)", precision=0,
                                               minimum=0, maximum=512)
                    new_name = gr.Textbox(label="Name of the new model", placeholder="my birds", elem_id="new-name")
                    with gr.Row():
                        check = gr.Button("Check data")
                        train_button = gr.Button("Train", variant="primary", elem_id="train")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    status = gr.Markdown(SLOT.status(), elem_id="train-status")
            report = gr.Markdown()
            plot = gr.LinePlot(x="epoch", y="value", color="metric", label="Loss and accuracy per epoch", height=260)
            with gr.Row():
                per_class = gr.Dataframe(headers=["class", "validation accuracy", "images"], interactive=False)
                confusion = gr.Plot(label="Confusion matrix (validation)")
            download = gr.DownloadButton("Download the new model (.safetensors)", visible=False)

        with gr.Tab("Model"):
            with gr.Row():
                model_picker = gr.Dropdown(registry.names(), value=registry.default, label="Active model", scale=2,
                                           elem_id="model-picker")
                model_upload = gr.File(file_types=[".safetensors"], label="Add a model (.safetensors)", scale=1)
            card = gr.Markdown(model_card(first), elem_id="model-card")

        # --- events (internal ones are private: only /classify and a few others form the public API)
        private = {"api_visibility": "private"}

        def run_classify(name, image, k, tgt, meth, alpha):
            return classify(registry.get(name), image, k, tgt, meth, alpha)

        def classify_if_photo(name, image, k, tgt, meth, alpha):
            if image is None:  # the photo was cleared
                return None, None, [], "", None
            return run_classify(name, image, k, tgt, meth, alpha)

        classify_inputs = [model_name, photo, top_k, target, method, opacity]
        classify_outputs = [label, overlay, trio, caption, explanation]
        button.click(run_classify, classify_inputs, classify_outputs, **private)
        photo.change(classify_if_photo, classify_inputs, classify_outputs, **private)  # upload, paste, example
        for control in (target, method):
            control.input(classify_if_photo, classify_inputs, classify_outputs, **private)
        opacity.release(reblend, [explanation, opacity], overlay, **private)

        def api_classify(image, k):
            """One photo (file) and top_k -> {species: probability} and the conv5 Grad-CAM overlay."""
            result = classify(registry.get(registry.default), image, k, top3=False)  # not returned: not drawn
            return result[0], result[1]

        # A stable, minimal endpoint for gradio_client: /classify(image, top_k) -> (top-k, overlay).
        api_button = gr.Button(visible=False)
        api_button.click(api_classify, [photo, top_k], [label, overlay], api_name="classify")
        many_button.click(lambda name, files: classify_many(registry.get(name), files), [model_name, many],
                          [table, csv_file], api_name="classify_many")

        picker_outputs = [model_name, model_picker, classify_model, card, target, top_k]
        model_picker.input(select_model, model_picker, picker_outputs, **private)
        classify_model.input(select_model, classify_model, picker_outputs, **private)
        model_upload.upload(upload_model, [model_upload, model_name], picker_outputs, **private)

        def show_classes(count, delta):
            count = max(2, min(MAX_CLASSES_UI, count + delta))
            return [count] + [gr.update(visible=i < count) for i in range(MAX_CLASSES_UI)]

        add_class.click(lambda c: show_classes(c, 1), visible_classes, [visible_classes] + groups, **private)
        remove_class.click(lambda c: show_classes(c, -1), visible_classes, [visible_classes] + groups, **private)
        check.click(check_data, [zip_file] + names + uploads, report, **private)
        train_button.click(
            run_training, [zip_file, mode, start, epochs, image_size, new_name, model_name, session_id] + names + uploads,
            [status, report, plot, per_class, confusion, download, model_picker, classify_model],
            concurrency_limit=1, concurrency_id="training", **private,
        )
        stop_button.click(stop_training, session_id, status, queue=False, **private)

        def api_fine_tune(zip_upload, train_mode, n_epochs, name, session, progress=gr.Progress()):
            """A zip of class folders, quick|full, epochs (0 = automatic), a name -> (status, new model file).
            Starts from the default model; shares the one training slot with the Train button."""
            final = None
            for final in run_training(zip_upload, train_mode, "current model", n_epochs, 0, name, registry.default,
                                      session, *[""] * MAX_CLASSES_UI, *[None] * MAX_CLASSES_UI, progress=progress):
                pass
            return final[0], final[5].get("value")

        api_model = gr.File(visible=False)
        gr.Button(visible=False).click(api_fine_tune, [zip_file, mode, epochs, new_name, session_id],
                                       [status, api_model], api_name="fine_tune", concurrency_limit=1,
                                       concurrency_id="training")
    return demo


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's memory arenas. glibc gives threads that allocate at once arenas of their own;
    with Gradio's worker threads the server's RSS grew 55-72 MB over 500-1,000 requests and then
    stayed (no leak, but memory a Space pays for); with 2 arenas it grew 23 MB
    (``benchmarks/load.py``). A no-op where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def tidy_workdir(workdir: Path) -> None:
    """At start-up: create the work folder; remove what a killed run left (its job folder, a
    checkpoint's temporary file). Finished models are never half-written (atomic rename).
    One app per work folder: another app's running jobs would be removed too."""
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "jobs", ignore_errors=True)
    for leftover in (workdir / "models").glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ResNeXt bird classifier app")
    parser.add_argument("--checkpoint", type=Path, help="model file (default: the bird model in checkpoints/)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("RESNEXT_WORKDIR", Path(tempfile.gettempdir()) / "resnext-app")),
                        help="where uploads and fine-tuned models are written")
    args = parser.parse_args(argv)
    limit_malloc_arenas()  # before the server starts its threads
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        sys.exit(f"error: the default bird model is not installed ({DEFAULT_CHECKPOINT.name} is not in "
                 f"checkpoints/); start the app on a model of yours with --checkpoint PATH")
    try:
        tidy_workdir(args.workdir)
        registry = Models(checkpoint, args.device, args.workdir)
        classifier = registry.get(registry.default)
    except (FileNotFoundError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    # The first explanation imports grad-cam (OpenCV, matplotlib): pay that before the first visitor.
    classifier.explain(Image.new("RGB", (64, 64)), k=1)
    print(f"loaded {classifier}", flush=True)
    demo = build_demo(registry)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS,
                max_file_size="50mb", allowed_paths=[str(ASSETS)])


if __name__ == "__main__":
    main()
