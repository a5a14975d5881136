"""The MLflow UI that ``detforge ui`` serves, seen through headless Chromium: a tracked run's metric charts and
prediction images, and the registered model's ``best-…`` aliases.

Needs Debian's ``chromium`` package and the ``playwright`` Python package (no ``playwright install``: it drives
/usr/bin/chromium); ``.ci/run`` installs both. Screenshots go to ``$DETFORGE_TEST_ARTIFACTS/ui_browser`` when that
is set, else to the test's ``tmp_path``; the test prints the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import detforge
from detforge.tracking.store import Store
from helpers import free_port, stop_process_group, tiny_config

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

EXPERIMENT = "ui-browser"
MODEL_NAME = "tiny"
MAX_ITER = 2
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CARD = "[data-testid=experiment-view-compare-runs-card]"
# MLflow's single-page app fetches everything after the first paint; on a busy 2-core machine a chart can take
# several seconds to appear, so every wait allows this long.
UI_TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page() -> Iterator[Page]:
    """A headless Chromium page (1400x1000); skips where Chromium or Playwright is not installed."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (no `chromium` on PATH): `apt-get install chromium` (Debian) to run it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Playwright driver is not installed: `pip install playwright` (no `playwright install`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@pytest.fixture
def screenshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """Where this test's screenshots go; printed past pytest's capture so the CI log shows it."""
    root = os.environ.get("DETFORGE_TEST_ARTIFACTS")
    folder = Path(root) / "ui_browser" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nMLflow UI screenshots: {folder}")
    return folder


@dataclass
class UiServer:
    """A running ``detforge ui``."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def wait_healthy(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        state = "did not answer /health" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        raise TimeoutError(f"`detforge ui` {state} within {timeout:.0f} s:\n{self.log_path.read_text()}")


@contextmanager
def detforge_ui(log_path: Path) -> Iterator[UiServer]:
    """``detforge ui`` on a free port, in its own process group (it runs mlflow, which runs uvicorn)."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("detforge")), "ui", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield UiServer(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        stop_process_group(proc)


def tracked_config(tiny_dataset: Path, out: Path) -> dict[str, Any]:
    """Two iterations, one evaluation at the end: metrics, two prediction images and two `best-…` aliases."""
    return tiny_config(
        tiny_dataset,
        out,
        train={"max_iter": MAX_ITER, "log_period": 1, "checkpoint_period": 500},
        eval={"period": 0, "best_metrics": ["bbox/AP50"]},
        tracking={
            "backend": "mlflow",
            "experiment": EXPERIMENT,
            "model_name": MODEL_NAME,
            "num_eval_images": 2,
            "score_threshold": 0.0,
            "log_datasets": False,
        },
    )


def test_mlflow_ui_shows_metric_charts_prediction_images_and_best_aliases(
    store: Store, tiny_dataset: Path, tmp_path: Path, page: Page, screenshots: Path
) -> None:
    # The schema exists before the server starts, so that its start-up (a few seconds) overlaps the training
    # without both processes creating tables at once.
    store.experiment_id(EXPERIMENT)
    with detforge_ui(tmp_path / "detforge-ui.log") as server:
        detforge.train(tracked_config(tiny_dataset, tmp_path / "run"))
        client = store.client()
        experiment_id = store.experiment_id(EXPERIMENT)
        (run,) = client.search_runs([experiment_id])
        run_id = run.info.run_id
        # MLflow stores each log_image call as images/<key>+step+<step>+timestamp+…
        image_keys = sorted({a.path.split("/")[-1].split("+step+")[0] for a in client.list_artifacts(run_id, "images")})
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in ("eval/bbox/AP50", "eval/bbox/AR100", "train/loss", "train/loss_classifier", "train/lr")
        }
        aliases = client.get_registered_model(MODEL_NAME).aliases
        assert len(image_keys) == 2 and set(aliases) == {"best-bbox-AR100", "best-bbox-AP50"}
        server.wait_healthy()

        with screenshot_on_failure(page, screenshots / "failure-run-page.png"):
            page.goto(f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
            check_metric_charts(page, history, screenshots)
            check_prediction_images(page, image_keys, step=MAX_ITER, screenshots=screenshots)
        with screenshot_on_failure(page, screenshots / "failure-registry-page.png"):
            page.goto(f"{server.url}/#/models/{MODEL_NAME}")
            check_registry_aliases(page, aliases, screenshots)


@contextmanager
def screenshot_on_failure(page: Page, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        page.screenshot(path=path)
        raise


def check_metric_charts(page: Page, history: dict[str, list[tuple[int, float]]], screenshots: Path) -> None:
    """The Model metrics tab draws each logged metric as a chart whose points are the values in the store."""
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for()
    close_assistant(page)
    for section in ("eval/bbox/", "train/"):
        search.fill(section)
        for key in (k for k in history if k.startswith(section)):
            # a chart's legend reads "<run name> (<metric key>)"
            chart = page.locator(CARD).filter(has_text=f"({key})").locator(".js-plotly-plot")
            chart.locator(".scatterlayer path.point").first.wait_for()
            points = chart.evaluate("plot => plot.data[0].x.map((step, i) => [step, plot.data[0].y[i]])")
            assert [[step, pytest.approx(value)] for step, value in sorted(history[key])] == points, key
        page.screenshot(path=screenshots / f"run-metrics-{section.strip('/').replace('/', '-')}.png")


def close_assistant(page: Page) -> None:
    """Close the MLflow Assistant side panel (if it is open) so that the screenshots show the page itself."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def check_prediction_images(page: Page, image_keys: list[str], *, step: int, screenshots: Path) -> None:
    """Each logged prediction image has a card that loads the picture the tracker sent at the evaluation step."""
    from playwright.sync_api import expect

    page.get_by_placeholder("Search metric charts").fill("val-")
    for key in image_keys:
        card = page.locator(CARD).filter(has=page.get_by_role("heading", name=key, exact=True))
        show_step(card, step)
        image = logged_image(card, key, step)
        assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0, key
    page.screenshot(path=screenshots / "run-images.png")
    # A card lists every run parameter above its picture, which pushes the picture out of sight; the full-screen
    # view has room for it.
    first = page.locator(CARD).filter(has=page.get_by_role("heading", name=image_keys[0], exact=True))
    first.locator("button[data-component-id=fullscreen_button_chartcard]").click()
    dialog = page.get_by_role("dialog")
    show_step(dialog, step)
    picture = logged_image(dialog, image_keys[0], step)
    picture.scroll_into_view_if_needed()
    expect(picture).to_be_in_viewport()
    page.screenshot(path=screenshots / "run-image-fullscreen.png")
    picture.screenshot(path=screenshots / f"{image_keys[0]}-step{step}.png")
    page.keyboard.press("Escape")


def logged_image(container: Locator, key: str, step: int) -> Locator:
    """The picture of image ``key`` at ``step`` in a card or dialog whose slider shows ``step``.

    MLflow up to 3.17 points the ``img`` at the artifact (``images/<key>+step+<step>+…``); 3.18 fetches the
    artifact itself and shows it through a ``blob:`` URL, so there the card's heading and slider say which image it
    is.
    """
    return container.locator(f'img[src*="{key}%2Bstep%2B{step}%2B"], img[src^="blob:"]').first


def show_step(container: Locator, step: int) -> None:
    """Move an image card's step slider to ``step``.

    With images at several steps a card opens at step 0 ("No image logged at this step"), and detforge logs its
    first images after the first training step. With one step the box is disabled and already shows it.
    """
    box = container.locator("input[type=number]").first
    if box.is_enabled():
        box.fill(str(step))
        box.press("Tab")  # the box commits on blur, not on Enter


def check_registry_aliases(page: Page, aliases: dict[str, str], screenshots: Path) -> None:
    """The registered model page lists each `best-…` alias on the version row that the registry says."""
    for alias, version in aliases.items():
        row = page.get_by_role("row").filter(has_text=f"Version {version}")
        row.get_by_text(alias, exact=False).first.wait_for()
    page.screenshot(path=screenshots / "registry-model.png", full_page=True)
