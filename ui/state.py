"""What the app keeps between requests: the models (shared and each visitor's own) and the one
training slot.

A visitor is known by an *owner* token: 32 random hex digits made when their browser first opens
the app and kept in that browser's storage (``gr.BrowserState``), so a page reload finds their
models again. The models a visitor trains or uploads live in ``<workdir>/visitors/<owner>/``
and are listed, selected and loaded only with that token: no other session can see or reach
them. The default model and any ``.safetensors`` an operator puts in ``<workdir>/models/`` are
shared by everybody.
"""

from __future__ import annotations

import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from resnext import Classifier, load_classifier

OWNER = re.compile(r"[0-9a-f]{32}")
KEEP_VISITOR_S = 7 * 24 * 3600  # a visitor's models are removed a week after they last trained or uploaded


def new_owner() -> str:
    return secrets.token_hex(16)


def valid_owner(token) -> str | None:
    """The token if it is one this app makes, else None (a client can send anything)."""
    return token if isinstance(token, str) and OWNER.fullmatch(token) else None


def safe_name(text: str) -> str:
    """A model or class name that is safe as a file name: letters, digits, spaces, dashes."""
    name = re.sub(r"[^\w\- ]+", "", text or "", flags=re.UNICODE).strip()[:60]
    return name or "model"


class Models:
    """The models this app serves, by name, and a small cache of loaded classifiers (shared by
    all sessions: a model's weights are the same whoever uses them)."""

    def __init__(self, default: Path | None, device: str, workdir: Path, cache_size: int = 3):
        self.device = device
        self.workdir = Path(workdir)
        self.shared: dict[str, Path] = {}
        self._cache: OrderedDict[Path, Classifier] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        if default is not None:
            self.shared[Path(default).stem] = Path(default)
        for path in sorted((self.workdir / "models").glob("*.safetensors")):
            self.shared.setdefault(path.stem, path)

    @property
    def default(self) -> str | None:
        return next(iter(self.shared), None)

    def folder(self, owner: str) -> Path:
        """Where ``owner``'s models live (created on first use)."""
        if valid_owner(owner) is None:
            raise ValueError(f"not a visitor token: {owner!r}")
        return self.workdir / "visitors" / owner

    def own(self, owner: str | None) -> dict[str, Path]:
        """``owner``'s models, oldest first; none for a missing or malformed token."""
        if valid_owner(owner) is None or not self.folder(owner).is_dir():
            return {}
        files = sorted(self.folder(owner).glob("*.safetensors"), key=lambda p: (p.stat().st_mtime, p.name))
        return {p.stem: p for p in files if p.stem not in self.shared}

    def names(self, owner: str | None = None) -> list[str]:
        return list(self.shared) + list(self.own(owner))

    def path(self, name: str | None, owner: str | None = None) -> Path:
        name = name or self.default
        found = self.shared.get(name) or self.own(owner).get(name)
        if found is None:
            raise gr.Error(f"Unknown model {name!r}; pick one in the Model tab.")
        return found

    def get(self, name: str | None = None, owner: str | None = None) -> Classifier:
        path = self.path(name, owner)
        with self._lock:
            if path not in self._cache:
                self._cache[path] = load_classifier(path, device=self.device)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(path)
            return self._cache[path]

    def new_file(self, owner: str, name: str) -> Path:
        """A fresh file for ``owner``'s model called ``name`` (made unique among the names they see)."""
        folder = self.folder(owner)
        folder.mkdir(parents=True, exist_ok=True)
        base, taken, n = safe_name(name), set(self.names(owner)), 2
        name = base
        while name in taken or (folder / f"{name}.safetensors").exists():
            name, n = f"{base} ({n})", n + 1
        return folder / f"{name}.safetensors"

    def tidy(self, now: float | None = None) -> None:
        """Remove visitors' folders untouched for :data:`KEEP_VISITOR_S`."""
        cutoff = (now or time.time()) - KEEP_VISITOR_S
        for folder in (self.workdir / "visitors").glob("*"):
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)


class TrainingSlot:
    """One training run per app; others wait in Gradio's queue and see how many are ahead."""

    def __init__(self):
        self.lock = threading.Lock()  # held by the run in progress
        self.count = threading.Lock()  # guards ``waiting``
        self.stops: dict[str, threading.Event] = {}
        self.waiting = 0

    def status(self) -> str:
        if self.lock.locked():
            return f"A training run is in progress; {self.waiting} waiting." if self.waiting else "A training run is in progress."
        return "No training run in progress."

    def stop_event(self, owner: str) -> threading.Event:
        event = self.stops.setdefault(owner, threading.Event())
        event.clear()
        return event

    def stop(self, owner: str) -> None:
        event = self.stops.get(owner)
        if event is not None:
            event.set()


SLOT = TrainingSlot()


def secret_for(workdir: Path) -> str:
    """The key that encrypts what the app keeps in a visitor's browser, made once per work folder
    (so a restart does not forget who owns which models) and readable by this user only."""
    path = Path(workdir) / ".browser-secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
        path.chmod(0o600)
    return path.read_text().strip()
