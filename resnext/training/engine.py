"""The training engine: :func:`iter_train` sets a run up, hands it to its mode (:mod:`.quick`,
:mod:`.full`, :mod:`.distill`) and writes the checkpoint; :func:`train` runs it to the end.

Training works on a copy: the model that serves predictions is never touched. Cancelling
(``should_stop`` returning True, or closing the generator) stops between steps and writes no
file. Under ``torchrun`` full mode runs with DistributedDataParallel; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointInfo, save_checkpoint
from ..data import Dataset
from ..fast import configure_cpu_threads
from ..inference import select_device
from ..transforms import Preprocessing
from . import distill, full, quick
from .calibrate import rules_for_fine_tune
from .config import Progress, TrainConfig, TrainingCancelled, TrainResult
from .context import Best, Context, distributed, summarise
from .start import load_start_point

__all__ = ["iter_train", "train"]

RUNNERS = {"quick": quick.run, "full": full.run, "distill": distill.run}
STARTED_FROM_KEYS = ("mode", "init", "epochs", "best_epoch", "config", "seconds", "device", "date")


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
        out: checkpoint path written (atomically) at the end, best-by-validation weights, with
            verdict rules chosen on the validation photos; ``None`` writes nothing.
        should_stop: polled between steps; True ends the run with a "cancelled" event, no file.
    """
    ctx, info = _context(data, config.resolved(), should_stop)
    state = yield from RUNNERS[ctx.config.mode](ctx)
    if state is None:
        yield ctx.progress("cancelled", message="stopped; no checkpoint written")
        return
    best_state, history, best_epoch, confusion = state
    model = ctx.model
    model.load_state_dict(best_state)
    model.eval().cpu()
    val_acc, per_class = summarise(confusion, data.classes)
    result = TrainResult(
        classes=data.classes, history=history, best_epoch=best_epoch, val_acc=val_acc, per_class_acc=per_class,
        confusion=confusion.tolist(), checkpoint=None, seconds=ctx.elapsed(), model=model, preprocessing=ctx.eval_pre,
        epoch_choice=Best.rule(len(data.val)),
    )
    if out is not None and ctx.rank == 0:
        result.checkpoint = save_checkpoint(out, model, data.classes, ctx.eval_pre, _provenance(ctx, info, result))
    if ctx.world > 1:
        dist.barrier()
    yield ctx.progress("done", epoch=best_epoch, epochs=ctx.config.epochs, val_acc=val_acc,
                       message=f"kept epoch {best_epoch}, {result.epoch_choice}; validation: {result.validation_text()}")
    yield result


def _context(data: Dataset, config: TrainConfig, should_stop) -> tuple[Context, CheckpointInfo | None]:
    """The run's context: a private copy of the start point, with a new head where the classes differ."""
    device = select_device(config.device)
    if device.type == "cpu":
        configure_cpu_threads()
    rank, world = distributed()
    torch.manual_seed(config.seed + rank)
    start = time.perf_counter()
    model, info, pre = load_start_point(config.init, config.arch)
    if config.crop_fraction is not None:
        pre = dataclasses.replace(pre, resize=round(pre.input_size / config.crop_fraction))
    model = copy.deepcopy(model)  # never mutate a model someone else may be serving
    if info is None or info.classes != data.classes:
        torch.manual_seed(config.seed)  # the same new head on every rank
        model.reset_classifier(len(data.classes))
    train_size = config.image_size or pre.input_size
    # Quick mode validates (and ships) at the size its features were computed at.
    eval_pre = pre.with_size(train_size if config.mode == "quick" else (config.eval_size or train_size))
    model.to(device)
    ctx = Context(model, data, config, pre.with_size(train_size), eval_pre, device, rank, world,
                  should_stop or (lambda: False), start)
    return ctx, info


def _provenance(ctx: Context, info: CheckpointInfo | None, result: TrainResult) -> dict:
    """What the checkpoint records about how it was made (file names only, never this machine's paths)."""
    config, data = ctx.config, ctx.data
    rules = rules_for_fine_tune(result.model, data.classes, ctx.eval_pre, data.val, info.provenance if info else None,
                                data.train)
    init = config.init if config.init in ("default", "imagenet", "scratch") else Path(config.init).name
    provenance = {
        "data": {"root": Path(data.root).name, **data.report.to_dict(), "skipped": len(data.report.skipped)},
        "mode": config.mode,
        "init": init,
        "epochs": config.epochs,
        "best_epoch": result.best_epoch,
        "epoch_choice": result.epoch_choice,
        "config": {**asdict(config), "init": init, **_names_only(config)},
        "metrics": {"val_acc": result.val_acc, "val_photos": len(data.val), "per_class_val_acc": result.per_class_acc},
        "seconds": round(result.seconds, 1),
        "verdict": rules.to_dict(),
        "world_size": ctx.world,
        "device": ctx.device.type,
    }
    if info is not None:  # how the start point itself was made, one level deep
        provenance["started_from"] = {k: info.provenance[k] for k in STARTED_FROM_KEYS if k in info.provenance}
    return provenance


def _names_only(config: TrainConfig) -> dict:
    """The config's file and folder settings as names, never as paths of this machine."""
    name = lambda p: Path(p).name  # noqa: E731
    return {
        "teacher": config.teacher and name(config.teacher),
        "unlabelled": [name(p) for p in config.unlabelled],
        "negatives": [name(p) for p in config.negatives],
        "snapshot": config.snapshot and name(config.snapshot),
    }
