import ast
import subprocess
import sys

import pytest
import torch
import torchvision

from resnext import ResNeXt, from_torchvision, resnext50_32x4d, resnext101_32x8d, resnext_tiny
from resnext.checkpoint import to_torchvision
from resnext.composition import build_model
from resnext.model import Bottleneck

from conftest import ROOT, randomize_batchnorm, tiny_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [32, 64, 97, 224])
def test_any_input_size_gives_finite_logits(size):
    model = tiny_model(num_classes=50)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 50)
    assert torch.isfinite(out).all()


def test_non_square_input():
    out = tiny_model(num_classes=7)(torch.randn(1, 3, 80, 144))
    assert out.shape == (1, 7)


def test_forward_returns_logits_not_probabilities():
    out = tiny_model()(torch.randn(4, 3, 64, 64))
    assert (out < 0).any()  # softmax output is never negative
    assert not torch.allclose(out.sum(dim=1), torch.ones(4))


def test_features_and_head_compose_to_forward():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 2, 2)  # stride 32
    torch.testing.assert_close(model.forward_head(features), model(x))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNeXt((1, 2, 1, 1), 4, 2, 10, stem_width=8, zero_init_residual=False)).train()
    model(torch.randn(3, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = resnext_tiny()
    gammas = [m.bn3.weight for m in model.modules() if isinstance(m, Bottleneck)]
    assert gammas and all((g == 0).all() for g in gammas)
    other = ResNeXt((1, 1, 1, 1), 4, 2, 10, stem_width=8, zero_init_residual=False)
    assert all((m.bn3.weight == 1).all() for m in other.modules() if isinstance(m, Bottleneck))


def test_convs_followed_by_bn_have_no_bias():
    for m in resnext_tiny().modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.bias is None


def test_projection_shortcut_only_where_shape_changes():
    model = ResNeXt((2, 2, 2, 2), 4, 2, 10, stem_width=8)
    for stage in (model.conv2, model.conv3, model.conv4, model.conv5):
        assert stage[0].downsample is not None  # width (conv2) or stride (conv3..5) changes
        assert stage[1].downsample is None  # identity, as in the article


def test_stage_widths_follow_the_article_for_32x8d():
    model = resnext101_32x8d(num_classes=10)
    outs = [stage[-1].conv3.out_channels for stage in (model.conv2, model.conv3, model.conv4, model.conv5)]
    assert outs == [256, 512, 1024, 2048]  # not 2 * cardinality * group_depth = 512, ...
    assert [s[0].conv2.groups for s in (model.conv2, model.conv5)] == [32, 32]
    assert model.conv2[0].conv2.out_channels == 256 and model.conv5[0].conv2.out_channels == 2048


@pytest.mark.parametrize(
    "ours, theirs, expected",
    [
        (resnext50_32x4d, torchvision.models.resnext50_32x4d, 25_028_904),
        (resnext101_32x8d, torchvision.models.resnext101_32x8d, 88_791_336),
    ],
)
def test_parameter_counts_equal_torchvision(ours, theirs, expected):
    assert count(ours(1000)) == expected == count(theirs())
    assert ours(50).fc.out_features == 50


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (resnext50_32x4d, torchvision.models.resnext50_32x4d),
        (resnext101_32x8d, torchvision.models.resnext101_32x8d),
    ],
)
def test_torchvision_weights_map_to_identical_logits(ours, theirs):
    torch.manual_seed(0)
    reference = randomize_batchnorm(theirs(num_classes=50)).eval()
    model = ours(num_classes=50).eval()
    model.load_state_dict(from_torchvision(reference.state_dict()))  # strict: every name maps
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_name_mapping_round_trips():
    reference = torchvision.models.resnext50_32x4d(num_classes=10).state_dict()
    ours = from_torchvision(reference)
    assert set(ours) == set(resnext50_32x4d(10).state_dict())
    back = to_torchvision(ours)
    assert list(back) == list(reference) and all(back[k] is reference[k] for k in reference)
    with_heads = ResNeXt((3, 4, 6, 3), 32, 4, 10, locator=True, bird_head=True).state_dict()
    assert list(to_torchvision(with_heads)) == list(reference)  # heads torchvision has not: left out


def test_bad_arguments_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match=r"\(3, 4, 6\)"):
        ResNeXt((3, 4, 6), 32, 4, 10)
    with pytest.raises(ValueError, match="cardinality.*0"):
        ResNeXt((1, 1, 1, 1), 0, 4, 10)
    with pytest.raises(ValueError, match="num_classes.*-1"):
        ResNeXt((1, 1, 1, 1), 2, 4, -1)
    with pytest.raises(ValueError, match="unknown architecture fields"):
        build_model({"layers": [1, 1, 1, 1], "cardinality": 2, "group_depth": 2, "num_classes": 3, "depth": 9})


def test_config_rebuilds_the_same_architecture():
    model = ResNeXt((1, 2, 1, 1), 4, 2, 10, stem_width=8)
    clone = build_model(model.config())
    assert clone.config() == model.config()
    assert count(clone) == count(model)


def test_reset_classifier():
    model = resnext_tiny(10)
    model.reset_classifier(3)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_the_model_module_imports_torch_only():
    """model.py is the network alone: importing it loads torch and no other module of the package
    (the detector, checkpoints and serving are composed with it in resnext.composition)."""
    code = ("import sys, torch; before = set(sys.modules); import resnext.model; "
            "print(sorted(set(sys.modules) - before)); print(sorted(m for m in sys.modules if m.startswith('resnext')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    new, ours = (ast.literal_eval(line) for line in done.stdout.splitlines())
    assert new == ours == ["resnext", "resnext.model"]


def test_a_network_alone_has_no_detector_and_its_config_none():
    model = resnext_tiny(3)
    assert model.detector is None and "detector" not in model.config()
    assert build_model({**model.config(), "detector": 0}).detector is None
