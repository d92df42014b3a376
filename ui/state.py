"""What the app keeps between requests: the models (shared and each visitor's own), the disk they
take, and the one training slot.

A visitor is known by an *owner* token: 32 random hex digits made when their browser first opens
the app and kept in that browser's storage (``gr.BrowserState``) with the server's signature of
it, so a page reload finds their models again. The models a visitor trains or uploads live in
``<workdir>/visitors/<owner>/`` and are listed, selected and loaded only with that token: no
other session can see or reach them. The default model and any ``.safetensors`` an operator
puts in ``<workdir>/models/`` are shared by everybody.

What protects a visitor's models is the token alone: 128 random bits nobody can guess, never
listed or sent to anyone else. The signature (HMAC-SHA256 with a key that never leaves the
server) only makes the app refuse tokens it did not issue. Whoever has a visitor's browser
storage has their models.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from resnext import Classifier, load_classifier

OWNER = re.compile(r"[0-9a-f]{32}")
KEEP_VISITOR_S = 7 * 24 * 3600  # a visitor's models are removed a week after they last trained or uploaded
KEEP_CACHE_S = 3600  # Gradio's copies of uploads and answers, and API deliveries: an hour
FRESH_S = 120  # a file this young may still be on its way to a visitor: never removed to make room
TRANSIENT = ("api", "gradio-cache", "exports")  # what may go to make room: copies and deliveries, never a saved model
DISK_MARGIN = 64 * 1024**2  # left free on the disk itself, whatever the cap says
UNKNOWN_UPLOAD = 50 * 1024**2  # an upload that does not declare its length counts as the largest one allowed


ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the example photos


class StorageFull(RuntimeError):
    """No room for a write under the work folder's cap (or on the disk): the message says so plainly."""


def disk_full(err: OSError) -> bool:
    """Whether a failed write failed for want of space (the disk, or the user's quota on it)."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Limits:
    """What one visitor or one call may take from a public server. The Space owner sets them with
    ``app.py`` flags or ``RESNEXT_*`` environment variables (see :meth:`from_env`)."""

    models_per_visitor: int = 5  # the oldest goes when a sixth is added
    disk_bytes: int = 4 * 1024**3  # the work folder as a whole; held at every write (old copies go first)
    max_epochs: int = 100  # per training run, quick or full
    train_s: float = 900.0  # wall time of one training run
    train_memory_mb: int = 512  # full mode: what one run's decoded photos may take

    @classmethod
    def from_env(cls, env=os.environ) -> "Limits":
        """``RESNEXT_MODELS_PER_VISITOR``, ``RESNEXT_DISK_GB``, ``RESNEXT_MAX_EPOCHS``,
        ``RESNEXT_TRAIN_MINUTES``; a malformed value is an error that names it."""
        fields = {"RESNEXT_MODELS_PER_VISITOR": ("models_per_visitor", int, 1),
                  "RESNEXT_DISK_GB": ("disk_bytes", float, 1024**3),
                  "RESNEXT_MAX_EPOCHS": ("max_epochs", int, 1), "RESNEXT_TRAIN_MINUTES": ("train_s", float, 60)}
        values = {}
        for var, (name, kind, unit) in fields.items():
            if env.get(var):
                try:
                    value = kind(env[var])
                except ValueError:
                    value = 0
                if not value > 0:
                    raise ValueError(f"{var} must be a positive number, got {env[var]!r}")
                values[name] = int(value * unit) if name == "disk_bytes" else value * unit
        return cls(**values)


def refs_folder(model: Path) -> Path:
    """Where a visitor's model keeps its reference photos, one per class (beside the model file)."""
    return model.with_name(model.stem + ".refs")


def new_owner() -> str:
    return secrets.token_hex(16)


def valid_owner(token) -> str | None:
    """The token if it is one this app makes, else None (a client can send anything)."""
    return token if isinstance(token, str) and OWNER.fullmatch(token) else None


def signature(key: bytes, owner: str) -> str:
    return hmac.new(key, owner.encode(), hashlib.sha256).hexdigest()


def signed_owner(key: bytes, remembered) -> str | None:
    """The owner token a browser kept, if the server signed it; None for a forged or missing one."""
    remembered = remembered if isinstance(remembered, dict) else {}
    owner, sig = valid_owner(remembered.get("owner")), remembered.get("sig")
    if owner is None or not isinstance(sig, str) or not hmac.compare_digest(sig, signature(key, owner)):
        return None
    return owner


def safe_name(text: str) -> str:
    """A model or class name that is safe as a file name: letters, digits, spaces, dashes."""
    name = re.sub(r"[^\w\- ]+", "", text or "", flags=re.UNICODE).strip()[:60]
    return name or "model"


class Models:
    """The models this app serves, by name, and a small cache of loaded classifiers (shared by
    all sessions: a model's weights are the same whoever uses them)."""

    def __init__(self, default: Path | None, device: str, workdir: Path, cache_size: int = 3,
                 limits: Limits = Limits()):
        self.device = device
        self.workdir = Path(workdir)
        self.limits = limits
        self.shared: dict[str, Path] = {}
        self._cache: OrderedDict[Path, Classifier] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._room = threading.Lock()  # one reservation at a time: two writes cannot both take the last room
        self._reserved = 0  # bytes promised to writes under way (uploads, unzipping, a run's model)
        # Gradio serves the example photos from its cache, copied once at start-up with the assets'
        # dates: a tidy that took them for old uploads broke every example (403) after an hour.
        self._examples = {(p.name, p.stat().st_size) for p in ASSETS.glob("*") if p.is_file()}
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

    def api_file(self) -> Path:
        """Where a ``/fine_tune`` call's model is written: no visitor owns it; it is removed once
        delivered (and by :meth:`tidy` if a call dies first)."""
        folder = self.workdir / "api"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"fine-tuned-{secrets.token_hex(6)}.safetensors"

    def kept(self, owner: str, path: Path) -> list[str]:
        """After ``path`` was saved as ``owner``'s model: keep the visitor within their quota.
        Returns the names of ``owner``'s models that were removed (nobody else's ever are)."""
        mine = [p for p in self.own(owner).values() if p != path]  # oldest first
        removed = mine[: max(0, len(mine) + 1 - self.limits.models_per_visitor)]
        for old in removed:
            self.forget(old)
        return [p.stem for p in removed]

    def forget(self, path: Path) -> None:
        with self._lock:
            self._cache.pop(path, None)
        path.unlink(missing_ok=True)
        if path.suffix == ".safetensors":
            shutil.rmtree(refs_folder(path), ignore_errors=True)  # its reference photos go with it

    def disk_use(self) -> int:
        """Bytes under the work folder, a file with several names (hard links) counted once."""
        seen, total = set(), 0
        for path in _files(self.workdir):
            try:
                st = path.stat(follow_symlinks=False)
            except OSError:  # removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    @contextmanager
    def reserving(self, nbytes: int, what: str = "this"):
        """Room for ``nbytes`` about to be written under the work folder, held until the block
        ends (by then the bytes are on disk, where :meth:`disk_use` counts them). Old copies go to
        make room (:meth:`make_room`); a visitor's saved model never does.

        Raises:
            StorageFull: no room under the cap, or on the disk, even then.
        """
        nbytes = max(0, int(nbytes))
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._room:
            disk_free = shutil.disk_usage(self.workdir).free - DISK_MARGIN
            if nbytes > disk_free:
                raise StorageFull(f"The server's disk is full: {what} needs {_size(nbytes)} and {_size(max(0, disk_free))} "
                                  "is free. Try again later.")
            used = self.make_room(self.limits.disk_bytes - self._reserved - nbytes)
            room = self.limits.disk_bytes - self._reserved - used
            if nbytes > room:
                raise StorageFull(f"The server's storage is full: {what} needs {_size(nbytes)} and {_size(max(0, room))} "
                                  f"of its {_size(self.limits.disk_bytes)} are free. Try again later, or with fewer or smaller files.")
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._room:
                self._reserved -= nbytes

    def make_room(self, target: int | None = None, now: float | None = None) -> int:
        """Bring the work folder under ``target`` bytes (default :attr:`Limits.disk_bytes`) by removing
        API deliveries, exports and Gradio's cached copies, oldest first. Visitors' saved models and
        the operator's ``models/`` are never removed for room (a visitor's go a week after they last
        used them: :meth:`tidy`), nor is anything younger than :data:`FRESH_S` (on its way to someone).
        Returns the bytes the work folder holds afterwards."""
        target = self.limits.disk_bytes if target is None else target
        total = self.disk_use()
        if total <= target:
            return total
        young = (now or time.time()) - FRESH_S
        candidates = [(_stat(p), p) for folder in TRANSIENT for p in _files(self.workdir / folder)
                      if not self._is_example(p)]
        for (size, mtime), path in sorted(candidates, key=lambda c: c[0][1]):  # oldest first
            if total <= target or mtime >= young:
                break
            total -= size
            self.forget(path)
        return total

    def _is_example(self, path: Path) -> bool:
        """Gradio's cached copy of an example photo (its name and size): served for as long as the app runs."""
        return path.parent.parent.name == "gradio-cache" and (path.name, _stat(path)[0]) in self._examples

    def tidy(self, now: float | None = None) -> None:
        """Remove visitors' folders untouched for :data:`KEEP_VISITOR_S`, API deliveries and
        Gradio's cached copies older than :data:`KEEP_CACHE_S` (and the folders they leave
        empty), then keep the work folder under its cap. Runs at start-up and every few minutes."""
        now = now or time.time()
        for folder in (self.workdir / "visitors").glob("*"):
            if folder.is_dir() and folder.stat().st_mtime < now - KEEP_VISITOR_S:
                shutil.rmtree(folder, ignore_errors=True)
        for top in ("api", "gradio-cache"):
            for folder, dirs, names in os.walk(self.workdir / top, topdown=False):  # files before their folders
                for path in (Path(folder) / name for name in names):
                    try:
                        if path.stat().st_mtime < now - KEEP_CACHE_S and not self._is_example(path):
                            path.unlink()
                    except OSError:  # gone meanwhile
                        pass
                for path in (Path(folder) / name for name in dirs):
                    try:
                        if not any(path.iterdir()) and path.stat().st_mtime < now - FRESH_S:
                            path.rmdir()
                    except OSError:
                        pass
        self.make_room(now=now)

    def tidy_every(self, seconds: float = 300) -> threading.Thread:
        """:meth:`tidy` in a daemon thread, every ``seconds``, for as long as the app runs."""
        def loop():
            while True:
                time.sleep(seconds)
                try:
                    self.tidy()
                except Exception as err:  # noqa: BLE001 - the next round tries again; the app goes on
                    print(f"tidying the work folder failed: {err}", flush=True)

        thread = threading.Thread(target=loop, name="tidy-workdir", daemon=True)
        thread.start()
        return thread


def _files(folder: Path):
    """Every file under ``folder``; folders that other requests remove meanwhile are passed over
    (``Path.rglob`` raised when a finished run's job folder went while it walked)."""
    for top, _, names in os.walk(folder):
        for name in names:
            yield Path(top) / name


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.1f} GB" if nbytes >= 1024**3 else f"{nbytes / 1024**2:.0f} MB"


def _stat(path: Path) -> tuple[int, float]:
    """(size, mtime); (0, now) for a file another thread removed meanwhile."""
    try:
        st = path.stat()
        return st.st_size, st.st_mtime
    except OSError:
        return 0, time.time()


class TrainingSlot:
    """One training run per app; others wait in Gradio's queue and see how many are ahead."""

    def __init__(self):
        self.lock = threading.Lock()  # held by the run in progress
        self.count = threading.Lock()  # guards ``waiting``
        self.stops: dict[str, threading.Event] = {}
        self.waiting = 0

    def stop_event(self, owner: str) -> threading.Event:
        event = self.stops.setdefault(owner, threading.Event())
        event.clear()
        return event

    def stop(self, owner: str) -> None:
        event = self.stops.get(owner)
        if event is not None:
            event.set()


SLOT = TrainingSlot()


def removed_message(registry: Models, removed: list[str]) -> str:
    names = ", ".join(repr(n) for n in removed)
    return (f"Each visitor keeps at most {registry.limits.models_per_visitor} models here, so your oldest, {names}, "
            "was removed.")


def signing_key(workdir: Path) -> bytes:
    """The key that signs visitors' tokens, made once per work folder (so a restart still knows
    the tokens it issued), readable by this user only, and never sent to a browser."""
    path = Path(workdir) / ".visitor-key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())
