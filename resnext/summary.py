"""The architecture stage by stage, as the article's Table 1 shows it: what the Model tab prints."""

from __future__ import annotations

import torch
from torch import nn

from .model import ResNeXt

__all__ = ["stage_table"]


def stage_table(model: ResNeXt, input_size: int = 224) -> list[dict]:
    """One row per stage (conv1..conv5, fc): output size, channels, blocks, cardinality,
    parameters and multiply-accumulates at ``input_size``, counted with hooks on one forward pass."""
    macs: dict[nn.Module, int] = {}

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs[module] = output.numel() // output.shape[0] * k
        elif isinstance(module, nn.Linear):
            macs[module] = module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    shapes = {}
    stages = {"conv1": model.conv1, "conv2": model.conv2, "conv3": model.conv3, "conv4": model.conv4, "conv5": model.conv5}
    hooks += [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:]))) for n, m in stages.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=model.fc.weight.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    rows = []
    for name, module in stages.items():
        channels, height, width = shapes[name]
        rows.append({
            "stage": name,
            "output": f"{height}x{width}",
            "channels": channels,
            "blocks": len(module) if name != "conv1" else 1,
            "cardinality": model.cardinality if name != "conv1" else None,
            "width": module[0].conv2.out_channels if name != "conv1" else None,  # grouped 3x3 width
            "params": sum(p.numel() for p in module.parameters()),
            "macs": sum(macs.get(m, 0) for m in module.modules()),
        })
    rows.append({
        "stage": "fc", "output": "1x1", "channels": model.num_classes, "blocks": None, "cardinality": None,
        "width": None, "params": sum(p.numel() for p in model.fc.parameters()), "macs": macs.get(model.fc, 0),
    })
    return rows
