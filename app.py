"""ResNeXt bird classifier: the Gradio app (Classify, Fine-tune and Model tabs).

    python app.py [--checkpoint PATH] [--host H] [--port P] [--share] [--device auto|cpu|cuda]
                  [--workdir DIR] [--models-per-visitor N] [--disk-gb GB] [--max-epochs N]
                  [--train-minutes M]

The entry point a Space expects: arguments, work folder, launch. The UI lives in ``ui/``; every
tensor in the ``resnext`` package. Nothing heavy happens at import time. Writable files (uploads
being trained on, visitors' models, CSV exports, Gradio's cache) live under the work folder
(``--workdir`` or ``RESNEXT_WORKDIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network at start-up

import ui  # noqa: E402
from resnext.inference import DEFAULT_CHECKPOINT  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's memory arenas. glibc gives threads that allocate at once arenas of their own;
    with Gradio's worker threads the server's RSS grew 55-72 MB over 500-1,000 requests and then
    stayed (no leak, but memory a Space pays for); with 2 arenas it grew 23 MB
    (``benchmarks/load.py``). A no-op where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def tidy_workdir(workdir: Path) -> None:
    """At start-up: create the work folder; remove what a killed run left (its job folder, a
    checkpoint's temporary file, undelivered API models) and Gradio's cache of the last run (copies
    of private uploads and trained models, which would otherwise be served again to anyone holding
    their address). Finished models are never half-written (atomic rename).
    One app per work folder: another app's running jobs would be removed too."""
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    for folder in ("jobs", "api", "gradio-cache"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    for leftover in [*(workdir / "models").glob(".*.tmp"), *(workdir / "visitors").glob("*/.*.tmp")]:
        leftover.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ResNeXt bird classifier app")
    parser.add_argument("--checkpoint", type=Path, help="model file (default: the bird model in checkpoints/)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("RESNEXT_WORKDIR", Path(tempfile.gettempdir()) / "resnext-app")),
                        help="where uploads, visitors' models and exports are written")
    limits = parser.add_argument_group("limits for a public server (defaults: RESNEXT_* variables, else as shown)")
    limits.add_argument("--models-per-visitor", type=int, metavar="N", help="models each visitor keeps (5)")
    limits.add_argument("--disk-gb", type=float, metavar="GB", help="cap of the whole work folder (4)")
    limits.add_argument("--max-epochs", type=int, metavar="N", help="epochs of one training run (100)")
    limits.add_argument("--train-minutes", type=float, metavar="M", help="wall time of one training run (15)")
    return parser.parse_args(argv)


def limits_from(args: argparse.Namespace) -> "ui.Limits":
    """The environment's limits (``RESNEXT_*``), then the flags given."""
    base = ui.Limits.from_env()
    flags = {"models_per_visitor": args.models_per_visitor, "max_epochs": args.max_epochs,
             "disk_bytes": args.disk_gb and int(args.disk_gb * 1024**3), "train_s": args.train_minutes and args.train_minutes * 60}
    for name, value in flags.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_malloc_arenas()  # before the server starts its threads
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        sys.exit(f"error: the default bird model is not installed ({DEFAULT_CHECKPOINT.name} is not in "
                 f"checkpoints/); start the app on a model of yours with --checkpoint PATH")
    try:
        tidy_workdir(args.workdir)
        registry = ui.Models(checkpoint, args.device, args.workdir, limits=limits_from(args))
        registry.tidy()
        classifier = registry.get(registry.default)
        key = ui.signing_key(args.workdir)
    except (FileNotFoundError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    # Gradio's copies of uploads and of the files it serves live in the work folder, where the
    # app's tidying and disk cap reach them (read when the Blocks are built).
    os.environ["GRADIO_TEMP_DIR"] = str((args.workdir / "gradio-cache").resolve())
    registry.tidy_every(float(os.environ.get("RESNEXT_TIDY_SECONDS", 300)))
    # The first explanation imports grad-cam (OpenCV, matplotlib): pay that before the first visitor.
    from PIL import Image

    classifier.explain(Image.new("RGB", (64, 64)), k=1)
    print(f"loaded {classifier}", flush=True)
    ui.install()
    demo = ui.build_demo(registry, key)
    demo.queue(default_concurrency_limit=2)
    from starlette.middleware import Middleware

    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=ui.THEME, css=ui.CSS,
                max_file_size="50mb", allowed_paths=[str(ASSETS)],
                app_kwargs={"middleware": [Middleware(ui.UploadGuard, registry=registry)]})


if __name__ == "__main__":
    main()
