"""``train_throughput.py --mode distill``: distill mode's engine against the bare step, and its
batched views against one photo at a time (see ``distill_parts``)."""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill_parts import PerPhotoViews, bare_step, sync
from resnext.data import load_dataset
from resnext.inference import select_device
from resnext.training import TrainConfig, iter_train
from resnext.training import teacher as teacher_module
from resnext.training.context import autocast_dtype, decode
from resnext.training.distill import image_files
from resnext.training.teacher import load_teacher_backbone
from resnext.training.views import BatchViews, load_pool
from train_throughput import DATA, block_rates, photo_folder


def teacher_file(path: Path, work: Path) -> Path:
    """The shared teacher if it is here, else a random MobileNetV2 saved the same way (same work)."""
    if path.is_file():
        return path
    import torchvision

    path = work / "teacher.pt"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), path)
    teacher_module.TEACHER_SHA256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return path


def engine_rates(data, config: TrainConfig, steps: int):
    """Images/s of each block of ``steps`` steps of distill mode (views included), after one
    block of warm-up."""
    return block_rates(iter_train(data, config), steps, config.batch_size, warm_up=1)


def view_rates(config: TrainConfig, labelled: list[Path], negatives: list[Path], device, batch: int):
    """(batched views/s, per-photo views/s) makers on the same photos, for alternating blocks."""
    side = round(config.teacher_size * 1.3)
    pools = {"labelled": load_pool(labelled, side, device), "negatives": load_pool(negatives, side, device)}
    pools["unlabelled"] = pools["labelled"]
    batched = BatchViews(pools, config.teacher_size, config, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device)
    old = PerPhotoViews(config.teacher_size, config, decode(negatives, side), torch.Generator().manual_seed(0))
    old_birds, old_negatives = decode(labelled, side), decode(negatives, side)
    n_neg = round(batch * config.negative_fraction)

    def new_block(reps: int = 3) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            batched.batch(torch.randint(0, len(labelled), (batch - n_neg,)), 0, n_neg)
        sync(device)
        return reps * batch / (time.perf_counter() - start)

    def old_block(reps: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            old.batch(old_birds, old_negatives, batch - n_neg, n_neg).to(device)
        sync(device)
        return reps * batch / (time.perf_counter() - start)

    return new_block, old_block


def distill_main(args) -> None:
    device = select_device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    data = load_dataset(args.labelled or photo_folder(work / "photos"), val_split=0.05)
    teacher = teacher_file(args.teacher, work)
    config = TrainConfig(mode="distill", init="scratch", epochs=1000, image_size=args.image_size, crop_fraction=1.0,
                         teacher_size=args.teacher_size, batch_size=batch, lr=0.01, teacher=str(teacher), device=str(device),
                         unlabelled=(str(args.unlabelled),) if args.unlabelled else (),
                         negatives=(str(args.negatives),) if args.negatives else (), unlabelled_fraction=0.25,
                         negative_fraction=0.15, cutmix=0.3).resolved()
    amp = autocast_dtype(device, "auto")
    bare = bare_step(device, args.image_size, args.teacher_size, batch, amp, load_teacher_backbone(teacher))
    bare(2)  # warm-up
    negatives = image_files([args.negatives])[:500] if args.negatives else [p for p, _ in data.train][:50]
    new_views, old_views = view_rates(config, [p for p, _ in data.train][:500], negatives, device, batch)
    new_views(1)
    engine = engine_rates(data, config, args.steps)
    rates = {"engine": [], "bare": [], "views_batched": [], "views_per_photo": []}
    for _ in range(args.blocks):  # alternate blocks, so all see the same machine
        rates["engine"].append(next(engine))
        rates["bare"].append(bare(args.steps))
        rates["views_batched"].append(new_views())
        rates["views_per_photo"].append(old_views())
        print("block", json.dumps({k: round(v[-1], 1) for k, v in rates.items()}), flush=True)
    engine.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "distill_images_per_s": round(med["engine"], 1), "bare_step_images_per_s": round(med["bare"], 1),
        "ratio": round(med["engine"] / med["bare"], 3),
        "views_per_s_batched": round(med["views_batched"], 1), "views_per_s_per_photo": round(med["views_per_photo"], 1),
        "views_ratio": round(med["views_batched"] / med["views_per_photo"], 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "image_size": args.image_size, "teacher_size": args.teacher_size, "batch_size": batch,
        "precision": str(amp).removeprefix("torch.") if amp else "fp32",
        "data": "given folders" if args.labelled else ("cub100/train photos" if DATA.is_dir() else "generated photos"),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"distill mode on {result['device']}: student {args.image_size} px, teacher {args.teacher_size} px, batch {batch}, "
          f"{result['precision']}")
    print(f"distill mode (views included) {result['distill_images_per_s']:.1f} img/s   bare step "
          f"{result['bare_step_images_per_s']:.1f} img/s   ratio {result['ratio']:.3f} (target >= 0.5 on a GPU)")
    print(f"views: batched {result['views_per_s_batched']:.1f}/s   one photo at a time (before #36) "
          f"{result['views_per_s_per_photo']:.1f}/s   ratio {result['views_ratio']:.2f} (target >= 1.0)")
