"""Fine-tuning: quick (frozen backbone, cached features, new linear head) and full.

One engine for the app's Fine-tune tab and the ``train`` command. :func:`iter_train` is a
generator of :class:`Progress` events (a terminal progress bar and the Gradio UI both consume it)
ending with the :class:`TrainResult`; :func:`train` runs it to the end. Training works on a copy:
the model that serves predictions is never touched. Cancelling (``should_stop`` returning True, or
closing the generator) stops between steps and writes no file. Under ``torchrun`` full mode runs
with DistributedDataParallel; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from .data import Dataset
from .fast import _cpu_has_bf16, configure_cpu_threads, fast_backbone
from .inference import DEFAULT_CHECKPOINT, select_device
from .model import ResNeXt, build_model, resnext50_32x4d
from .transforms import Preprocessing, load_image

__all__ = ["Progress", "TrainConfig", "TrainResult", "TrainingCancelled", "iter_train", "train", "load_start_point"]

IMAGENET_HINT = (
    "torchvision could not download the ImageNet weights for resnext50_32x4d ({err}). With no "
    "network, copy resnext50_32x4d-1a0047aa.pth from a machine that has it into {cache} and retry."
)


class TrainingCancelled(RuntimeError):
    """Raised by :func:`train` when ``should_stop`` asked to stop; no file was written."""


STARTED_FROM_KEYS = ("mode", "init", "epochs", "best_epoch", "config", "seconds", "device", "date")


@dataclass
class TrainConfig:
    """How to train. ``None`` fields get mode-dependent defaults (see :meth:`resolved`)."""

    mode: str = "quick"  # quick: frozen backbone + linear head on cached features; full: fine-tune
    init: str = "default"  # default | imagenet | scratch | path to a checkpoint of ours
    epochs: int | None = None  # quick: 60 head epochs; full: 10
    image_size: int | None = None  # training input size; default: the start point's
    eval_size: int | None = None  # validation and shipped input size; default: image_size
    crop_fraction: float | None = None  # shipped centre crop / resize; default: the start point's (1.0: whole image)
    batch_size: int = 32
    lr: float | None = None  # head learning rate; quick 3e-3 (AdamW), full 1e-2 (SGD) / 1e-3 (AdamW)
    backbone_lr_scale: float = 0.1  # backbone lr = lr * this (full mode)
    optimizer: str = "sgd"  # full mode: sgd (Nesterov) | adamw
    weight_decay: float | None = None  # sgd 5e-4, adamw 0.05; quick 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    train_layers: str = "all"  # full mode: all | conv5 (conv5 + head only)
    augment: str = "trivialaugment"  # full mode: trivialaugment | flip (crop + flip only)
    min_scale: float = 0.25  # random-resized-crop's smallest area fraction
    mixup: float = 0.0  # probability of mixup/cutmix per batch (full mode)
    ema: float = 0.0  # EMA decay of the weights, 0 = off (full mode)
    views: int = 4  # quick mode: views per training image (centre, flip, random crops)
    val_split: float = 0.15
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16/fp16 where fast) | fp32
    workers: int | None = None  # data-loading processes; default 0 on CPU, 4 on CUDA
    arch: str = "resnext50_32x4d"  # for init=scratch: resnext50_32x4d | resnext101_32x8d | tiny

    def resolved(self) -> "TrainConfig":
        if self.mode not in ("quick", "full"):
            raise ValueError(f"mode must be 'quick' or 'full', got {self.mode!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.train_layers not in ("all", "conv5"):
            raise ValueError(f"train_layers must be 'all' or 'conv5', got {self.train_layers!r}")
        if self.augment not in ("trivialaugment", "flip"):
            raise ValueError(f"augment must be 'trivialaugment' or 'flip', got {self.augment!r}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"precision must be 'auto' or 'fp32', got {self.precision!r}")
        for name in ("batch_size", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.crop_fraction is not None and not 0.3 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be between 0.3 and 1.0, got {self.crop_fraction}")
        for name in ("image_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and not 32 <= value <= 1024:
                raise ValueError(f"{name} must be between 32 and 1024 pixels, got {value}")
        quick = self.mode == "quick"
        adamw = quick or self.optimizer == "adamw"
        return TrainConfig(**{
            **asdict(self),
            "epochs": self.epochs or (60 if quick else 10),
            "lr": self.lr or (3e-3 if quick else (1e-3 if adamw else 1e-2)),
            "weight_decay": self.weight_decay if self.weight_decay is not None else (1e-4 if quick else (0.05 if adamw else 5e-4)),
        })


@dataclass
class Progress:
    """One step of training, for progress bars and plots."""

    stage: str  # "features" (quick mode's extraction), "train", "epoch" (end of one), "done", "cancelled"
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    images_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""


@dataclass
class TrainResult:
    """What a finished run returns (and what its checkpoint's provenance records)."""

    classes: list[str]
    history: list[dict]
    best_epoch: int
    val_acc: float | None
    per_class_acc: dict[str, float | None]
    confusion: list[list[int]]
    checkpoint: Path | None
    seconds: float
    model: ResNeXt = field(repr=False)
    preprocessing: Preprocessing = field(repr=False)


# ----------------------------------------------------------------------------- start points


def load_start_point(init: str, arch: str = "resnext50_32x4d") -> tuple[ResNeXt, CheckpointInfo | None, Preprocessing]:
    """The network to start from, its checkpoint metadata (if any) and preprocessing."""
    if init == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the default model {DEFAULT_CHECKPOINT.name} is not installed; use --init imagenet, scratch or a checkpoint path"
            )
        model, info = load_checkpoint(DEFAULT_CHECKPOINT)
        return model, info, info.preprocessing
    if init == "imagenet":
        return _imagenet_resnext50(), None, Preprocessing()
    if init == "scratch":
        builders = {
            "resnext50_32x4d": lambda: resnext50_32x4d(1000),
            "resnext101_32x8d": lambda: build_model({"layers": [3, 4, 23, 3], "cardinality": 32, "group_depth": 8, "num_classes": 1000}),
            "tiny": lambda: build_model({"layers": [1, 1, 1, 1], "cardinality": 4, "group_depth": 2, "num_classes": 10, "stem_width": 8}),
        }
        if arch not in builders:
            raise ValueError(f"unknown arch {arch!r}; use one of {sorted(builders)}")
        return builders[arch](), None, Preprocessing()
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"--init {init!r}: not default, imagenet, scratch, or an existing checkpoint file")
    model, info = load_checkpoint(path)
    return model, info, info.preprocessing


def _imagenet_resnext50() -> ResNeXt:
    """torchvision's ImageNet ResNeXt-50 weights (downloaded once, cached), mapped onto ours."""
    import torchvision

    from .checkpoint import from_torchvision

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        weights = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # URLError, socket errors, HTTP errors: all mean "no weights"
        raise RuntimeError(IMAGENET_HINT.format(err=err, cache=cache)) from None
    model = resnext50_32x4d(1000)
    model.load_state_dict(from_torchvision(state))
    return model


# ----------------------------------------------------------------------------- data


def _decode(paths: list[Path], side: int) -> list[Tensor]:
    """Decode every image once into memory, shorter side resized to ``side``: uint8 (3, H, W)."""
    out = []
    for path in paths:
        image = load_image(path)
        scale = side / min(image.size)
        if scale < 1:
            size = (max(side, round(image.size[0] * scale)), max(side, round(image.size[1] * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return out


class _AugmentedImages(torch.utils.data.Dataset):
    """In-memory uint8 images -> augmented, normalized tensors."""

    def __init__(self, images: list[Tensor], labels: list[int], size: int, pre: Preprocessing, config: TrainConfig):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        steps = [v2.RandomResizedCrop(size, scale=(config.min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if config.augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def augmented_training_set(data: Dataset, size: int, pre: Preprocessing, config: TrainConfig) -> _AugmentedImages:
    """``data``'s training images decoded once (shorter side 1.3x ``size``, room for the random
    crops) with full mode's augmentation."""
    images = _decode([p for p, _ in data.train], side=max(size, round(size * 1.3)))
    return _AugmentedImages(images, [y for _, y in data.train], size, pre, config)


def _eval_tensors(paths: list[Path], pre: Preprocessing) -> Tensor:
    return torch.stack([pre(load_image(p)) for p in paths]) if paths else torch.empty(0, 3, pre.input_size, pre.input_size)


# ----------------------------------------------------------------------------- helpers


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _metrics(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, Tensor]:
    """(summed cross-entropy, confusion matrix [true, predicted])."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
    confusion = torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    return loss, confusion.view(num_classes, num_classes)


def _summarise(confusion: Tensor, classes: list[str]) -> tuple[float | None, dict[str, float | None]]:
    totals = confusion.sum(1)
    per_class = {
        name: (confusion[i, i].item() / totals[i].item() if totals[i] else None) for i, name in enumerate(classes)
    }
    n = totals.sum().item()
    return (confusion.diag().sum().item() / n if n else None), per_class


def _eta(start: float, done: int, total: int) -> float | None:
    elapsed = time.perf_counter() - start
    return elapsed / done * (total - done) if done else None


# ----------------------------------------------------------------------------- the engine


def train(data: Dataset, config: TrainConfig = TrainConfig(), out: str | os.PathLike | None = None,
          callback: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run :func:`iter_train` to the end. Raises :class:`TrainingCancelled` if stopped."""
    for event in iter_train(data, config, out, should_stop):
        if isinstance(event, TrainResult):
            return event
        if callback:
            callback(event)
        if event.stage == "cancelled":
            raise TrainingCancelled("training was stopped; no checkpoint was written")
    raise TrainingCancelled("training ended without a result")


def iter_train(data: Dataset, config: TrainConfig = TrainConfig(), out: str | os.PathLike | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[Progress | TrainResult]:
    """Train on ``data``; yield :class:`Progress` events, then the :class:`TrainResult`.

    Args:
        data: from :func:`resnext.data.load_dataset`.
        config: see :class:`TrainConfig`.
        out: checkpoint path written (atomically) at the end, best-by-validation weights;
            ``None`` writes nothing.
        should_stop: polled between steps; True ends the run with a "cancelled" event, no file.
    """
    config = config.resolved()
    stop = should_stop or (lambda: False)
    device = select_device(config.device)
    if device.type == "cpu":
        configure_cpu_threads()
    rank, world = _distributed()
    torch.manual_seed(config.seed + rank)
    start = time.perf_counter()

    model, info, pre = load_start_point(config.init, config.arch)
    if config.crop_fraction is not None:
        pre = Preprocessing(pre.input_size, round(pre.input_size / config.crop_fraction), pre.mean, pre.std, pre.interpolation)
    model = copy.deepcopy(model)  # never mutate a model someone else may be serving
    if info is None or info.classes != data.classes:
        torch.manual_seed(config.seed)  # the same new head on every rank
        model.reset_classifier(len(data.classes))
    train_size = config.image_size or pre.input_size
    # Quick mode validates (and ships) at the size its features were computed at.
    eval_pre = pre.with_size(train_size if config.mode == "quick" else (config.eval_size or train_size))
    model.to(device)

    runner = _quick if config.mode == "quick" else _full
    state = yield from runner(model, data, config, pre.with_size(train_size), eval_pre, device, rank, world, stop, start)
    if state is None:
        yield Progress("cancelled", elapsed_s=time.perf_counter() - start, message="stopped; no checkpoint written")
        return
    best_state, history, best_epoch, confusion = state
    model.load_state_dict(best_state)
    model.eval().cpu()
    val_acc, per_class = _summarise(confusion, data.classes)
    result = TrainResult(
        classes=data.classes, history=history, best_epoch=best_epoch, val_acc=val_acc, per_class_acc=per_class,
        confusion=confusion.tolist(), checkpoint=None, seconds=time.perf_counter() - start,
        model=model, preprocessing=eval_pre,
    )
    if out is not None and rank == 0:
        init = config.init if config.init in ("default", "imagenet", "scratch") else Path(config.init).name
        provenance = {
            "data": {"root": Path(data.root).name, **data.report.to_dict(), "skipped": len(data.report.skipped)},
            "mode": config.mode,
            "init": init,  # a file name, never a path of this machine
            "epochs": config.epochs,
            "best_epoch": best_epoch,
            "config": {**asdict(config), "init": init},
            "metrics": {"val_acc": val_acc, "per_class_val_acc": per_class},
            "seconds": round(result.seconds, 1),
            "world_size": world,
            "device": device.type,
        }
        if info is not None:  # how the start point itself was made, one level deep
            provenance["started_from"] = {k: info.provenance[k] for k in STARTED_FROM_KEYS if k in info.provenance}
        result.checkpoint = save_checkpoint(out, model, data.classes, eval_pre, provenance)
    if world > 1:
        dist.barrier()
    yield Progress("done", epoch=best_epoch, epochs=config.epochs, val_acc=val_acc, elapsed_s=result.seconds,
                   message=f"best validation accuracy {val_acc:.1%} at epoch {best_epoch}" if val_acc is not None else "done")
    yield result


def _quick(model, data, config, train_pre, eval_pre, device, rank, world, stop, start):
    """Frozen backbone: pooled conv5 features of a few views per image, computed once; then a
    linear head trained on them. Returns (best state, history, best epoch, confusion) or None."""
    from torchvision.transforms import v2

    model.eval()
    backbone, _ = fast_backbone(model, device, train_pre.input_size)
    crop = v2.RandomResizedCrop(train_pre.input_size, scale=(0.35, 1.0), antialias=True)

    def views(path: Path, n: int) -> list[Image.Image]:
        image = load_image(path)
        centre = train_pre.crop(image)
        out = [centre, centre.transpose(Image.Transpose.FLIP_LEFT_RIGHT)][:n]
        while len(out) < n:
            view = crop(image)
            out.append(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if len(out) % 2 else view)
        return out

    jobs = [(p, y, config.views) for p, y in data.train] + [(p, y, 1) for p, y in data.val]
    total = sum(n for _, _, n in jobs)
    feats: list[Tensor] = []
    labels: list[int] = []
    done, t0 = 0, time.perf_counter()
    batch: list[Image.Image] = []

    def flush():
        x = torch.stack([train_pre.normalize(v) for v in batch])
        with torch.inference_mode():
            f = backbone(x.to(device)).float().mean(dim=(2, 3))  # (B, C): the head's pooled input
        feats.append(f.cpu())
        batch.clear()

    for path, label, n in jobs:
        if stop():
            return None
        batch.extend(views(path, n))
        labels.extend([label] * n)
        done += n
        if len(batch) >= 16:
            flush()
            yield Progress("features", step=done, steps=total, images_per_s=done / (time.perf_counter() - t0),
                           elapsed_s=time.perf_counter() - start, eta_s=_eta(t0, done, total),
                           message="computing features (once)")
    if batch:
        flush()
    yield Progress("features", step=done, steps=total, images_per_s=done / (time.perf_counter() - t0),
                   elapsed_s=time.perf_counter() - start, eta_s=0.0, message="features ready")
    features = torch.cat(feats)
    y = torch.tensor(labels)
    n_train = sum(config.views for _ in data.train)
    x_train, y_train, x_val, y_val = features[:n_train], y[:n_train], features[n_train:], y[n_train:]

    head = nn.Linear(features.shape[1], len(data.classes))
    if model.fc.out_features == len(data.classes):
        head.load_state_dict(model.fc.state_dict())
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(config.seed)
    history, best = [], (-1.0, None, 0, None)
    step = 0
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = correct = 0.0
        for i in range(0, len(order), config.batch_size):
            if stop():
                return None
            idx = order[i : i + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, total_steps, int(config.warmup_epochs * steps_per_epoch))
            logits = head(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            step += 1
        with torch.no_grad():
            val_loss, confusion = _metrics(head(x_val), y_val, len(data.classes)) if len(x_val) else (0.0, torch.zeros(len(data.classes), len(data.classes), dtype=torch.long))
        val_acc, _ = _summarise(confusion, data.classes)
        record = {"epoch": epoch, "loss": loss_sum / len(x_train), "train_acc": correct / len(x_train),
                  "val_acc": val_acc, "val_loss": val_loss / len(x_val) if len(x_val) else None}
        history.append(record)
        score = val_acc if val_acc is not None else -record["loss"]
        if score > best[0]:
            best = (score, copy.deepcopy(head.state_dict()), epoch, confusion)
        yield Progress("epoch", epoch=epoch, epochs=config.epochs, step=step, steps=total_steps,
                       loss=record["loss"], train_acc=record["train_acc"], val_acc=val_acc, val_loss=record["val_loss"],
                       elapsed_s=time.perf_counter() - start,
                       eta_s=_eta(start, epoch, config.epochs) if epoch else None)
    _, head_state, best_epoch, confusion = best
    model.fc = nn.Linear(features.shape[1], len(data.classes))
    model.fc.load_state_dict(head_state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, history, best_epoch, confusion


def _full(model, data, config, train_pre, eval_pre, device, rank, world, stop, start):
    """Fine-tune (conv5 + head, or everything) on augmented batches of in-memory images."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    size = train_pre.input_size
    yield Progress("features", message="decoding images into memory", elapsed_s=time.perf_counter() - start)
    train_set = augmented_training_set(data, size, train_pre, config)
    val_x = _eval_tensors([p for p, _ in data.val], eval_pre)
    val_y = torch.tensor([y for _, y in data.val], dtype=torch.long)

    if config.train_layers == "conv5":
        for name, module in model.named_children():
            module.requires_grad_(name in ("conv5", "fc"))
    model = model.to(memory_format=torch.channels_last)
    head_params = list(model.fc.parameters())
    backbone_params = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]

    def groups(params, lr):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # BN and biases
        return [{"params": decay, "lr": lr, "weight_decay": config.weight_decay, "base_lr": lr},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr}]

    param_groups = groups(head_params, config.lr) + groups(backbone_params, config.lr * config.backbone_lr_scale)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(param_groups)
    # Only the weights are averaged: BN statistics gathered under other weights would not fit the
    # average (early in a run that costs most of the accuracy); they are recomputed at the end.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=False) if config.ema else None

    net = DistributedDataParallel(model) if world > 1 else model
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=config.seed) if world > 1 else None
    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(train_set) > config.batch_size * world,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    mix = None
    if config.mixup > 0:
        from torchvision.transforms import v2

        mix = v2.RandomChoice([v2.MixUp(num_classes=len(data.classes)), v2.CutMix(num_classes=len(data.classes))])
    amp = _autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    history, best = [], (-math.inf, None, 0, None)
    step, seen, t0 = 0, 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        if config.train_layers == "conv5":
            for name, module in model.named_children():
                if name not in ("conv5", "fc"):
                    module.eval()  # frozen BN statistics too
        loss_sum = correct = count = 0.0
        for x, y in loader:
            if stop():
                return None
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            target = y
            if mix is not None and torch.rand(()) < config.mixup:
                x, target = mix(x, y)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(step, total_steps, warmup)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
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
                ema.update_parameters(model)
            step += 1
            seen += len(x) * world
            loss_sum += loss.item() * len(x)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(x)
            yield Progress("train", epoch=epoch, epochs=config.epochs, step=step, steps=total_steps, loss=loss.item(),
                           images_per_s=seen / (time.perf_counter() - t0), elapsed_s=time.perf_counter() - start,
                           eta_s=_eta(t0, step, total_steps))
        # The raw weights are judged every epoch; the EMA, if any, once, at the end.
        val_loss, confusion = _evaluate_tensors(model, val_x, val_y, len(data.classes), device, amp, rank, world)
        stats = torch.tensor([loss_sum, correct, count], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        val_acc, _ = _summarise(confusion, data.classes)
        n_val = confusion.sum().item()
        record = {"epoch": epoch, "loss": stats[0].item() / stats[2].item(), "train_acc": stats[1].item() / stats[2].item(),
                  "val_acc": val_acc, "val_loss": val_loss / n_val if n_val else None}
        history.append(record)
        score = val_acc if val_acc is not None else -record["loss"]
        if score > best[0]:
            best = (score, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, epoch, confusion)
        yield Progress("epoch", epoch=epoch, epochs=config.epochs, step=step, steps=total_steps, loss=record["loss"],
                       train_acc=record["train_acc"], val_acc=val_acc, val_loss=record["val_loss"],
                       images_per_s=seen / (time.perf_counter() - t0), elapsed_s=time.perf_counter() - start,
                       eta_s=_eta(t0, step, total_steps))
    _, state, best_epoch, confusion = best
    if ema is not None:
        _recalibrate_batchnorm(ema.module, loader, device, amp)
        val_loss, ema_confusion = _evaluate_tensors(ema.module, val_x, val_y, len(data.classes), device, amp, rank, world)
        ema_acc, _ = _summarise(ema_confusion, data.classes)
        best_acc, _ = _summarise(confusion, data.classes)
        history[-1]["ema_val_acc"] = ema_acc
        if ema_acc is None or best_acc is None or ema_acc >= best_acc:  # the average wins ties
            state = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
            best_epoch, confusion = config.epochs, ema_confusion
        yield Progress("epoch", epoch=config.epochs, epochs=config.epochs, step=step, steps=total_steps,
                       loss=history[-1]["loss"], train_acc=history[-1]["train_acc"], val_acc=ema_acc,
                       elapsed_s=time.perf_counter() - start, eta_s=0.0, message="weight average (EMA) evaluated")
    return state, history, best_epoch, confusion


def _recalibrate_batchnorm(model: nn.Module, loader, device, amp, max_batches: int = 50) -> None:
    """Recompute BN running statistics for averaged weights (as SWA's ``update_bn`` does), from
    up to ``max_batches`` training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches seen
    model.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i, (x, _) in enumerate(loader):
            if i >= max_batches:
                break
            model(x.to(device).contiguous(memory_format=torch.channels_last))
    for m in bns:
        m.momentum = momenta[m]
    model.eval()


def _evaluate_tensors(model, x, y, num_classes, device, amp, rank, world) -> tuple[float, Tensor]:
    """Summed validation loss and confusion matrix, sharded over ranks and reduced."""
    model.eval()
    shard = slice(rank, None, world)
    x, y = x[shard], y[shard]
    loss, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(x), 64):
            xb = x[i : i + 64].to(device).contiguous(memory_format=torch.channels_last)
            l, c = _metrics(model(xb), y[i : i + 64].to(device), num_classes)
            loss += l
            confusion += c.cpu()
    if world > 1:
        stats = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(stats)
        dist.all_reduce(confusion)
        loss = stats.item()
    return loss, confusion
