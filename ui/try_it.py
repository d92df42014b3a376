"""The Fine-tune tab's "Try it" panel: right after a run, the new model answers a photo the visitor
drops, takes with the webcam or picks from their own validation photos, without leaving the tab."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from resnext import display_name

from .answers import open_photo, species_sentence, verdict_message
from .context import Ctx
from .fixes import photo_input
from .references import thumbnails

PRIVATE = {"api_visibility": "private"}
PER_CLASS = 2  # validation photos shown per class
MAX_SHOWN = 24
THUMB_SIDE = 224


@dataclass
class TryIt:
    box: gr.Column
    photo: gr.Image
    label: gr.Label
    verdict: gr.Markdown
    gallery: gr.Gallery
    photos: gr.State  # the gallery's photos, kept on the server: a click sends an index, never a path

    def shown(self, photos: list) -> dict:
        """The panel after a run: visible, with the run's validation photos to pick from."""
        return {self.box: gr.Column(visible=True), self.photos: [p for p, _ in photos],
                self.gallery: gr.Gallery(value=photos or None, visible=bool(photos)), self.label: None,
                self.verdict: "", self.photo: None}


def build() -> TryIt:
    with gr.Column(visible=False, elem_id="try-it") as box:
        gr.Markdown("### Try it\nDrop a photo, take one with the webcam, or click one of your validation photos: "
                    "your new model answers here.")
        with gr.Row(equal_height=False):
            photo = photo_input(label="A photo to try", sources=["upload", "webcam", "clipboard"], height=260,
                                elem_id="try-photo", min_width=260)
            with gr.Column(min_width=260):
                label = gr.Label(label="Your model says", num_top_classes=5, elem_id="try-answer")
                verdict = gr.Markdown(elem_id="try-verdict")
        gallery = gr.Gallery(label="Your validation photos: click one", columns=8, rows=1, height=170, allow_preview=False,
                             elem_id="try-examples", buttons=[], object_fit="contain",
                             elem_classes=["static-label", "photo-grid"])
    return TryIt(box, photo, label, verdict, gallery, gr.State([]))


def validation_photos(val: list, classes: list[str]) -> list[tuple[Image.Image, str]]:
    """Up to :data:`PER_CLASS` validation photos of each class (at most :data:`MAX_SHOWN`), as
    small thumbnails captioned with their class."""
    return [(image, display_name(classes[label])) for image, label in thumbnails(val, PER_CLASS, THUMB_SIDE, MAX_SHOWN)]


def answer(ctx: Ctx, owner, model, image) -> tuple[dict | str, str]:
    """The session's model (the new one, after a run) on one photo: per-class bars and the verdict."""
    classifier = ctx.registry.get(model, owner)
    photo, _ = open_photo(image)
    (top,) = classifier.predict(photo, k=min(5, len(classifier.classes)))
    bars = {display_name(p.label): p.prob for p in top}
    if top.verdict == "species":
        return bars, species_sentence(classifier, top[0])
    return ("No bird found" if top.verdict == "not_a_bird" else bars), verdict_message(classifier, top)


def wire(ctx: Ctx, tab: TryIt) -> None:
    def on_photo(owner, model, image):
        if image is None:  # cleared
            return None, ""
        return answer(ctx, owner, model, image)

    def on_pick(photos, evt: gr.SelectData):
        """The picked photo goes into the photo box, whose change answers it: what is shown is what was asked."""
        index = evt.index if isinstance(evt.index, int) else -1
        if not 0 <= index < len(photos or []):
            raise gr.Error("Pick one of the photos shown.")
        return photos[index]

    tab.photo.change(on_photo, [ctx.session, ctx.model_name, tab.photo], [tab.label, tab.verdict], **PRIVATE)
    tab.gallery.select(on_pick, tab.photos, tab.photo, **PRIVATE)
