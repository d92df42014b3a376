"""The Fine-tune tab: a zip or named classes of photos, the settings, one progress display, the
run's plot and honest report, and the new model, which becomes the visitor's own."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import try_it, webcam
from .context import Ctx
from .state import SLOT, new_owner, valid_owner
from .training import MAX_CLASSES_UI, TrainRequest, check_data, run_training, status_html

PRIVATE = {"api_visibility": "private"}
# Short names: the legend is one line of a phone-wide plot ("validation accuracy" was cut to "valida…");
# loss and accuracy are the training photos' unless named "validation".
LINE_COLOURS = {"loss": "#2563eb", "accuracy": "#f59e0b", "validation accuracy": "#059669"}
INTRO = ("Teach the model your own classes. Upload a **zip** with one folder per class, or name classes below and "
         "add photos to each. *Quick* mode teaches only the model's last step, which turns what it sees into names "
         "(seconds to a minute on a CPU); *full* mode retrains the whole network (slower; better with many photos). "
         "The new model is yours: nobody else can see or use it.")
STARTS = [("the model in use", "current model"), ("a general photo model (ImageNet)", "ImageNet"),
          ("nothing (random weights: needs thousands of photos)", "scratch")]


@dataclass
class FineTuneTab:
    zip_file: gr.File
    names: list
    uploads: list
    groups: list
    visible_classes: gr.State
    add_class: gr.Button
    remove_class: gr.Button
    mode: gr.Radio
    start: gr.Radio
    epochs: gr.Number
    image_size: gr.Number
    new_name: gr.Textbox
    check: gr.Button
    train: gr.Button
    stop: gr.Button
    status: gr.HTML
    report: gr.Markdown
    plot: gr.LinePlot
    per_class: gr.Dataframe
    confusion: gr.Plot
    download: gr.DownloadButton
    try_it: try_it.TryIt
    webcam: webcam.Webcam


def build(ctx: Ctx) -> FineTuneTab:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(min_width=300):
            zip_file = gr.File(file_types=[".zip"], label="Zip of class folders (optional)", elem_id="zip-upload")
            names, uploads, groups = [], [], []
            for i in range(MAX_CLASSES_UI):
                with gr.Group(visible=i < 2) as group:
                    names.append(gr.Textbox(label=f"Class {i + 1} name", placeholder="e.g. Robin", elem_id=f"class-{i}"))
                    uploads.append(gr.File(file_count="multiple", file_types=["image"], label="Photos", height=120,
                                           elem_id=f"class-{i}-photos"))
                groups.append(group)
            with gr.Row():
                add_class = gr.Button("+ Add class", size="sm")
                remove_class = gr.Button("− Remove class", size="sm")
            camera = webcam.build(MAX_CLASSES_UI)
        with gr.Column(min_width=300):
            mode = gr.Radio(["quick", "full"], value="quick", label="Mode")
            start = gr.Radio(STARTS, value="current model", label="Start from")
            with gr.Row():
                epochs = gr.Number(value=0, label="Epochs (0 = automatic: 60 quick, 10 full)", precision=0, minimum=0,
                                   maximum=ctx.registry.limits.max_epochs, min_width=140)
                image_size = gr.Number(value=0, label="Image size in px (0 = the model's own)", precision=0, minimum=0,
                                       maximum=512, min_width=140)
            new_name = gr.Textbox(label="Name of the new model", placeholder="my birds", elem_id="new-name")
            with gr.Row():
                check = gr.Button("Check data", min_width=100)
                train = gr.Button("Train", variant="primary", elem_id="train", min_width=100)
                stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=100)
            # Not SLOT.status(): read once when the page is built, it would go stale for every visitor.
            status = gr.HTML(status_html("One training run at a time: if another is in progress, yours waits in the "
                                         "queue and shows its place here."), elem_id="train-status")
    report = gr.Markdown(elem_id="train-report")
    tried = try_it.build()  # hidden until a run saves a model
    # Hidden until the first epoch: gradio 6.31's LinePlot loses its colours for good when the
    # first value it receives is an empty table, so it is never sent one.
    plot = gr.LinePlot(x="epoch", y="value", color="metric", label="Loss and accuracy per epoch", color_title="",
                       visible=False, elem_id="train-plot", color_map=LINE_COLOURS, colors_in_legend=list(LINE_COLOURS))
    # Hidden until a run has results: an empty table and an empty plot frame meant nothing
    with gr.Row():
        per_class = gr.Dataframe(headers=["class", "validation accuracy", "photos"], interactive=False,
                                 elem_id="per-class", min_width=300, visible=False, wrap=True,
                                 column_widths=["36%", "40%", "24%"])
        # The title is drawn in the figure: Gradio's label floats over the plot and hid a cell on a phone
        confusion = gr.Plot(label="Confusion matrix (validation)", show_label=False, elem_id="confusion", min_width=300,
                            visible=False)
    download = gr.DownloadButton("Download the new model (.safetensors)", visible=False, elem_id="download")
    return FineTuneTab(zip_file, names, uploads, groups, gr.State(2), add_class, remove_class, mode, start, epochs,
                       image_size, new_name, check, train, stop, status, report, plot, per_class, confusion, download,
                       tried, camera)


def request(owner, current_model, zip_file, mode, start, epochs, image_size, new_name, *classes) -> TrainRequest:
    """The tab's inputs as a :class:`TrainRequest` (a new owner if the page's first load has not
    given the session one yet)."""
    return TrainRequest(owner=valid_owner(owner) or new_owner(), zip_file=zip_file, names=list(classes[:MAX_CLASSES_UI]),
                        files=list(classes[MAX_CLASSES_UI:]), mode=mode, start=start, epochs=int(epochs or 0),
                        image_size=int(image_size or 0), new_name=new_name or "", current_model=current_model)


def wire(ctx: Ctx, tab: FineTuneTab) -> None:
    """The tab's events, after every tab is built (a finished run selects its model everywhere)."""
    inputs = [ctx.session, ctx.model_name, tab.zip_file, tab.mode, tab.start, tab.epochs, tab.image_size, tab.new_name,
              *tab.names, *tab.uploads]
    results = [tab.status, tab.report, tab.plot, tab.per_class, tab.confusion, tab.download, tab.try_it.box,
               tab.try_it.photos, tab.try_it.gallery, tab.try_it.label, tab.try_it.verdict, tab.try_it.photo]

    def train(*values):
        req = request(*values)
        yield {tab.plot: gr.LinePlot(visible=False), tab.download: gr.DownloadButton(visible=False),
               tab.per_class: gr.Dataframe(value=None, visible=False), tab.confusion: gr.Plot(value=None, visible=False),
               tab.stop: gr.Button("Stop", interactive=True),
               tab.try_it.box: gr.Column(visible=False)}
        for view in run_training(ctx.registry, req):
            yield _updates(ctx, tab, req.owner, view)

    def show_classes(count, delta):
        count = max(2, min(MAX_CLASSES_UI, count + delta))
        return [count] + [gr.Group(visible=i < count) for i in range(MAX_CLASSES_UI)]

    tab.add_class.click(lambda c: show_classes(c, 1), tab.visible_classes, [tab.visible_classes] + tab.groups, **PRIVATE)
    tab.remove_class.click(lambda c: show_classes(c, -1), tab.visible_classes, [tab.visible_classes] + tab.groups,
                           **PRIVATE)
    tab.check.click(lambda z, *c: check_data(ctx.registry, z, c[:MAX_CLASSES_UI], c[MAX_CLASSES_UI:]),
                    [tab.zip_file, *tab.names, *tab.uploads], tab.report, **PRIVATE)
    run, answer_inputs, answer_outputs = ctx.reanswer
    # The one progress display is the status line; Gradio's own marks only where the run waits in
    # the queue (its place in it) on that line, nowhere else.
    tab.train.click(train, inputs, results + [tab.stop] + ctx.selection_outputs(), concurrency_limit=1, concurrency_id="training",
                    show_progress="minimal", show_progress_on=tab.status, **PRIVATE).then(run, answer_inputs, answer_outputs,
                                                                                           **PRIVATE)
    def stop(owner):
        SLOT.stop(owner)
        return gr.Button("Stopping after this step…", interactive=False)

    # The button, not the status line, says "stopping": this quick answer (queue=False) can arrive
    # after the run's own last word ("Stopped") and must not overwrite it.
    tab.stop.click(stop, ctx.session, tab.stop, queue=False, **PRIVATE)
    try_it.wire(ctx, tab.try_it)

    def add_photo(count, index, shot, *uploads):
        """A webcam shot joins a class's photos (the class shown if it was hidden); the shot is cleared."""
        index, photos = webcam.add_shot(index, shot, list(uploads))
        count = max(count, index + 1)
        return [count, *[gr.Group(visible=i < count) for i in range(MAX_CLASSES_UI)],
                *[photos if i == index else gr.skip() for i in range(MAX_CLASSES_UI)], None]

    tab.webcam.add.click(add_photo, [tab.visible_classes, tab.webcam.target, tab.webcam.shot, *tab.uploads],
                         [tab.visible_classes, *tab.groups, *tab.uploads, tab.webcam.shot], **PRIVATE)


def _updates(ctx: Ctx, tab: FineTuneTab, owner: str, view) -> dict:
    status = view.status
    if view.new_model:
        status += status_html("Try it below; it is also selected in the Classify tab, and only you can see it.")
    updates = {tab.status: status}
    if view.done:
        updates[tab.stop] = gr.Button("Stop", interactive=True)
    if view.report is not None:
        updates[tab.report] = view.report
    if view.history is not None:
        updates[tab.plot] = gr.LinePlot(value=view.history, visible=True)
    if view.per_class is not None:
        updates[tab.per_class] = gr.Dataframe(value=view.per_class, visible=True)
        updates[tab.confusion] = gr.Plot(value=view.figure, visible=True)
    if view.model_file:
        updates[tab.download] = gr.DownloadButton(value=view.model_file, visible=True)
    if view.new_model:
        updates.update(ctx.select(owner, view.new_model))
        updates.update(tab.try_it.shown(view.tries or []))
    return updates
