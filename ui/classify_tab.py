"""The Classify tab: a photo in, the answer right under it (top-k, verdict, heatmap), the top-3
side by side, an optional box drawn by the visitor, settings, examples and several photos at
once. Widgets, their handlers and their events live here together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import gradio as gr

from resnext import display_name, load_image

from .answers import BATCH_HEADERS, METHOD_NAMES, PREDICTION, TOP1, Unusable, classify, page_label, reblend
from .context import Ctx, example_caption, examples, known_examples
from .fixes import Unreadable, photo_input
from .references import reference

PRIVATE = {"api_visibility": "private"}
REPEAT_S = 3.0  # the same photo "new" again within this many seconds is Gradio's second change event
# The overlay, tiles and reference photos go out as JPEG, not Gradio's default WebP: a 1,280 px
# overlay encodes in 3 ms instead of 97, with the same error against the drawn image.
IMAGE_FORMAT = "jpeg"
BOX_HINT = "Bird small in the photo? **Click two opposite corners of it** on the photo to look only there."
SCROLL_TO_ANSWER = """() => { if (window.innerWidth < 700) {
  document.getElementById('prediction')?.scrollIntoView({behavior: 'smooth', block: 'nearest'}); } }"""


@dataclass
class ClassifyTab:
    photo: gr.Image
    top3_row: gr.Row
    top3_captions: list
    label: gr.Label
    overlay: gr.Image
    caption: gr.Markdown
    opacity: gr.Slider
    top3: list
    box: gr.State
    box_hint: gr.Markdown
    clear_box: gr.Button
    explanation: gr.State
    method: gr.Dropdown
    many: gr.File
    table: gr.Dataframe
    csv_file: gr.File
    button: gr.Button
    many_button: gr.Button
    model: gr.Dropdown
    example_gallery: gr.Gallery
    refs: list  # a reference photo under each top-3 tile, where the model has one

    def cleared(self) -> dict:
        return {self.label: page_label(), self.overlay: None, self.caption: "", self.explanation: None,
                self.top3_row: gr.Row(visible=False)}


def build(ctx: Ctx) -> ClassifyTab:
    registry = ctx.registry
    first = registry.get(registry.default)
    n = len(first.classes)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            photo = photo_input(label="Photo", sources=["upload", "webcam", "clipboard"], height=360, elem_id="photo")
            box_hint = gr.Markdown(BOX_HINT, elem_id="box-hint", elem_classes="small-print")
            with gr.Row():
                button = gr.Button("Classify", variant="primary", elem_id="classify", min_width=120)
                clear_box = gr.Button("Use the whole photo", size="sm", visible=False, elem_id="clear-box", min_width=120)
            # Under the photo, in the first view on a desktop, where the answer's top-3 row cannot push them down
            shown = known_examples(first.classes)
            with gr.Column(visible=bool(shown), elem_id="examples") as example_box:
                example_gallery = gr.Gallery(shown or None,
                                             label="Example photos (click one)", columns=5, height="auto",
                                             allow_preview=False, object_fit="cover", elem_id="example-gallery", buttons=[],
                                             elem_classes=["static-label", "photo-grid"])
        with gr.Column(scale=1, min_width=300, elem_id="answer"):
            label = gr.Label(label=PREDICTION, show_heading=True, elem_id="prediction")
            caption = gr.Markdown(elem_id="caption")
            overlay = gr.Image(label="Where the model looked", type="numpy", interactive=False, height=400,
                               elem_id="overlay", buttons=["download", "fullscreen"], format=IMAGE_FORMAT,
                               elem_classes="static-label")
            opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
    with gr.Row(elem_id="top3", visible=False) as top3_row:
        top3, top3_captions, refs = [], [], []
        for i in range(3):
            with gr.Column(min_width=80, elem_classes="top3-tile"):
                top3.append(gr.Image(type="pil", interactive=False, height=160, elem_id=f"top3-{i}", buttons=[],
                                     show_label=False, format=IMAGE_FORMAT))
                top3_captions.append(gr.Markdown(elem_classes="tile-caption"))
                refs.append(gr.Image(type="pil", interactive=False, height=140, elem_id=f"ref-{i}", buttons=[],
                                     label="What it looks like", show_label=True, visible=False, format=IMAGE_FORMAT,
                                     elem_classes="static-label"))
    with gr.Row():
        classify_model = gr.Dropdown(registry.names(), value=registry.default, label="Model", min_width=260,
                                     elem_id="classify-model")
        top_k = gr.Slider(1, min(10, n), value=min(5, n), step=1, label="Top-k", min_width=200, elem_id="top-k")
    with gr.Accordion("Explanation options", open=False):
        target = gr.Dropdown([TOP1] + sorted(display_name(c) for c in first.classes), value=TOP1,
                             label="Explain which class", filterable=True, elem_id="target")
        method = gr.Dropdown([(v, k) for k, v in METHOD_NAMES.items()], value="gradcam", label="CAM method",
                             elem_id="method")
    with gr.Accordion("Several photos at once", open=False):
        many = gr.File(file_count="multiple", file_types=["image"], label="Photos", elem_id="many")
        many_button = gr.Button("Classify all", elem_id="classify-all")
        table = gr.Dataframe(headers=BATCH_HEADERS, interactive=False, wrap=True, elem_id="batch-table",
                             column_widths=["20%", "14%", "16%", "6%", "16%", "6%", "16%", "6%"])  # 100 %: no column cut off
        csv_file = gr.File(label="Download as CSV", interactive=False)
    ctx.pickers.append(classify_model)
    ctx.target, ctx.top_k, ctx.example_box, ctx.example_gallery = target, top_k, example_box, example_gallery
    tab = ClassifyTab(photo, top3_row, top3_captions, label, overlay, caption, opacity, top3, gr.State(None), box_hint, clear_box, gr.State(None),
                      method, many, table, csv_file, button, many_button, classify_model, example_gallery, refs)
    return tab


def answer(ctx: Ctx, tab: ClassifyTab, name, owner, image, k, target, method, opacity, box) -> dict:
    """The answer for the inputs as they are now; an empty photo clears it, a file that is not a
    photo is named in a warning and removed."""
    if image is None:
        return tab.cleared()
    classifier = ctx.registry.get(name, owner)
    try:
        shown = classify(classifier, image, k, target, method, opacity, box=box)
    except Unusable as err:  # a yellow warning and the file removed, never red "Error" badges
        gr.Warning(err.message)
        return {**tab.cleared(), tab.photo: None, tab.box: None}
    # the top-3 tiles explain the top 3 predictions, in order: each gets its species' reference photo
    refs = [reference(classifier, p.label) for p in shown.explanation.predictions[:3]] if shown.top3 else []
    refs += [None] * (3 - len(refs))
    return {tab.label: page_label(shown), tab.overlay: shown.overlay, tab.caption: shown.caption,
            tab.explanation: shown.explanation, tab.top3_row: gr.Row(visible=bool(shown.top3)),
            **{tile: img for tile, (img, _) in zip(tab.top3, shown.top3)},
            **{cap: text for cap, (_, text) in zip(tab.top3_captions, shown.top3)},
            **{ref: gr.Image(value=path and load_image(path), visible=path is not None) for ref, path in zip(tab.refs, refs)}}


class Repeats:
    """Gradio 6.31 fires the photo's change twice for every upload onto a photo already shown, and
    the two may run at once: every such photo was answered twice (twice the server's work) and a
    broken file warned twice. The second for the same visitor and file within :data:`REPEAT_S` is
    let go; kept per visitor on the server, as a per-session State is read by both at once."""

    def __init__(self):
        self.lock, self.last = threading.Lock(), {}

    def seen(self, owner, image) -> bool:
        """Whether ``owner`` was just answered for ``image``; records this answer if not."""
        if owner is None or image is None:
            return False
        key, now = (image.reason if isinstance(image, Unreadable) else str(image)), time.monotonic()
        with self.lock:
            if len(self.last) > 10_000:  # forget visitors who left
                self.last = {o: v for o, v in self.last.items() if now - v[1] < REPEAT_S}
            previous = self.last.get(owner)
            self.last[owner] = (key, now)
        return previous is not None and previous[0] == key and now - previous[1] < REPEAT_S


def corner(box, x: float, y: float) -> tuple[dict, str]:
    """A click on the photo: the first corner of a box, or the second, which completes it."""
    if isinstance(box, dict) and "first" in box:
        x0, y0 = box["first"]
        return {"box": [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]}, "Looking inside your box (green)."
    return {"first": [x, y]}, "First corner set: **now click the opposite corner of the bird.**"


def pick_example(evt: gr.SelectData):
    """The example clicked, found by its caption (the gallery shows only the model's own species)."""
    caption = (evt.value or {}).get("caption") if isinstance(evt.value, dict) else None
    for path in examples():
        if example_caption(path) == caption:
            return path
    raise gr.Error("Pick one of the example photos shown.")


def wire(ctx: Ctx, tab: ClassifyTab) -> None:
    """The tab's events; after every tab is built (a model change updates other tabs too)."""
    inputs = [ctx.model_name, ctx.session, tab.photo, ctx.top_k, ctx.target, tab.method, tab.opacity, tab.box]
    outputs = [tab.label, tab.overlay, tab.caption, tab.explanation, tab.photo, tab.box, tab.top3_row, *tab.top3,
               *tab.top3_captions, *tab.refs]

    def run(name, owner, image, k, target, method, opacity, box):
        drawn = box.get("box") if isinstance(box, dict) else None
        return answer(ctx, tab, name, owner, image, k, target, method, opacity, drawn)

    def whole_photo(*values):
        """A new photo, or "Use the whole photo": forget the box and answer for all of it."""
        return {**run(*values[:-1], None), tab.box: None, tab.box_hint: BOX_HINT, tab.clear_box: gr.Button(visible=False)}

    repeats = Repeats()

    def new_photo(name, owner, image, k, target, method, opacity, box):
        """A new photo: the whole of it, explained for its own top-1 (a class chosen for the last
        photo would explain this one for a species it may give 0 %)."""
        if repeats.seen(owner, image):
            return {}
        return {**whole_photo(name, owner, image, k, TOP1, method, opacity, box), ctx.target: TOP1}

    def clicked(name, owner, image, k, target, method, opacity, box, evt: gr.SelectData):
        box, hint = corner(box, *evt.index[:2])
        updates = {tab.box: box, tab.box_hint: hint, tab.clear_box: gr.Button(visible=True)}
        if "box" not in box:
            return updates
        return {**updates, **run(name, owner, image, k, target, method, opacity, box)}

    more = outputs + [tab.box_hint, tab.clear_box]
    on_answer = {**PRIVATE, "show_progress_on": [tab.label, tab.overlay]}  # never over the photo being clicked
    tab.button.click(run, inputs, outputs, **on_answer)
    tab.photo.change(new_photo, inputs, more + [ctx.target], **on_answer).then(None, js=SCROLL_TO_ANSWER)  # upload, paste, example
    tab.photo.select(clicked, inputs, more, **on_answer)
    tab.clear_box.click(whole_photo, inputs, more, **on_answer)
    for control in (ctx.target, tab.method):
        control.input(run, inputs, outputs, **on_answer)
    ctx.top_k.release(run, inputs, outputs, **on_answer)
    tab.example_gallery.select(pick_example, None, tab.photo, **PRIVATE)  # the photo's change answers
    tab.opacity.release(reblend, [tab.explanation, tab.opacity], tab.overlay, **PRIVATE)
    tab.model.input(ctx.select, [ctx.session, tab.model], ctx.selection_outputs(), **PRIVATE).then(
        run, inputs, outputs, **on_answer)
    ctx.reanswer = (run, inputs, outputs)  # what a model change elsewhere (Model tab, training) runs next
