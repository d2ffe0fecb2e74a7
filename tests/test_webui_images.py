"""Images in the web UI's chat: attached by file picker, paste and drop for a vision model, sent as Ollama ``images``.

The vision model is the test model with the tiny generated projector
(tests/projector.py), created as an Ollama user would: the projector
uploaded as a blob, then ``create`` from the model with it as a file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from conftest import llama_cpp_source
from projector import tiny_projector_path
from test_vision import png
from ui_daemon import MODEL, UIDaemon, ui_daemon
from webui_browser import Page, api, browser, ui  # noqa: F401 (browser, ui: fixtures)

VISION = "smolvision"
QUESTION = "What is in this picture?"

#: Put a file in the page's clipboard or drag it in: (kind, selector, name, MIME type, base64).
DISPATCH = """([kind, selector, name, type, data]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type }));
    const target = document.querySelector(selector);
    if (kind === "paste") {
        target.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }));
    } else {
        target.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }
}"""

#: A WebP the browser makes itself: a format the daemon does not read, so the page turns it into PNG.
WEBP = """async () => {
    const canvas = new OffscreenCanvas(24, 24);
    const context = canvas.getContext("2d");
    context.fillStyle = "#20c020";
    context.fillRect(0, 0, 24, 24);
    const blob = await canvas.convertToBlob({ type: "image/webp" });
    const bytes = new Uint8Array(await blob.arrayBuffer());
    return [blob.type, btoa(String.fromCharCode(...bytes))];
}"""


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIDaemon]:
    with ui_daemon(model_path, tmp_path_factory.mktemp("webui-images")) as started:
        client = ollama.Client(host=started.url, timeout=180)
        client.create(model=VISION, from_=MODEL, files={"mmproj-tiny.gguf": client.create_blob(tiny_projector_path())})
        yield started


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def thumbnails(ui: Page, selector: str) -> list[tuple[str, str]]:
    """(alt, src) of the images under ``selector``."""
    return ui.page.eval_on_selector_all(f"{selector} img", "images => images.map((i) => [i.alt, i.src])")


def chat(daemon: UIDaemon, images: list[str]) -> dict[str, Any]:
    return api(daemon, "POST", "/api/chat", {"model": VISION, "stream": False, "messages": [
        {"role": "user", "content": QUESTION, **({"images": images} if images else {})}]})


def test_images_are_attached_by_picker_paste_and_drop_and_sent_with_the_question(ui: Page) -> None:
    assert "vision" in api(ui.daemon, "POST", "/api/show", {"model": VISION})["capabilities"]
    red, blue = png(30, 30, (220, 10, 10)), png(30, 30, (10, 10, 220))
    picture = (llama_cpp_source() / "tools" / "mtmd" / "test-1.jpeg").read_bytes()
    page = ui.page
    ui.open("chat")
    picker = page.locator("#model-picker")
    page.locator(f'#model-picker option[value="{VISION}:latest"]').wait_for(state="attached")

    # A model without sight offers no attaching, and says so when an image is dropped on it anyway.
    picker.select_option(f"{MODEL}:latest")
    assert page.locator("#attach").is_hidden()
    page.evaluate(DISPATCH, ["drop", ".thread", "red.png", "image/png", b64(red)])
    page.locator(".notice", has_text="cannot read images").wait_for()
    assert page.locator("#attachments").is_hidden()

    picker.select_option(f"{VISION}:latest")
    page.get_by_role("button", name="Attach images").wait_for()
    page.locator("#attach-input").set_input_files([{"name": "red.png", "mimeType": "image/png", "buffer": red}])
    page.locator('#attachments img[alt="red.png"]').wait_for()
    page.evaluate(DISPATCH, ["paste", "#prompt", "pasted.jpeg", "image/jpeg", b64(picture)])
    page.locator('#attachments img[alt="pasted.jpeg"]').wait_for()
    page.evaluate(DISPATCH, ["drop", ".thread", "blue.png", "image/png", b64(blue)])
    webp_type, webp = page.evaluate(WEBP)
    assert webp_type == "image/webp"
    page.evaluate(DISPATCH, ["drop", ".thread", "green.webp", "image/webp", webp])
    page.locator('#attachments img[alt="green.webp"]').wait_for()
    page.get_by_role("button", name="Remove image blue.png").click()
    attached = thumbnails(ui, "#attachments")
    assert [alt for alt, _ in attached] == ["red.png", "pasted.jpeg", "green.webp"]
    assert attached[2][1].startswith("data:image/png;base64,iVBORw0KGgo")
    assert page.locator(".notice").inner_text() == ""

    sent: list[Any] = []
    page.on("request", lambda request: sent.append(request.post_data_json) if request.url.endswith("/api/chat") else None)
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    page.locator(".message.assistant .stats").wait_for()
    assert page.locator("#attachments").is_hidden() and page.locator("#attachments img").count() == 0
    shown = thumbnails(ui, ".message.user")
    assert [alt for alt, _ in shown] == ["Image 1", "Image 2", "Image 3"]
    assert [src for _, src in shown] == [src for _, src in attached]
    ui.screenshot("images")

    # The request carried the three images as Ollama's base64, the WebP as PNG.
    images = sent[0]["messages"][-1]["images"]
    assert images[:2] == [b64(red), b64(picture)] and images[2] == attached[2][1].split(",", 1)[1]
    # The daemon read them: the answer is the one the API gives with them, not the one without.
    stored = json.loads(page.evaluate("localStorage.getItem('mullama.conversations')"))[0]["messages"]
    assert stored[0]["images"] == images
    answer = stored[1]["content"]
    assert answer and chat(ui.daemon, images)["message"]["content"] == answer
    assert chat(ui.daemon, [])["message"]["content"] != answer

    # The images stay with the conversation: after a reload they are shown and a regenerated answer reads them again.
    page.reload()
    page.locator(".message.user img.thumb").nth(2).wait_for()
    page.click("#regenerate")
    page.locator("#stop").wait_for(state="hidden")
    page.locator(".message.assistant .stats").wait_for()
    assert sent[-1]["messages"][-1]["images"] == images
    assert page.locator(".message.assistant .content").inner_text().strip()
