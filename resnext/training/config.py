"""What a training run is told (:class:`TrainConfig`), what it reports (:class:`Progress`) and
what it returns (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model import ResNeXt
from ..transforms import Preprocessing

__all__ = ["MODES", "Progress", "TrainConfig", "TrainResult", "TrainingCancelled"]

MODES = ("quick", "full", "distill")


class TrainingCancelled(RuntimeError):
    """Raised by :func:`~resnext.training.train` when ``should_stop`` asked to stop; no file was written."""


@dataclass
class TrainConfig:
    """How to train. ``None`` fields get mode-dependent defaults (see :meth:`resolved`)."""

    mode: str = "quick"  # quick: frozen backbone + linear head on cached features; full: fine-tune; distill: with a teacher
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
    train_layers: str = "all"  # full and distill modes: all | conv4 (conv4, conv5 + heads) | conv5 (conv5 + heads)
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
    memory_mb: int | None = None  # full mode: the most its decoded photos may take (checked first); None: no cap
    arch: str = "resnext50_32x4d"  # for init=scratch: resnext50_32x4d | resnext101_32x8d | tiny
    # distill mode (resnext/training/distill.py): the teacher, extra photos, and the loss weights
    teacher: str | None = None  # MobileNetV2 feature weights (see resnext/training/teacher.py)
    teacher_size: int = 160  # the teacher's input; views are made at this size
    unlabelled: tuple[str, ...] = ()  # folders of bird photos without labels (teacher features only)
    negatives: tuple[str, ...] = ()  # folders of photos with no bird (outlier exposure)
    unlabelled_fraction: float = 0.2  # of each batch
    negative_fraction: float = 0.12  # of each batch (real negatives or made-up non-photos)
    real_negatives: float = 0.7  # of the negatives, the share taken from ``negatives``
    zoom_out: float = 0.5  # probability that a bird view is zoomed out
    min_zoom: float = 0.25  # smallest photo side in a zoomed-out view, as a fraction of the frame
    temperature: float = 1.0
    ce_weight: float = 0.3
    feature_weight: float = 1.0
    locator_weight: float = 1.0
    outlier_weight: float = 0.5
    # distill mode: the share of each batch's views that get a box of another view of the batch pasted in
    # (CutMix across the pools: birds into non-birds and the reverse), learnt from the teacher alone
    # ("function matching", Beyer et al., 2022): its probe's answer and its features on the mixed view
    cutmix: float = 0.0
    snapshot: str | None = None  # distill mode: write each epoch's weights here
    minutes: float | None = None  # distill mode: train this long, its schedule by the clock (see training/clock.py)

    def resolved(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "distill" and not self.teacher:
            raise ValueError("distill mode needs a teacher (the MobileNetV2 weights file)")
        for name in ("unlabelled_fraction", "negative_fraction", "real_negatives", "zoom_out", "min_zoom", "cutmix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.train_layers not in ("all", "conv4", "conv5"):
            raise ValueError(f"train_layers must be 'all', 'conv4' or 'conv5', got {self.train_layers!r}")
        if self.augment not in ("trivialaugment", "flip"):
            raise ValueError(f"augment must be 'trivialaugment' or 'flip', got {self.augment!r}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"precision must be 'auto' or 'fp32', got {self.precision!r}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise ValueError(f"memory_mb must be at least 1, got {self.memory_mb}")
        for name in ("batch_size", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.minutes is not None and not 0 < self.minutes <= 7 * 24 * 60:
            raise ValueError(f"minutes must be more than 0 and at most a week (10080), got {self.minutes}")
        if self.minutes is not None and self.mode != "distill":
            raise ValueError(f"minutes sets distill mode's schedule; {self.mode} mode counts epochs")
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
    epoch_choice: str = ""  # which rule chose best_epoch (see training.context.Best)

    def validation_text(self) -> str:
        """The validation accuracy with its count and worth (see :func:`resnext.evaluate.validation_text`)."""
        from ..evaluate import validation_text

        return validation_text(sum(self.confusion[i][i] for i in range(len(self.confusion))), sum(map(sum, self.confusion)))
