"""Full mode: fine-tune the network (everything, or conv4/conv5 and the head) on augmented
batches of in-memory photos; DistributedDataParallel under ``torchrun``."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .context import (Best, Context, augmented_training_set, eta, eval_tensors, evaluate_tensors, freeze,
                      freeze_batchnorm, lr_factor, recalibrate_batchnorm, summarise)

__all__ = ["run", "sgd_or_adamw"]


def sgd_or_adamw(ctx: Context, head: list[nn.Parameter], backbone: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The config's optimizer; the backbone at ``backbone_lr_scale`` of the head's rate, no weight
    decay on BN parameters and biases. Each group keeps its ``base_lr`` for the schedule."""
    config = ctx.config

    def groups(params, lr):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # BN and biases
        return [{"params": decay, "lr": lr, "weight_decay": config.weight_decay, "base_lr": lr},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr}]

    param_groups = groups(head, config.lr) + groups(backbone, config.lr * config.backbone_lr_scale)
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(param_groups)


def _loader(ctx: Context, train_set):
    config, world = ctx.config, ctx.world
    sampler = (torch.utils.data.DistributedSampler(train_set, world, ctx.rank, shuffle=True, seed=config.seed)
               if world > 1 else None)
    workers = config.workers if config.workers is not None else (4 if ctx.device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=len(train_set) > config.batch_size * world, num_workers=workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, sampler


def run(ctx: Context):
    """Yields Progress; returns (best state, history, best epoch, confusion), or None if stopped."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    config, model = ctx.config, ctx.model
    yield ctx.progress("features", message="decoding images into memory")
    train_set = yield from augmented_training_set(ctx, ctx.train_pre.input_size)
    val = None if train_set is None else (yield from eval_tensors(ctx))
    if val is None:
        return None
    freeze(model, config.train_layers)
    model = model.to(memory_format=torch.channels_last)
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]
    optimizer = sgd_or_adamw(ctx, list(model.fc.parameters()), backbone)
    # Only the weights are averaged: BN statistics gathered under other weights would not fit the
    # average (early in a run that costs most of the accuracy); they are recomputed at the end.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=False) if config.ema else None
    net = DistributedDataParallel(model) if ctx.world > 1 else model
    loader, sampler = _loader(ctx, train_set)
    mix = None
    if config.mixup > 0:
        from torchvision.transforms import v2

        mix = v2.RandomChoice([v2.MixUp(num_classes=len(ctx.classes)), v2.CutMix(num_classes=len(ctx.classes))])
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 else None
    total = config.epochs * len(loader)
    history, best, clock = [], Best(len(ctx.data.val)), {"step": 0, "seen": 0, "t0": time.perf_counter()}
    for epoch in range(1, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        freeze_batchnorm(model, config.train_layers)
        sums = yield from _epoch(ctx, net, loader, optimizer, scaler, ema, mix, epoch, total, clock)
        if sums is None:
            return None
        record, confusion = _judge(ctx, model, val, sums, epoch)
        history.append(record)
        best.offer(epoch, record, model.state_dict(), confusion)
        yield ctx.progress("epoch", epoch=epoch, epochs=config.epochs, step=clock["step"], steps=total,
                           loss=record["loss"], train_acc=record["train_acc"], val_acc=record["val_acc"],
                           val_loss=record["val_loss"], images_per_s=clock["seen"] / (time.perf_counter() - clock["t0"]),
                           eta_s=eta(clock["t0"], clock["step"], total))
    if ema is not None:
        yield from _judge_average(ctx, ema.module, loader, val, history, best, total)
    return best.result(history)


def _epoch(ctx: Context, net, loader, optimizer, scaler, ema, mix, epoch: int, total: int, clock: dict):
    """One pass over the loader; returns (summed loss, correct, count) or None if stopped."""
    config, device = ctx.config, ctx.device
    warmup = int(config.warmup_epochs * len(loader))
    loss_sum = correct = count = 0.0
    for x, y in loader:
        if ctx.stop():
            return None
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        target = y
        if mix is not None and torch.rand(()) < config.mixup:
            x, target = mix(x, y)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(clock["step"], total, warmup)
        with torch.autocast(device.type, dtype=ctx.amp or torch.float32, enabled=ctx.amp is not None):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(ctx.model)
        clock["step"] += 1
        clock["seen"] += len(x) * ctx.world
        loss_sum += loss.item() * len(x)
        correct += (logits.argmax(1) == y).sum().item()
        count += len(x)
        yield ctx.progress("train", epoch=epoch, epochs=config.epochs, step=clock["step"], steps=total, loss=loss.item(),
                           images_per_s=clock["seen"] / (time.perf_counter() - clock["t0"]),
                           eta_s=eta(clock["t0"], clock["step"], total))
    return loss_sum, correct, count


def _judge(ctx: Context, model, val, sums, epoch: int) -> tuple[dict, torch.Tensor]:
    """The epoch's record: training loss and accuracy (reduced over ranks), validation."""
    val_loss, confusion = evaluate_tensors(model, *val, len(ctx.classes), ctx.device, ctx.amp, ctx.rank, ctx.world)
    stats = torch.tensor(sums, dtype=torch.float64)
    if ctx.world > 1:
        torch.distributed.all_reduce(stats)
    val_acc, _ = summarise(confusion, ctx.classes)
    n_val = confusion.sum().item()
    return {"epoch": epoch, "loss": stats[0].item() / stats[2].item(), "train_acc": stats[1].item() / stats[2].item(),
            "val_acc": val_acc, "val_loss": val_loss / n_val if n_val else None}, confusion


def _judge_average(ctx: Context, average, loader, val, history: list[dict], best: Best, total: int):
    """The raw weights were judged every epoch; the EMA once, here, with BN statistics of its own.
    The average wins ties, and wherever the validation photos are too few to choose (it is the
    end of the run, as the last epoch is)."""
    recalibrate_batchnorm(average, loader, ctx.device, ctx.amp)
    _, confusion = evaluate_tensors(average, *val, len(ctx.classes), ctx.device, ctx.amp, ctx.rank, ctx.world)
    ema_acc, _ = summarise(confusion, ctx.classes)
    best_acc, _ = summarise(best.confusion, ctx.classes)
    history[-1]["ema_val_acc"] = ema_acc
    if not best.by_validation or ema_acc is None or best_acc is None or ema_acc >= best_acc:
        best.state = {k: v.detach().cpu().clone() for k, v in average.state_dict().items()}
        best.epoch, best.confusion = ctx.config.epochs, confusion
    yield ctx.progress("epoch", epoch=ctx.config.epochs, epochs=ctx.config.epochs, step=total, steps=total,
                       loss=history[-1]["loss"], train_acc=history[-1]["train_acc"], val_acc=ema_acc, eta_s=0.0,
                       message="weight average (EMA) evaluated")

