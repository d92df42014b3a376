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

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import IMAGE_EXTENSIONS
from ..transforms import Preprocessing, load_image, wider_shot
from .augment import cutmix
from .clock import Clock
from .context import Best, Context, evaluate_tensors, freeze, freeze_batchnorm, summarise
from .teacher import Teacher, load_teacher_backbone
from .views import BatchViews, coverage_batch, load_pool

__all__ = ["run", "image_files"]


def image_files(folders) -> list[Path]:
    """Every image file under ``folders`` (recursively), in a stable order."""
    out = []
    for folder in folders:
        out += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return out


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
    pools = _pools(ctx)
    if pools is None:
        return None
    labels = torch.tensor([y for _, y in ctx.data.train], device=ctx.device)
    views = BatchViews(pools, config.teacher_size, config, ctx.train_pre.mean, ctx.train_pre.std, ctx.device, config.seed)
    val = _validation(ctx.data, ctx.eval_pre)
    if model.locator is None:
        model.add_locator()
    freeze(model, config.train_layers)
    model.to(ctx.device).to(memory_format=torch.channels_last)
    projection = nn.Linear(model.num_features, 1280).to(ctx.device)  # student features -> teacher's; not shipped
    optimizer = _sgd(model, projection, config)
    mix = _batch_mix(config, len(pools["unlabelled"]))
    clock = Clock(config, max(1, len(labels) // mix[0]))
    history, best, shown = [], Best(len(ctx.data.val)), None
    weight = torch.tensor([float(mix[0]), 1.0], device=ctx.device)  # the loss is a mean over the labelled views
    for epoch in clock.epochs():
        model.train()
        freeze_batchnorm(model, config.train_layers)
        order = _handed_to_views(torch.randperm(len(labels), generator=g).to(ctx.device), views)
        sums = torch.zeros(4, device=ctx.device)  # loss, correct, count, locator loss
        for s in clock.steps():
            if ctx.stop():
                return None
            idx = order[s * mix[0] : (s + 1) * mix[0]]
            x, boxes = _views(views, idx, mix)
            parts = _step(ctx, teacher, projection, optimizer, config.lr * clock.lr_factor(), x, boxes, labels[idx], mix,
                          views.g)
            clock.tick(len(x))
            sums[:2] += parts[:2] * weight  # in place, with no copy from the host that could wait for the GPU
            sums[2] += mix[0]
            sums[3] += parts[2] * mix[0]
            if clock.step % SHOW_EVERY == 1:  # the only wait for the GPU between judgements
                shown = parts[0].item()
            yield ctx.progress("train", epoch=epoch, epochs=clock.epochs_estimate(), step=clock.step,
                               steps=clock.steps_estimate(), loss=shown, images_per_s=clock.rate(), eta_s=clock.eta())
        if not clock.judge_now():
            continue
        record, confusion = _judge(ctx, val, sums, epoch)
        history.append(record)
        # Judged on plain and wide (1/3 of the frame) validation photos alike: visitors bring both.
        score = (record["val_acc"] + record["val_acc_third"]) / 2 if record["val_acc"] is not None else None
        best.offer(epoch, record, model.state_dict(), confusion, score)
        if config.snapshot and clock.snapshot_now():
            _snapshot(config.snapshot, model, ctx.classes, ctx.eval_pre, record)
        yield ctx.progress("epoch", epoch=epoch, epochs=clock.epochs_estimate(), step=clock.step,
                           steps=clock.steps_estimate(), loss=record["loss"], train_acc=record["train_acc"],
                           val_acc=record["val_acc"], val_loss=record["val_loss"], images_per_s=clock.rate(),
                           eta_s=clock.eta(), message=_third_message(record))
    return best.result(history)


SHOW_EVERY = 20  # the loss a step reports is read back from the device every this many steps


def _handed_to_views(order: Tensor, views: BatchViews) -> Tensor:
    """The epoch's order, which the views' own CUDA stream reads: it waits for it once an epoch."""
    if views.device.type == "cuda":
        views.stream = getattr(views, "stream", None) or torch.cuda.Stream(views.device)
        views.stream.wait_stream(torch.cuda.current_stream(views.device))
        order.record_stream(views.stream)
    return order


def _views(views: BatchViews, idx: Tensor, mix) -> tuple[Tensor, Tensor]:
    """A batch's views. On a GPU they are made on a stream of their own: what view making waits
    for (a few small reads back) does not wait for the training step, which runs meanwhile."""
    if views.device.type != "cuda":
        return views.batch(idx, mix[1], mix[2])
    main = torch.cuda.current_stream(views.device)
    with torch.cuda.stream(views.stream):
        x, boxes = views.batch(idx, mix[1], mix[2])
    main.wait_stream(views.stream)
    x.record_stream(main)
    boxes.record_stream(main)
    return x, boxes


def _pools(ctx: Context) -> dict | None:
    """The photo pools, each decoded once onto the training device (None if stopped)."""
    config, side = ctx.config, round(ctx.config.teacher_size * 1.3)
    pools = {}
    for name, paths in (("labelled", [p for p, _ in ctx.data.train]), ("unlabelled", image_files(config.unlabelled)),
                        ("negatives", image_files(config.negatives))):
        pools[name] = load_pool(paths, side, ctx.device, ctx.stop)
        if pools[name] is None:
            return None
    return pools


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


def _step(ctx: Context, teacher: Teacher, projection: nn.Module, optimizer, lr: float, x: Tensor, boxes: Tensor,
          y: Tensor, mix, g: torch.Generator | None = None):
    """One optimisation step on normalised views ``x`` (B, 3, T, T) at the teacher's size and the
    birds' ``boxes`` (B, 4; NaN rows: no bird), both on the device; returns (loss, labelled views
    right, locator loss) as one tensor on the device: nothing here waits for the GPU."""
    config, model, device = ctx.config, ctx.model, ctx.device
    n_lab, n_unl, n_neg = mix
    n = len(x)
    mixed = cutmix(x, config.cutmix, g) if config.cutmix else torch.zeros(n, dtype=torch.bool, device=x.device)
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
    target_map = coverage_batch(boxes.to(device), located.shape[-1])
    # The teacher's probe is matched on the labelled views and on every mixed one; the labels, the
    # locator's map and "no class" (outlier exposure) hold only for the views left as they were.
    labelled = torch.arange(n, device=device) < n_lab
    plain = ~mixed
    temp = config.temperature
    kd_rows = F.kl_div(F.log_softmax(logits / temp, 1), F.softmax(t_logits / temp, 1), reduction="none").sum(1) * temp**2
    kd = _mean(kd_rows, labelled | mixed)
    ce = _mean(F.cross_entropy(logits, torch.cat([y, y.new_zeros(n - n_lab)]), reduction="none",
                               label_smoothing=config.label_smoothing), labelled & plain)
    feat = F.smooth_l1_loss(projected, t_feats)
    loc = _mean(F.binary_cross_entropy_with_logits(located, target_map, reduction="none").mean((1, 2)), plain)
    loss = kd + config.ce_weight * ce + config.feature_weight * feat + config.locator_weight * loc
    negative = (torch.arange(n, device=device) >= n_lab + n_unl) & plain
    # outlier exposure: a uniform class distribution on non-birds (0 in a batch without one)
    loss = loss + config.outlier_weight * _mean(-F.log_softmax(logits, 1).mean(1), negative)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (logits[:n_lab].argmax(1) == y).sum()
    return torch.stack([loss.detach(), correct.float(), loc.detach()])


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

    device = next(model.parameters()).device  # where it trains: it goes back there
    save_checkpoint(path, model.cpu().float().eval(), classes, pre, {"snapshot": record})
    model.to(device)
