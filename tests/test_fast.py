"""The fast inference path must give the fp32 model's answers."""

import numpy as np
import pytest
import torch

from resnext import load_classifier
from resnext.fast import FoldedBackbone, OneDNNBackbone, configure_cpu_threads, cpu_count, fast_backbone, fold_batchnorm

from conftest import tiny_model

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def test_batchnorm_folding_is_exact_in_fp32():
    model = tiny_model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-5


@onednn
@pytest.mark.parametrize("size", [64, 80, 97])
def test_onednn_fp32_backbone_equals_the_model(size):
    model = tiny_model()
    backbone = OneDNNBackbone(model, torch.float32, input_size=64)  # packed for 64, run at any size
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        ours, reference = backbone(x), model.forward_features(x)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 1e-4


def test_folded_eager_backbone_equals_the_model():
    model = tiny_model()
    backbone = FoldedBackbone(model, torch.device("cpu"), dtype=None)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert (backbone(x) - model.forward_features(x)).abs().max() < 1e-4


def test_fast_path_is_chosen_and_named():
    _, name = fast_backbone(tiny_model(), torch.device("cpu"), 64)
    if torch.backends.mkldnn.is_available():
        assert name in ("oneDNN bf16", "oneDNN fp32")
    else:
        assert name == "folded BN fp32"


def test_fast_and_fp32_classifiers_agree(tiny_checkpoint):
    fast = load_classifier(tiny_checkpoint, device="cpu")
    exact = load_classifier(tiny_checkpoint, device="cpu", fast=False)
    assert exact.fast_path == "off" and fast.fast_path != "off"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64 + i, 80, 3), dtype=np.uint8) for i in range(64)]
    a = fast.predict(images, k=1)
    b = exact.predict(images, k=1)
    agree = np.mean([x[0].index == y[0].index for x, y in zip(a, b)])
    assert agree >= 0.98  # bf16 may flip a near-tie of this random-weight model, rarely
    assert max(abs(x[0].prob - y[0].prob) for x, y in zip(a, b)) < 0.01
    cam_fast = fast.explain(images[0], target=b[0][0].index).cam
    cam_exact = exact.explain(images[0], target=b[0][0].index).cam
    assert np.abs(cam_fast - cam_exact).max() < 0.05


def test_fast_path_leaves_the_public_model_alone(tiny_checkpoint):
    fast = load_classifier(tiny_checkpoint, device="cpu")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    assert next(fast.model.parameters()).dtype == torch.float32


def test_thread_settings(monkeypatch):
    """One thread per usable CPU, unless the user chose with OMP_NUM_THREADS. ``cpu_count`` is
    made 3 here, a number neither this machine's default nor the user's, so each branch shows."""
    import resnext.fast

    assert 1 <= cpu_count() <= (__import__("os").cpu_count() or 1)
    before = torch.get_num_threads()
    monkeypatch.setattr(resnext.fast, "cpu_count", lambda: 3)
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads() == 1  # the user's choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert configure_cpu_threads() == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
