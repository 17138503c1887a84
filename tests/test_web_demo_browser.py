"""The web demo in a real browser: `ofa-ufo serve` in a subprocess, headless Chromium driven by selenium.

The page must show what `Demo.run` computes for the same request: the answer line, and the image with
the boxes drawn. Needs Debian's `chromium` + `chromium-driver` (.ci/run installs them where apt-get
works) and the `[test]` extra's selenium and gradio; without them the test is skipped, saying which.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ofa_ufo.cli.web_demo import Demo
from ofa_ufo.data.real_photos import load_photo

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
STARTUP_S = 180  # the server imports torch, transformers and gradio and loads the model


def _tool(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def _missing() -> str | None:
    """Why the test cannot run here, or None."""
    for module in ("selenium", "gradio"):
        try:
            __import__(module)  # optional: the [test] extra installs them
        except ImportError:
            return f"{module} is not installed (pip install 'ofa-ufo[test]')"
    if _tool(BROWSERS) is None:
        return "no chromium browser on PATH (apt-get install chromium chromium-driver)"
    if _tool(("chromedriver",)) is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


# one worker starts the page once for every test here (its fixture is per process)
pytestmark = [pytest.mark.skipif(_missing() is not None, reason=str(_missing())), pytest.mark.xdist_group("browser")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`python -m ofa_ufo serve` on a free port; yields its URL, stops it afterwards."""
    port, log = _free_port(), tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ofa_ufo", "serve", "--model", str(tiny_checkpoint),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + STARTUP_S
    try:
        while not _answers(url):
            assert proc.poll() is None and time.monotonic() < deadline, f"server did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver  # optional: the [test] extra
    from selenium.webdriver.chrome.service import Service  # optional: the [test] extra

    options = webdriver.ChromeOptions()
    options.binary_location = _tool(BROWSERS)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(_tool(("chromedriver",))))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo(tiny_checkpoint) -> Demo:
    """The same model in this process: what the page must show."""
    return Demo(tiny_checkpoint)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photo (scikit-image's astronaut) where installed, else a generated one."""
    path = tmp_path_factory.mktemp("browser") / "photo.png"
    try:
        image = load_photo("astronaut").resize((256, 256))
    except ImportError:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8))
    image.save(path)
    return path


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait  # optional: the [test] extra

    return WebDriverWait(driver, timeout).until(condition)


def _css(driver, selector: str, timeout: float = 60):
    return _wait(driver, lambda d: d.find_element("css selector", selector), timeout)


def _choose(driver, elem_id: str, value: str) -> None:
    """Pick a Gradio dropdown's option by clicking it, as a person would."""
    _css(driver, f"#{elem_id} input").click()
    _css(driver, f"[role=option][aria-label='{value}']").click()


def _run_and_read(driver) -> str:
    """Click Run on a fresh page; the answer line once it appears."""
    _css(driver, "#run").click()
    box = _css(driver, "#answer textarea")
    _wait(driver, lambda d: box.get_attribute("value"), 120)
    return box.get_attribute("value")


def _toasts(driver) -> str:
    """The text of the notices (Gradio's toasts) the page shows."""
    return " ".join(e.get_attribute("textContent") for e in driver.find_elements("css selector", ".toast-body"))


def _page_image(driver, elem_id: str) -> Image.Image:
    """The image an output component shows, fetched from the URL the page loaded it from."""
    source = _css(driver, f"#{elem_id} img").get_attribute("src")
    with urllib.request.urlopen(source, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_page_uploads_runs_and_shows_the_answer_and_the_drawn_boxes(server, browser, photo, demo, tmp_path):
    expected = demo.run("grounding", str(photo), "the astronaut")
    browser.get(server)
    _choose(browser, "task", "grounding")
    _css(browser, "#image input[type=file]").send_keys(str(photo))
    _css(browser, "#image img")  # the upload finished: the page previews it
    _css(browser, "#text textarea").send_keys("the astronaut")
    assert _run_and_read(browser) == expected.text

    drawn = _page_image(browser, "result_image")
    assert drawn.size == Image.open(photo).size
    assert drawn.tobytes() == expected.image.tobytes() != Image.open(photo).convert("RGB").tobytes()
    cells = [cell.get_attribute("textContent").strip() for cell in browser.find_elements("css selector", "#details td")]
    assert "the astronaut" in cells

    shot = tmp_path / "demo_screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\nweb demo screenshot: {shot}")


def test_page_captions_a_bundled_photo(server, browser, demo):
    pytest.importorskip("skimage", reason="bundled photos need scikit-image (the [demo] extra)")
    expected = demo.run("caption", load_photo("chelsea"))
    browser.get(server)
    _choose(browser, "photo", "chelsea")
    _css(browser, "#image img")
    assert _run_and_read(browser) == expected.text


def test_page_shows_a_bad_request_as_an_error(server, browser):
    browser.get(server)
    _choose(browser, "task", "classification")
    _css(browser, "#run").click()  # no image: the page says so instead of answering
    assert "needs an image" in _wait(browser, lambda d: "needs an image" in _toasts(d) and _toasts(d))
    assert _css(browser, "#answer textarea").get_attribute("value") == ""
