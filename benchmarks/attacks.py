"""Attacks: the second round of the public-server attacks (issue 33) against a real ``app.py``.

    python benchmarks/attacks.py [--checkpoint PATH] [--only NAME ...] [--json]

Launches ``app.py`` on 127.0.0.1 (the default bird model if installed) with a 0.5 GB disk cap and a
60 s training limit, samples the server's RSS every 50 ms, and sends each hostile upload in turn,
through the same routes a browser or ``gradio_client`` uses. For each: the answer (or the one-line
reason) and how long it took, the server's peak memory during it, and whether the training slot is
free afterwards. The bars: peak under 2.5 GB, an answer within 5 s, nothing left behind; and a normal
``/classify`` p50 within 2x while two attacks run at once (the last row).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gradio_client import Client, handle_file  # noqa: E402

from serve import AppServer  # noqa: E402


def scan_bomb(folder: Path, side: int = 8000, scans: int = 3000) -> Path:
    """A progressive JPEG of ``side`` x ``side`` whose last scan is repeated to ``scans`` scans."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=75)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda"):end]
    path = folder / "scans.jpg"
    path.write_bytes(data[:end] + last * (scans - 10) + b"\xff\xd9")
    return path


def float_tiff(folder: Path, side: int = 8000) -> Path:
    array = np.zeros((side, side), np.float32)
    array[::97, ::89] = 0.5
    path = folder / "float.tif"
    Image.fromarray(array, "F").save(path, "TIFF", compression="tiff_adobe_deflate")
    return path


def zip_of(folder: Path, name: str, count: int, image: Image.Image, fmt: str) -> Path:
    """``count`` copies of one encoded ``image`` in two class folders."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            zf.writestr(f"{'ab'[i % 2]}/{i}.{fmt.lower()}", buf.getvalue())
    return path


class Sampler:
    """The server's RSS every 50 ms; ``peak()`` since the last ``reset()``."""

    def __init__(self, app: AppServer):
        self.app, self.top, self.running = app, 0.0, True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.running:
            try:
                self.top = max(self.top, self.app.rss_mb())
            except (OSError, RuntimeError):
                return
            time.sleep(0.05)

    def reset(self) -> None:
        self.top = self.app.rss_mb()

    def peak(self) -> float:
        return self.top


def call(url: str, api: str, *args) -> str:
    try:
        result = Client(url, verbose=False).predict(*args, api_name=api)
        return f"answered: {str(result)[:80]}"
    except Exception as err:  # noqa: BLE001 - the reason is what we report
        return f"refused: {str(err).splitlines()[0][:160]}"


def uploads(url: str, count: int, mb: int) -> str:
    import httpx

    payload = np.random.default_rng(0).bytes(mb * 1024**2)
    with ThreadPoolExecutor(count) as pool:
        codes = list(pool.map(lambda i: httpx.post(url + "gradio_api/upload", files={"files": (f"{i}.jpg", payload)},
                                                     timeout=120).status_code, range(count)))
    return f"{codes.count(200)} accepted, {codes.count(413)} refused (413)"


def classify_p50(url: str, photo: Path, n: int = 10) -> float:
    client = Client(url, verbose=False)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.predict(handle_file(str(photo)), 3, api_name="/classify")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "resnext50_32x4d_cub100.safetensors")
    parser.add_argument("--only", nargs="*", help="run only these attacks")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="attacks-"))
    example = sorted((ROOT / "assets").glob("*.jpg"))[0]
    long_thin = Image.new("RGB", (6000, 300), (90, 140, 60))
    attacks = {
        "scan bomb (3,000 scans, 64 MP)": lambda url: call(url, "/classify", handle_file(str(scan_bomb(folder))), 3),
        "float32 TIFF, 64 MP": lambda url: call(url, "/classify", handle_file(str(float_tiff(folder))), 3),
        "4 float32 TIFFs at once": lambda url: " | ".join(ThreadPoolExecutor(4).map(
            lambda _: call(url, "/classify", handle_file(str(float_tiff(folder))), 3), range(4))),
        "full mode, 19,000 long thin JPEGs": lambda url: call(url, "/fine_tune", handle_file(str(
            zip_of(folder, "thin19k.zip", 19_000, long_thin, "JPEG"))), "full", 1, "x"),
        "full mode, 5,000 long thin JPEGs": lambda url: call(url, "/fine_tune", handle_file(str(
            zip_of(folder, "thin5k.zip", 5_000, long_thin, "JPEG"))), "full", 1, "x"),
        "full mode, 300 long thin JPEGs (trains)": lambda url: call(url, "/fine_tune", handle_file(str(
            zip_of(folder, "thin300.zip", 300, long_thin, "JPEG"))), "full", 1, "x"),
        "19,988 PNGs of 64 MP": lambda url: call(url, "/fine_tune", handle_file(str(
            zip_of(folder, "png20k.zip", 19_988, Image.new("1", (8000, 8000)), "PNG"))), "quick", 1, "x"),
        "5,000 PNGs of 64 MP": lambda url: call(url, "/fine_tune", handle_file(str(
            zip_of(folder, "png5k.zip", 5_000, Image.new("1", (8000, 8000)), "PNG"))), "quick", 1, "x"),
        "20 uploads of 30 MB (0.5 GB cap)": lambda url: uploads(url, 20, 30),
    }
    rows = []
    env = {"RESNEXT_DISK_GB": "0.5", "RESNEXT_TRAIN_MINUTES": "1"}
    with AppServer(args.checkpoint, folder / "work", extra_env=env) as app:
        sampler = Sampler(app)
        base = classify_p50(app.url, example)
        for name, attack in attacks.items():
            if args.only and name not in args.only:
                continue
            sampler.reset()
            start = time.perf_counter()
            outcome = attack(app.url)
            seconds = time.perf_counter() - start
            free = call(app.url, "/fine_tune", None, "quick", 1, "x")  # the slot: answers at once when free
            rows.append({"attack": name, "seconds": round(seconds, 1), "peak_mb": round(sampler.peak()),
                         "outcome": outcome, "slot_free_after": "Add photos" in free or "zip" in free})
            print(rows[-1], flush=True)
        sampler.reset()
        with ThreadPoolExecutor(2) as pool:  # two attacks at once, and a normal visitor
            busy = [pool.submit(attacks["float32 TIFF, 64 MP"], app.url), pool.submit(attacks["scan bomb (3,000 scans, 64 MP)"], app.url)]
            under = classify_p50(app.url, example)
            [f.result() for f in busy]
        rows.append({"attack": "classify p50 while two run", "seconds": round(under, 3), "peak_mb": round(sampler.peak()),
                     "outcome": f"{under / base:.2f}x the p50 alone ({base:.3f} s)", "slot_free_after": None})
        print(rows[-1], flush=True)
        leftovers = [str(p.relative_to(app.workdir)) for p in (app.workdir / "jobs").rglob("*")] if (app.workdir / "jobs").exists() else []
        sampler.running = False
    if args.json:
        print(json.dumps({"rows": rows, "leftover_job_files": leftovers}, indent=1))
    else:
        print(f"\nleftover job files: {len(leftovers)}")
        for row in rows:
            print(f"{row['attack']:38s} {row['seconds']:7.1f} s  peak {row['peak_mb']:6.0f} MB  {row['outcome'][:110]}")


if __name__ == "__main__":
    main()
