"""A real headless browser for the tests of `baton report`'s page: Debian's chromium driven by Selenium.

Plain functions, so any test file can use them (tests run with `pytest -n 2 --dist loadfile`, where one file's
fixtures are not another's). The tests that use them are marked `browser`, a tier of their own (`make test-browser`;
`make test-fast` leaves them out). Without chromium and chromedriver, `chromium()` installs them when it can (root and
apt-get, as tests/slurm/cluster/start.sh installs Slurm) and otherwise skips the test with the reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# every plotly figure's traces that drew something: lines with a path, points (markers, bars)
FIGURES_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(div => ({
  id: div.id,
  svg: div.querySelectorAll('.main-svg').length,
  drawn: Array.from(div.querySelectorAll('.scatterlayer .trace path.js-line, .scatterlayer .trace .points path,'
                                         + ' .barlayer .point path'))
         .filter(p => (p.getAttribute('d') || '').length > 4).length,
}));
"""


@functools.cache
def _installed() -> str | None:
    """None when chromium and chromedriver are there (installing them if need be); else why not."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} or {CHROMEDRIVER} missing, and installing them needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # an install is not something a test run does silently: pytest lists the warning at the end
    warnings.warn(f"{CHROMIUM} missing: installing Debian's chromium and chromium-driver with apt-get "
                  "(about 25 packages)", stacklevel=2)
    install = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=120", "--no-install-recommends",
               "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"apt-get install chromium chromium-driver failed: {proc.stderr.strip()[-300:]}"
    return None if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER) else "chromium still missing"


def chromium() -> Any:
    """A headless chromium WebDriver that keeps the console's messages (quit it when done), or skip the test."""
    reason = _installed()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def check_report(page: Path, stages: list[str], *, plots: int, timeout: float = 60) -> dict[str, Any]:
    """Open `page` (file://) in the browser and check it rendered: no SEVERE console message, `plots` plotly figures
    each with a drawn trace, the lineage picture with a box (`stage-<i>`) for each stage, every table with rows, every
    stage named. Returns what it found."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(page.resolve().as_uri())
        WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && window.Plotly !== undefined && "
            "Array.from(document.querySelectorAll('.js-plotly-plot')).every(div => div.querySelector('.main-svg'))"))
        WebDriverWait(driver, timeout).until(lambda d: all(f["drawn"] for f in d.execute_script(FIGURES_JS)))
        figures = driver.execute_script(FIGURES_JS)
        lineage = driver.execute_script("""
            const svg = document.querySelector('#lineage svg');
            if (!svg) return null;
            const box = svg.getBoundingClientRect();
            return {width: box.width, height: box.height,
                    nodes: Array.from(svg.querySelectorAll('[id^="stage-"]'))
                           .filter(g => g.getBoundingClientRect().width > 0).length,
                    text: svg.textContent};""")
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => [t.className, "
            "t.querySelectorAll('tbody tr').length]);")
        text = driver.execute_script("return document.body.innerText;")
        switched = _switch_to_tokens(driver)
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    finally:
        driver.quit()
    assert not severe, severe
    assert len(figures) == plots and all(f["svg"] and f["drawn"] for f in figures), figures
    assert lineage is not None and lineage["width"] > 0 and lineage["height"] > 0, lineage
    assert lineage["nodes"] == len(stages) and all(s in lineage["text"] for s in stages), lineage  # a box each
    assert tables and all(rows for _, rows in tables), tables
    missing = [s for s in stages if s not in text]
    assert not missing, missing
    return {"figures": figures, "lineage": lineage, "tables": tables, "switched": switched}


def _switch_to_tokens(driver: Any) -> bool | None:
    """Press the training curves' "tokens" button: True when the first trace's x changed (None: no buttons)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    buttons = driver.find_elements(By.CSS_SELECTOR, "#curves .updatemenu-button")
    if not buttons:
        return None
    first_x = "return JSON.stringify(document.querySelector('#curves .js-plotly-plot').data[0].x);"
    before = driver.execute_script(first_x)
    buttons[1].click()
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(first_x) != before)
    return True
