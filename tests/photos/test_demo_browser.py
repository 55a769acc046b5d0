"""The photo demo as `make demo` starts it (examples/photos/run.py: site, two workers, beat, on
sqlite), driven in Debian's Chromium: photos uploaded become thumbnails in the page without a
reload, a file that is not a photo gets its error beside its name, and the export's private
link downloads every row, for its owner only and only until it expires.

Set PHOTOS_SCREENSHOT=docs/images/photos-demo.png to save the page with its thumbnails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_chromium, require_module
from tests.support import ROOT, OffloadProcess

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: The export link's lifetime in this test: long enough to download 30 MB on a slow machine,
#: short enough to wait for its expiry.
LINK_MAX_AGE_S = 15
ROWS = 500_000
_READY = re.compile(r"ready on (http://\S+)")


class Demo(OffloadProcess):
    """``python -m examples.photos.run --port 0``, its output collected line by line."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.args = ["examples.photos.run"]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "PHOTOS_"))}
        env.update({"PYTHONPATH": str(ROOT), "PHOTOS_LINK_MAX_AGE": str(LINK_MAX_AGE_S)})
        env.pop("DJANGO_SETTINGS_MODULE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.photos.run", "--port", "0", "--data-dir", str(data_dir)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        match = _READY.search(self.wait_for(lambda line: _READY.search(line) is not None, timeout=90))
        assert match is not None
        self.base = match.group(1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    require_chromium()
    require_module("django", "pip install 'offload[django]'")
    started = time.monotonic()
    process = Demo(tmp_path_factory.mktemp("photos"))
    print(f"demo ready in {time.monotonic() - started:.1f} s")
    try:
        yield process
    finally:
        # Ctrl-C, as a user stops `make demo`: everything stops, and the launcher says so.
        process.interrupt()
        try:
            code = process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, process.output[-3000:]
        assert "demo | stopped" in process.output



def photos(folder: Path) -> list[Path]:
    """Three generated photos (one DSLR-size, one portrait stored sideways with an EXIF
    orientation tag) and a text file."""
    from PIL import Image, ImageDraw, ImageOps

    def scene(width: int, height: int, low: str, high: str, noise: float = 0.0) -> Image.Image:
        image = ImageOps.colorize(Image.linear_gradient("L").resize((width, height)), low, high)
        if noise:  # camera-like grain, which is what makes a real photo's JPEG large
            image = Image.blend(image, Image.effect_noise((width, height), 60).convert("RGB"), noise)
        draw = ImageDraw.Draw(image)
        draw.ellipse((width * 0.62, height * 0.3, width * 0.8, height * 0.3 + width * 0.18), fill="#ffd166")
        draw.polygon([(0, height), (width * 0.3, height * 0.58), (width * 0.55, height * 0.8),
                      (width * 0.78, height * 0.5), (width, height)], fill="#2d3142")
        return image

    made = []
    big = folder / "dslr-6000x4000.jpg"
    scene(6000, 4000, "#1e3c72", "#f7b267", noise=0.3).save(big, "JPEG", quality=95)
    made.append(big)
    # An upright 800x1200 picture stored sideways (1200x800) with orientation 6, as cameras
    # do: turned back, its thumbnail is 341x512.
    portrait = folder / "portrait-exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = scene(800, 1200, "#0f5132", "#a3cfbb").rotate(90, expand=True)
    sideways.save(portrait, "JPEG", quality=90, exif=exif.tobytes())
    made.append(portrait)
    small = folder / "lake.jpg"
    scene(1024, 682, "#432371", "#faae7b").save(small, "JPEG", quality=90)
    made.append(small)
    notes = folder / "notes.txt"
    notes.write_text("not a photo at all\n")
    made.append(notes)
    return made


def test_upload_export_and_private_link(demo: Demo, browser: Any, tmp_path: Path) -> None:
    files = photos(tmp_path)
    assert files[0].stat().st_size > 8_000_000
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)

    # Given a first visit: signed in as the demo user at once.
    page.goto(demo.base + "/")
    assert page.text_content("#username") == "demo"
    page.evaluate("window.loadedOnce = true")  # gone if the page ever reloads

    # When four files are uploaded in one go
    page.set_input_files("#files", [str(f) for f in files])
    page.click("#upload")

    # Then three thumbnails and one error appear, each in the card of its file, without a reload.
    page.wait_for_function(
        "document.querySelectorAll('#photos img.thumbnail').length === 3"
        " && document.querySelectorAll('#photos .error').length === 1"
    )
    assert page.evaluate("window.loadedOnce") is True
    cards = page.evaluate("""Array.from(document.querySelectorAll('#photos .photo')).map((li) => {
        const img = li.querySelector('img.thumbnail'), error = li.querySelector('.error');
        return {name: li.querySelector('.name').textContent, error: error && error.textContent,
                size: img && [img.naturalWidth, img.naturalHeight]};
    })""")
    by_name = {card["name"]: card for card in cards}
    assert by_name["dslr-6000x4000.jpg"]["size"] == [512, 341]
    assert by_name["portrait-exif.jpg"]["size"] == [341, 512]  # turned upright
    assert by_name["lake.jpg"]["size"] == [512, 341]
    assert by_name["notes.txt"]["size"] is None
    assert "not an image" in by_name["notes.txt"]["error"]
    if os.environ.get("PHOTOS_SCREENSHOT"):
        page.screenshot(path=os.environ["PHOTOS_SCREENSHOT"])

    # When the export is started, its progress shows and then its private link.
    started = time.monotonic()
    page.click("#export")
    link = page.wait_for_selector("#download")
    export_s = time.monotonic() - started
    href, expires_at = link.get_attribute("href"), float(link.get_attribute("data-expires-at"))
    assert href.startswith("/exports/")
    url = demo.base + href

    # Then the link downloads every row, with the header line.
    answer = context.request.get(url)
    assert answer.status == 200, answer.text()
    body = answer.body()
    assert body.count(b"\n") == ROWS + 1
    assert body.startswith(b"id,newsletter,sent_on,recipients,opened,clicked,unsubscribed,bounced\r\n")
    print(f"export of {ROWS:,} rows shown after {export_s:.1f} s; CSV {len(body) / 1e6:.1f} MB")

    # The other user and a stranger get nothing from it.
    other = browser.new_context()
    other_page = other.new_page()
    other_page.goto(demo.base + "/")
    other_page.click("#switch-bob")
    other_page.wait_for_selector("#username:text('bob')")
    assert other_page.query_selector("#photos img.thumbnail") is None  # bob sees none of demo's photos
    # Someone else's export is not found, as if it did not exist: neither the other user nor a
    # stranger who is signed in as nobody learns that it does.
    assert other.request.get(url).status == 404
    stranger = browser.new_context()
    assert stranger.request.get(url).status == 404
    stranger.close()
    other.close()

    # The owner is told on their next page, once (the worker marks the task a moment after the
    # browser hears of its end: reload until the message is there, within a deadline).
    deadline = time.monotonic() + 20
    while True:
        page.goto(demo.base + "/")
        messages = page.locator(".message").all_text_contents()
        if messages or time.monotonic() > deadline:
            break
    assert len(messages) == 1 and f"{ROWS:,} rows is ready" in messages[0], messages
    page.goto(demo.base + "/")
    assert page.locator(".message").count() == 0
    # ... and by email (the console backend writes it to the worker's output; the body's
    # encoding differs between Django versions, so only the headers are read here).
    demo.wait_for("Subject: Your newsletter statistics export is ready", timeout=10)
    demo.wait_for("To: demo@example.com", timeout=10)

    # After it expires, the link is refused.
    time.sleep(max(expires_at - time.time(), 0) + 1)  # the expiry is a known instant, not a guess
    assert context.request.get(url).status == 403

    # The nightly cleanup is scheduled, and when run (here by hand, keeping nothing) it removes
    # the thumbnails and the export.
    assert "nightly_cleanup: cron('0 3 * * *')" in demo.output
    assert cleanup(demo, older_than_days=0) == {"photos": 4, "exports": 1}
    assert not any((demo.data_dir / "media" / "thumbs").iterdir())
    assert not any((demo.data_dir / "media" / "exports").iterdir())
    page.goto(demo.base + "/")
    assert page.locator("#photos .photo").count() == 0
    context.close()


def cleanup(demo: Demo, older_than_days: float) -> Any:
    """``offload send ... nightly_cleanup [days] --wait``, with the demo's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "PHOTOS_"))}
    env.update({"PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "examples.photos.settings",
                "PHOTOS_DATA_DIR": str(demo.data_dir)})
    done = subprocess.run(
        [sys.executable, "-m", "offload", "send", "offload.contrib.django:app",
         "examples.photos.gallery.tasks.nightly_cleanup", json.dumps([older_than_days]), "--wait", "--timeout", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_demo_starts_without_warnings(demo: Demo) -> None:
    # Everything the demo prints up to "ready" is its own report: a warning there (uvicorn on
    # Django's missing lifespan support, a deprecation) is noise a new user reads as a fault.
    ready_at = next(i for i, line in enumerate(demo.lines) if _READY.search(line))
    noisy = [line for line in demo.lines[:ready_at] if re.search(r"warn|deprecat|unsupported", line, re.I)]
    assert noisy == []
