"""Distillation mode: the student (our ResNeXt) learns from an ImageNet teacher on the *same*
augmented view (Beyer et al., 2022, "a good teacher is patient and consistent"), finds the bird
(zoom-out views and the locator head), and learns what is not a bird (outlier exposure).

Each batch mixes three pools:
- labelled photos: KL to the teacher's probe + label-smoothed cross-entropy;
- unlabelled bird photos (``config.unlabelled``): the teacher's features only, so other species
  teach the student about birds without being called one of its classes;
- non-birds (``config.negatives`` and made-up non-photos): the teacher's features, a uniform
  class distribution (Hendrycks et al., 2019, "outlier exposure"), and an empty locator map.
Every view may be zoomed out (the photo shrunk to 1/4..1 of the frame with plausible
surroundings); the locator learns the covered fraction of each conv5 cell.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import IMAGE_EXTENSIONS
from ..transforms import Preprocessing, load_image, wider_shot
from .augment import coverage, cutmix, synthetic_nonphoto, zoom_out
from .context import Best, Context, decode, eta, evaluate_tensors, freeze, freeze_batchnorm, lr_factor, summarise
from .teacher import Teacher, load_teacher_backbone

__all__ = ["run", "image_files"]


def image_files(folders) -> list[Path]:
    """Every image file under ``folders`` (recursively), in a stable order."""
    out = []
    for folder in folders:
        out += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return out


class _Views:
    """Augmented views of in-memory uint8 images at the teacher's size, with the bird's box."""

    def __init__(self, size: int, pre: Preprocessing, config, backgrounds: list[Tensor], generator: torch.Generator):
        from torchvision.transforms import v2

        self.size, self.config, self.backgrounds, self.g = size, config, backgrounds, generator
        self.crop = v2.RandomResizedCrop(size, scale=(config.min_scale, 1.0), antialias=True)
        self.wide_crop = v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)
        self.colour = v2.Compose([v2.RandomHorizontalFlip(), v2.TrivialAugmentWide()])
        self.mean = torch.tensor(pre.mean).view(3, 1, 1)
        self.std = torch.tensor(pre.std).view(3, 1, 1)

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.g))

    def bird(self, image: Tensor) -> tuple[Tensor, tuple | None]:
        view = self.colour(self.crop(image)).float().div_(255)
        box = (0.0, 0.0, 1.0, 1.0)
        if self._rand() < self.config.zoom_out:
            ratio = self.config.min_zoom + (1 - self.config.min_zoom) * self._rand()
            background = None
            if self.backgrounds and self._rand() < 0.5:
                i = int(torch.randint(0, len(self.backgrounds), (1,), generator=self.g))
                background = self.colour(self.wide_crop(self.backgrounds[i])).float().div_(255)
            view, box = zoom_out(view, ratio, background, self.g)
        return (view - self.mean) / self.std, box

    def negative(self, image: Tensor | None) -> tuple[Tensor, None]:
        if image is None:
            view = synthetic_nonphoto(self.size, self.g)
        else:
            view = self.colour(self.wide_crop(image)).float().div_(255)
        return (view - self.mean) / self.std, None


def _fit_teacher(ctx: Context) -> Teacher:
    """The teacher with its probe fit on the labelled training photos (each photo and its mirror)."""
    config, data, device = ctx.config, ctx.data, ctx.device
    backbone = load_teacher_backbone(config.teacher)
    teacher = Teacher(backbone, len(data.classes), size=config.teacher_size).to(device)
    pre = Preprocessing(config.teacher_size, config.teacher_size)
    feats, labels = [], []
    for i in range(0, len(data.train), 64):
        chunk = data.train[i : i + 64]
        x = torch.stack([pre(load_image(p)) for p, _ in chunk]).to(device)
        f = (teacher.features(x) + teacher.features(x.flip(-1))) / 2
        feats.append(f.cpu())
        labels += [y for _, y in chunk]
    train_acc = teacher.fit_probe(torch.cat(feats).to(device), torch.tensor(labels, device=device))
    teacher.train_acc = train_acc
    return teacher


def run(ctx: Context):
    """Yields Progress; returns (best state, history, best epoch, confusion), or None if stopped."""
    config, model = ctx.config, ctx.model
    if ctx.world > 1:
        raise ValueError("distill mode runs in one process; use full mode under torchrun")
    g = torch.Generator().manual_seed(config.seed)
    yield ctx.progress("features", message="fitting the teacher's probe")
    teacher = _fit_teacher(ctx)
    yield ctx.progress("features", message=f"teacher probe fit (train accuracy {teacher.train_acc:.1%}); decoding photos")
    side = round(config.teacher_size * 1.3)
    pools = {
        "labelled": decode([p for p, _ in ctx.data.train], side),
        "unlabelled": decode(image_files(config.unlabelled), side),
        "negatives": decode(image_files(config.negatives), side),
    }
    labels = torch.tensor([y for _, y in ctx.data.train])
    views = _Views(config.teacher_size, ctx.train_pre, config, pools["negatives"], g)
    val = _validation(ctx.data, ctx.eval_pre)
    if model.locator is None:
        model.add_locator()
    freeze(model, config.train_layers)
    model.to(ctx.device).to(memory_format=torch.channels_last)
    projection = nn.Linear(model.num_features, 1280).to(ctx.device)  # student features -> teacher's; not shipped
    optimizer = _sgd(model, projection, config)
    mix = _batch_mix(config, len(pools["unlabelled"]))
    steps_per_epoch = max(1, len(pools["labelled"]) // mix[0])
    total = config.epochs * steps_per_epoch
    history, best, clock = [], Best(len(ctx.data.val)), {"step": 0, "seen": 0, "t0": time.perf_counter()}
    for epoch in range(1, config.epochs + 1):
        model.train()
        freeze_batchnorm(model, config.train_layers)
        order = torch.randperm(len(labels), generator=g)
        sums = torch.zeros(4)  # loss, correct, count, locator loss
        for s in range(steps_per_epoch):
            if ctx.stop():
                return None
            items, y = _batch(views, pools, labels, order[s * mix[0] : (s + 1) * mix[0]], mix, config, g)
            lr = config.lr * lr_factor(clock["step"], total, int(config.warmup_epochs * steps_per_epoch))
            loss, parts = _step(ctx, teacher, projection, optimizer, lr, items, y, mix, g)
            clock["step"] += 1
            clock["seen"] += len(items)
            sums += torch.tensor([loss * mix[0], parts["correct"], mix[0], parts["locator"] * mix[0]])
            yield ctx.progress("train", epoch=epoch, epochs=config.epochs, step=clock["step"], steps=total, loss=loss,
                               images_per_s=clock["seen"] / (time.perf_counter() - clock["t0"]),
                               eta_s=eta(clock["t0"], clock["step"], total))
        record, confusion = _judge(ctx, val, sums, epoch)
        history.append(record)
        # Judged on plain and wide (1/3 of the frame) validation photos alike: visitors bring both.
        score = (record["val_acc"] + record["val_acc_third"]) / 2 if record["val_acc"] is not None else None
        best.offer(epoch, record, model.state_dict(), confusion, score)
        if config.snapshot:
            _snapshot(config.snapshot, model, ctx.classes, ctx.eval_pre, record)
        yield ctx.progress("epoch", epoch=epoch, epochs=config.epochs, step=clock["step"], steps=total,
                           loss=record["loss"], train_acc=record["train_acc"], val_acc=record["val_acc"],
                           val_loss=record["val_loss"], images_per_s=clock["seen"] / (time.perf_counter() - clock["t0"]),
                           eta_s=eta(clock["t0"], clock["step"], total),
                           message=_third_message(record))
    return best.result(history)


def _sgd(model: nn.Module, projection: nn.Module, config) -> torch.optim.Optimizer:
    """SGD-Nesterov on what trains, without weight decay on BN parameters and biases."""
    trained = [p for p in model.parameters() if p.requires_grad] + list(projection.parameters())
    return torch.optim.SGD([{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
                            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=config.lr, momentum=0.9, nesterov=True)


def _third_message(record: dict) -> str:
    third = record["val_acc_third"]
    return f"1/3-frame validation accuracy {third:.1%}" if third is not None else ""


def _batch_mix(config, unlabelled: int) -> tuple[int, int, int]:
    """(labelled, unlabelled, negatives) photos per batch."""
    n_unl = min(round(config.batch_size * config.unlabelled_fraction) if unlabelled else 0, config.batch_size // 2)
    n_neg = round(config.batch_size * config.negative_fraction)
    return config.batch_size - n_unl - n_neg, n_unl, n_neg


def _batch(views: _Views, pools: dict, labels: Tensor, idx: Tensor, mix, config, g):
    """One batch's views: labelled photos ``idx``, then random unlabelled photos and negatives."""
    _, n_unl, n_neg = mix
    unlabelled, negatives = pools["unlabelled"], pools["negatives"]
    items = [views.bird(pools["labelled"][i]) for i in idx.tolist()]
    items += [views.bird(unlabelled[i]) for i in torch.randint(0, max(1, len(unlabelled)), (n_unl,), generator=g).tolist()]
    for i in torch.randint(0, max(1, len(negatives)), (n_neg,), generator=g).tolist():
        real = negatives and float(torch.rand((), generator=g)) < config.real_negatives
        items.append(views.negative(negatives[i] if real else None))
    return items, labels[idx]


def _step(ctx: Context, teacher: Teacher, projection: nn.Module, optimizer, lr: float, items, y: Tensor, mix,
          g: torch.Generator | None = None):
    """One optimisation step; returns the loss and its parts."""
    config, model, device = ctx.config, ctx.model, ctx.device
    n_lab, n_unl, n_neg = mix
    x = torch.stack([v for v, _ in items])  # (B, 3, T, T) at the teacher's size
    mixed = cutmix(x, config.cutmix, g) if config.cutmix else torch.zeros(len(items), dtype=torch.bool)
    x, y, mixed = x.to(device), y.to(device), mixed.to(device)
    t_logits, t_feats = teacher(x)
    xs = F.interpolate(x, size=(ctx.train_pre.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=ctx.amp or torch.float32, enabled=ctx.amp is not None):
        features = model.forward_features(xs.contiguous(memory_format=torch.channels_last))  # (B, C, h, w)
        logits = model.forward_head(features).float()
        located = model.forward_locator(features).float()  # (B, h, w)
        projected = projection(features.float().mean(dim=(2, 3)))
    target_map = torch.stack([coverage(box, located.shape[-1]) for _, box in items]).to(device)
    # The teacher's probe is matched on the labelled views and on every mixed one; the labels, the
    # locator's map and "no class" (outlier exposure) hold only for the views left as they were.
    labelled = torch.arange(len(items), device=device) < n_lab
    plain = ~mixed
    temp = config.temperature
    kd_rows = F.kl_div(F.log_softmax(logits / temp, 1), F.softmax(t_logits / temp, 1), reduction="none").sum(1) * temp**2
    kd = _mean(kd_rows, labelled | mixed)
    ce = _mean(F.cross_entropy(logits, torch.cat([y, y.new_zeros(len(items) - n_lab)]), reduction="none",
                               label_smoothing=config.label_smoothing), labelled & plain)
    feat = F.smooth_l1_loss(projected, t_feats)
    loc = _mean(F.binary_cross_entropy_with_logits(located, target_map, reduction="none").mean((1, 2)), plain)
    loss = kd + config.ce_weight * ce + config.feature_weight * feat + config.locator_weight * loc
    negative = (torch.arange(len(items), device=device) >= n_lab + n_unl) & plain
    if negative.any():  # outlier exposure: a uniform class distribution on non-birds
        loss = loss + config.outlier_weight * _mean(-F.log_softmax(logits, 1).mean(1), negative)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), {"correct": (logits[:n_lab].argmax(1) == y).sum().item(), "locator": loc.item()}


def _mean(rows: Tensor, keep: Tensor) -> Tensor:
    """The mean of ``rows`` where ``keep``; 0 (still part of the graph) where none is kept."""
    return (rows * keep).sum() / keep.sum().clamp_min(1)


def _judge(ctx: Context, val, sums: Tensor, epoch: int) -> tuple[dict, Tensor]:
    """The epoch's record: training loss, validation on plain photos and on wider shots."""
    plain, labels, wide = val
    n = len(ctx.classes)
    val_loss, confusion = evaluate_tensors(ctx.model, plain, labels, n, ctx.device, ctx.amp)
    _, wide_confusion = evaluate_tensors(ctx.model, wide, labels, n, ctx.device, ctx.amp)
    n_val = confusion.sum().item()
    record = {"epoch": epoch, "loss": sums[0].item() / sums[2].item(), "train_acc": sums[1].item() / sums[2].item(),
              "locator_loss": sums[3].item() / sums[2].item(), "val_acc": summarise(confusion, ctx.classes)[0],
              "val_acc_third": summarise(wide_confusion, ctx.classes)[0], "val_loss": val_loss / n_val if n_val else None}
    return record, confusion


def _validation(data, pre: Preprocessing) -> tuple[Tensor, Tensor, Tensor]:
    """Validation photos as given and as wider shots (the bird at 1/3 of the frame)."""
    photos = [load_image(p) for p, _ in data.val]
    empty = torch.empty(0, 3, pre.input_size, pre.input_size)
    plain = torch.stack([pre(p) for p in photos]) if photos else empty
    wide = torch.stack([pre(wider_shot(p)) for p in photos]) if photos else empty
    return plain, torch.tensor([y for _, y in data.val], dtype=torch.long), wide


def _snapshot(path, model, classes, pre, record) -> None:
    """This epoch's weights, so a crash loses one epoch (resume with ``--init`` on this file)."""
    from ..checkpoint import save_checkpoint

    save_checkpoint(path, model.cpu().float().eval(), classes, pre, {"snapshot": record})
    model.to(next(model.parameters()).device)
