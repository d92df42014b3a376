import gradio as gr
import numpy as np
import pytest

import app
from resnext import display_name, load_classifier

from conftest import CLASSES


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return load_classifier(tiny_checkpoint, device="cpu")


def test_classify_returns_label_overlay_and_caption(classifier, photo):
    label, overlay, caption = app.classify(classifier, photo, 3)
    assert len(label) == 3 and all(0 <= p <= 1 for p in label.values())
    assert set(label) <= {display_name(c) for c in CLASSES}  # readable names, not folder names
    assert overlay.shape == photo.shape and overlay.dtype == np.uint8
    assert "Where the model looked" in caption and "CPU" in caption


def test_classify_refuses_empty_and_bad_input_with_a_plain_message(classifier, tmp_path):
    with pytest.raises(gr.Error, match="Add a photo"):
        app.classify(classifier, None)
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    with pytest.raises(gr.Error, match="Could not read that image"):
        app.classify(classifier, str(bad))


def test_build_demo_without_launching(classifier):
    demo = app.build_demo(classifier)
    assert isinstance(demo, gr.Blocks)
    api = [d for d in demo.config["dependencies"] if d.get("api_name") == "classify"]
    assert len(api) == 1
