"""The public API, in one place: the endpoints ``gradio_client`` users call, with their own
functions. Everything else in the UI is private (``api_visibility="private"``).

- ``/classify(image, top_k) -> ({species: probability}, overlay)``: the default model.
- ``/answer(image, top_k) -> {verdict, bird, box, found_bird, boxed, predictions}``: the default
  model's answer as data, the verdict included (the CLI's ``--json`` record); no heatmap.
- ``/classify_many(files) -> (table, csv)``: the calling session's model (the default for a client).
- ``/fine_tune(zip, mode, epochs, name) -> (status, model file)``: starts from the default model and
  shares the one training slot with the Train button. The new model belongs to the calling
  session: an API client gets the file; no browser session sees it.
"""

from __future__ import annotations

import re

import gradio as gr

from .answers import answer_record, classify, classify_many
from .classify_tab import ClassifyTab
from .context import Ctx
from .finetune_tab import FineTuneTab
from .state import new_owner, valid_owner
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


def api_fine_tune(ctx: Ctx, zip_file, mode, epochs, name, owner):
    """A zip of class folders, quick|full, epochs (0 = automatic), a name -> (status, model file)."""
    request = TrainRequest(owner=valid_owner(owner) or new_owner(), zip_file=zip_file, mode=mode,
                           epochs=int(epochs or 0), new_name=name or "")
    final = None
    for final in run_training(ctx.registry, request):
        pass
    return _plain(final.status), final.model_file


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

    def fine_tune_endpoint(zip_upload, train_mode, n_epochs, name, session):
        return api_fine_tune(ctx, zip_upload, train_mode, n_epochs, name, session)

    gr.Button(visible=False).click(classify_endpoint, [tab.photo, ctx.top_k], [tab.label, tab.overlay],
                                   api_name="classify")
    gr.Button(visible=False).click(answer_endpoint, [tab.photo, ctx.top_k], gr.JSON(visible=False), api_name="answer")
    tab.many_button.click(classify_many_endpoint, [ctx.model_name, ctx.session, tab.many], [tab.table, tab.csv_file],
                          api_name="classify_many")
    status, model_file = gr.Textbox(visible=False), gr.File(visible=False)
    gr.Button(visible=False).click(
        fine_tune_endpoint, [fine_tune.zip_file, fine_tune.mode, fine_tune.epochs, fine_tune.new_name, ctx.session],
        [status, model_file], api_name="fine_tune", concurrency_limit=1, concurrency_id="training")
