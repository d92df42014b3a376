"""What the Classify tab and ``/classify`` answer: top-k, verdict, heatmaps and captions, and the
batch table. Plain functions of a classifier and an input; no widgets here."""

from __future__ import annotations

import csv
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import gradio as gr
from PIL import Image

from resnext import Classifier, ImageLoadError, display_name
from resnext.imagefile import ANSWER_SIDE, load_photo, shrink_to_fit

from .card import plain
from .fixes import Unreadable, plain_reason

MIN_PHOTO_SIDE = 16  # pixels a side: anything smaller shows nothing to tell (as for training photos)
MAX_PHOTO_SIDE = ANSWER_SIDE  # photos are shrunk to this for display and heatmaps (the network sees less)
TOP3_SIDE = 480  # the top-3 tiles are small: no need to send 1280 px copies
KEEP_FILES_S = 3600  # CSVs and images served to a visitor are deleted after an hour
TOP1 = "Top-1 prediction"
PREDICTION = "Prediction"  # the answer box's title
METHOD_NAMES = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
    "hirescam": "HiResCAM", "eigencam": "Eigen-CAM", "finercam": "Finer-CAM (contrast with look-alikes)",
}
CLASS_FREE = {"eigencam"}  # maps that do not depend on the class asked about
BATCH_HEADERS = ["file", "verdict", "1st", "p1", "2nd", "p2", "3rd", "p3"]
VERDICT_WORDS = {"species": "species", "unsure": "not sure", "not_a_bird": "not a bird"}

try:  # Hugging Face ZeroGPU: GPU-bound functions must be wrapped; elsewhere a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


@gpu
def gpu_explain(classifier: Classifier, photo, target, method, k, box=None):
    """The chosen class's map and the top-3's, from one forward pass (the GPU-bound part)."""
    return classifier.explain_classes(photo, [target], method, k, top=3, box=box)


class Shown(NamedTuple):
    """One answer as the page shows it."""

    label: dict | str  # {species: probability}, or a phrase when there is no bird
    overlay: object  # the heatmap over the photo (RGB array)
    top3: list  # [(overlay, caption)] * 3, or [] when not drawn
    caption: str  # markdown under the answer
    explanation: object  # kept so the opacity slider can re-blend without a network pass


def species(label: str) -> str:
    """A class's name as it is shown in Markdown: a model's class names are whatever its maker
    chose (``<img src=x>``, ``**bold**``), so they are escaped, never rendered."""
    return plain(display_name(label))


class Unusable(gr.Error):
    """A file that cannot be answered (not a photo, cut short, too small, too large): the page
    says why in a warning and removes it; an API caller gets the same words as an error."""


def open_photo(image) -> tuple[Image.Image, float]:
    """Whatever the photo input hands over -> (an upright RGB photo of at most MAX_PHOTO_SIDE
    pixels, the scale from the uploaded photo's pixels to it).

    Raises:
        gr.Error: no photo. Unusable: a file that is no usable photo, in plain words.
    """
    if image is None:
        raise gr.Error("Add a photo first: upload one, paste it, or use the webcam.")
    if isinstance(image, Unreadable):
        raise Unusable(f"That file cannot be used: {image.reason}.")
    try:
        photo, scale = load_photo(image, MAX_PHOTO_SIDE)  # a phone's JPEG is decoded at half its size already
    except (ImageLoadError, FileNotFoundError) as err:
        raise Unusable(f"That file cannot be used: {plain_reason(err)}.") from None
    if min(photo.size) < MIN_PHOTO_SIDE / scale:
        width, height = (round(v / scale) for v in photo.size)
        raise Unusable(f"This photo is too small to tell anything from ({width}x{height} pixels; a photo needs at "
                       f"least {MIN_PHOTO_SIDE} on each side).")
    return photo, scale


def classify(classifier: Classifier, image, top_k: int = 5, target: str | None = None, method: str = "gradcam",
             opacity: float = 0.5, top3: bool = True, box=None) -> Shown:
    """Top-k, the conv5 heatmap over the photo, the top-3 heatmaps and a caption. ``box``:
    (left, top, right, bottom) in the uploaded photo's pixels, to look only there.
    ``top3=False`` leaves the top-3 overlays undrawn, for callers that drop them."""
    photo, scale = open_photo(image)
    k = _top_k(classifier, top_k)
    chosen = None if target in (None, "", TOP1) else target
    start = time.perf_counter()
    try:
        explanations = gpu_explain(classifier, photo, chosen, method, k, None if box is None else [v * scale for v in box])
    except ValueError as err:  # unknown class or method, a box too small
        raise gr.Error(str(err)) from None
    elapsed = (time.perf_counter() - start) * 1000
    main, trio = explanations[0], explanations[1:]
    label = {display_name(p.label): p.prob for p in main.predictions}
    if main.verdict == "not_a_bird":
        label = "No bird found"
    bird = main.verdict != "not_a_bird"  # with no bird, no species tiles to compare
    gallery = [(overlay, f"{species(e.label)} · {e.prob:.0%}") for e, overlay in zip(trio, _tiles(trio, opacity))] \
        if top3 and bird else []
    lines = caption_lines(classifier, main)
    lines.append(f"<span class='small-print'>answered in {elapsed:.0f} ms on the {classifier.device.type.upper()}</span>")
    return Shown(label, main.overlay_with(opacity), gallery, "\n\n".join(lines), main)


def answer_record(classifier: Classifier, image, top_k: int = 5) -> dict:
    """One photo's answer as data, as ``python -m resnext predict --json`` gives it: the verdict,
    the bird score, the box classified (in the given photo's pixels) and the top-k. No heatmap."""
    photo, scale = open_photo(image)
    (answer,) = classifier.predict(photo, k=_top_k(classifier, top_k))
    return {**answer.to_dict(), "box": [round(v / scale, 1) for v in answer.box]}


def _top_k(classifier: Classifier, top_k) -> int:
    return max(1, min(int(top_k), len(classifier.classes)))


def page_label(shown: Shown | None = None) -> gr.Label:
    """The Prediction box for an answer (empty without one). The species is its heading only when
    the verdict is "species": a "not sure" answer lists its closest species under a title that
    says so, with no name in large type to be read as the answer."""
    unsure = shown is not None and shown.explanation.verdict == "unsure"
    return gr.Label(value=None if shown is None else shown.label, show_heading=not unsure,
                    label="Not sure: the closest species" if unsure else PREDICTION)


def fine_tuned(classifier: Classifier) -> bool:
    """A visitor's model trained here on a few classes: its answers are among those classes only."""
    return (classifier.info.provenance or {}).get("mode") in ("quick", "full")


def species_sentence(classifier: Classifier, best) -> str:
    """A confident answer in words; a fine-tuned model says that it only knows its own classes
    ("Pileated Woodpecker (83 %): sure enough to say so" was its answer to a Brown Pelican)."""
    if fine_tuned(classifier):
        n = len(classifier.classes)
        return (f"Of the {n} classes this model knows, this looks most like **{species(best.label)}** ({best.prob:.0%}); "
                f"it names one of those {n} whatever the photo shows.")
    return f"**{species(best.label)}** ({best.prob:.0%}): sure enough to say so."


def caption_lines(classifier: Classifier, main) -> list[str]:
    """The verdict in words, which box was used, and what the heatmap shows."""
    if main.verdict != "species":
        lines = [verdict_message(classifier, main.predictions)]
    else:
        lines = [species_sentence(classifier, main.predictions[0])] if fine_tuned(classifier) else []
    if main.boxed:
        lines.append("I looked only inside the box you drew (green).")
    elif main.found:
        what = "the bird" if main.verdict == "species" else "what looked most like a bird"  # there may be none
        weighs = "is the closer look's" if classifier.rules.crop_weight >= 1 else "weighs both looks"
        lines.append(f"I also looked closer at {what} (the green box); the answer {weighs}.")
    method = METHOD_NAMES.get(main.method, main.method)
    if main.verdict == "not_a_bird":
        lines.append(f"Where the network looked most (warm colours; {method}). With no bird, there is no species to "
                     "explain.")
    elif main.method in CLASS_FREE:
        lines.append(f"What the network's features respond to most strongly (warm colours; {method}: the same map "
                     "whichever class you pick).")
    else:
        lines.append(f"Where the model looked to decide **{species(main.label)}** ({main.prob:.0%}): the warm colours "
                     f"({method}).")
    return lines


def verdict_message(classifier: Classifier, answer) -> str:
    """A plain sentence for an answer that is not a confident species."""
    best = answer[0]
    if answer.verdict == "not_a_bird":  # no species named: any name here would be read as the answer
        return ("<div class='unsure'><b>This does not look like a bird photo.</b> If there is a bird, try a "
                "photo that shows all of it, not too small.</div>\n")
    return (f"<div class='unsure'>⚠️ <b>Not sure</b> — my best guess is {species(best.label)} at only "
            f"{best.prob:.0%}. This may not be one of the {len(classifier.classes)} species I know.</div>\n")


def _tiles(explanations: list, opacity: float) -> list[Image.Image]:
    """The top-3 overlays at tile size, drawn on one small copy of the photo (not drawn at 1,280 px
    and shrunk three times: 4x less work for a phone photo)."""
    if not explanations:
        return []
    photo = explanations[0].photo
    small = shrink_to_fit(photo, TOP3_SIDE)
    scale = small.width / photo.width
    return [Image.fromarray(replace(e, photo=small, box=tuple(v * scale for v in e.box)).overlay_with(opacity))
            for e in explanations]


def reblend(explanation, opacity: float):
    """The opacity slider: blend the kept heatmap again, no network pass."""
    if explanation is None:
        return gr.skip()
    return explanation.overlay_with(float(opacity))


def classify_many(classifier: Classifier, files, exports: Path) -> tuple[list[list], str]:
    """Several photos at once: one row per photo with its top-3 (percentages), and a CSV of the
    same (probabilities as numbers) under ``exports``."""
    if not files:
        raise gr.Error("Add one or more photos first.")
    rows, problems = [], 0
    for file in files:
        path = Path(file if isinstance(file, str) else file.name)
        try:
            (top,) = classifier.predict(open_photo(str(path))[0], k=3)  # as one photo at a time sees it
        except Unusable as err:
            problems += 1
            rows.append([path.name, "unreadable: " + err.message.split(": ", 1)[-1]] + [""] * (len(BATCH_HEADERS) - 2))
            continue
        row = [path.name, VERDICT_WORDS[top.verdict]]
        shown = top if top.verdict != "not_a_bird" else []  # with no bird, no species word (as the single answer)
        for p in shown + [None] * (3 - len(shown)):
            row += [display_name(p.label), round(p.prob, 4)] if p else ["", ""]
        rows.append(row)
    if problems:
        gr.Warning(f"{problems} file(s) could not be used; the table says why.")
    out = export_path(exports, "predictions", ".csv")
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BATCH_HEADERS)
        writer.writerows(rows)
    return [[f"{v:.0%}" if isinstance(v, float) else v for v in row] for row in rows], str(out)


def export_path(folder: Path, stem: str, suffix: str) -> Path:
    """A fresh file name under ``folder``, whose files older than :data:`KEEP_FILES_S` are
    removed on the way (Gradio serves its own copy of each)."""
    folder.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - KEEP_FILES_S
    for old in folder.iterdir():
        if old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
    return folder / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
