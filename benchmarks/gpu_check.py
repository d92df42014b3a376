"""Run every CUDA path once, for real: one command, one summary table, non-zero exit on failure.

    python benchmarks/gpu_check.py [--device cuda] [--photos 300] [--checkpoint PATH]

(a) the default model on the device against CPU fp32 on ``cub100/test`` photos: top-1 agreement
    and the largest CAM difference; (b) predict/explain at batch 1 and 32 against torchvision's
    eager fp32 and ``torch.compile`` on the device, in the same run; (c) a quick and a short full
    fine-tune on a few classes (AMP on CUDA); (d) ``torchrun`` with 1 process (and 2 where there
    are 2 GPUs) for one epoch (NCCL on CUDA, gloo on the CPU); (e) ``app.py --device ...`` answering
    one ``/classify`` through gradio_client. ``--device cpu`` runs the same steps on the CPU, so the
    script itself is known to work where there is no GPU. Needs the repository and ``../shared``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resnext import load_classifier  # noqa: E402
from resnext.checkpoint import to_torchvision  # noqa: E402
from resnext.inference import DEFAULT_CHECKPOINT  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cub100"


def test_photos(n: int) -> list[Path]:
    paths = sorted(p for p in (DATA / "test").rglob("*.jpg"))
    return paths[:: max(1, len(paths) // n)][:n]


def timed(fn, runs: int, sync) -> float:
    """Median milliseconds of ``runs`` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def agreement(args) -> dict:
    """(a) the device's answers and maps against CPU fp32's."""
    device = load_classifier(args.checkpoint, device=args.device)
    exact = load_classifier(args.checkpoint, device="cpu", fast=False)
    photos = test_photos(args.photos)
    same, cam_diff = 0, 0.0
    for i, path in enumerate(photos):
        a, b = device.predict(path, k=1)[0], exact.predict(path, k=1)[0]
        same += a[0].index == b[0].index
        if i < 30:  # maps of the same class on both
            cam_a = device.explain(path, target=b[0].index).cam
            cam_b = exact.explain(path, target=b[0].index).cam
            cam_diff = max(cam_diff, float(abs(cam_a - cam_b).max()))
    return {"top1_agreement": same / len(photos), "photos": len(photos), "max_cam_difference": round(cam_diff, 4),
            "fast_path": device.fast_path, "ok": same / len(photos) >= 0.99 and cam_diff < 0.1}


def speed(args) -> dict:
    """(b) ours against torchvision eager fp32 and torch.compile, batch 1 and 32."""
    classifier = load_classifier(args.checkpoint, device=args.device)
    dev = classifier.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    photo = test_photos(1)[0]
    size = classifier.preprocessing.input_size
    reference = torchvision.models.resnext50_32x4d(num_classes=classifier.model.num_classes)
    reference.load_state_dict(to_torchvision(classifier.model.state_dict()))
    reference = reference.eval().to(dev)
    compiled = torch.compile(reference)
    out = {}
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size, device=dev)
        photos = [photo] * batch

        def eager():
            with torch.inference_mode():
                return reference(x)

        def comp():
            with torch.inference_mode():
                return compiled(x)

        out[f"b{batch}"] = {
            "predict_ms": round(timed(lambda: classifier.predict(photos, k=5, batch_size=batch), args.runs, sync), 2),
            "torchvision_fp32_ms": round(timed(eager, args.runs, sync), 2),
            "torch_compile_ms": round(timed(comp, args.runs, sync), 2),
        }
    out["explain_b1_ms"] = round(timed(lambda: classifier.explain(photo).overlay, args.runs, sync), 2)
    out["ok"] = True
    return out


def fine_tunes(args, work: Path) -> dict:
    """(c) quick and full fine-tunes on 4 classes x 10 photos (AMP on CUDA)."""
    from resnext.data import load_dataset
    from resnext.training import TrainConfig, train

    subset = work / "four"
    for folder in sorted((DATA / "train").iterdir())[:4]:
        (subset / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:10]:
            (subset / folder.name / photo.name).symlink_to(photo)
    data = load_dataset(subset, val_split=0.3)
    out = {}
    for mode, epochs in (("quick", 20), ("full", 2)):
        start = time.perf_counter()
        result = train(data, TrainConfig(mode=mode, epochs=epochs, device=args.device, batch_size=8),
                       out=work / f"{mode}.safetensors")
        out[mode] = {"val_acc": result.val_acc, "seconds": round(time.perf_counter() - start, 1)}
    out["ok"] = all(out[m]["val_acc"] is not None for m in ("quick", "full"))
    return out


def distributed(args, work: Path) -> dict:
    """(d) torchrun, one epoch of full mode, 1 process (and 2 where there are 2 GPUs)."""
    counts = [1] + ([2] if args.device == "cuda" and torch.cuda.device_count() >= 2 else [])
    out = {}
    for n in counts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "resnext",
               "train", str(work / "four"), "--mode", "full", "--epochs", "1", "--batch-size", "4",
               "--device", args.device, "--out", str(work / f"ddp{n}.safetensors")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        out[f"nproc{n}"] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                            "tail": proc.stderr[-300:] if proc.returncode else ""}
    out["ok"] = all(v["rc"] == 0 for v in out.values())
    return out


def app_answer(args, work: Path) -> dict:
    """(e) the app on the device answers one /classify."""
    from gradio_client import Client, handle_file
    from serve import AppServer

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    with AppServer(checkpoint, work / "app", device=args.device) as app:
        start = time.perf_counter()
        top_k, overlay = Client(app.url, verbose=False).predict(handle_file(str(test_photos(1)[0])), 3,
                                                                  api_name="/classify")
        seconds = time.perf_counter() - start
    return {"answer": top_k.get("label"), "seconds": round(seconds, 2), "ok": bool(top_k.get("label")) and Path(overlay).is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["agreement", "speed", "fine_tunes", "distributed", "app"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu to try the script itself", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        steps = {"agreement": lambda: agreement(args), "speed": lambda: speed(args),
                 "fine_tunes": lambda: fine_tunes(args, Path(tmp)), "distributed": lambda: distributed(args, Path(tmp)),
                 "app": lambda: app_answer(args, Path(tmp))}
        for name, step in steps.items():
            if name in args.skip:
                continue
            start = time.perf_counter()
            try:
                results[name] = step()
            except Exception as err:  # noqa: BLE001 - every failure goes into the table
                results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-800:]}
            results[name]["step_seconds"] = round(time.perf_counter() - start, 1)
    print(f"device: {args.device} ({card}), torch {torch.__version__}")
    print("| step | ok | seconds | details |\n|---|---|---|---|")
    for name, r in results.items():
        details = {k: v for k, v in r.items() if k not in ("ok", "step_seconds", "trace")}
        print(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['step_seconds']} | {json.dumps(details)} |")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
