"""The chat page's microphone: Chromium's fake capture device plays an espeak question, the page hears it.

Chromium is started with its fake media device reading a recording
(``--use-file-for-fake-audio-capture``) and permission granted without a
prompt; the page's AudioWorklet brings it to 16 kHz, its loudness detector
cuts the utterance out, ``POST /api/voice`` transcribes it with Whisper
tiny.en and streams the test model's answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from daemon import create_model
from speech_helpers import cache_dir, sox, speak, word_errors
from ui_daemon import MODEL, UIDaemon, ui_daemon
from webui_browser import CHROMIUM, Page, api, ui  # noqa: F401 (ui: fixture)
from whisper_weights import whisper_tiny_en_path

SPEECH = "whisper:tiny.en"
#: A question Whisper tiny.en hears right wherever the page cuts it and whatever the encoder's window (some are
#: not: "the capital of France" came back as "the capital and friends" in most cuts, under either window).
QUESTION = "Why is the sky blue?"
SYSTEM = "You are a pirate. Answer every message as a pirate would."
TYPED = "My name is Ada."


def spoken_question() -> Path:
    """The question spoken, as 16 kHz mono with a second of silence before it and eight after (cached)."""
    dest = cache_dir() / "question-sky-16000.wav"
    if not dest.exists():
        raw = speak(QUESTION, cache_dir() / "question-sky-raw.wav")
        sox(raw, "-r", "16000", "-c", "1", "-b", "16", dest, "pad", "1", "8")
    return dest


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium whose microphone is the recording, played once, allowed without asking."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    recording = spoken_question()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={recording}%noloop"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIDaemon]:
    with ui_daemon(model_path, tmp_path_factory.mktemp("webui-mic")) as started:
        yield started


def test_a_spoken_question_is_transcribed_and_answered(ui: Page) -> None:
    page = ui.page
    ui.open("chat")
    page.locator(f'#model-picker option[value="{MODEL}:latest"]').wait_for(state="attached")
    # No speech model yet: no microphone.
    assert page.locator("#mic").is_hidden()

    create_model(ui.daemon.port, whisper_tiny_en_path(), SPEECH)
    page.reload()
    mic = page.get_by_role("button", name="Speak")
    mic.wait_for()
    # A typed turn first, under a system prompt: the spoken turn is answered with both before it.
    page.click("text=Settings")
    page.get_by_label("System prompt").fill(SYSTEM)
    page.fill("#prompt", TYPED)
    page.press("#prompt", "Enter")
    page.locator(".message.assistant .content").wait_for()
    page.locator("#send").wait_for()
    sent: list[Any] = []
    page.on("request", lambda request: sent.append(request) if "/api/voice" in request.url else None)
    mic.click()
    page.get_by_role("button", name="Stop listening").wait_for()
    assert page.locator("#mic").get_attribute("aria-pressed") == "true"

    question = page.locator(".message.user").nth(1)
    question.wait_for()
    assert question.locator(".role").inner_text() == "You (spoken)"
    heard = question.locator(".content").inner_text()
    assert word_errors(QUESTION, heard)[0] <= 1, heard
    # The answer streams in, then the turn ends (Send is back).
    answer = page.locator(".message.assistant .content").nth(1)
    answer.wait_for()
    page.locator("#send").wait_for()
    said = answer.inner_text().strip()
    assert said

    # One utterance, sent as 16 kHz 16-bit PCM, answered for the conversation's model.
    (request,) = sent
    assert request.headers["content-type"] == "application/octet-stream"
    query = parse_qs(urlsplit(request.url).query)
    assert query["model"] == [f"{MODEL}:latest"] and query["speech_model"] == ["whisper:tiny.en"]
    body = request.post_data_buffer
    assert len(body) % 2 == 0 and 2.0 < len(body) / 32000 < 8.0
    saved = json.loads(page.evaluate("localStorage.getItem('mullama.conversations')"))[0]["messages"]
    assert [(m["role"], m.get("spoken")) for m in saved] == [
        ("user", None), ("assistant", None), ("user", True), ("assistant", None)]
    # The conversation so far went with the audio: the system prompt, the typed question and its answer.
    history = [{"role": "system", "content": SYSTEM}] + [
        {"role": m["role"], "content": m["content"]} for m in saved[:2]]
    assert json.loads(query["messages"][0]) == history
    # The answer is the model's own (greedy) answer to that conversation and the transcript, not to the
    # transcript alone.
    def chat(messages: list[dict[str, str]]) -> str:
        reply = api(ui.daemon, "POST", "/api/chat", {"model": MODEL, "stream": False, "options": {},
                                                     "messages": messages})
        return reply["message"]["content"].strip()

    spoken = [{"role": "user", "content": heard}]
    assert said == chat(history + spoken) != chat(spoken)
    ui.screenshot("mic")

    # A second click stops listening.
    page.get_by_role("button", name="Stop listening").click()
    mic.wait_for()
    assert page.locator("#mic").get_attribute("aria-pressed") == "false"


#: The page's own utterance cutter on a made-up signal: (the utterances' lengths in samples, starts seen, PCM bytes).
CUT = """async () => {
    const { Utterances, pcm16, SPEECH_RATE } = await import("/ui/mic.js");
    const seconds = (s) => Math.round(s * SPEECH_RATE);
    const tone = (s, level) => Float32Array.from({ length: seconds(s) }, (_, i) => level * Math.sin(i / 4));
    const quiet = (s) => new Float32Array(seconds(s));
    const found = [];
    let starts = 0;
    const cutter = new Utterances({ onStart: () => { starts += 1; }, onUtterance: (s) => found.push(s.length) });
    // A 40 ms click, a second of speech, a second of silence, then speech the user stops listening to.
    const signal = [quiet(0.5), tone(0.04, 0.5), quiet(0.5), tone(1, 0.3), quiet(1), tone(0.5, 0.3)];
    for (const part of signal) {
        for (let i = 0; i < part.length; i += 1600) cutter.feed(part.slice(i, i + 1600));
    }
    const before = found.length;
    cutter.flush();
    return [found, before, starts, Array.from(pcm16(Float32Array.from([0, 0.5, -1, 2])))];
}"""


def test_utterances_are_cut_out_by_loudness(ui: Page) -> None:
    ui.open("chat")
    found, before_flush, starts, pcm = ui.page.evaluate(CUT)
    # The click started nothing. The speech is one utterance: 0.3 s up to where it was seen to start (the 60 ms
    # that confirmed it among them), the rest of it, and the 0.7 s of silence that ended it.
    assert starts == 2 and before_flush == 1
    frame = 320  # 20 ms
    assert found[0] == frame * (12 + 50 + 35)
    # Stopping hands over the speech going on, with what came before it.
    assert found[1] == frame * (12 + 25)
    # 16-bit little-endian, clipped to [-1, 1].
    assert pcm == [0, 0, 0x00, 0x40, 0x01, 0x80, 0xFF, 0x7F]
