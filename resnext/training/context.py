"""What every training mode shares: the run's :class:`Context`, decoded photos and their
augmentation, the learning-rate schedule, evaluation and the best-epoch bookkeeping."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DataError, Dataset
from ..evaluate import TOO_FEW_TO_JUDGE
from ..fast import _cpu_has_bf16
from ..model import ResNeXt
from ..imagefile import load_image, probe_image
from ..transforms import Preprocessing
from .config import Progress, TrainConfig

__all__ = [
    "Best", "CHOOSE_EPOCH_FROM", "Context", "TRAINED_WITH", "augmented_training_set", "autocast_dtype", "check_memory",
    "decode", "distributed", "eval_tensors", "evaluate_tensors", "freeze", "kept_bytes", "lr_factor",
    "recalibrate_batchnorm", "summarise",
]

# What trains when only the top of the network does (the heads always train).
TRAINED_WITH = {"conv4": ("conv4", "conv5", "fc", "locator"), "conv5": ("conv5", "fc", "locator")}


@dataclass
class Context:
    """One run: the network being trained (a private copy), its data and settings, where it runs."""

    model: ResNeXt
    data: Dataset
    config: TrainConfig
    train_pre: Preprocessing  # what training views are made to
    eval_pre: Preprocessing  # what validation (and the shipped model) uses
    device: torch.device
    rank: int = 0
    world: int = 1
    stop: Callable[[], bool] = lambda: False
    start: float = field(default_factory=time.perf_counter)

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def amp(self) -> torch.dtype | None:
        return autocast_dtype(self.device, self.config.precision)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, stage: str, **fields) -> Progress:
        return Progress(stage, elapsed_s=self.elapsed(), **fields)


CHOOSE_EPOCH_FROM = TOO_FEW_TO_JUDGE  # validation photos needed before they choose the epoch to keep


class Best:
    """The epoch a run keeps.

    With at least :data:`CHOOSE_EPOCH_FROM` validation photos: the one with the best validation
    score (the lower validation loss on ties, then the later epoch). With fewer, the validation
    accuracy moves in steps of a third or a tenth and its first maximum is usually an epoch or two
    into the run, a head that has barely trained: then the run keeps its last epoch, the end of its
    fixed schedule (the learning rate decays to zero there). ``how`` says which rule chose.
    """

    def __init__(self, n_val: int):
        self.n_val = n_val
        self.by_validation = n_val >= CHOOSE_EPOCH_FROM
        self.key, self.state, self.epoch, self.confusion = None, None, 0, None

    @property
    def how(self) -> str:
        return self.rule(self.n_val)

    @staticmethod
    def rule(n_val: int) -> str:
        """Which rule keeps the epoch of a run with ``n_val`` validation photos, in words."""
        if n_val >= CHOOSE_EPOCH_FROM:
            return f"chosen by the best score on {n_val} validation photos"
        return (f"the last one: {n_val} validation photo{'s are' if n_val != 1 else ' is'} too few to choose "
                f"on ({CHOOSE_EPOCH_FROM} needed)")

    def offer(self, epoch: int, record: dict, state: dict, confusion: Tensor, score: float | None = None) -> None:
        if self.by_validation:
            score = record["val_acc"] if score is None else score
            key = (score, -(record["val_loss"] if record["val_loss"] is not None else 0.0), epoch)
        else:
            key = (epoch,)
        if self.key is None or key > self.key:
            self.key, self.epoch, self.confusion = key, epoch, confusion
            self.state = {k: v.detach().cpu().clone() for k, v in state.items()}

    def result(self, history: list[dict]) -> tuple[dict, list[dict], int, Tensor]:
        return self.state, history, self.epoch, self.confusion


# ----------------------------------------------------------------------------- data


KEPT_ASPECT = 2  # a photo kept in memory is at most this many times ``side`` on its longer side


def decode(paths: list[Path], side: int) -> list[Tensor]:
    """Decode every image once into memory, uint8 (3, H, W): shorter side at most ``side``, longer
    at most :data:`KEPT_ASPECT` x ``side`` (a 20:1 photo kept at ``side`` on its shorter side took
    0.94 MB)."""
    return [decode_one(path, side) for path in paths]


def decode_one(path: Path, side: int) -> Tensor:
    # Shrunk as it is decoded (a JPEG at a reduced scale already): what stays in memory is bounded
    # on both sides, whatever size the file declares.
    image = load_image(path, shrink_to=side, max_side=KEPT_ASPECT * side)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def kept_bytes(path: Path, side: int) -> int:
    """What :func:`decode_one` keeps of ``path`` in memory, from its header alone (no decoding)."""
    width, height = probe_image(path).size
    scale = min(1.0, side / min(width, height), KEPT_ASPECT * side / max(width, height))
    return 3 * max(1, round(width * scale)) * max(1, round(height * scale))


def check_memory(ctx: "Context", side: int) -> None:
    """Full mode keeps every training photo decoded and every validation photo as a tensor: refuse,
    before decoding any, a run whose photos would take more than ``config.memory_mb``."""
    if ctx.config.memory_mb is None:
        return
    val_bytes = 4 * 3 * ctx.eval_pre.input_size**2 * len(ctx.data.val)
    need = sum(kept_bytes(p, side) for p, _ in ctx.data.train) + val_bytes
    if need > ctx.config.memory_mb * 1024**2:
        raise DataError(f"full mode keeps every photo in memory, and these {len(ctx.data.train) + len(ctx.data.val):,} "
                        f"would take {need / 1024**2:,.0f} MB at {ctx.train_pre.input_size} px; this server allows "
                        f"{ctx.config.memory_mb:,} MB. Use quick mode, fewer photos or a smaller image size.")


def load_each(ctx: "Context", paths: list[Path], load: Callable[[Path], Tensor], what: str):
    """``load`` of every path, asking ``ctx.stop`` before each and reporting progress (a generator;
    returns the list, or None if stopped)."""
    out, t0 = [], time.perf_counter()
    for i, path in enumerate(paths):
        if ctx.stop():
            return None
        out.append(load(path))
        if i % 16 == 15:
            yield ctx.progress("features", step=i + 1, steps=len(paths), eta_s=eta(t0, i + 1, len(paths)),
                               message=f"decoding {what}")
    return out


class AugmentedImages(torch.utils.data.Dataset):
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


def augmented_training_set(ctx: "Context", size: int):
    """``ctx.data``'s training images decoded once (shorter side 1.3x ``size``, room for the random
    crops) with full mode's augmentation, after :func:`check_memory`; None if stopped (a generator)."""
    side = max(size, round(size * 1.3))
    check_memory(ctx, side)
    images = yield from load_each(ctx, [p for p, _ in ctx.data.train], lambda p: decode_one(p, side), "training photos")
    if images is None:
        return None
    return AugmentedImages(images, [y for _, y in ctx.data.train], size, ctx.train_pre, ctx.config)


def eval_tensors(ctx: "Context"):
    """The validation photos as the shipped model sees them, and their labels; None if stopped (a generator)."""
    pre, val = ctx.eval_pre, ctx.data.val
    x = yield from load_each(ctx, [p for p, _ in val], lambda p: pre(load_image(p)), "validation photos")
    if x is None:
        return None
    x = torch.stack(x) if x else torch.empty(0, 3, pre.input_size, pre.input_size)
    return x, torch.tensor([y for _, y in val], dtype=torch.long)


# ----------------------------------------------------------------------------- helpers


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 (or fp16) autocast where the hardware computes it fast; None means fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def eta(start: float, done: int, total: int) -> float | None:
    elapsed = time.perf_counter() - start
    return elapsed / done * (total - done) if done else None


def freeze(model: nn.Module, train_layers: str) -> None:
    """Stop gradients to the stages that do not train (see :data:`TRAINED_WITH`)."""
    if train_layers != "all":
        for name, module in model.named_children():
            module.requires_grad_(name in TRAINED_WITH[train_layers])


def freeze_batchnorm(model: nn.Module, train_layers: str) -> None:
    """Put the frozen stages in eval mode, so their BN statistics stay as they are."""
    if train_layers != "all":
        for name, module in model.named_children():
            if name not in TRAINED_WITH[train_layers]:
                module.eval()


def metrics(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, Tensor]:
    """(summed cross-entropy, confusion matrix [true, predicted])."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
    confusion = torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    return loss, confusion.view(num_classes, num_classes)


def summarise(confusion: Tensor, classes: list[str]) -> tuple[float | None, dict[str, float | None]]:
    """(overall accuracy, per-class accuracy) of a confusion matrix; None where nothing was seen."""
    totals = confusion.sum(1)
    per_class = {
        name: (confusion[i, i].item() / totals[i].item() if totals[i] else None) for i, name in enumerate(classes)
    }
    n = totals.sum().item()
    return (confusion.diag().sum().item() / n if n else None), per_class


def evaluate_tensors(model, x, y, num_classes, device, amp, rank=0, world=1) -> tuple[float, Tensor]:
    """Summed validation loss and confusion matrix, sharded over ranks and reduced."""
    model.eval()
    shard = slice(rank, None, world)
    x, y = x[shard], y[shard]
    loss, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(x), 64):
            xb = x[i : i + 64].to(device).contiguous(memory_format=torch.channels_last)
            batch_loss, batch_confusion = metrics(model(xb), y[i : i + 64].to(device), num_classes)
            loss += batch_loss
            confusion += batch_confusion.cpu()
    if world > 1:
        stats = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(stats)
        dist.all_reduce(confusion)
        loss = stats.item()
    return loss, confusion


def recalibrate_batchnorm(model: nn.Module, loader, device, amp, max_batches: int = 50) -> None:
    """Recompute BN running statistics for averaged weights (as SWA's ``update_bn`` does), from
    up to ``max_batches`` training batches. The bird detector's BN is not the ResNeXt's and is
    left alone (the forward pass never runs it)."""
    bns = [m for name, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and "detector" not in name.split(".")]
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

