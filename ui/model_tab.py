"""The Model tab: the active model, adding one's own ``.safetensors``, and the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from resnext import load_classifier

from .card import model_card
from .context import Ctx
from .state import Models, safe_name

PRIVATE = {"api_visibility": "private"}


def upload_model(registry: Models, owner: str, file) -> str:
    """Check an uploaded ``.safetensors`` and keep it as ``owner``'s own model; returns its name.
    A bad file changes nothing."""
    if file is None:
        raise gr.Error("Choose a .safetensors file first.")
    path = Path(file if isinstance(file, str) else file.name)
    if path.suffix.lower() != ".safetensors":
        raise gr.Error("Only .safetensors checkpoints are accepted (a pickled .pt/.pth file could run code).")
    target = registry.new_file(owner, safe_name(path.stem))
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, staging)
    try:
        load_classifier(staging, device="cpu", fast=False)  # full check: shapes, values
    except (ValueError, FileNotFoundError) as err:
        staging.unlink(missing_ok=True)
        raise gr.Error(f"That file is not a usable model: {str(err).split(': ', 1)[-1]}") from None
    staging.replace(target)
    return target.stem


def build(ctx: Ctx) -> tuple[gr.Dropdown, gr.File]:
    registry = ctx.registry
    with gr.Row():
        picker = gr.Dropdown(registry.names(), value=registry.default, label="Active model", scale=2, min_width=260,
                             elem_id="model-picker")
        upload = gr.File(file_types=[".safetensors"], label="Add a model (.safetensors), for you only", scale=1,
                         min_width=200, elem_id="model-upload")
    ctx.card = gr.Markdown(model_card(registry.get(registry.default)), elem_id="model-card")
    ctx.pickers.append(picker)
    return picker, upload


def wire(ctx: Ctx, picker: gr.Dropdown, upload: gr.File) -> None:
    """The tab's events, after every tab is built."""
    def added(owner, file):
        name = upload_model(ctx.registry, owner, file)
        gr.Info(f"Model {name!r} added and selected; only you can see it.")
        return ctx.select(owner, name)

    run, inputs, outputs = ctx.reanswer
    picker.input(ctx.select, [ctx.session, picker], ctx.selection_outputs(), **PRIVATE).then(run, inputs, outputs, **PRIVATE)
    upload.upload(added, [ctx.session, upload], ctx.selection_outputs(), **PRIVATE).then(run, inputs, outputs, **PRIVATE)
