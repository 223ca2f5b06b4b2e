"""Debian's headless Chromium driven by selenium, for the report's screenshots and its
end-to-end test. Needs the `chromium` and `chromium-driver` packages (installed by `.ci/run`)
and selenium (the `dev` extra)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# without the background-networking flags Chromium keeps trying to reach Google's hosts,
# which a closed network refuses, many at a time
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def available() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


@contextlib.contextmanager
def headless_chromium(width: int = 1200, height: int = 1600) -> Iterator:
    """A selenium Chrome driver on Debian's Chromium with a fresh, temporary profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # the driver's path is given, so selenium-manager never tries to download one
        driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER)), options=options
        )
        try:
            yield driver
        finally:
            driver.quit()
