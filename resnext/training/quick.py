"""Quick mode: the backbone stays frozen; pooled conv5 features of a few views per photo are
computed once, then a new linear head is trained on them (seconds per epoch, even on a CPU)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..fast import fast_backbone
from ..transforms import load_image
from .context import Best, Context, eta, lr_factor, metrics, summarise

__all__ = ["run"]


def run(ctx: Context):
    """Yields Progress; returns (best state, history, best epoch, confusion), or None if stopped."""
    cached = yield from _features(ctx)
    if cached is None:
        return None
    features, labels = cached
    n_train = ctx.config.views * len(ctx.data.train)
    result = yield from _train_head(ctx, features[:n_train], labels[:n_train], features[n_train:], labels[n_train:])
    if result is None:
        return None
    head, history, best = result
    ctx.model.fc = head
    return {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}, history, best.epoch, best.confusion


def _views(ctx: Context, path, n: int) -> list[Image.Image]:
    """The centre crop, its mirror image, then random crops (every other one mirrored)."""
    from torchvision.transforms import v2

    pre = ctx.train_pre
    crop = v2.RandomResizedCrop(pre.input_size, scale=(0.35, 1.0), antialias=True)
    image = load_image(path, shrink_to=2 * pre.resize)  # the views need no more detail than this
    centre = pre.crop(image)
    out = [centre, centre.transpose(Image.Transpose.FLIP_LEFT_RIGHT)][:n]
    while len(out) < n:
        view = crop(image)
        out.append(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if len(out) % 2 else view)
    return out


def _features(ctx: Context):
    """Pooled conv5 features of ``views`` views per training photo and one per validation photo."""
    ctx.model.eval()
    backbone, _ = fast_backbone(ctx.model, ctx.device, ctx.train_pre.input_size)
    jobs = [(p, y, ctx.config.views) for p, y in ctx.data.train] + [(p, y, 1) for p, y in ctx.data.val]
    total = sum(n for _, _, n in jobs)
    feats: list[Tensor] = []
    labels: list[int] = []
    batch: list[Image.Image] = []
    done, t0 = 0, time.perf_counter()

    def flush():
        x = torch.stack([ctx.train_pre.normalize(v) for v in batch])
        with torch.inference_mode():
            feats.append(backbone(x.to(ctx.device)).float().mean(dim=(2, 3)).cpu())  # (B, C): the head's input
        batch.clear()

    for path, label, n in jobs:
        if ctx.stop():
            return None
        batch.extend(_views(ctx, path, n))
        labels.extend([label] * n)
        done += n
        if len(batch) >= 16:
            flush()
            yield ctx.progress("features", step=done, steps=total, images_per_s=done / (time.perf_counter() - t0),
                               eta_s=eta(t0, done, total), message="computing features (once)")
    if batch:
        flush()
    yield ctx.progress("features", step=done, steps=total, images_per_s=done / (time.perf_counter() - t0),
                       eta_s=0.0, message="features ready")
    return torch.cat(feats), torch.tensor(labels)


def _train_head(ctx: Context, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor):
    """A linear head on cached features, AdamW with warm-up and cosine decay."""
    config, classes = ctx.config, ctx.classes
    head = nn.Linear(x_train.shape[1], len(classes))
    if ctx.model.fc.out_features == len(classes):
        head.load_state_dict(ctx.model.fc.state_dict())
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(config.seed)
    history, best, step = [], Best(len(x_val)), 0
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = correct = 0.0
        for i in range(0, len(order), config.batch_size):
            if ctx.stop():
                return None
            idx = order[i : i + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total, warmup)
            logits = head(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            step += 1
        with torch.no_grad():
            val_loss, confusion = metrics(head(x_val), y_val, len(classes)) if len(x_val) else \
                (0.0, torch.zeros(len(classes), len(classes), dtype=torch.long))
        val_acc, _ = summarise(confusion, classes)
        record = {"epoch": epoch, "loss": loss_sum / len(x_train), "train_acc": correct / len(x_train),
                  "val_acc": val_acc, "val_loss": val_loss / len(x_val) if len(x_val) else None}
        history.append(record)
        best.offer(epoch, record, head.state_dict(), confusion)
        yield ctx.progress("epoch", epoch=epoch, epochs=config.epochs, step=step, steps=total, loss=record["loss"],
                           train_acc=record["train_acc"], val_acc=val_acc, val_loss=record["val_loss"],
                           eta_s=eta(ctx.start, epoch, config.epochs))
    head.load_state_dict(best.state)
    return head, history, best
