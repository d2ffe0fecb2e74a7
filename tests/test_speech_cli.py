"""``mullama transcribe`` against a ``mullama serve`` subprocess, on espeak recordings."""

from __future__ import annotations

import os
import subprocess
import sys
import wave

import pytest
from daemon import cli, create_model, serve
from speech_helpers import SENTENCES, sox, spoken_sentence, word_errors
from whisper_weights import whisper_tiny_en_path

SPEECH = "whisper:tiny.en"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    # The daemon uses the native libraries this test process uses.
    native = {"MULLAMA_LIBRARY_PATH": os.environ["MULLAMA_LIBRARY_PATH"]} if "MULLAMA_LIBRARY_PATH" in os.environ else {}
    serving = serve(tmp_path_factory.mktemp("speech-cli"), **native)
    try:
        create_model(serving.port, whisper_tiny_en_path(), SPEECH)
        create_model(serving.port, model_path, "smol", parameters={"num_predict": 16, "temperature": 0})
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


def test_listen_to_a_file_prints_each_transcript_and_its_answer(daemon, tmp_path):
    talk = tmp_path / "talk.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", tmp_path / "pause.wav", "trim", "0", "1.5")
    sox(spoken_sentence(12), tmp_path / "pause.wav", spoken_sentence(17), tmp_path / "pause.wav", talk)
    result = cli(daemon.env, "listen", "smol", "--speech-model", SPEECH, "--file", str(talk))
    assert result.returncode == 0, result.stderr
    heard = [line[4:] for line in result.stdout.splitlines() if line.startswith(">>> ")]
    assert len(heard) == 2 and word_errors(SENTENCES[12], heard[0])[0] <= 1
    assert word_errors(SENTENCES[17], heard[1])[0] <= 1
    # Each transcript is followed by its answer (cut short with "[interrupted]" when the next utterance starts
    # first, as on a slow machine); an answer may hold blank lines of its own.
    turns = result.stdout.split(">>> ")[1:]
    assert len(turns) == 2, result.stdout
    assert all(any(line.strip() for line in turn.splitlines()[1:]) for turn in turns), result.stdout


def test_listen_reads_raw_pcm_from_stdin(daemon):
    with wave.open(str(spoken_sentence(17))) as reader:
        raw = reader.readframes(reader.getnframes())
    result = subprocess.run([sys.executable, "-m", "mullama", "listen", "smol", "--speech-model", SPEECH],
                            env=daemon.env, input=raw + bytes(32000), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (heard,) = [line[4:] for line in result.stdout.decode().splitlines() if line.startswith(">>> ")]
    assert word_errors(SENTENCES[17], heard)[0] <= 1


def test_listen_refuses_a_text_model_as_its_speech_model(daemon):
    result = cli(daemon.env, "listen", "smol", "--speech-model", "smol", stdin="")
    assert result.returncode == 1 and "not a speech model" in result.stderr


def test_list_show_and_ps_know_the_speech_model(daemon):
    listed = cli(daemon.env, "list")
    assert listed.returncode == 0 and any(line.startswith(SPEECH) for line in listed.stdout.splitlines())
    shown = cli(daemon.env, "show", SPEECH)
    assert shown.returncode == 0, shown.stderr
    assert "whisper" in shown.stdout and "speech" in shown.stdout and "F16" in shown.stdout
    assert cli(daemon.env, "transcribe", str(spoken_sentence(7)), "-m", SPEECH, "--keepalive", "5m").returncode == 0
    running = cli(daemon.env, "ps")
    assert running.returncode == 0 and any(line.startswith(SPEECH) for line in running.stdout.splitlines())
    assert cli(daemon.env, "stop", SPEECH).returncode == 0
    assert not any(line.startswith(SPEECH) for line in cli(daemon.env, "ps").stdout.splitlines())
