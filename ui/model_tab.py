"""The Model tab: the active model, adding one's own ``.safetensors``, and the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from resnext import load_classifier

from .card import model_card
from .context import Ctx
from .state import Models, new_owner, removed_message, safe_name, valid_owner
from .training import storage

PRIVATE = {"api_visibility": "private"}


def upload_model(registry: Models, owner: str, file) -> tuple[str, list[str]]:
    """Check an uploaded ``.safetensors`` and keep it as ``owner``'s own model. Returns its name
    and the names of ``owner``'s models removed to stay within the quota. A bad file changes
    nothing and leaves nothing behind (Gradio's copy of the upload included)."""
    if file is None:
        raise gr.Error("Choose a .safetensors file first.")
    path = Path(file if isinstance(file, str) else file.name)
    try:
        if path.suffix.lower() != ".safetensors":
            raise gr.Error("Only .safetensors checkpoints are accepted (a pickled .pt/.pth file could run code).")
        return _keep(registry, owner, path)
    finally:
        discard_upload(path)


def _keep(registry: Models, owner: str, path: Path) -> tuple[str, list[str]]:
    target = registry.new_file(owner, safe_name(path.stem))
    staging = target.with_name(f".{target.name}.tmp")
    try:
        with storage(), registry.reserving(path.stat().st_size, "this model"):
            shutil.copyfile(path, staging)
        load_classifier(staging, device="cpu", fast=False)  # full check: metadata, shapes, values
        staging.replace(target)
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError, OSError) as err:
        reason = str(err).split(": ", 1)[-1]
        raise gr.Error(f"That file is not a usable model: {reason}") from None
    except Exception as err:  # noqa: BLE001 - a stranger's file: nothing it does may escape as a bare "Error"
        raise gr.Error(f"That file is not a usable model ({type(err).__name__}).") from None
    finally:
        staging.unlink(missing_ok=True)
        if not any(target.parent.iterdir()):
            target.parent.rmdir()  # a failed first upload leaves no empty folder
    return target.stem, registry.kept(owner, target)


def discard_upload(path: Path) -> None:
    """Remove Gradio's copy of an upload once it has been read (and its folder, if now empty);
    a file outside Gradio's upload folder is not an upload and is left alone."""
    from gradio.utils import get_upload_folder

    if not path.resolve().is_relative_to(Path(get_upload_folder()).resolve()):
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def build(ctx: Ctx) -> tuple[gr.Dropdown, gr.File]:
    registry = ctx.registry
    with gr.Row():
        picker = gr.Dropdown(registry.names(), value=registry.default, label="Active model", scale=2, min_width=260,
                             elem_id="model-picker")
        upload = gr.File(file_types=[".safetensors"], label="Add a model (.safetensors), for you only", scale=1,
                         min_width=200, elem_id="model-upload")
    ctx.card = gr.Markdown(model_card(registry.get(registry.default), shipped=True), elem_id="model-card")
    ctx.pickers.append(picker)
    return picker, upload


def wire(ctx: Ctx, picker: gr.Dropdown, upload: gr.File) -> None:
    """The tab's events, after every tab is built."""
    def added(owner, file):
        owner = valid_owner(owner) or new_owner()  # an upload can beat the page's first load
        try:
            name, removed = upload_model(ctx.registry, owner, file)
        except gr.Error as err:  # a warning, not an error: the picker and card stay as they were, no red badges
            gr.Warning(err.message)
            return [gr.skip()] * len(ctx.selection_outputs())
        gr.Info(f"Model {name!r} added and selected; only you can see it.")
        if removed:
            gr.Warning(removed_message(ctx.registry, removed))
        return ctx.select(owner, name)

    run, inputs, outputs = ctx.reanswer
    picker.input(ctx.select, [ctx.session, picker], ctx.selection_outputs(), **PRIVATE).then(run, inputs, outputs, **PRIVATE)
    upload.upload(added, [ctx.session, upload], ctx.selection_outputs(), **PRIVATE).then(run, inputs, outputs, **PRIVATE)
