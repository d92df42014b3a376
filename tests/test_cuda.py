"""CUDA paths (skipped without a GPU; ``benchmarks/gpu_check.py`` runs them all with real data)."""

import pytest
import torch

from resnext import load_classifier
from resnext.data import load_dataset
from resnext.training import TrainConfig, train

from conftest import make_shapes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_answers_match_the_cpu(tiny_checkpoint, photo):
    gpu = load_classifier(tiny_checkpoint, device="cuda")
    cpu = load_classifier(tiny_checkpoint, device="cpu", fast=False)
    assert gpu.device.type == "cuda" and "CUDA" in gpu.fast_path
    (a,), (b,) = gpu.predict(photo, k=3), cpu.predict(photo, k=3)
    assert [p.index for p in a][:1] == [p.index for p in b][:1]
    assert abs(gpu.explain(photo, target=b[0].index).cam - cpu.explain(photo, target=b[0].index).cam).max() < 0.1


@cuda
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_cuda_fine_tunes(tmp_path, tiny_checkpoint, mode):
    data = load_dataset(make_shapes(tmp_path / "data", classes=3, per_class=8))
    result = train(data, TrainConfig(mode=mode, init=str(tiny_checkpoint), epochs=2, device="cuda", batch_size=8),
                   out=tmp_path / "out.safetensors")
    assert result.val_acc is not None and (tmp_path / "out.safetensors").is_file()
