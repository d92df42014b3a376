"""Bounded property-based tests (hypothesis) of the two doors hostile bytes come through.

* ``load_image``: arbitrary bytes, small valid PNG/JPEG/GIF/WebP/BMP/TIFF files with random byte
  flips and truncations, and PNG headers declaring any size. It returns an upright RGB image that
  the preprocessing can use, or raises ``ImageLoadError`` with a one-line message; nothing else,
  and never hangs (each call runs under an alarm).
* ``safe_extract``: zips built from random entry names (normal names, ``..`` parts, absolute
  paths, backslashes, drive letters, unicode, empty and over-long parts, system files), random
  small contents and symlink entries, and valid zips with random byte flips. It raises
  ``DataError`` or writes exactly the expected files, all inside the destination; nothing ever
  appears next to it.

Every test is derandomized (the same examples on every run) and small: the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import signal
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from resnext import ImageLoadError, Preprocessing, load_image
from resnext.transforms import MAX_ASPECT
from resnext.data import IGNORED, DataError, safe_extract

from test_hostile import exif
from test_transforms import png_declaring


def fuzz(max_examples: int) -> settings:
    """Deterministic (the same examples every run, no example database), no per-example deadline.
    A fresh temporary folder per example replaces tmp_path, hence the fixture health check."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (TimeoutError) instead of hanging; a no-op where there is no SIGALRM. The limits used
    (10 s to load an image, 20 s to extract a zip) are hundreds of times the normal: a few
    milliseconds per input here (2 cores)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ============================================================================ load_image

PREPROCESS = Preprocessing(input_size=16, resize=16)


def check_load(data: bytes, max_pixels: int = 64_000_000) -> Image.Image | None:
    """The property: an RGB image the pipeline can use, or ImageLoadError with one line; else fail."""
    try:
        with time_limit(10):
            image = load_image(data, max_pixels=max_pixels)
            pixels = np.asarray(image)  # the pixels really are decoded, not deferred
            tensor = PREPROCESS(image)
    except ImageLoadError as err:
        message = str(err)
        assert message.startswith("<bytes>: ") and "\n" not in message, message
        return None
    assert image.mode == "RGB"
    width, height = image.size
    assert width >= 1 and height >= 1 and width * height <= max_pixels
    assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
    assert tensor.shape == (3, 16, 16) and torch.isfinite(tensor).all()
    return image


def _sample(fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    """A 10x12 (WxH) picture of noise, encoded as ``fmt``."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    if fmt == "GIF-animated":
        frames = [image.quantize(16), Image.fromarray(255 - np.asarray(image)).quantize(16)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    else:
        image.save(buf, fmt, **kwargs)
    return buf.getvalue()


SAMPLES = {
    "PNG": _sample("PNG"),
    "PNG-grey-alpha": _sample("PNG", "LA"),
    "PNG-palette": _sample("PNG", "P"),
    "JPEG": _sample("JPEG", quality=90),
    "JPEG-progressive": _sample("JPEG", progressive=True),
    "JPEG-EXIF-rotated": _sample("JPEG", exif=exif(6)),
    "GIF": _sample("GIF"),
    "GIF-animated": _sample("GIF-animated"),
    "WEBP": _sample("WEBP", lossless=True),
    "BMP": _sample("BMP"),
    "TIFF": _sample("TIFF"),
}


def test_the_samples_are_valid_images():
    for name, data in SAMPLES.items():
        image = check_load(data)
        assert image is not None, name
        assert image.size == ((12, 10) if name == "JPEG-EXIF-rotated" else (10, 12)), name  # stood upright


@fuzz(300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    check_load(data)


@st.composite
def damaged(draw) -> bytes:
    """A valid sample with 1-8 bytes replaced, and perhaps cut short."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for position, value in draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)):
        data[position % len(data)] = value
    cut = draw(st.none() | st.integers(1, 1 << 16))
    return bytes(data[: cut % len(data) or None] if cut else data)


@fuzz(500)
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL's own notes on corrupt metadata
@given(damaged())
def test_damaged_images(data):
    check_load(data)


@fuzz(100)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_declared_sizes_are_checked_before_decoding(width, height):
    """A PNG whose header declares ``width`` x ``height`` and carries no pixel data."""
    limit = 10_000  # small, so nothing big is ever allocated whatever the header says
    if width * height > limit:
        reason = "too large"
    elif max(width, height) > MAX_ASPECT * min(width, height):
        reason = "too long and thin"
    else:
        reason = "damaged or cut short"
    with pytest.raises(ImageLoadError, match=reason):
        with time_limit(10):
            load_image(png_declaring(width, height), max_pixels=limit)


# ============================================================================ safe_extract

# Name parts: ordinary, hostile (``..``, drive letters), system files, too long for the disk, and
# NUL bytes (zipfile cuts a name there; a name can end up empty).
PART = st.one_of(
    st.sampled_from(["Robin", "Wren-ü", "a b", "img.png", "x.jpg", "..", ".", "", "C:", "c:", "__MACOSX", "._x.png",
                     ".DS_Store", "Thumbs.db", "x" * 300, "\x00", "evil.png\x00.jpg"]),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8),
)
PREFIX = st.sampled_from(["", "", "", "/", "\\", "C:", "C:\\", "d:/", "//server/share/", "\\\\?\\", "./", "~/"])


@st.composite
def entry_name(draw) -> str:
    parts = draw(st.lists(PART, min_size=1, max_size=4))
    separators = draw(st.lists(st.sampled_from(["/", "\\"]), min_size=len(parts), max_size=len(parts)))
    name = draw(PREFIX) + "".join(p + s for p, s in zip(parts, separators))[:-1]
    return name + ("/" if draw(st.booleans()) and name else "")  # a trailing slash: a folder entry


ENTRY = st.tuples(entry_name(), st.binary(max_size=40), st.sampled_from(["file"] * 8 + ["symlink"]))


class Entry(zipfile.ZipInfo):
    """zipfile's own ``is_dir`` fails on an empty name, which a hostile zip may well carry (zipfile
    cuts a name at its first NUL byte, so a name starting with one is stored empty)."""

    def is_dir(self) -> bool:
        return self.filename.endswith("/")


def build_zip(path: Path, entries) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, kind in entries:
            info = Entry(name)
            if kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            elif info.is_dir():
                data = b""
            else:
                info.external_attr = 0o644 << 16
            zf.writestr(info, data)


def hostile(name: str) -> bool:
    """What safe_extract refuses outright: no name, an absolute path, a ``..`` part, a drive letter."""
    slashed = name.replace("\\", "/")
    return not name or slashed.startswith("/") or ".." in slashed.split("/") or (len(slashed) > 1 and slashed[1] == ":")


def extract_and_check(archive: Path, dest: Path, outside: Path):
    """Run safe_extract; whatever happens, every file is inside ``dest`` and ``outside`` is empty.

    Returns safe_extract's result, or the DataError it raised."""
    try:
        with time_limit(20):
            result = safe_extract(archive, dest)
    except DataError as err:
        result = err
        assert str(err).startswith(archive.name + ": ") and "\n" not in str(err)
    base = dest.parent
    assert {p.name for p in base.iterdir()} <= {archive.name, dest.name, outside.name}
    assert list(outside.iterdir()) == []
    if dest.exists():
        root = dest.resolve()
        for path in dest.rglob("*"):
            assert not path.is_symlink(), path
            assert path.resolve().is_relative_to(root), path
    return result


@pytest.fixture()
def workspace():
    """Made per example (a function-scoped tmp_path would be shared by all of them)."""

    def make():
        stack = contextlib.ExitStack()
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-zip-")))
        (base / "outside").mkdir()
        return stack, base / "upload.zip", base / "dest", base / "outside"

    return make


@fuzz(200)
@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@given(st.lists(ENTRY, min_size=1, max_size=6))
def test_random_entry_names(workspace, entries):
    stack, archive, dest, outside = workspace()
    with stack:
        build_zip(archive, entries)
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()  # the names as stored: what safe_extract sees
            contents = [zf.read(info) for info in infos]
        result = extract_and_check(archive, dest, outside)
        if any(stat.S_ISLNK(i.external_attr >> 16) or hostile(i.filename) for i in infos):
            assert isinstance(result, DataError)
            assert not dest.exists()  # refused before anything is written
            return
        if isinstance(result, DataError):  # a file and a folder of one name, a name too long for the disk
            assert "cannot extract entry" in str(result)
            return
        expected, skipped = {}, []
        for info, content in zip(infos, contents):
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if any(p in IGNORED or p.startswith("._") for p in parts):
                skipped.append(info.filename)
            elif not info.filename.endswith("/"):
                expected[PurePosixPath(*parts)] = content  # a later entry of the same name wins
        assert [name for name, _ in result] == skipped
        written = {PurePosixPath(p.relative_to(dest).as_posix()): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert written == expected


def _valid_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Robin/a.png", b"robin " * 40)
        zf.writestr("Wren/", b"")
        zf.writestr("Wren/b.png", b"wren " * 30)
        zf.writestr("Wren-ü/c.png", b"\x89PNG" + bytes(range(200)))
    return buf.getvalue()


VALID_ZIP = _valid_zip()


@fuzz(300)
@given(st.lists(st.tuples(st.integers(0, len(VALID_ZIP) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.none() | st.integers(1, len(VALID_ZIP) - 1))
def test_damaged_zips(workspace, flips, cut):
    stack, archive, dest, outside = workspace()
    with stack:
        data = bytearray(VALID_ZIP)
        for position, value in flips:
            data[position] = value
        archive.write_bytes(bytes(data[:cut] if cut else data))
        extract_and_check(archive, dest, outside)
