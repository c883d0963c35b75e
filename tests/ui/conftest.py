"""A real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) against
two real daemons on loopback, for the web page at `/ui/`.

Daemon A knows B as `b` (push), `b-bidir` (RemoteSelf), `b-proxy` (through a proxy that stalls
every bucket request, so that a transfer lasts long enough to be paused) and `dead` (a closed
port: disabled). Screenshots go to one folder of the test run, printed at the end of the session;
with `ACCELERATOR_UPDATE_SCREENSHOTS=1` the jobs page during a transfer is also copied to
`docs/jobs.png` (the README shows it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import free_port
from tests.faultproxy import Fault, FaultProxy
from tests.transfers.pair import Pair

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPOSITORY = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = REPOSITORY / "docs" / "jobs.png"

STALL = 0.25  # seconds per bucket request through `b-proxy`
OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2, "Threads": 2}}

_screenshot_folder: list[Path] = []


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra: pip install -e '.[test]')"
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()):
        return "chromium is not installed (Debian: apt-get install chromium chromium-driver; `./run test` does it as root)"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is not installed (Debian: apt-get install chromium-driver; `./run test` does it as root)"
    return None


def stall_buckets(method: str, path: str, attempt: int) -> Fault | None:
    if (method == "GET" and path.startswith("/transfers/chunks/")) or \
            (method == "PUT" and path.startswith("/transfers/push/")):
        return Fault.stall(STALL)
    return None


class UiPair(Pair):
    """The transfers pair, plus a peer `dead` on a closed port."""

    def __init__(self, *args: Any, dead_port: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dead_port = dead_port

    def config_a(self) -> dict[str, Any]:
        config = super().config_a()
        config["OrthancPeers"]["dead"] = {"Url": f"http://127.0.0.1:{self.dead_port}/"}
        return config


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[UiPair]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    port_b = free_port()
    with FaultProxy(f"http://127.0.0.1:{port_b}", stall_buckets) as proxy, \
            UiPair(tmp_path_factory.mktemp("ui-daemons"), a=OPTIONS, b=OPTIONS, proxy_url=proxy.url,
                   port_b=port_b, dead_port=free_port()) as pair:
        yield pair


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui-screenshots")
    _screenshot_folder.append(folder)
    return folder


@pytest.fixture(scope="module")
def driver(pair, tmp_path_factory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                     "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failures
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    browser.set_script_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.ui_failed = report.failed


@pytest.fixture(autouse=True)
def screenshot_on_failure(request, screenshots) -> Iterator[None]:
    """A failed browser test leaves the page as it was (PNG and HTML) next to the screenshots."""
    yield
    if getattr(request.node, "ui_failed", False) and "driver" in request.fixturenames:
        browser = request.getfixturevalue("driver")
        try:
            browser.save_screenshot(str(screenshots / f"FAILED-{request.node.name}.png"))
            (screenshots / f"FAILED-{request.node.name}.html").write_text(browser.page_source)
            console = "\n".join(f"{e['level']} {e['message']}" for e in browser.get_log("browser"))
            (screenshots / f"FAILED-{request.node.name}.console.txt").write_text(console)
        except Exception:  # the browser itself may be what failed
            pass


def save_screenshot(browser: Any, folder: Path, name: str, *, docs: bool = False) -> Path:
    path = folder / f"{name}.png"
    assert browser.save_screenshot(str(path)), f"no screenshot {path}"
    if docs and os.environ.get("ACCELERATOR_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOT)
    return path


def pytest_terminal_summary(terminalreporter) -> None:
    for folder in _screenshot_folder:
        if any(folder.iterdir()):
            terminalreporter.write_line(f"web page screenshots: {folder}")
