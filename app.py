"""ResNeXt bird classifier: the Gradio app.

    python app.py [--checkpoint PATH] [--host H] [--port P] [--share] [--device auto|cpu|cuda]

The UI only: every tensor lives in the ``resnext`` package. Nothing heavy happens at import time;
``main()`` loads the model and launches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network at start-up

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from resnext import Classifier, ImageLoadError, display_name, load_classifier  # noqa: E402

# System fonts: the page makes no request to a font CDN.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def classify(classifier: Classifier, image, top_k: int = 5):
    """Handler of the Classify button: ``{species: probability}``, the conv5 Grad-CAM overlay, a caption."""
    if image is None:
        raise gr.Error("Add a photo first: upload one, paste it, or use the webcam.")
    start = time.perf_counter()
    try:
        explanation = classifier.explain(image, k=int(top_k))
        overlay = explanation.overlay
    except (ImageLoadError, FileNotFoundError) as err:
        raise gr.Error(f"Could not read that image: {err}") from None
    elapsed = (time.perf_counter() - start) * 1000
    label = {display_name(p.label): p.prob for p in explanation.predictions}
    caption = (
        f"Where the model looked to decide **{display_name(explanation.label)}** "
        f"({explanation.prob:.0%}). <small>{elapsed:.0f} ms on {classifier.device.type.upper()} "
        f"({classifier.fast_path})</small>"
    )
    return label, overlay, caption


def build_demo(classifier: Classifier) -> gr.Blocks:
    """The app's Blocks, built without launching."""
    with gr.Blocks(title="ResNeXt bird classifier") as demo:
        gr.Markdown(
            f"# ResNeXt bird classifier\n"
            f"Knows {len(classifier.classes)} species. Shows where the network looked (Grad-CAM from its conv5 stage)."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Photo", sources=["upload", "webcam", "clipboard"])
                top_k = gr.Slider(1, min(10, len(classifier.classes)), value=min(5, len(classifier.classes)), step=1, label="Top-k")
                button = gr.Button("Classify", variant="primary")
            with gr.Column():
                label = gr.Label(label="Prediction")
                overlay = gr.Image(label="Grad-CAM (conv5)", type="numpy", interactive=False)
                caption = gr.Markdown()
        button.click(lambda img, k: classify(classifier, img, k), [image, top_k], [label, overlay, caption], api_name="classify")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ResNeXt bird classifier app")
    parser.add_argument("--checkpoint", help="model file (default: the bird model in checkpoints/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    try:
        classifier = load_classifier(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"loaded {classifier}", flush=True)
    build_demo(classifier).launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME)


if __name__ == "__main__":
    main()
