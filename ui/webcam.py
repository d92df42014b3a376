"""The Fine-tune tab's webcam: take a photo and add it to one of the named classes' photos."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from resnext import ImageLoadError, load_image

from .fixes import Unreadable, photo_input, plain_reason

MAX_PHOTOS_PER_CLASS = 500  # what one class's upload box holds, webcam shots included


@dataclass
class Webcam:
    shot: gr.Image
    target: gr.Dropdown
    add: gr.Button


def build(classes: int) -> Webcam:
    with gr.Accordion("Take photos with the webcam", open=False, elem_id="webcam-box"):
        shot = photo_input(label="Webcam", sources=["webcam"], height=240, elem_id="webcam-shot")
        with gr.Row(equal_height=True):
            target = gr.Dropdown(choices=[(f"Class {i + 1}", i) for i in range(classes)], value=0, label="Add it to",
                                 elem_id="webcam-class", min_width=120)
            add = gr.Button("Add the photo", elem_id="webcam-add", min_width=120)
    return Webcam(shot, target, add)


def add_shot(index, shot, uploads: list) -> tuple[int, list]:
    """(the class, its photos with the shot added): the checks a file upload gets, in one line each.

    Raises:
        gr.Error: no shot, a shot that is not a usable photo, an unknown class, a full class.
    """
    if shot is None:
        raise gr.Error("Take a photo first: open the webcam and press its capture button.")
    if isinstance(shot, Unreadable):
        raise gr.Error(f"That photo cannot be used: {shot.reason}.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(uploads):
        raise gr.Error(f"Pick one of the {len(uploads)} classes to add the photo to.")
    try:
        load_image(shot)  # the same limits as any photo (pixels, shape), read from the header first
    except (ImageLoadError, FileNotFoundError) as err:
        raise gr.Error(f"That photo cannot be used: {plain_reason(err)}.") from None
    photos = [f if isinstance(f, str) else f.name for f in uploads[index] or []]
    if len(photos) >= MAX_PHOTOS_PER_CLASS:
        raise gr.Error(f"Class {index + 1} already has {len(photos)} photos, the most one class takes here.")
    return index, photos + [shot]
