"""Distill mode's throughput parts for ``train_throughput.py --mode distill``: the bare step (the
reference) and distill mode's view making as it was until issue #36 (one photo at a time), which
the batched views are measured against on the CPU."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from resnext import resnext50_32x4d
from resnext.training.augment import synthetic_nonphoto, zoom_out
from resnext.training.teacher import Teacher


def bare_step(device: torch.device, size: int, teacher_size: int, batch: int, amp, teacher_backbone):
    """The step everyone would write: ResNeXt-50 at ``size`` learning from the MobileNetV2 teacher
    at ``teacher_size`` on ready tensors on the device; autocast, channels_last, SGD. Returns a
    function timing ``steps`` steps (images/s)."""
    student = resnext50_32x4d(100).to(device).to(memory_format=torch.channels_last).train()
    teacher = Teacher(teacher_backbone, 100, size=teacher_size).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, teacher_size, teacher_size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def run(steps: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                t_logits, _ = teacher(x)
                xs = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                logits = student(xs.contiguous(memory_format=torch.channels_last)).float()
                loss = F.kl_div(F.log_softmax(logits, 1), F.softmax(t_logits.float(), 1), reduction="batchmean") \
                    + F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        sync(device)
        return steps * batch / (time.perf_counter() - start)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PerPhotoViews:
    """Distill mode's views until #36: torchvision v2 on each decoded uint8 photo, one at a time."""

    def __init__(self, size: int, config, backgrounds, generator: torch.Generator):
        from torchvision.transforms import v2

        self.size, self.config, self.backgrounds, self.g = size, config, backgrounds, generator
        self.crop = v2.RandomResizedCrop(size, scale=(config.min_scale, 1.0), antialias=True)
        self.wide_crop = v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)
        self.colour = v2.Compose([v2.RandomHorizontalFlip(), v2.TrivialAugmentWide()])

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.g))

    def bird(self, image):
        view = self.colour(self.crop(image)).float().div_(255)
        if self._rand() < self.config.zoom_out:
            ratio = self.config.min_zoom + (1 - self.config.min_zoom) * self._rand()
            background = None
            if self.backgrounds and self._rand() < 0.5:
                i = int(torch.randint(0, len(self.backgrounds), (1,), generator=self.g))
                background = self.colour(self.wide_crop(self.backgrounds[i])).float().div_(255)
            view, _ = zoom_out(view, ratio, background, self.g)
        return view

    def negative(self, image):
        if image is None:
            return synthetic_nonphoto(self.size, self.g)
        return self.colour(self.wide_crop(image)).float().div_(255)

    def batch(self, birds, negatives, n_birds: int, n_neg: int) -> torch.Tensor:
        pick = lambda pool, n: torch.randint(0, len(pool), (n,), generator=self.g).tolist()  # noqa: E731
        items = [self.bird(birds[i]) for i in pick(birds, n_birds)]
        for i in pick(negatives, n_neg):
            real = self._rand() < self.config.real_negatives
            items.append(self.negative(negatives[i] if real else None))
        return torch.stack(items)
