"""``mullama transcribe`` against a ``mullama serve`` subprocess, on espeak recordings."""

from __future__ import annotations

import os

import pytest
from daemon import cli, create_model, serve
from speech_helpers import SENTENCES, spoken_sentence, word_errors
from whisper_weights import whisper_tiny_en_path

SPEECH = "whisper:tiny.en"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    # The daemon uses the native libraries this test process uses.
    native = {"MULLAMA_LIBRARY_PATH": os.environ["MULLAMA_LIBRARY_PATH"]} if "MULLAMA_LIBRARY_PATH" in os.environ else {}
    serving = serve(tmp_path_factory.mktemp("speech-cli"), **native)
    try:
        create_model(serving.port, whisper_tiny_en_path(), SPEECH)
        create_model(serving.port, model_path, "smol")
        yield serving
    finally:
        serving.stop()


def test_transcribe_prints_the_text(daemon):
    result = cli(daemon.env, "transcribe", str(spoken_sentence(12)), "--model", SPEECH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and word_errors(SENTENCES[12], result.stdout)[0] <= 1


def test_transcribe_as_subtitles(daemon):
    result = cli(daemon.env, "transcribe", str(spoken_sentence(17)), "-m", SPEECH, "--format", "srt",
                 "--language", "en")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1" and " --> " in lines[1] and word_errors(SENTENCES[17], lines[2])[0] <= 1


def test_transcribe_verbose_json_without_vad(daemon):
    import json

    result = cli(daemon.env, "transcribe", str(spoken_sentence(7)), "-m", SPEECH, "-f", "verbose_json", "--no-vad")
    body = json.loads(result.stdout)
    assert body["language"] == "english" and "vad_segments" not in body and body["segments"]


@pytest.mark.parametrize("args,message", [
    (["--model", "smol"], "not a speech model"),
    (["--model", SPEECH, "--translate"], "English-only"),
    (["--model", SPEECH, "--language", "tlh"], "language"),
])
def test_errors_are_one_line_and_exit_1(daemon, args, message):
    result = cli(daemon.env, "transcribe", str(spoken_sentence(1)), *args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_a_missing_file_or_a_corrupt_one(daemon, tmp_path):
    missing = cli(daemon.env, "transcribe", str(tmp_path / "nothing.wav"), "-m", SPEECH)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    answer = cli(daemon.env, "transcribe", str(corrupt), "-m", SPEECH)
    assert answer.returncode == 1 and "WAV file" in answer.stderr


def test_run_on_a_speech_model_says_to_transcribe(daemon):
    result = cli(daemon.env, "run", SPEECH, "hello")
    assert result.returncode == 1 and "mullama transcribe" in result.stderr
