"""Load: the app under concurrent ``/classify`` traffic, over many requests, and beside a fine-tune.

    python benchmarks/load.py [--checkpoint PATH] [--clients 8] [--calls 25] [--requests 500] [--json]

Launches ``app.py`` on 127.0.0.1 (the default bird model if installed, else a randomly initialised
ResNeXt-50 of the same size) and drives it with ``gradio_client``:

1. warm-up: every client sends 2 requests; the server's RSS is read afterwards (the baseline).
2. burst: ``--clients`` clients send ``--calls`` requests each, all at once: success rate, p50/p95.
3. memory: more concurrent requests until ``--requests`` in all; RSS growth over the baseline
   (target <= 50 MB: Grad-CAM hooks, tensors and temporary files must not pile up). The files
   the app keeps under its work folder are counted too.
4. training: a quick fine-tune through ``/fine_tune`` (a generated 3-class zip) while the clients
   keep classifying: both must succeed, and classify answers must keep coming during the run.

Every phase stops issuing requests at ``--timeout`` seconds; what did not finish counts as failed
(``timeout=float("inf")`` from Python: no deadline, so every request is sent, whatever the speed).
"""

from __future__ import annotations

import argparse
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

RSS_GROWTH_TARGET_MB = 50


def make_photos(folder: Path, count: int = 6, seed: int = 0) -> list[Path]:
    """Photos of several sizes and formats (so the server sees varied work)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(120, 480)), int(rng.integers(120, 480))
        path = folder / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def make_zip(path: Path, classes: int = 3, per_class: int = 10, seed: int = 0) -> Path:
    """A zip of ``classes`` folders of 64 px pictures, each class its own colour."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(classes):
            colour = np.array([(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 210, 40)][c % 4])
            for i in range(per_class):
                image = np.clip(rng.normal(colour, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                buffer = tempfile.SpooledTemporaryFile()
                Image.fromarray(image).save(buffer, format="PNG")
                buffer.seek(0)
                zf.writestr(f"colours/class {c}/{i:03d}.png", buffer.read())
    return path


class Calls:
    """Outcomes of /classify calls: (finished at, seconds, error or None); thread-safe."""

    def __init__(self):
        self.records: list[tuple[float, float, str | None]] = []
        self.lock = threading.Lock()

    def add(self, finished: float, seconds: float, error: str | None) -> None:
        with self.lock:
            self.records.append((finished, seconds, error))

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        chosen = [r for r in self.records if since <= r[0] <= until]
        ok = sorted(s for _, s, e in chosen if e is None)
        errors = sorted({e for _, _, e in chosen if e is not None})
        return {
            "requests": len(chosen),
            "success_rate": round(len(ok) / len(chosen), 4) if chosen else None,
            "p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
            "p95_ms": round(1000 * ok[min(len(ok) - 1, int(0.95 * len(ok)))], 1) if ok else None,
            "errors": errors[:5],
        }


def classify_once(client: Client, photo: Path, calls: Calls, top_k: int = 5) -> None:
    start = time.perf_counter()
    error = None
    try:
        label, overlay = client.predict(handle_file(str(photo)), top_k, api_name="/classify")
        if len(label.get("confidences", [])) != top_k or not Path(overlay).is_file():
            error = f"incomplete answer: {str(label)[:80]}"
    except Exception as err:  # noqa: BLE001 - any failure is a failed request, recorded by kind
        error = f"{type(err).__name__}: {str(err)[:120]}"
    calls.add(time.monotonic(), time.perf_counter() - start, error)


def drive(clients: list[Client], photos: list[Path], calls: Calls, per_client: int | None, deadline: float,
          until: threading.Event | None = None, top_k: int = 5) -> None:
    """Every client sends ``per_client`` requests (or keeps sending until ``until`` is set), at once."""

    def loop(i: int, client: Client) -> None:
        n = 0
        while time.monotonic() < deadline and (per_client is None or n < per_client):
            if until is not None and until.is_set():
                return
            classify_once(client, photos[(i + n) % len(photos)], calls, top_k)
            n += 1
        if per_client is not None:  # requests never sent before the deadline count as failed
            for _ in range(per_client - n):
                calls.add(time.monotonic(), 0.0, "not sent before the deadline")

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(loop, range(len(clients)), clients))


def files_under(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def work_files(app: AppServer) -> int:
    """Files the app keeps in its work folder (CSV exports, models)."""
    return files_under(app.workdir / "exports") + files_under(app.workdir / "models")


def run(checkpoint: Path, work: Path, clients: int = 8, calls_per_client: int = 25, requests: int = 500,
        train: bool = True, timeout: float = 600.0, top_k: int = 5) -> dict:
    """The load run on a fresh ``app.py`` serving ``checkpoint``."""
    with AppServer(checkpoint, work / "app") as app:
        return run_on(app, work, clients, calls_per_client, requests, train, timeout, top_k)


def run_on(app: AppServer, work: Path, clients: int = 8, calls_per_client: int = 25, requests: int = 500,
           train: bool = True, timeout: float = 600.0, top_k: int = 5) -> dict:
    """The load run on a running app: a burst, then ``requests`` in all before memory is read,
    then (``train``) a quick fine-tune beside the classifying."""
    photos = make_photos(work / "photos")
    result: dict = {"checkpoint": app.checkpoint.name, "clients": clients}
    deadline = time.monotonic() + timeout
    pool = [Client(app.url, verbose=False) for _ in range(clients)]
    calls = Calls()  # every request; the phases are time windows of it
    drive(pool, photos, calls, 2, deadline, top_k=top_k)
    baseline = app.rss_mb()
    kept = work_files(app)
    burst_start = time.monotonic()
    drive(pool, photos, calls, calls_per_client, deadline, top_k=top_k)
    burst_end = time.monotonic()
    result["burst"] = calls.summary(since=burst_start, until=burst_end)
    remaining = max(0, requests - len(calls.records))
    drive(pool, photos, calls, -(-remaining // clients), deadline, top_k=top_k)
    end = app.rss_mb()
    result["memory"] = {
        "requests": len(calls.records),
        "success_rate": calls.summary()["success_rate"],
        "rss_baseline_mb": round(baseline, 1),
        "rss_end_mb": round(end, 1),
        "rss_growth_mb": round(end - baseline, 1),
        "peak_rss_mb": round(app.peak_rss_mb(), 1),
        "work_files_added": work_files(app) - kept,
        "gradio_cache_files": files_under(app.cache),
    }
    if train:
        result["training"] = train_beside_classify(app, pool, photos, work, deadline, top_k)
    return result


def train_beside_classify(app: AppServer, pool: list[Client], photos: list[Path], work: Path, deadline: float,
                          top_k: int) -> dict:
    """A quick fine-tune through /fine_tune while the clients keep classifying."""
    archive = make_zip(work / "colours.zip")
    done = threading.Event()
    outcome: dict = {}

    def fine_tune() -> None:
        start = time.monotonic()
        try:
            status, model = Client(app.url, verbose=False).predict(
                handle_file(str(archive)), "quick", 0, "load test model", api_name="/fine_tune")
            outcome.update(ok="Saved as" in status and model is not None and Path(model).is_file(), status=status[:200])
        except Exception as err:  # noqa: BLE001
            outcome.update(ok=False, status=f"{type(err).__name__}: {str(err)[:200]}")
        outcome["seconds"] = round(time.monotonic() - start, 1)
        outcome["window"] = (start, time.monotonic())
        done.set()

    calls = Calls()
    trainer = threading.Thread(target=fine_tune)
    trainer.start()
    drive(pool, photos, calls, None, deadline, until=done, top_k=top_k)
    trainer.join(timeout=None if deadline == float("inf") else max(1.0, deadline - time.monotonic()))
    if "window" not in outcome:
        return {"ok": False, "status": "did not finish before the deadline"}
    start, end = outcome.pop("window")
    during = calls.summary(since=start, until=end)
    return {**outcome, "classify_during": during}


def main() -> None:
    from latency import benchmark_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--calls", type=int, default=25, help="requests per client in the burst")
    parser.add_argument("--requests", type=int, default=500, help="requests in all before RSS is read")
    parser.add_argument("--no-train", action="store_true", help="skip the fine-tune phase")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds; later requests count as failed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load-"))
    checkpoint = benchmark_checkpoint(args.checkpoint, work)
    result = run(checkpoint, work, args.clients, args.calls, args.requests, not args.no_train, args.timeout)
    if args.json:
        print(json.dumps(result))
        return
    burst, memory = result["burst"], result["memory"]
    print(f"model: {result['checkpoint']}; {args.clients} clients")
    print(f"burst: {burst['requests']} requests, success {burst['success_rate']:.1%}, "
          f"p50 {burst['p50_ms']} ms, p95 {burst['p95_ms']} ms")
    print(f"memory: {memory['requests']} requests, success {memory['success_rate']:.1%}, RSS {memory['rss_baseline_mb']} -> "
          f"{memory['rss_end_mb']} MB, growth {memory['rss_growth_mb']} MB (target <= {RSS_GROWTH_TARGET_MB}); "
          f"peak {memory['peak_rss_mb']} MB; files added to the work folder: {memory['work_files_added']}; "
          f"Gradio cache: {memory['gradio_cache_files']} files (deleted after an hour)")
    if "training" in result:
        t = result["training"]
        during = t.get("classify_during", {})
        print(f"training: {'ok' if t['ok'] else 'FAILED'} in {t.get('seconds')} s ({t['status'][:80]}); "
              f"classify meanwhile: {during.get('requests')} answered, success {during.get('success_rate')}, "
              f"p50 {during.get('p50_ms')} ms")
    if burst["errors"]:
        print(f"burst errors: {burst['errors']}")


if __name__ == "__main__":
    main()
