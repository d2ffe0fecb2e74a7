"""The browser side of the web UI tests: Debian's ``chromium`` driven by Playwright, and raw calls to the daemon.

A test module imports the ``browser`` and ``ui`` fixtures from here and
defines its own ``daemon`` fixture (a :class:`~ui_daemon.UIDaemon`), which
``ui`` uses. Each ``ui`` page fails its test on any console error the test
did not expect. Screenshots go to ``MULLAMA_SCREENSHOTS`` (default: the
test's temporary directory).
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ui_daemon import UIDaemon

CHROMIUM = Path("/usr/bin/chromium")
#: Milliseconds a browser wait may take: generations on a shared two-core machine are slow.
WAIT = 120_000


def request(port: int, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw request: (status, headers, body); the path is sent exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def api(daemon: UIDaemon, method: str, path: str, body: Any = None) -> Any:
    """A JSON call that must succeed."""
    status, _, data = request(daemon.port, method, path, body)
    assert status == 200, data
    return json.loads(data) if data.strip() else None


@dataclass
class Page:
    """A browser page on the daemon's UI, and what its console reported."""

    page: Any
    daemon: UIDaemon
    errors: list[str] = field(default_factory=list)
    #: Console errors the test expects (substrings), ignored by the final check.
    expected: list[str] = field(default_factory=list)

    def open(self, route: str) -> None:
        """Go to a page of the UI (``chat``, ``models``...)."""
        self.page.goto(f"{self.daemon.url}/ui#/{route}")

    def screenshot(self, name: str) -> None:
        """Write the whole page to ``webui-NAME.png`` under ``MULLAMA_SCREENSHOTS``."""
        self.page.screenshot(path=str(Path(os.environ["MULLAMA_SCREENSHOTS"]) / f"webui-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium under Playwright, for a test module; skips the module when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture
def ui(browser: Any, daemon: UIDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Page]:
    """A fresh browser context (empty storage) whose page must log no unexpected console error."""
    if not os.environ.get("MULLAMA_SCREENSHOTS"):
        monkeypatch.setenv("MULLAMA_SCREENSHOTS", str(tmp_path))
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(WAIT)
    page = Page(context.new_page(), daemon)
    page.page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.page.on("pageerror", lambda error: page.errors.append(f"uncaught: {error}"))
    yield page
    context.close()
    unexpected = [text for text in page.errors if not any(part in text for part in page.expected)]
    assert not unexpected, unexpected
