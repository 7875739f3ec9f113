"""Headless Chromium for the tests that open the dashboard and the report in a real browser.

The browser is the system's (Debian: ``apt-get install -y chromium chromium-driver``), driven
by Selenium through the chromedriver that comes with it; Selenium's own driver downloads are
never used. Where either is missing the browser tests are skipped with a message that says
what to install (``.ci/run`` installs them when it runs as root with apt).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

INSTALL = "apt-get install -y chromium chromium-driver"
# How long a test waits for the page to show something (a wait, never an assertion on time).
WAIT_S = 90.0


def _find(names: tuple[str, ...], fixed: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in fixed if os.path.exists(p)), None)


def chromium_paths() -> tuple[str, str] | None:
    """The Chromium binary and its chromedriver, or None when either is missing."""
    binary = _find(("chromium", "chromium-browser"), ("/usr/bin/chromium",))
    driver = _find(("chromedriver",), ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))
    return None if binary is None or driver is None else (binary, driver)


def _skip_loudly() -> None:
    message = (
        "BROWSER TESTS SKIPPED: no headless Chromium with chromedriver on this machine. "
        f"Install them ({INSTALL}, as root on Debian; .ci/run does it) to test the dashboard "
        "and the report in a real browser."
    )
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


WINDOW = (1400, 1000)


@pytest.fixture(scope="session")
def _chromium() -> Iterator[Any]:
    """One headless Chromium (Selenium WebDriver) for the session's browser tests, quit at its
    end (starting one takes seconds on a busy machine)."""
    paths = chromium_paths()
    if paths is None:
        _skip_loudly()
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(_chromium: Any) -> Iterator[Any]:
    """The session's headless Chromium on a blank page at 1400x1000, as a test starts it; after
    the test it is left on a blank page again (no page of one test runs into the next)."""
    _chromium.get("about:blank")
    _chromium.set_window_size(*WINDOW)
    try:
        yield _chromium
    finally:
        _chromium.get("about:blank")


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Wait (up to :data:`WAIT_S`) until ``condition(driver)`` is truthy; fails naming ``what``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def full_page_screenshot(driver: Any, path: Path, width: int = 1400) -> Path:
    """A screenshot of the whole page (the window grown to the document's height)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(int(height) + 20, 6000))
    driver.save_screenshot(str(path))
    return path
