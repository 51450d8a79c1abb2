"""The Virtual HQ page in a real browser, against `presenced demo` (three regions, one process).

Playwright drives Debian's Chromium (``/usr/bin/chromium``; Playwright never downloads a
browser here). Two users on two regions: ann on eu, bob on us. Ann's cursor must show on
bob's page where ann put it, a direct message must reach bob and come back delivered and
read, and when ann's tab closes she must vanish from bob's page.

Without Chromium (or node, for the JavaScript unit tests) these tests skip, unless
``PRESENCED_REQUIRE_BROWSER=1`` (set by ``.ci/run``), in which case they fail: CI never
skips them silently. Screenshots go to ``$PRESENCED_ARTIFACTS/browser/`` when that is set,
else to pytest's ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: A real browser against a real daemon.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "presenced" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_LINE = re.compile(r"^\s+(eu|us|ap)\s+(http://\S+/)\s+(ws://\S+/)\s*$")
#: Milliseconds for anything to show up on a page (cross-region gossip takes a few ticks).
WAIT_MS = 10_000


def required() -> bool:
    return os.environ.get("PRESENCED_REQUIRE_BROWSER", "") not in ("", "0")


def missing(what: str) -> None:
    """Skip for want of ``what``, or fail when CI requires the browser tests to run."""
    if required():
        pytest.fail(f"{what} is missing and PRESENCED_REQUIRE_BROWSER is set")
    pytest.skip(f"{what} is missing (set PRESENCED_REQUIRE_BROWSER=1 to make this a failure)")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``$PRESENCED_ARTIFACTS/browser`` or the test's tmp_path."""
    base = os.environ.get("PRESENCED_ARTIFACTS")
    folder = Path(base) / "browser" if base else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------ JavaScript unit tests


def test_javascript_client_unit_tests() -> None:
    """presenced.js: presence maps, throttling, reconnects, receipts (``node --test``)."""
    node = shutil.which("node")
    if node is None:
        missing("node")
    result = subprocess.run(
        [node, "--test", str(WEB / "presenced.test.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^# fail 0$", result.stdout, re.MULTILINE), result.stdout


# ------------------------------------------------------------------ the page, in Chromium


class Demo:
    """`python -m presenced demo --port-base 0` in a subprocess, with its page URLs."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "presenced", "demo", "--port-base", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def pages(self, timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {m.group(1): m.group(2) for line in self.lines if (m := PAGE_LINE.match(line))}
            if len(found) == 3:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"presenced demo printed no page URLs:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture
def demo() -> Iterator[Demo]:
    running = Demo()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        missing(str(CHROMIUM))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, size: tuple[int, int], problems: list[str]) -> Any:
    """A page in a context of its own (its own sessionStorage), recording console errors."""
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.on("pageerror", lambda error: problems.append(f"{url}: {error}"))
    page.on(
        "console",
        lambda message: message.type == "error" and problems.append(f"{url}: {message.text}"),
    )
    page.goto(url)
    page.wait_for_selector('[data-testid="status"][data-status="connected"]', timeout=WAIT_MS)
    return page


def wait_online(page: Any, user: str, *, present: bool = True) -> None:
    selector = f'[data-testid="online-list"] [data-testid="online-{user}"]'
    page.wait_for_selector(selector, state="attached" if present else "detached", timeout=WAIT_MS)


def cursor_at(page: Any, user: str, x: float, y: float, tolerance: float = 0.5) -> None:
    """Wait until ``user``'s cursor on ``page`` is shown at (x %, y %) of the floor."""
    page.wait_for_function(
        """([user, x, y, tolerance]) => {
             const c = document.querySelector(`[data-testid="cursor-${user}"]`);
             return !!c && !c.hidden
               && Math.abs(parseFloat(c.style.left) - x) <= tolerance
               && Math.abs(parseFloat(c.style.top) - y) <= tolerance;
           }""",
        arg=[user, x, y, tolerance],
        timeout=WAIT_MS,
    )


def test_virtual_hq_across_two_regions(demo: Demo, browser: Any, artifacts: Path) -> None:
    pages = demo.pages()
    problems: list[str] = []
    # Different window sizes: positions travel as fractions of the floor, not pixels.
    ann = open_page(browser, pages["eu"] + "?user=ann", (1280, 800), problems)
    bob = open_page(browser, pages["us"] + "?user=bob", (1000, 720), problems)
    wait_online(ann, "bob")
    wait_online(bob, "ann")
    assert bob.get_attribute('[data-testid="online-ann"]', "data-sessions") == "1"
    assert "eu" in bob.inner_text('[data-testid="online-ann"]').lower()

    # Ann's mouse at (30 %, 65 %) of her floor shows at (30 %, 65 %) of bob's floor.
    box = ann.locator('[data-testid="floor"]').bounding_box()
    assert box is not None
    ann.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.1 * box["height"])
    ann.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.65 * box["height"], steps=8)
    cursor_at(bob, "ann", 30, 65)
    label = bob.inner_text('[data-testid="cursor-ann"]').lower()
    assert "ann" in label and "eu" in label
    # And the other way round, on a smaller floor.
    box = bob.locator('[data-testid="floor"]').bounding_box()
    assert box is not None
    bob.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.2 * box["height"], steps=4)
    cursor_at(ann, "bob", 80, 20)
    assert ann.locator('[data-testid="cursor-ann"]').count() == 0, "no cursor for oneself"
    assert ann.inner_text('[data-testid="latency"]').endswith("ms")
    ann.screenshot(path=str(artifacts / "ann-eu.png"))
    bob.screenshot(path=str(artifacts / "bob-us.png"))

    # Room chat, through the room broadcast.
    bob.fill('[data-testid="chat-input"]', "hello from us")
    bob.click('[data-testid="chat-send"]')
    ann.wait_for_selector('[data-testid="chat-line"]:has-text("hello from us")', timeout=WAIT_MS)

    # A direct message from ann (eu) to bob (us): shown to bob, delivered then read for ann.
    ann.select_option('[data-testid="chat-to"]', "bob")
    ann.fill('[data-testid="chat-input"]', "hi bob, standup?")
    ann.click('[data-testid="chat-send"]')
    bob.wait_for_selector('[data-testid="dm-in"]:has-text("hi bob, standup?")', timeout=WAIT_MS)
    ann.wait_for_selector(
        '[data-testid="dm-out"][data-state="delivered"], [data-testid="dm-out"][data-state="read"]',
        timeout=WAIT_MS,
    )
    # bob's page is visible, so it sends the read receipt: ✓✓.
    ann.wait_for_selector('[data-testid="dm-out"][data-state="read"]', timeout=WAIT_MS)
    assert ann.inner_text('[data-testid="dm-out"] .mark') == "✓✓"
    # Typing took the mice off the floors (cursors hidden); back on, they show again.
    for page, x, y in ((ann, 0.45, 0.4), (bob, 0.6, 0.7)):
        box = page.locator('[data-testid="floor"]').bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=4)
    cursor_at(bob, "ann", 45, 40)
    cursor_at(ann, "bob", 60, 70)
    ann.screenshot(path=str(artifacts / "ann-eu-direct-message.png"))
    bob.screenshot(path=str(artifacts / "bob-us-direct-message.png"))

    # Ann closes her tab: she leaves bob's list and cursor layer.
    ann.context.close()
    wait_online(bob, "ann", present=False)
    bob.wait_for_selector('[data-testid="cursor-ann"]', state="detached", timeout=WAIT_MS)
    assert bob.inner_text('[data-testid="online-count"]') == "1"
    bob.screenshot(path=str(artifacts / "bob-us-after-ann-left.png"))
    bob.context.close()
    assert not problems, problems
    assert demo.stop() == 0, demo.output()
    assert "Traceback" not in demo.output(), demo.output()
