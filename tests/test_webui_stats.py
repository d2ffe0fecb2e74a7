"""The web UI's Statistics page in a real browser: the daemon's ``/api/stats`` as numbers, charts and tables.

The page refreshes itself; the test makes requests while it is open and
waits for the numbers and the charts to catch up with what the daemon says.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ui_daemon import MODEL, UIDaemon, ui_daemon
from webui_browser import Page, api, browser, request, ui  # noqa: F401 (browser, ui: fixtures)


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIDaemon]:
    with ui_daemon(model_path, tmp_path_factory.mktemp("webui-stats")) as started:
        yield started


def shown_totals(ui: Page) -> dict[str, str]:
    """The totals the page shows, by their ``data-stat``."""
    return ui.page.eval_on_selector_all(
        "#stats-totals .total", "items => Object.fromEntries(items.map((i) => [i.dataset.stat, "
                                "i.querySelector('dd').textContent]))")


def number(text: str) -> int:
    return int(text.replace(",", "").replace("\u202f", "").replace("\xa0", ""))


def chart_sum(ui: Page, selector: str) -> int:
    """The sum of the values the marks under ``selector`` carry."""
    return ui.page.eval_on_selector_all(selector, "marks => marks.reduce((sum, m) => sum + Number(m.dataset.value), 0)")


def generate(daemon: UIDaemon, prompt: str) -> dict[str, Any]:
    return api(daemon, "POST", "/api/generate", {"model": MODEL, "prompt": prompt, "stream": False})


def settled_total(daemon: UIDaemon, requests: int) -> dict[str, Any]:
    """The daemon's 24-hour total once it counts ``requests``: a request is counted just after its answer is sent."""
    deadline = time.monotonic() + 60
    while (total := api(daemon, "GET", "/api/stats?since=24h")["total"] or {}).get("requests") != requests:
        assert time.monotonic() < deadline, f"the daemon counts {total.get('requests')} requests, not {requests}"
        time.sleep(0.05)
    return total


def wait_for_requests(ui: Page, requests: int) -> None:
    ui.page.wait_for_function(
        f"() => document.querySelector('#stats-totals [data-stat=requests] dd')?.textContent.replace(/\\D/g, '')"
        f" === '{requests}'")


def test_the_page_shows_the_daemons_statistics_and_follows_new_requests(ui: Page) -> None:
    daemon = ui.daemon
    generate(daemon, "Say one word.")
    ui.open("stats")
    page = ui.page
    total = settled_total(daemon, 1)
    wait_for_requests(ui, total["requests"])
    shown = shown_totals(ui)
    assert number(shown["generated_tokens"]) == total["generated_tokens"] > 0
    assert number(shown["prompt_tokens"]) == total["prompt_tokens"] > 0
    assert shown["errors"] == "0" and shown["p50"].endswith(("ms", " s"))
    # The charts hold the same numbers: bars of requests and of tokens, a point per percentile in the hour used.
    assert chart_sum(ui, "#chart-requests rect") == total["requests"]
    assert chart_sum(ui, "#chart-tokens rect") == total["prompt_tokens"] + total["generated_tokens"]
    assert page.locator("#chart-latency circle").count() == 3
    assert page.locator('#stats-models tr[data-model="smol:latest"] td').first.inner_text() == str(total["requests"])
    for name in ("Requests per hour", "Tokens per hour", "Latency per hour"):
        chart = page.get_by_role("img", name=name)
        assert chart.get_attribute("aria-describedby")
    assert f"{total['requests']} requests in the last 24 hours, 0 failed" in page.locator(
        "#chart-requests desc").text_content()

    # New requests, including a failed one, reach the numbers, the bars and the table without a reload.
    page.get_by_text("Requests per hour as a table").click()
    for prompt in ("Count to three.", "Name a fruit."):
        generate(daemon, prompt)
    # An image for a model without a projector: refused once the model is known, so counted against it.
    status, _, _ = request(daemon.port, "POST", "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                                                    "images": ["aGVsbG8="]})
    assert status == 400
    after = settled_total(daemon, total["requests"] + 3)
    assert after["errors"] == 1
    wait_for_requests(ui, after["requests"])
    assert shown_totals(ui)["errors"] == "1"
    assert number(shown_totals(ui)["generated_tokens"]) == after["generated_tokens"] > total["generated_tokens"]
    assert chart_sum(ui, "#chart-requests rect") == after["requests"]
    assert chart_sum(ui, "#chart-requests rect.series-bad") == 1
    assert chart_sum(ui, "#chart-tokens rect") == after["prompt_tokens"] + after["generated_tokens"]
    # The table the reader opened stays open across refreshes and holds the same numbers.
    table = page.locator("#chart-requests-table")
    assert table.get_attribute("open") is not None
    cells = table.locator("tbody tr").evaluate_all(
        "rows => rows.map((r) => [...r.querySelectorAll('td')].map((c) => Number(c.textContent.replace(/\\D/g, ''))))")
    assert sum(ok + bad for ok, bad in cells) == after["requests"]
    page.set_viewport_size({"width": 1200, "height": 1100})
    ui.screenshot("stats")

    # A week, one model: the same requests, now among 7 days of hours labelled by day.
    page.select_option("#stats-period", "7d")
    page.select_option("#stats-model", "smol:latest")
    page.wait_for_function("() => document.querySelectorAll('#chart-requests .labels text').length >= 7")
    assert "in the last 7 days" in page.locator("#chart-requests desc").text_content()
    assert chart_sum(ui, "#chart-requests rect") == after["requests"]
    assert number(shown_totals(ui)["requests"]) == after["requests"]

    # Dark mode repaints the charts from the dark palette.
    light = page.eval_on_selector("#chart-requests rect.series-0", "r => getComputedStyle(r).fill")
    page.emulate_media(color_scheme="dark")
    dark = page.eval_on_selector("#chart-requests rect.series-0", "r => getComputedStyle(r).fill")
    assert light != dark
    ui.screenshot("stats-dark")

    # A phone's width: the charts shrink, nothing overflows sideways.
    page.set_viewport_size({"width": 380, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 380
    assert page.locator("#chart-requests svg").bounding_box()["width"] <= 380

