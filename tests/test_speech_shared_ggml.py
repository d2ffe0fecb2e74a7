"""Text and speech in one process, on one ggml: libwhisper is built on libllama's ggml libraries.

The proof has three parts: the process maps each ggml library once (both
engines resolved to the same files), a chat generation and a transcription
run at the same time and each gives exactly what it gives alone, and
whisper.cpp's log setter (which also sets the shared ggml's) keeps every
line in Mullama's logger instead of stderr.
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from speech_helpers import SENTENCES, spoken_sentence, word_errors
from whisper_weights import whisper_tiny_en_path

import mullama
from mullama.speech import SpeechModel, load_audio

CHAT = [("user", "Name three colours of the rainbow.")]


@pytest.fixture(scope="module")
def speech_model():
    """Whisper tiny.en loaded with two threads."""
    with SpeechModel(whisper_tiny_en_path(), num_thread=2) as model:
        yield model


@pytest.fixture(scope="module")
def text_model(model_path):
    with mullama.Model(model_path, num_ctx=512, num_thread=2) as loaded:
        yield loaded


def chat(model: mullama.Model, started: threading.Event | None = None) -> str:
    generation = model.generate(model.apply_builtin_template(CHAT), temperature=0, num_predict=32)
    for _ in generation:
        if started is not None:
            started.set()
    return generation.result.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_process_maps_one_ggml_for_both_engines(text_model, speech_model):
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    names = {Path(p).name.split(".so")[0]: Path(p).resolve() for p in mapped}
    assert "libwhisper" in names and "libllama" in names
    for lib in ("libggml-base", "libggml", "libggml-cpu"):
        copies = {p for p in mapped if Path(p).name.split(".so")[0] == lib}
        assert len(copies) == 1, copies
    assert names["libwhisper"].parent == names["libllama"].parent == names["libggml-base"].parent


def test_a_chat_and_a_transcription_at_once_each_give_what_they_give_alone(text_model, speech_model):
    audio = load_audio(spoken_sentence(18))
    alone_chat, alone_speech = chat(text_model), speech_model.transcribe(audio).text
    assert alone_chat.strip() and word_errors(SENTENCES[18], alone_speech)[0] <= 2
    started, transcribed = threading.Event(), threading.Event()

    def chats() -> list[str]:
        # Generation goes on, round after round, until the transcription is over: they overlap for certain.
        texts = []
        while not transcribed.is_set():
            texts.append(chat(text_model, started))
        return texts

    def transcribe() -> str:
        started.wait()
        try:
            return speech_model.transcribe(audio).text
        finally:
            transcribed.set()

    with ThreadPoolExecutor(2) as pool:
        chat_texts, speech_text = pool.submit(chats), pool.submit(transcribe)
        assert speech_text.result() == alone_speech
        assert chat_texts.result() and set(chat_texts.result()) == {alone_chat}


def test_whisper_logs_go_to_mullamas_logger_not_stderr(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="mullama.native")
    with SpeechModel(whisper_tiny_en_path(), num_thread=1):
        pass
    assert any("whisper_init_from_file_with_params_no_state" in r.getMessage() for r in caplog.records)
    assert "whisper_" not in capfd.readouterr().err
