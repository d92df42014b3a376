"""End-to-end: the app in headless Chromium, driven by Playwright, with a tiny model.

Skipped where Chromium or Playwright is missing (.ci/run installs both). Screenshots of each tab
go to test-output/ for a person to look at.
"""

import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_shapes
from serve import AppServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with AppServer(tiny_checkpoint, tmp_path_factory.mktemp("appwork"), timeout=120) as app:
        yield app.url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(server)
    page.wait_for_selector("#photo")
    yield page
    page.close()


def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "bird.jpg"
    Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(path)
    return path


def shot(page, name: str) -> None:
    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


def test_upload_shows_top_k_and_heatmap(page, tmp_path):
    page.locator("#photo input[type=file]").set_input_files(str(photo(tmp_path)))
    page.locator("#prediction").get_by_text("%").first.wait_for(timeout=60_000)
    page.locator("#overlay img").wait_for(timeout=60_000)
    assert page.locator("#caption").inner_text().startswith(("Where the model looked", "⚠"))
    assert page.locator("#top3 img").count() >= 3
    shot(page, "classify")


def test_corrupt_upload_shows_a_readable_error(page, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    page.locator("#photo input[type=file]").set_input_files(str(bad))
    page.get_by_text("Could not read that image").first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    shot(page, "error")


def test_finetune_a_zip_then_classify_with_the_new_model(page, tmp_path):
    make_shapes(tmp_path / "shapes", classes=3, per_class=6)
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "shapes").rglob("*.png")):
            zf.write(f, "shapes/" + f.relative_to(tmp_path / "shapes").as_posix())
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#zip-upload input[type=file]").set_input_files(str(archive))
    page.locator("#new-name textarea, #new-name input").first.fill("shapes model")
    page.locator("#train").click()
    page.locator("#train-status").get_by_text("Saved as").wait_for(timeout=120_000)
    shot(page, "finetune")
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-picker input").click()
    page.get_by_role("option", name="shapes model").click()
    page.locator("#model-card").get_by_text("red disc").wait_for(timeout=30_000)  # the new card lists its classes
    shot(page, "model")
    page.get_by_role("tab", name="Classify").click()
    page.locator("#photo input[type=file]").set_input_files(str(next((tmp_path / "shapes" / "red disc").glob("*.png"))))
    page.locator("#prediction").get_by_text("red disc").first.wait_for(timeout=60_000)


def test_stop_ends_a_full_run(page, tmp_path):
    make_shapes(tmp_path / "shapes", classes=2, per_class=30)
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "shapes").rglob("*.png")):
            zf.write(f, f.relative_to(tmp_path / "shapes").as_posix())
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#zip-upload input[type=file]").set_input_files(str(archive))
    page.get_by_role("radio", name="full").check()
    page.get_by_label("Epochs (0 = automatic: 60 quick, 10 full)").fill("300")  # long enough to still be running
    page.locator("#train").click()
    page.locator("#train-status").get_by_text("Training").wait_for(timeout=60_000)
    started = time.time()
    page.locator("#stop").click()
    page.locator("#train-status").get_by_text("Stopped").wait_for(timeout=30_000)
    assert time.time() - started < 15
    shot(page, "stopped")
