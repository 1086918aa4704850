"""/docs in headless Chromium with no internet: the page renders and "Try it out" works.

Needs Debian's chromium and chromium-driver (.ci/run installs them). Skipped where they
are missing, except in CI, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_schemathesis import served
from tests.helpers import noise_jpeg

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromedriver (.ci/run installs them)")
        pytest.skip("chromium or chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_docs_render_offline_and_try_it_out_embeds_a_crop(  # type: ignore[no-untyped-def]
    browser, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    crop = tmp_path / "crop.jpg"
    crop.write_bytes(noise_jpeg(4))
    url, process = served(tiny_model_dir, tmp_path)
    try:
        browser.get(f"{url}/docs")
        wait = WebDriverWait(browser, 60)
        operation = wait.until(
            ready.element_to_be_clickable((By.CSS_SELECTOR, "[id^='operations-embeddings-embed_']"))
        )
        titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
        assert {"/embed", "/embed/batch", "/analyze", "/similarity"} <= set(titles)
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, ".try-out__btn"))).click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
        browser.find_element(By.CSS_SELECTOR, "input[type='file']").send_keys(str(crop))
        browser.find_element(By.CSS_SELECTOR, ".btn.execute").click()
        cell = (By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
        wait.until(ready.presence_of_element_located(cell))
        assert browser.find_element(*cell).text.strip() == "200"
        body = browser.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
        assert '"embedding"' in body
        assert '"dim": 64' in body
    finally:
        process.kill()
        process.wait()
