"""Start-up time and memory of the app, against the floor of importing torch and gradio.

Times ``python app.py`` from launch to the first successful ``/classify`` answer over HTTP (via
gradio_client, imported before the clock starts), against ``python -c "import torch, gradio"``;
then sends more requests and reads the server's peak RSS (VmHWM). Medians over ``--repeats``.

    python benchmarks/startup.py [--checkpoint PATH] [--repeats 3] [--requests 20] [--json]

Without a checkpoint it uses the default bird model if installed, else a randomly initialised
ResNeXt-50 with 100 classes (the same size and start-up work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gradio_client import Client, handle_file  # noqa: E402

from latency import benchmark_checkpoint  # noqa: E402
from serve import ENV, AppServer  # noqa: E402


def import_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, gradio"], check=True, env=ENV, cwd=ROOT)
    return time.perf_counter() - start


def app_run(checkpoint: Path, photo: Path, requests: int, work: Path, timeout: float = 180.0) -> tuple[float, float]:
    """Seconds from launch to the first /classify answer, and peak RSS (MB) after ``requests`` more."""
    start = time.perf_counter()
    app = AppServer(checkpoint, work, timeout).start()
    try:
        client = Client(app.wait().url, verbose=False)
        client.predict(handle_file(str(photo)), 5, api_name="/classify")
        first_answer = time.perf_counter() - start
        for _ in range(requests):
            client.predict(handle_file(str(photo)), 5, api_name="/classify")
        return first_answer, app.peak_rss_mb()
    finally:
        app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="requests served before reading peak RSS")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    checkpoint = benchmark_checkpoint(args.checkpoint, work)
    photo = work / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (227, 227, 3), dtype=np.uint8)).save(photo)

    floors, starts, rss = [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load and file cache
        floors.append(import_floor())
        first, peak = app_run(checkpoint, photo, args.requests, work / f"app{len(starts)}")
        starts.append(first)
        rss.append(peak)
    result = {
        "import_floor_s": round(statistics.median(floors), 2),
        "first_answer_s": round(statistics.median(starts), 2),
        "startup_ratio": round(statistics.median(starts) / statistics.median(floors), 2),
        "peak_rss_mb": round(max(rss)),
        "requests": args.requests,
        "checkpoint": checkpoint.name,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"import torch, gradio: {result['import_floor_s']:.2f} s (floor)")
    print(f"python app.py -> first /classify answer: {result['first_answer_s']:.2f} s, "
          f"ratio {result['startup_ratio']:.2f} (target <= 2)")
    print(f"peak RSS after {args.requests} requests: {result['peak_rss_mb']} MB (target <= 1536)")


if __name__ == "__main__":
    main()
