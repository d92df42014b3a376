"""Fixes to Gradio 6.31, applied by :func:`install` (never as a side effect of an import), and
the photo input that reads uploads gently."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio import processing_utils
from PIL import Image

from resnext import ImageLoadError, load_image

from .state import disk_full

_original_save_pil_to_cache = processing_utils.save_pil_to_cache


def install() -> None:
    """Apply the fixes; safe to call more than once."""
    processing_utils.save_pil_to_cache = save_pil_to_cache  # every image output goes through it


def uninstall() -> None:
    processing_utils.save_pil_to_cache = _original_save_pil_to_cache


def save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
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
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, target)
    except OSError as err:  # a full disk: no half-written file stays, and the visitor reads why
        Path(staging).unlink(missing_ok=True)
        if disk_full(err):
            raise gr.Error("The server's disk is full, so the answer's pictures cannot be sent. Try again later.") from None
        raise
    return str(target)


NOT_ARRIVED = "the file did not arrive; try uploading it again"


@dataclass(frozen=True)
class Unreadable:
    """What the photo input hands over for a file that is not a photo: the reason, in plain words."""

    reason: str


def plain_reason(err: Exception) -> str:
    """An image loading error as a visitor should read it: what is wrong with the file, without
    the server's folders, library names or exception types."""
    text = str(err)
    if isinstance(err, FileNotFoundError):
        return NOT_ARRIVED
    reason = text.split(": ", 1)[-1] if ": " in text else text
    if "damaged or cut short (" in reason:
        return reason.split(" (", 1)[0]  # "damaged or cut short (PIL's own words)" -> the plain part
    return reason  # a limit keeps its numbers: "too large (20000x20000 = ...; the limit is 64,000,000)"


GENTLE = "gentle-photo"  # the class that marks a photo input (it survives Gradio's copies of the component)


def photo_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` handing over the uploaded file's path. Gradio peeks at every upload; a file
    that is not a photo becomes :class:`Unreadable` instead of an exception, so the handler can say
    what the file is and clear it without red "Error" badges on every output.

    The leniency lives on ``gr.Image`` itself, for the inputs marked with :data:`GENTLE`: once an
    event has updated a component, Gradio keeps a fresh instance of it for the session, built from
    its constructor arguments (a patch on the instance was lost there, and every broken file after
    the first got red badges); the marker is one of those arguments. A subclass would be taken for
    a custom component with no front end."""
    _make_image_inputs_gentle()
    classes = [*(kwargs.pop("elem_classes", None) or []), GENTLE]
    return gr.Image(type="filepath", image_mode=None, elem_classes=classes, **kwargs)  # Gradio only reads the header


def _make_image_inputs_gentle() -> None:
    if getattr(gr.Image.preprocess, "gentle", False):
        return
    strict = gr.Image.preprocess

    def preprocess(self, payload):
        if GENTLE not in (self.elem_classes or []):
            return strict(self, payload)
        try:
            return strict(self, payload)
        except Exception:  # noqa: BLE001 - any failure here means "not a photo we can read"
            return Unreadable(_reason_for(getattr(payload, "path", None)))

    preprocess.gentle = True
    gr.Image.preprocess = preprocess


def _reason_for(path) -> str:
    if not path:
        return NOT_ARRIVED
    try:
        load_image(path)
    except (ImageLoadError, FileNotFoundError) as err:
        return plain_reason(err)
    return "not a photo in a format this app reads (JPEG, PNG, WebP, GIF, BMP or TIFF)"
