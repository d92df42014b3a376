"""The public API, in one place: the endpoints ``gradio_client`` users call, with their own
functions. Everything else in the UI is private (``api_visibility="private"``).

- ``/classify(image, top_k) -> ({species: probability}, overlay)``: the default model.
- ``/answer(image, top_k) -> {verdict, bird, box, found_bird, boxed, predictions}``: the default
  model's answer as data, the verdict included (the CLI's ``--json`` record); no heatmap.
- ``/classify_many(files) -> (table, csv)``: the calling session's model (the default for a client).
- ``/fine_tune(zip, mode, epochs, name) -> (status, model file)``: starts from the default model and
  shares the one training slot (and its limits) with the Train button. The caller gets the file;
  the server keeps no copy once it is delivered, and no session can see it. A caller that
  disconnects stops its run at the next progress update.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from .answers import answer_record, classify, classify_many
from .classify_tab import ClassifyTab
from .context import Ctx
from .finetune_tab import FineTuneTab
from .state import new_owner
from .training import TrainRequest, run_training


def api_classify(ctx: Ctx, image, top_k):
    """One photo (file) and top_k -> {species: probability} and the conv5 Grad-CAM overlay."""
    shown = classify(ctx.registry.get(), image, top_k, top3=False)  # the top-3 are not returned: not drawn
    return shown.label, shown.overlay


def api_answer(ctx: Ctx, image, top_k) -> dict:
    """One photo (file) and top_k -> the answer as data, verdict included."""
    return answer_record(ctx.registry.get(), image, top_k)


def api_classify_many(ctx: Ctx, name, owner, files):
    """Several photos -> a table of each one's verdict and top-3, and the same as a CSV file."""
    return classify_many(ctx.registry.get(name, owner), files, ctx.registry.workdir / "exports")


def api_fine_tune(ctx: Ctx, zip_file, mode, epochs, name):
    """A zip of class folders, quick|full, epochs (0 = automatic), a name -> (status, model file),
    as a generator: progress lines (no file) while it trains, then the result. Gradio copies the
    file for the caller when it is yielded; the server's own copy is removed right after."""
    if mode not in ("quick", "full"):
        raise gr.Error(f"mode must be 'quick' or 'full', got {str(mode)[:20]!r}")
    try:
        epochs = int(epochs or 0)
    except (TypeError, ValueError):
        raise gr.Error(f"epochs must be a whole number, got {str(epochs)[:20]!r}") from None
    request = TrainRequest(owner=new_owner(), zip_file=zip_file, mode=mode, epochs=epochs, new_name=name or "", api=True)
    final = None
    for final in run_training(ctx.registry, request):
        if not final.done:
            yield _plain(final.status), None
    try:
        yield _plain(final.status), final.model_file
    finally:
        if final.model_file:
            Path(final.model_file).unlink(missing_ok=True)


def _plain(status_html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", status_html).split())


def register(ctx: Ctx, classify_tab: ClassifyTab, fine_tune: FineTuneTab) -> None:
    """The endpoints, on hidden buttons (and the visible "Classify all" button for ``/classify_many``);
    the parameter names are the ones clients see."""
    tab = classify_tab

    def classify_endpoint(image, k):
        return api_classify(ctx, image, k)

    def answer_endpoint(image, k):
        return api_answer(ctx, image, k)

    def classify_many_endpoint(name, session, files):
        return api_classify_many(ctx, name, session, files)

    def fine_tune_endpoint(zip_upload, train_mode, n_epochs, name):
        yield from api_fine_tune(ctx, zip_upload, train_mode, n_epochs, name)

    gr.Button(visible=False).click(classify_endpoint, [tab.photo, ctx.top_k], [tab.label, tab.overlay],
                                   api_name="classify")
    gr.Button(visible=False).click(answer_endpoint, [tab.photo, ctx.top_k], gr.JSON(visible=False), api_name="answer")
    tab.many_button.click(classify_many_endpoint, [ctx.model_name, ctx.session, tab.many], [tab.table, tab.csv_file],
                          api_name="classify_many")
    status, model_file = gr.Textbox(visible=False), gr.File(visible=False)
    gr.Button(visible=False).click(
        fine_tune_endpoint, [fine_tune.zip_file, fine_tune.mode, fine_tune.epochs, fine_tune.new_name],
        [status, model_file], api_name="fine_tune", concurrency_limit=1, concurrency_id="training")
