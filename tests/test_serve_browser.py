"""A real browser drives ``hbird serve --demo`` (issue 16's acceptance test of the page).

Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) under
Selenium: start the server on a free localhost port, see the gallery's first paint with
Gradio's scripts blocked, paint a mask with mouse events,
predict all, check another image's overlay, remove the prompt image, check that the
overlay is gone, and save screenshots under the test's tmp folder. Skipped, with the
reason, when Selenium, Gradio, Chromium or chromedriver is missing.

The expected pictures are computed independently of the page: with one prompt image
painted only with class 1 (the rest unlabelled), every bank patch holds the label
distribution "all class 1", so every prediction is class 1 everywhere and the overlay
of an image is exactly ``round(0.5 · image + 0.5 · (128, 0, 0))`` (VOC colour of class 1,
the mix the REST overlay draws); without a prompt the gallery shows the plain image.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hbird
from hbird._optional import is_available

CLASS1_RGB = np.array([128, 0, 0])  # PASCAL VOC colour of class 1
FIRST, OTHER = "scene_0000.png", "scene_0001.png"
WAIT_SERVER_S = 300  # the server imports torch and gradio: slow on a loaded 2-core CPU
WAIT_UI_S = 180


def _browser() -> tuple[str | None, str | None]:
    names = ("chromium", "chromium-browser", "google-chrome")
    binary = next((shutil.which(n) for n in names if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (
        "/usr/lib/chromium/chromedriver"
        if Path("/usr/lib/chromium/chromedriver").is_file()
        else None
    )
    return binary, driver


BINARY, DRIVER = _browser()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not is_available("selenium"), reason="needs selenium (pip install selenium)"
    ),
    pytest.mark.skipif(
        not is_available("gradio"), reason='the page needs gradio (pip install "hbird[serve]")'
    ),
    pytest.mark.skipif(
        BINARY is None or DRIVER is None,
        reason="needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def picture(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fetch(url))).convert("RGB")).astype(np.int64)


def wait_until(condition, timeout: float, what: str, server=None):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            pytest.fail(f"hbird serve exited ({server.returncode}) while waiting for {what}")
        try:
            value = condition()
        except Exception:  # the page is still rendering; try again
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def server(tmp_path, request):
    """``hbird serve --demo`` (plus the arguments an indirect parametrisation gives) on a
    free port; yields ``(url, state dir)``."""
    extra = list(getattr(request, "param", []))
    port, state = free_port(), tmp_path / "state"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    src = str(Path(hbird.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "hbird", "serve", "--demo", "--state", str(state)]
    proc = subprocess.Popen([*cmd, *extra, "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: fetch(url + "/api/workspaces/default"), WAIT_SERVER_S, "the server", proc
        )
        yield url, state
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BINARY
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1400")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def thumbnail(driver, name: str) -> str:
    """The URL of the gallery picture captioned ``name...``."""
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.CSS_SELECTOR, f"#gallery img[alt^='{name}']")
    return img.get_attribute("src")


def status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def paint_stroke(driver) -> None:
    """Drag the class-1 brush (the default colour) across the middle of the editor."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_elements(By.CSS_SELECTOR, "#editor canvas")[-1]
    chain = ActionChains(driver).move_to_element_with_offset(canvas, -90, -30).click_and_hold()
    for _ in range(18):
        chain.move_by_offset(10, 3)
    chain.release().perform()


def test_paint_predict_remove_in_a_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, state = server
    images = state / "demo-data" / "images"
    plain_other = np.asarray(Image.open(images / OTHER).convert("RGB")).astype(np.int64)
    # 0. the first paint: the gallery is in the page's HTML and shows without Gradio's
    # client (its scripts blocked here); once the client has rendered, it is hidden
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/assets/*.js"]})
    browser.get(url + "/")
    early = wait_until(lambda: _first_paint_picture(browser), WAIT_UI_S, "the first paint")
    assert early.is_displayed() and np.array_equal(picture(early.get_attribute("src")), plain_other)
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")  # no Gradio page yet
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})

    browser.get(url + "/")
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#editor canvas"), WAIT_UI_S, "the editor"
    )
    assert "Demo" in browser.find_element(By.ID, "demo-banner").text
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img"), 60, "the gallery")
    assert not browser.find_element(By.ID, "hbird-first-paint").is_displayed()
    assert np.array_equal(picture(thumbnail(browser, OTHER)), plain_other)

    # 1-2. paint on the first image and add it to the prompt (retry while the editor's
    # background is still loading: the page then says nothing is painted)
    def painted_and_added():
        paint_stroke(browser)
        browser.find_element(By.ID, "add-prompt").click()
        return wait_until(lambda: "Prompt (1)" in status(browser), 20, "the prompt add", None)

    deadline = time.monotonic() + WAIT_UI_S
    while True:
        try:
            painted_and_added()
            break
        except pytest.fail.Exception:
            if time.monotonic() > deadline:
                raise
    described = json.loads(fetch(url + "/api/workspaces/default"))
    assert described["prompt"] == [FIRST]
    mask = np.asarray(Image.open(state / "default" / "masks" / "scene_0000.png"))
    assert set(np.unique(mask).tolist()) == {1, 255}  # the stroke is class 1, the rest unlabelled
    assert mask[0, 0] == 255 and mask[-1, -1] == 255  # the stroke stays off the corners

    # 3-4. predict all: the other image's gallery picture is its class-1 overlay
    browser.find_element(By.ID, "predict-all").click()
    wait_until(lambda: _caption_scored(browser), WAIT_UI_S, "predict all")
    expected = np.round(0.5 * plain_other + 0.5 * CLASS1_RGB)
    overlay = picture(thumbnail(browser, OTHER))
    assert np.abs(overlay - expected).max() <= 1
    browser.save_screenshot(str(tmp_path / "predicted.png"))

    # 5-6. remove the prompt image: the prediction goes back to the plain image
    browser.find_element(By.ID, "remove-prompt").click()
    wait_until(lambda: "Prompt (0)" in status(browser), WAIT_UI_S, "the prompt removal")
    wait_until(
        lambda: np.array_equal(picture(thumbnail(browser, OTHER)), plain_other),
        WAIT_UI_S,
        "the plain picture back in the gallery",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        fetch(f"{url}/api/workspaces/default/prediction/{OTHER}.png")
    assert err.value.code == 400 and "prompt is empty" in err.value.read().decode()
    assert json.loads(fetch(url + "/api/workspaces/default"))["prompt"] == []

    # 7. a screenshot under the tmp folder
    browser.save_screenshot(str(tmp_path / "removed.png"))
    for shot in ("predicted.png", "removed.png"):
        assert Image.open(tmp_path / shot).size[0] > 0


def _first_paint_picture(driver):
    """The first paint's picture of the other image, once it has loaded (else None)."""
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.CSS_SELECTOR, f"#hbird-first-paint img[alt^='{OTHER}']")
    return img if driver.execute_script("return arguments[0].naturalWidth", img) else None


def _caption_scored(driver) -> bool:
    """True once the other image's caption carries its mean confidence (predicted)."""
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.CSS_SELECTOR, f"#gallery img[alt^='{OTHER}']")
    return "·" in (img.get_attribute("alt") or "")


@pytest.mark.parametrize("server", [["--task", "depth"]], indirect=True)
def test_upload_depth_predict_and_confidence_in_a_browser(server, browser, tmp_path):
    """Depth on the page: upload the demo's 16-bit PNG depth map of one image, predict all;
    another image's gallery picture is its predicted depth (the REST prediction PNG, mm)
    through matplotlib's turbo table over the 2nd-98th percentile of the uploaded map's
    valid depths, with the colour bar shown; "show confidence" turns it into the grey
    confidence map the REST route gives."""
    import matplotlib
    from selenium.webdriver.common.by import By

    url, state = server
    upload = state / "demo-data" / "depth" / "scene_0000.png"
    browser.get(url + "/")
    field = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, "#depth-upload input[type=file]"),
        WAIT_UI_S,
        "the depth upload",
    )
    field.send_keys(str(upload))
    wait_until(
        lambda: "scene_0000" in browser.find_element(By.ID, "depth-upload").text,
        WAIT_UI_S,
        "the uploaded file",
    )
    browser.find_element(By.ID, "add-prompt").click()
    wait_until(lambda: "Prompt (1)" in status(browser), WAIT_UI_S, "the prompt add")
    assert json.loads(fetch(url + "/api/workspaces/default"))["prompt"] == [FIRST]
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt-depth img"), 60, "the prompt map"
    )

    browser.find_element(By.ID, "predict-all").click()
    wait_until(lambda: _caption_scored(browser), WAIT_UI_S, "predict all")
    assert browser.find_elements(By.CSS_SELECTOR, "#colour-bar img")  # the depth key is shown
    uploaded = np.asarray(Image.open(upload)).astype(np.float64) / 1000
    lo, hi = np.percentile(uploaded[uploaded > 0], [2, 98])
    mm = np.asarray(
        Image.open(io.BytesIO(fetch(f"{url}/api/workspaces/default/prediction/{OTHER}.png")))
    )
    table = matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255
    t = np.clip((mm / 1000 - lo) / (hi - lo), 0, 1)
    expected = table[np.round(t * 255).astype(int)]
    shown = picture(thumbnail(browser, OTHER))
    close = (np.abs(shown - expected) <= 1).all(-1)
    assert close.mean() >= 0.99, close.mean()  # the PNG's mm rounding moves a rare pixel
    browser.save_screenshot(str(tmp_path / "depth.png"))

    browser.find_element(By.CSS_SELECTOR, "#confidence input").click()
    grey = picture(f"{url}/api/workspaces/default/confidence/{OTHER}.png")
    wait_until(
        lambda: np.abs(picture(thumbnail(browser, OTHER)) - grey).max() <= 1,
        WAIT_UI_S,
        "the confidence map in the gallery",
    )
    assert Image.open(tmp_path / "depth.png").size[0] > 0
