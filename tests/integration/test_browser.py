"""`vitpipe ui` in a real browser: headless Debian Chromium driven by Selenium over a short real training run.

The run (FilterViT-Pico on the digits, 4 steps, evaluation and pictures at steps 2 and 4) is tracked into a
SQLite store; `vitpipe ui` serves it. The page it prints must show the run table (MLflow's "Model training"
view, not the GenAI overview), the run's `val/top1` chart, and the image panel with the model's pictures at both
steps. Screenshots go to the test's directory; with ``VITPIPE_SCREENSHOTS=DIR`` also to DIR (docs/img for
docs/tracking.md). Chromium and its driver come from tools/browser_deps.sh (apt-get, once, as root).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.browser

EXIT_NOT_INSTALLABLE = 3
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,860", "--hide-scrollbars", "--force-device-scale-factor=1")


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installed by tools/browser_deps.sh where missing."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "browser_deps.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == EXIT_NOT_INSTALLABLE:
        pytest.skip(f"chromium is missing and cannot be installed: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ready = re.search(r"BROWSER_READY chromium=(\S+) driver=(\S+)", proc.stdout)
    assert ready, proc.stdout
    return ready.group(1), ready.group(2)


@pytest.fixture(scope="module")
def tracked_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory with one short FilterViT run: metrics every step, val/top1 and pictures at steps 2, 4."""
    out = tmp_path_factory.mktemp("browser-runs")
    proc = subprocess.run([sys.executable, "-m", "vitpipe", "train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml",
                           f"--data.path={digits_shards}", f"--run.output_dir={out}", "--run.name=browser",
                           "--model.name=filtervit_pico", "--schedule.max_steps=4", "--eval.every_steps=2",
                           "--tracking.pictures=1", "--tracking.log_every_steps=1", "--tracking.system_metrics_s=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def ui_address(tracked_run: Path) -> Iterator[str]:
    """The address `vitpipe ui` prints for the run's store (it serves until the test ends)."""
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", "ui", "--runs", str(tracked_run), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/\S*", line)
        assert address, line
        yield address.group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def browser(chromium: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, no network services of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)  # the driver is given: no download
    try:
        yield driver
    finally:
        driver.quit()


def _until(driver: Any, what: str, probe: Callable[[], Any], timeout: float = 45.0) -> Any:
    """Polls ``probe`` until it returns something truthy; on timeout fails with the page's text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except Exception:  # noqa: BLE001 - an element that is not (yet) there, or went stale
            found = None
        if found:
            return found
        time.sleep(0.25)
    body = driver.find_element("tag name", "body").text
    raise AssertionError(f"no {what} after {timeout:.0f} s at {driver.current_url}:\n{body[:1500]}")


def _save(driver: Any, name: str, tmp_path: Path) -> Path:
    """A small PNG (palette, 800 px wide) of the window, in tmp_path and, if asked, VITPIPE_SCREENSHOTS."""
    from PIL import Image

    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot = shot.resize((800, round(shot.height * 800 / shot.width)), Image.LANCZOS).quantize(colors=64)
    paths = [tmp_path / name] + ([Path(os.environ["VITPIPE_SCREENSHOTS"]) / name]
                                 if os.environ.get("VITPIPE_SCREENSHOTS") else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        shot.save(path, optimize=True)
    return paths[0]


def _close_assistant(driver: Any) -> None:
    """Closes MLflow's Assistant side panel (it opens itself on a browser's first visit to a local server)."""
    for button in driver.find_elements("xpath", "//button[@aria-label='Close']"):
        if button.is_displayed():
            button.click()


def test_ui_shows_runs_metrics_and_pictures(browser: Any, ui_address: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # 1. The printed address opens the run table, in the "Model training" view, without GenAI or telemetry notes.
    browser.get(ui_address)
    _until(browser, "run table", lambda: browser.find_element(By.LINK_TEXT, "browser"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "/runs" in browser.current_url and "Run Name" in body and "1 matching run" in body, body[:1500]
    assert "Detect Issues" not in body and "No data available" not in body, body[:1500]
    assert "collects usage data" not in body  # MLflow's UI telemetry notice
    _close_assistant(browser)
    time.sleep(0.5)
    _save(browser, "ui-runs.png", tmp_path)
    # MLflow keeps the view in the URL only until the next click; the sidebar switch stores it in the browser.
    for view in ("GenAI", "Model training"):
        browser.execute_script("arguments[0].click()", browser.find_element(By.XPATH, f"//*[text()='{view}']"))
        time.sleep(0.5)

    # 2. The run's metrics: a val/top1 chart.
    _until(browser, "run table", lambda: browser.find_element(By.LINK_TEXT, "browser")).click()
    _until(browser, "run page", lambda: browser.find_element(By.XPATH, "//*[text()='Model metrics']")).click()
    search = _until(browser, "chart search", lambda: browser.find_element(
        By.XPATH, "//input[@placeholder='Search metric charts']"))
    search.send_keys("val/")
    _until(browser, "val/top1 chart", lambda: browser.find_element(By.XPATH, "//h4[@title='val/top1']"))
    _until(browser, "plotted val/top1", lambda: browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))
    assert "Evaluations" not in browser.find_element(By.TAG_NAME, "body").text  # still the training view
    time.sleep(1.0)  # let the plots finish drawing
    _save(browser, "ui-val-top1.png", tmp_path)

    # 3. The image panel (full screen): the model's pictures at both evaluation steps, via the step slider.
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys("pictures")
    title = _until(browser, "image panel", lambda: browser.find_element(By.XPATH, "//h4[@title='pictures/sample0']"))
    card = title.find_element(By.XPATH, "./ancestor::div[@data-testid='experiment-view-compare-runs-card']")
    card.find_element(By.XPATH, ".//button[@data-component-id='fullscreen_button_chartcard']").click()
    step_box = _until(browser, "step slider", lambda: browser.find_elements(
        By.XPATH, "//input[@data-component-id='mlflow.experiment_tracking.common.line_smooth_slider']")[1])
    assert (step_box.get_attribute("min"), step_box.get_attribute("max")) == ("2", "4")  # steps with pictures
    shown = {}
    for step in ("2", "4"):
        step_box.send_keys(Keys.CONTROL, "a")
        step_box.send_keys(step, Keys.TAB)
        image = _until(browser, f"picture at step {step}", lambda s=step: [
            i for i in browser.find_elements(By.TAG_NAME, "img")
            if f"step%2B{s}%2B" in (i.get_attribute("src") or "")
            and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)][-1:])[0]
        shown[step] = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert all(width > 0 and height > 0 for width, height in shown.values()), shown
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    time.sleep(0.5)
    _save(browser, "ui-pictures.png", tmp_path)
