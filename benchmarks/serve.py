"""Launch ``python app.py`` on 127.0.0.1 for benchmarks and end-to-end tests, and read its memory.

    with AppServer(checkpoint, workdir) as app:
        Client(app.url).predict(...)
        app.rss_mb()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mb(pid: int, field: str) -> float:
    """A memory field of /proc/PID/status (VmRSS: now, VmHWM: peak) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class AppServer:
    """``app.py --checkpoint C --workdir W`` on a free port; Gradio's upload cache under W too.

    Entering waits until the port accepts connections (``timeout`` seconds at most); leaving
    terminates the process. The app's output goes to ``W/app.log``."""

    def __init__(self, checkpoint: Path, workdir: Path, timeout: float = 180.0, extra_env: dict | None = None,
                 device: str = "auto"):
        self.checkpoint, self.workdir, self.timeout, self.device = Path(checkpoint), Path(workdir), timeout, device
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.cache = self.workdir / "gradio-cache"
        self.env = {**ENV, "GRADIO_TEMP_DIR": str(self.cache), **(extra_env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AppServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "app.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--checkpoint", str(self.checkpoint), "--port", str(self.port),
             "--workdir", str(self.workdir), "--device", self.device],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        return self

    def wait(self) -> "AppServer":
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"app.py did not listen on port {self.port} within {self.timeout:.0f} s")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "app.log").read_text(errors="replace")

    def rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmRSS")

    def peak_rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def __enter__(self) -> "AppServer":
        try:
            return self.start().wait()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
