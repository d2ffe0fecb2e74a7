"""The web UI against a daemon that requires API keys: it asks for the key, keeps it for the tab's session only.

The daemon has ``MULLAMA_API_KEY`` (every scope) and a keys file with a
key that may run models but not read statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import running
from ui_daemon import UIDaemon
from webui_browser import WAIT, Page, browser, request, ui  # noqa: F401 (browser, ui: fixtures)

from mullama.ops.keys import create_key

KEY = "mk-the-web-ui-test-key"
KEY_STORAGE = "mullama.apiKey"


@pytest.fixture(scope="module")
def inference_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, create_key(path, "runner", ["inference"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, inference_key: tuple[Path, str]) -> Iterator[UIDaemon]:
    with running(tmp_path_factory.mktemp("webui-keys"), MULLAMA_API_KEY=KEY,
                 MULLAMA_KEYS=str(inference_key[0])) as server:
        yield UIDaemon(server, server.server_address[1])


def answer(page: Any, text: str) -> None:
    """Type ``text`` into the open dialog and submit it."""
    page.locator("#dialog-input").fill(text)
    page.locator("#dialog-input").press("Enter")


def test_the_daemon_refuses_the_api_without_the_key(daemon: UIDaemon) -> None:
    assert request(daemon.port, "GET", "/api/tags")[0] == 401
    assert request(daemon.port, "GET", "/ui/app.js")[0] == 200
    assert request(daemon.port, "GET", "/api/tags", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_the_ui_asks_for_the_key_once_and_keeps_it_for_the_session_only(ui: Page, browser: Any) -> None:
    page = ui.page
    refusals: list[str] = []
    page.on("response", lambda response: refusals.append(response.url) if response.status == 401 else None)
    ui.expected.append("401 (Unauthorized)")
    ui.open("models")
    dialog = page.locator("#dialog")
    dialog.get_by_text("This daemon requires an API key").wait_for()
    # /api/version and /api/tags were both refused; one dialog asks for both.
    assert page.evaluate("document.querySelectorAll('dialog[open]').length") == 1
    assert page.locator("#dialog-input").get_attribute("type") == "password"
    answer(page, "mk-wrong")
    dialog.get_by_text("The daemon refused that key").wait_for()
    answer(page, KEY)
    page.get_by_text("No models yet").wait_for()
    page.locator("#version", has_text="v").wait_for()
    assert dialog.is_hidden()
    assert {url.rsplit("/", 1)[-1] for url in refusals} == {"version", "tags"}
    # Kept in sessionStorage only: not in localStorage, not in a cookie.
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == KEY
    assert KEY not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert page.context.cookies() == []

    # A reload is the same session: no question.
    refusals.clear()
    page.reload()
    page.get_by_text("No models yet").wait_for()
    assert refusals == [] and dialog.is_hidden()

    # Another session (a new context) is asked again; cancelling shows the refusal.
    context = browser.new_context()
    context.set_default_timeout(WAIT)
    try:
        other = context.new_page()
        other.goto(f"{ui.daemon.url}/ui#/models")
        other.locator("#dialog").get_by_text("This daemon requires an API key").wait_for()
        assert other.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None
        other.locator("#dialog-cancel").click()
        other.get_by_text("Could not list the models:").wait_for()
    finally:
        context.close()


def test_a_key_without_the_metrics_scope_is_told_so_on_the_statistics_page(
        ui: Page, inference_key: tuple[Path, str]) -> None:
    page = ui.page
    ui.expected.append("403 (Forbidden)")
    page.add_init_script(f"sessionStorage.setItem('{KEY_STORAGE}', {inference_key[1]!r})")
    ui.open("stats")
    page.locator("#stats-error", has_text="This API key may not read statistics").wait_for()
    assert "metrics scope" in page.locator("#stats-error").inner_text()
    assert page.locator("#dialog").is_hidden()
