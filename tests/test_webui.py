"""The web UI at ``/ui``: its files as the daemon serves them, and the pages driven in a real browser.

The browser is Debian's ``chromium`` driven by Playwright (``.ci/run``
installs it when missing; see tests/webui_browser.py); the daemon is a real in-process one with the
real test model, and pulls come from the local test Hub.  Every page is
checked for console errors when its test ends.  Screenshots of the pages
go to ``MULLAMA_SCREENSHOTS`` (default: the test's temporary directory).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import create_model, serve
from ui_daemon import MODEL, PULL_NAME, UIDaemon, ui_daemon
from webui_browser import Page, api, browser, request, ui  # noqa: F401 (browser, ui: fixtures)

from mullama.http import webui


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIDaemon]:
    with ui_daemon(model_path, tmp_path_factory.mktemp("webui")) as started:
        yield started


# --- the files ---------------------------------------------------------------


def test_root_keeps_ollamas_answer(daemon: UIDaemon) -> None:
    status, _, body = request(daemon.port, "GET", "/")
    assert (status, body) == (200, b"Ollama is running")


@pytest.mark.parametrize(("path", "content_type"), [
    ("/ui", "text/html; charset=utf-8"),
    ("/ui/", "text/html; charset=utf-8"),
    ("/ui/app.js", "text/javascript; charset=utf-8"),
    ("/ui/style.css", "text/css; charset=utf-8"),
    ("/ui/icon.svg", "image/svg+xml"),
    ("/ui/vendor/marked.esm.js", "text/javascript; charset=utf-8"),
    ("/ui/vendor/purify.es.mjs", "text/javascript; charset=utf-8"),
])
def test_files_are_served_with_type_policy_and_cache_headers(daemon: UIDaemon, path: str, content_type: str) -> None:
    status, headers, body = request(daemon.port, "GET", path)
    assert status == 200 and body
    assert headers["Content-Type"] == content_type
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-cache"
    status, again, empty = request(daemon.port, "GET", path, headers={"If-None-Match": headers["ETag"]})
    assert (status, empty) == (304, b"")
    status, _, head_body = request(daemon.port, "HEAD", path)
    assert (status, head_body) == (200, b"")


def test_the_page_has_no_inline_script_or_style() -> None:
    page = (webui.WEB_ROOT / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script type="module" src="/ui/app.js">']
    assert "<style" not in page and not re.search(r"\s(style|on\w+)=", page)


@pytest.mark.parametrize("path", [
    "/ui/../http/webui.py",
    "/ui/../../setup.cfg",
    "/ui/vendor/../../http/webui.py",
    "/ui/%2e%2e/http/webui.py",
    "/ui/..%2fhttp%2fwebui.py",
    "/ui/..%5chttp%5cwebui.py",
    "/ui/..\\http\\webui.py",
    "/ui//etc/passwd",
    "/ui/%2fetc%2fpasswd",
    "/ui/./index.html",
    "/ui/index.html%00.js",
    "/ui/vendor",
    "/ui/missing.js",
])
def test_nothing_outside_the_web_files_is_reachable(daemon: UIDaemon, path: str) -> None:
    status, headers, body = request(daemon.port, "GET", path)
    assert status == 404, body[:200]
    assert headers["Content-Type"].startswith("application/json")
    assert b"import" not in body and b"root:" not in body


def test_the_ui_obeys_the_dns_rebinding_rule(daemon: UIDaemon) -> None:
    status, _, body = request(daemon.port, "GET", "/ui/app.js", headers={"Host": "attacker.example:11434"})
    assert status == 403 and b"import" not in body


def test_only_get_and_head_are_served(daemon: UIDaemon) -> None:
    status, _, _ = request(daemon.port, "POST", "/ui/app.js", {})
    assert status == 405


def test_vendored_files_match_their_recorded_sha256() -> None:
    vendor = webui.WEB_ROOT / "vendor"
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \| `[^`]+` → `([^`]+)` \| `([0-9a-f]{64})` \| [^|]*\(`([^`]+)`\)",
                      (vendor / "VENDORED.md").read_text(), re.MULTILINE)
    assert {row[0] for row in rows} == {"marked", "dompurify"}
    for name, version, file, sha256, licence in rows:
        assert hashlib.sha256((vendor / file).read_bytes()).hexdigest() == sha256, f"{name} {version} was changed"
        assert (vendor / licence).stat().st_size > 500


# --- in the browser -------------------------------------------------------------


def assistant_text(ui: Page) -> str:
    return ui.page.locator(".message.assistant .content").last.inner_text()


def test_every_page_loads(ui: Page) -> None:
    ui.open("chat")
    ui.page.locator('#model-picker option[value="smol:latest"]').wait_for(state="attached")
    assert ui.page.locator("#model-picker option").all_inner_texts() == ["smol:latest"]
    for route, heading in (("models", "Models"), ("running", "Running models"), ("stats", "Statistics")):
        ui.open(route)
        ui.page.get_by_role("heading", name=heading, exact=True).wait_for()
        assert ui.page.locator('nav a[aria-current="page"]').get_attribute("data-page") == route
    ui.page.get_by_role("img", name="Requests per hour").wait_for()


def test_chat_streams_answers_regenerates_edits_and_keeps_them(ui: Page) -> None:
    ui.open("chat")
    page = ui.page
    page.locator('#model-picker option[value="smol:latest"]').wait_for(state="attached")
    page.fill("#prompt", "Name three colours.")
    page.press("#prompt", "Enter")
    # While the Stop button shows, text is already in the page: the answer streams.
    page.wait_for_function("""() => !document.querySelector('#stop').hidden
        && document.querySelector('.message.assistant .content')?.textContent.trim().length > 0""")
    page.locator("#send").wait_for()
    stats = page.locator(".message.assistant .stats").inner_text()
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · prompt \d+ tokens( · stopped at the token limit)?",
                        stats), stats
    first = assistant_text(ui)
    assert first.strip()
    ui.screenshot("chat")

    page.reload()
    page.locator(".message.assistant .stats").wait_for()
    assert assistant_text(ui) == first
    assert page.locator(".conversation-list li.current").inner_text().startswith("Name three colours.")

    page.click("#regenerate")
    page.locator("#stop").wait_for(state="hidden")
    page.locator(".message.assistant .stats").wait_for()
    assert page.locator(".message").count() == 2
    assert assistant_text(ui).strip()

    page.locator(".message.user").get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Say hello in French.")
    page.get_by_role("button", name="Save and send").click()
    page.locator("#stop").wait_for(state="hidden")
    page.locator(".message.assistant .stats").wait_for()
    assert page.locator(".message").count() == 2
    assert page.locator(".message.user .content").inner_text() == "Say hello in French."
    assert assistant_text(ui).strip() and assistant_text(ui) != first


def test_stop_aborts_the_generation(ui: Page) -> None:
    ui.open("chat")
    page = ui.page
    page.locator('#model-picker option[value="smol:latest"]').wait_for(state="attached")
    page.click("text=Settings")
    page.get_by_label("Max tokens (num_predict)").fill("4000")
    page.get_by_label("System prompt").fill("You write very long stories.")
    page.fill("#prompt", "Tell me a long story about a lighthouse.")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.message.assistant .content')?.textContent.trim().length > 0")
    page.click("#stop")
    page.locator("#send").wait_for()
    stats = page.locator(".message.assistant .stats").inner_text()
    assert stats == "stopped", stats
    deadline = time.monotonic() + 60
    while any(model["active"] for model in api(ui.daemon, "GET", "/api/ps")["models"]):
        assert time.monotonic() < deadline, "the daemon kept generating after Stop"
        time.sleep(0.1)


HOSTILE_MARKDOWN = """# Heading

**bold** and `code`

<script>window.__xss = 1</script>

<img src=x onerror="window.__xss = 2">

[click](javascript:window.__xss=3)

<a href="javascript:window.__xss=4">raw link</a>

<a href="&#106;avascript:window.__xss=5">entity link</a>

<iframe src="javascript:window.__xss=6"></iframe>

<svg onload="window.__xss=7"></svg>

<details open ontoggle="window.__xss=8">toggle</details>

<form action="javascript:window.__xss=10"><button>go</button></form>

![image](x" onerror="window.__xss=11)

[reference][evil]

[safe](https://example.com/)

[evil]: javascript:window.__xss=12

```html
<script>window.__xss = 13</script>
```

<math><mtext><table><mglyph><style><img src=x onerror="window.__xss=9">

"""


#: Elements and attributes that could run script, as the page holds them.
DANGEROUS_NODES = """() => [...document.querySelectorAll('main *')].filter((e) =>
    ['SCRIPT', 'IMG', 'IFRAME', 'SVG', 'svg', 'MATH', 'math', 'STYLE'].includes(e.tagName)
    || [...e.attributes].some((a) => a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))
).map((e) => e.outerHTML)"""


def test_hostile_model_output_and_metadata_run_no_script(ui: Page, model_path: Path) -> None:
    conversation = {"id": "hostile", "title": "<img src=x onerror=window.__xss=20>", "model": "smol:latest",
                    "system": "", "options": {}, "think": False, "updated": 0, "messages": [
                        {"role": "user", "content": "<script>window.__xss = 21</script>",
                         "images": ['" onerror="window.__xss=25', "javascript:window.__xss=26",
                                    "iVBORw0KGgo\" onerror=\"window.__xss=27", {"src": "x"}]},
                        {"role": "assistant", "content": HOSTILE_MARKDOWN,
                         "thinking": "<img src=x onerror=window.__xss=22>",
                         "tool_calls": [{"function": {"name": "<img src=x onerror=window.__xss=23>",
                                                      "arguments": {"html": "<script>window.__xss=24</script>"}}}]}]}
    page = ui.page
    # Parsing the <style> of the last payload, the sanitiser meets the policy, which refuses it and says so.
    ui.expected.append("Applying inline style violates the following Content Security Policy directive")
    page.add_init_script(f"localStorage.setItem('mullama.conversations', JSON.stringify([{json.dumps(conversation)}]))")
    ui.open("chat")
    message = page.locator(".message.assistant")
    message.locator("h1").wait_for()
    assert message.locator("h1").inner_text() == "Heading"
    assert message.locator("strong").inner_text() == "bold"
    assert "<script>window.__xss = 13</script>" in message.locator("pre code").inner_text()
    assert message.locator("a[href='https://example.com/']").get_attribute("rel") == "noopener noreferrer nofollow"
    assert page.locator(".message.user .content").inner_text() == "<script>window.__xss = 21</script>"
    assert "<img src=x onerror=window.__xss=23>" in message.locator(".tool-call").inner_text()

    assert page.evaluate(DANGEROUS_NODES) == []

    create_model(ui.daemon.port, model_path, "hostile", license="<img src=x onerror=window.__xss=30>",
                 system="<script>window.__xss=31</script>",
                 template="{{ .Prompt }}<svg onload=window.__xss=32>")
    try:
        ui.open("models")
        page.get_by_role("button", name="Details of hostile:latest").click()
        details = page.locator("#model-details")
        details.get_by_text("<img src=x onerror=window.__xss=30>", exact=True).wait_for()
        assert "<script>window.__xss=31</script>" in details.inner_text()
        assert "<svg onload=window.__xss=32>" in details.inner_text()
        assert page.evaluate(DANGEROUS_NODES) == []
        assert page.evaluate("window.__xss") is None
    finally:
        api(ui.daemon, "DELETE", "/api/delete", {"model": "hostile"})


def test_models_page_lists_creates_copies_and_deletes(ui: Page) -> None:
    ui.open("models")
    page = ui.page
    row = page.locator('tr[data-model="smol:latest"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[:5] == ["98 MB", "llama", "134.52M", "Q4_1", "completion"], cells

    page.fill("#create-name", "made-in-ui")
    page.fill("#modelfile",
              'FROM smol\nPARAMETER temperature 0.25\nPARAMETER stop "<|im_end|>"\nSYSTEM """Be brief."""\n')
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("#create-status", has_text="Created made-in-ui.").wait_for()
    page.locator('tr[data-model="made-in-ui:latest"]').wait_for()
    shown = api(ui.daemon, "POST", "/api/show", {"model": "made-in-ui"})
    assert shown["system"] == "Be brief." and re.search(r"temperature\s+0\.25", shown["parameters"])

    page.get_by_role("button", name="Details of made-in-ui:latest").click()
    details = page.locator("#model-details")
    details.get_by_text("Be brief.", exact=True).wait_for()
    assert re.search(r"temperature\s+0\.25", details.inner_text())
    ui.screenshot("models")

    page.get_by_role("button", name="Copy made-in-ui:latest").click()
    page.get_by_label("New name").fill("ui-copy")
    page.get_by_role("button", name="Copy", exact=True).click()
    page.locator('tr[data-model="ui-copy:latest"]').wait_for()

    for name in ("ui-copy:latest", "made-in-ui:latest"):
        page.get_by_role("button", name=f"Delete {name}").click()
        page.locator("#dialog").get_by_role("button", name="Delete").click()
        page.locator(f'tr[data-model="{name}"]').wait_for(state="detached")
    assert [m["name"] for m in api(ui.daemon, "GET", "/api/tags")["models"]] == ["smol:latest"]


def test_modelfile_errors_are_shown_not_sent(ui: Page) -> None:
    ui.open("models")
    page = ui.page
    page.fill("#create-name", "broken")
    page.fill("#modelfile", 'PARAMETER temperature 0.5\nSYSTEM """never closed\n')
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("#create-status", has_text="Modelfile line 2: unterminated triple-quoted value").wait_for()
    page.fill("#modelfile", "FROM no-such-model\n")
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("#create-status", has_text='Create failed: model "no-such-model" not found').wait_for()


def test_pull_shows_progress_speed_and_eta_and_can_be_cancelled(ui: Page) -> None:
    hub = ui.daemon.hub
    ui.open("models")
    page = ui.page
    page.locator('tr[data-model="smol:latest"]').wait_for()
    hub.state.delay = 0.02
    try:
        page.fill("#pull-name", PULL_NAME)
        page.get_by_role("button", name="Pull", exact=True).click()
        page.locator("#pull-status", has_text=re.compile(r"\d+% · .* / 98 MB · .*/s · .* left")).wait_for()
        start = page.eval_on_selector("#pull-progress", "bar => bar.value")
        page.wait_for_function(f"() => document.querySelector('#pull-progress').value > {start}")
        ui.screenshot("pull")
        page.get_by_role("button", name="Cancel").click()
        page.locator("#pull-status", has_text="Pull cancelled.").wait_for()
        assert PULL_NAME not in [m["name"] for m in api(ui.daemon, "GET", "/api/tags")["models"]]
    finally:
        hub.state.delay = 0.0
    page.fill("#pull-name", PULL_NAME)
    page.get_by_role("button", name="Pull", exact=True).click()
    page.locator("#pull-status", has_text=f"Pulled {PULL_NAME}.").wait_for()
    page.locator(f'tr[data-model="{PULL_NAME}"]').wait_for()
    api(ui.daemon, "DELETE", "/api/delete", {"model": PULL_NAME})


def test_running_page_shows_the_loaded_model_and_unloads_it(ui: Page) -> None:
    api(ui.daemon, "POST", "/api/generate", {"model": MODEL, "keep_alive": "10m"})
    ui.open("running")
    page = ui.page
    row = page.locator('tr[data-model="smol:latest"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[3] == "0 / 1" and int(cells[2]) > 0 and cells[5] in ("in 10 minutes", "in 9 minutes"), cells
    ui.screenshot("running")
    row.get_by_role("button", name="Unload smol:latest").click()
    page.locator("#nothing-running").wait_for()
    assert api(ui.daemon, "GET", "/api/ps")["models"] == []


def test_a_stopped_daemon_shows_a_banner(ui: Page, tmp_path: Path) -> None:
    # A daemon in its own process: stopping it closes the connections the browser keeps alive.
    serving = serve(tmp_path)
    try:
        ui.page.goto(f"http://127.0.0.1:{serving.port}/ui#/models")
        ui.page.get_by_text("No models yet").wait_for()
    finally:
        serving.stop()
    ui.expected.append("net::ERR_CONNECTION_REFUSED")
    ui.page.click("nav >> text=Running")
    banner = ui.page.locator("#banner")
    banner.wait_for()
    assert banner.inner_text().startswith("Cannot reach the Mullama daemon")
