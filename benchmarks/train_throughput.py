"""Training throughput: our engine against a plain PyTorch loop, in one run, on whatever device is here.

``--mode full`` (the default):

Both train a ResNeXt-50 32x4d from scratch with the same batch size, image size, precision (bf16
autocast where the CPU has it) and optimizer (SGD, Nesterov). The reference is the loop everyone
writes: torchvision's model, contiguous NCHW batches of ready tensors, no augmentation, eager. Ours
is ``resnext.training.iter_train`` on real photos, decoding done once, with its random-resized-crop,
flip and TrivialAugment per image included in the time. Images/s over the timed steps after
warm-up, alternating blocks of steps between the two, medians of the blocks.

    python benchmarks/train_throughput.py [--image-size 112] [--batch-size 32] [--blocks 4] [--json]

``--mode distill``: distill mode (``recipes.v6``'s engine: views made on the device, the teacher at
``--teacher-size``, the student at ``--image-size``) against the bare step on ready tensors (the
same student, teacher, batch, precision and optimizer; see ``distill_parts.bare_step``), and
view making alone, batched against one photo at a time as distill mode did before issue #36:

    python benchmarks/train_throughput.py --mode distill [--labelled DIR] [--unlabelled DIR] [--negatives DIR]
        [--teacher FILE] [--image-size 112] [--teacher-size 224] [--batch-size 256] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnext import resnext50_32x4d, save_checkpoint  # noqa: E402
from resnext.data import load_dataset  # noqa: E402
from resnext.fast import configure_cpu_threads  # noqa: E402
from resnext.training import TrainConfig, iter_train  # noqa: E402
from resnext.training.context import autocast_dtype  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cub100" / "train"


def photo_folder(work: Path, classes: int = 10, per_class: int = 16) -> Path:
    """Real photos if ../shared is here, else generated ones (the work per image is the same)."""
    if DATA.is_dir():
        return DATA
    rng = np.random.default_rng(0)
    for c in range(classes):
        (work / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (227, 227, 3), dtype=np.uint8)).save(work / f"class_{c}" / f"{i}.jpg")
    return work


def block_rates(events, steps: int, batch: int, warm_up: int = 0):
    """Images/s of each block of ``steps`` "train" events of a training run's ``events`` (the first
    ``warm_up`` blocks after its setup dropped); the clock restarts after each block is yielded."""
    t0, count, blocks = None, 0, 0
    for event in events:
        if getattr(event, "stage", None) != "train":
            continue
        if t0 is None:
            t0, count = time.perf_counter(), 0
            continue
        count += 1
        if count == steps:
            rate = steps * batch / (time.perf_counter() - t0)
            blocks += 1
            if blocks > warm_up:
                yield rate
            t0, count = time.perf_counter(), 0  # the clock restarts when we get the CPU back


def ours(data, init: Path, size: int, batch: int, steps: int):
    """Images/s of each block of ``steps`` training steps of our engine (first block: warm-up)."""
    config = TrainConfig(mode="full", init=str(init), epochs=100, image_size=size, batch_size=batch, lr=0.1)
    return block_rates(iter_train(data, config), steps, batch)


def reference(size: int, batch: int, steps: int, amp) -> float:
    """The plain loop: torchvision model, ready tensors, autocast, SGD."""
    model = reference.model
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        reference.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reference.optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("full", "distill"), default="full")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--teacher-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (full), 256 on a GPU (distill), 64 on a CPU")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per contender")
    parser.add_argument("--labelled", type=Path, help="distill: a class-folder tree (default: cub100/train)")
    parser.add_argument("--unlabelled", type=Path, help="distill: bird photos without labels")
    parser.add_argument("--negatives", type=Path, help="distill: photos with no bird")
    parser.add_argument("--teacher", type=Path, default=ROOT.parent / "shared" / "weights" / "mobilenetv2_imagenet_features.pt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_cpu_threads()
    if args.mode == "distill":
        from distill_throughput import distill_main

        distill_main(args)
        return
    args.batch_size = args.batch_size or 32
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    data = load_dataset(photo_folder(work / "photos"), val_split=0.0)
    torch.manual_seed(0)
    init = save_checkpoint(work / "scratch.safetensors", resnext50_32x4d(len(data.classes)), data.classes)
    amp = autocast_dtype(torch.device("cpu"), "auto")

    reference.model = torchvision.models.resnext50_32x4d(num_classes=100).train()
    reference.optimizer = torch.optim.SGD(reference.model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    reference(args.image_size, args.batch_size, 2, amp)  # warm-up
    engine = ours(data, init, args.image_size, args.batch_size, args.steps)
    ours_rates, ref_rates = [], []
    for _ in range(args.blocks):  # alternate blocks, so both see the same machine
        ours_rates.append(next(engine))
        ref_rates.append(reference(args.image_size, args.batch_size, args.steps, amp))
    engine.close()
    result = {
        "ours_images_per_s": round(statistics.median(ours_rates), 1),
        "reference_images_per_s": round(statistics.median(ref_rates), 1),
        "ratio": round(statistics.median(ours_rates) / statistics.median(ref_rates), 2),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": str(amp).removeprefix("torch.") if amp else "fp32",
        "threads": torch.get_num_threads(),
        "data": "cub100/train photos" if DATA.is_dir() else "generated 227 px photos",
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"full-mode training, ResNeXt-50 32x4d, {args.image_size} px, batch {args.batch_size}, "
          f"{result['precision']}, {result['threads']} threads, {result['data']}")
    print(f"ours (augmentation included) {result['ours_images_per_s']:.1f} img/s   "
          f"plain PyTorch loop {result['reference_images_per_s']:.1f} img/s   ratio {result['ratio']:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
