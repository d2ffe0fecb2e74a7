"""OpenAI's /v1/audio/transcriptions and /v1/audio/translations, through the official ``openai`` client."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from speech_helpers import SENTENCES, sox, speech_daemon, spoken_sentence, word_errors

from mullama.speech.transcribe import TRANSCRIPTION_VAD

SPEECH = "whisper:tiny.en"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    with speech_daemon(tmp_path_factory.mktemp("speech-api"), model_path) as server:
        yield server


def post_form(server, fields: dict, files: dict | None = None, path: str = "/v1/audio/transcriptions",
              headers: dict | None = None) -> httpx.Response:
    """A multipart POST as a client other than the SDK sends it (for Mullama's own fields and for refusals)."""
    return httpx.post(f"http://127.0.0.1:{server.server_address[1]}{path}", data=fields, files=files,
                      headers=headers, timeout=300)


def recording(index: int):
    return spoken_sentence(index).open("rb")


def test_the_openai_client_transcribes_a_spoken_sentence(oai):
    with recording(12) as audio:
        result = oai.audio.transcriptions.create(model=SPEECH, file=audio)
    assert word_errors(SENTENCES[12], result.text)[0] <= 1
    assert result.usage.type == "duration" and result.usage.seconds >= 1


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_text_formats(oai, response_format):
    with recording(10) as audio:
        body = oai.audio.transcriptions.create(model=SPEECH, file=audio, response_format=response_format)
    assert isinstance(body, str) and "sun rose" in body.lower()
    if response_format == "srt":
        assert body.startswith("1\n00:00:0") and " --> " in body
    elif response_format == "vtt":
        assert body.startswith("WEBVTT\n\n00:00:0")
    else:
        assert body.endswith("\n") and word_errors(SENTENCES[10], body)[0] <= 1


def test_verbose_json_with_words_segments_and_vad_segments(oai, tmp_path):
    placed = tmp_path / "placed.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", tmp_path / "lead.wav", "trim", "0", "3")
    sox(tmp_path / "lead.wav", spoken_sentence(12), placed)
    with placed.open("rb") as audio:
        result = oai.audio.transcriptions.create(model=SPEECH, file=audio, response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])
    assert result.language == "english" and result.duration > 4
    assert word_errors(SENTENCES[12], result.text)[0] <= 1
    # Times are the recording's: the speech from 3 s, less the padding the VAD keeps ahead of it.
    pad = TRANSCRIPTION_VAD.pad_ms / 1000
    assert result.segments and result.segments[0].start >= 3.0 - pad - 0.2
    assert result.words and all(3.0 - pad - 0.3 <= w.start <= w.end <= result.duration for w in result.words)
    (speech,) = result.model_extra["vad_segments"]
    assert speech["start"] == pytest.approx(3.0 - pad, abs=0.3) and speech["end"] <= result.duration


def test_stream_sends_text_deltas_then_the_whole_text(oai, tmp_path):
    two = tmp_path / "two.wav"
    sox(spoken_sentence(17), spoken_sentence(18), two)
    with two.open("rb") as audio:
        events = list(oai.audio.transcriptions.create(model=SPEECH, file=audio, stream=True))
    *deltas, done = events
    assert deltas and all(e.type == "transcript.text.delta" and e.delta for e in deltas)
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text
    assert word_errors(SENTENCES[17] + " " + SENTENCES[18], done.text)[0] <= 2


def test_a_compressed_upload_is_decoded_by_ffmpeg(oai, tmp_path):
    flac = tmp_path / "sentence.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(spoken_sentence(10)), str(flac)],
                   check=True)
    with flac.open("rb") as audio:
        result = oai.audio.transcriptions.create(model=SPEECH, file=audio)
    assert word_errors(SENTENCES[10], result.text)[0] <= 1


def test_silence_gives_no_text_and_vad_can_be_turned_off(server, tmp_path):
    silence = tmp_path / "silence.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", silence, "trim", "0", "4")
    answer = post_form(server, {"model": SPEECH, "response_format": "verbose_json"},
                       {"file": ("silence.wav", silence.read_bytes())})
    assert answer.status_code == 200 and answer.json()["text"] == "" and answer.json()["vad_segments"] == []
    without = post_form(server, {"model": SPEECH, "response_format": "verbose_json", "vad": "false"},
                        {"file": ("sentence.wav", spoken_sentence(17).read_bytes())})
    assert without.status_code == 200 and "vad_segments" not in without.json()
    assert word_errors(SENTENCES[17], without.json()["text"])[0] <= 1


def test_translation_needs_a_multilingual_model(oai):
    with recording(1) as audio, pytest.raises(openai.BadRequestError, match="English-only") as caught:
        oai.audio.translations.create(model=SPEECH, file=audio)
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == "model"


def test_a_corrupt_file_is_a_bad_request_in_openais_shape(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.audio.transcriptions.create(model=SPEECH, file=("broken.wav", b"RIFF\x10\x00\x00\x00WAVEjunk"))
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert "WAV file" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="could not decode"):
        oai.audio.transcriptions.create(model=SPEECH, file=("noise.mp3", bytes(range(256)) * 40))


def test_a_corrupt_file_with_stream_is_still_a_plain_400(oai):
    with pytest.raises(openai.BadRequestError, match="WAV file"):
        oai.audio.transcriptions.create(model=SPEECH, file=("broken.wav", b"RIFF\x10\x00\x00\x00WAVEjunk"),
                                        stream=True)


def test_models_that_are_missing_or_not_speech_models(oai):
    with recording(1) as audio, pytest.raises(openai.NotFoundError) as caught:
        oai.audio.transcriptions.create(model="whisper:large-v9", file=audio)
    assert caught.value.body["code"] == "model_not_found"
    with recording(1) as audio, pytest.raises(openai.BadRequestError, match="not a speech model"):
        oai.audio.transcriptions.create(model="smol", file=audio)


def test_size_and_duration_limits(server, monkeypatch):
    sentence = spoken_sentence(2).read_bytes()
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_BYTES", str(len(sentence) - 1))
    too_big = post_form(server, {"model": SPEECH}, {"file": ("s.wav", sentence)})
    assert too_big.status_code == 413 and "MULLAMA_MAX_AUDIO_BYTES" in too_big.json()["error"]["message"]
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_BYTES", "1000")
    # Past the limit and its margin for form fields, the body is not even read.
    huge = post_form(server, {"model": SPEECH}, {"file": ("s.wav", bytes(2 << 20))})
    assert huge.status_code == 413
    monkeypatch.delenv("MULLAMA_MAX_AUDIO_BYTES")
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_SECONDS", "1")
    too_long = post_form(server, {"model": SPEECH}, {"file": ("s.wav", sentence)})
    assert too_long.status_code == 400 and "MULLAMA_MAX_AUDIO_SECONDS" in too_long.json()["error"]["message"]


@pytest.mark.parametrize("fields,param", [
    ({}, "model"),
    ({"model": SPEECH, "response_format": "mp4"}, "response_format"),
    ({"model": SPEECH, "temperature": "warm"}, "temperature"),
    ({"model": SPEECH, "temperature": "1.5"}, "temperature"),
    ({"model": SPEECH, "timestamp_granularities[]": "word"}, "timestamp_granularities"),
    ({"model": SPEECH, "response_format": "verbose_json", "timestamp_granularities[]": "char"},
     "timestamp_granularities"),
    ({"model": SPEECH, "stream": "perhaps"}, "stream"),
    ({"model": SPEECH, "language": "klingon"}, "language"),
])
def test_bad_fields_are_400s_naming_the_field(server, fields, param):
    answer = post_form(server, fields, {"file": ("s.wav", spoken_sentence(2).read_bytes())})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_a_form_without_a_file_or_not_a_form(server):
    assert post_form(server, {"model": SPEECH}, {"other": ("x", b"1")}).json()["error"]["param"] == "file"
    answer = httpx.post(f"http://127.0.0.1:{server.server_address[1]}/v1/audio/transcriptions",
                        json={"model": SPEECH, "file": "x"})
    assert answer.status_code == 400 and "multipart/form-data" in answer.json()["error"]["message"]


def test_a_web_page_may_not_post_a_form_without_a_preflight(server):
    origin = {"Origin": "http://localhost:3000"}
    answer = post_form(server, {"model": SPEECH}, {"file": ("s.wav", spoken_sentence(2).read_bytes())},
                       headers=origin)
    assert answer.status_code == 415 and "error" in answer.json()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from(["multipart/form-data; boundary=b", "multipart/form-data",
                                                 "multipart/form-data; boundary=--"]))
def test_garbage_bodies_get_an_openai_error_never_a_crash(server, body, content_type):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    try:
        connection.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}


def test_a_prompt_and_a_language(oai):
    with recording(12) as audio:
        result = oai.audio.transcriptions.create(model=SPEECH, file=audio, prompt="A river and its spring.",
                                                 language="en", temperature=0)
    assert word_errors(SENTENCES[12], result.text)[0] <= 1


def test_models_list_includes_the_speech_model(oai):
    assert SPEECH in {model.id for model in oai.models.list()}


def test_a_chat_and_a_transcription_at_once_in_one_daemon(oai):
    """Text and speech share the daemon's one ggml: together each gives what it gives alone."""
    def chat(started=None):
        stream = oai.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Name three colours."}],
                                             temperature=0, max_tokens=48, stream=True)
        pieces = []
        for chunk in stream:
            if started is not None:
                started.set()
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        return "".join(pieces)

    def transcribe():
        with recording(12) as audio:
            return oai.audio.transcriptions.create(model=SPEECH, file=audio).text

    alone = chat(), transcribe()
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        chatting = pool.submit(chat, started)
        started.wait(300)
        together = chatting, pool.submit(transcribe)
        assert (together[0].result(), together[1].result()) == alone
