"""OpenAI's transcription response formats, rendered from a transcript."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.speech.formats import CONTENT_TYPES, compression_ratio, render, timestamp, to_srt, to_verbose_json, to_vtt
from mullama.speech.transcribe import Segment, Transcript, Word

SEGMENTS = [
    Segment(0, 0.32, 7.68, " And so my fellow Americans ask not what your country can do for you.", [400, 523],
            -0.21, 0.01, 0.0, [Word("And", 0.33, 0.53, 0.65), Word("so", 0.68, 0.77, 0.97)]),
    Segment(1, 7.68, 3725.5, " Ask what you can do for your country.", [16206], -0.1, 0.02, 0.0,
            [Word("Ask", 7.7, 8.0, 0.9)]),
    Segment(2, 3725.5, 3726.0, " ", [], 0.0, 0.9, 0.0),
]
TRANSCRIPT = Transcript("And so my fellow Americans ask not what your country can do for you. Ask what you can do "
                        "for your country.", "en", "english", 3726.25, SEGMENTS)


def test_timestamps_in_both_notations():
    assert timestamp(0) == "00:00:00,000"
    assert timestamp(3725.5) == "01:02:05,500"
    assert timestamp(59.9996, ".") == "00:01:00.000"
    assert timestamp(-0.2) == "00:00:00,000"


@given(st.floats(min_value=0, max_value=360000, allow_nan=False))
def test_timestamps_read_back_to_the_millisecond(seconds):
    hours, minutes, rest = timestamp(seconds).split(":")
    secs, millis = rest.split(",")
    assert int(minutes) < 60 and int(secs) < 60
    total = int(hours) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000
    assert total == pytest.approx(seconds, abs=0.0005 + 1e-9)


def test_srt_numbers_cues_and_skips_empty_segments():
    assert to_srt(TRANSCRIPT) == (
        "1\n00:00:00,320 --> 00:00:07,680\nAnd so my fellow Americans ask not what your country can do for you.\n\n"
        "2\n00:00:07,680 --> 01:02:05,500\nAsk what you can do for your country.\n")


def test_vtt_has_its_header_and_dotted_times():
    assert to_vtt(TRANSCRIPT) == (
        "WEBVTT\n\n"
        "00:00:00.320 --> 00:00:07.680\nAnd so my fellow Americans ask not what your country can do for you.\n\n"
        "00:00:07.680 --> 01:02:05.500\nAsk what you can do for your country.\n")


def test_verbose_json_has_openais_fields():
    body = to_verbose_json(TRANSCRIPT)
    assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 3726.25
    assert body["text"] == TRANSCRIPT.text and "words" not in body
    first = body["segments"][0]
    assert set(first) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                          "compression_ratio", "no_speech_prob"}
    assert (first["start"], first["end"], first["tokens"]) == (0.32, 7.68, [400, 523])


def test_verbose_json_words_when_asked():
    words_only = to_verbose_json(TRANSCRIPT, ("word",))
    assert "segments" not in words_only
    assert words_only["words"] == [{"word": "And", "start": 0.33, "end": 0.53},
                                   {"word": "so", "start": 0.68, "end": 0.77},
                                   {"word": "Ask", "start": 7.7, "end": 8.0}]
    both = to_verbose_json(TRANSCRIPT, ("word", "segment"))
    assert len(both["segments"]) == 3 and len(both["words"]) == 3


def test_render_by_name():
    assert render(TRANSCRIPT) == {"text": TRANSCRIPT.text}
    assert render(TRANSCRIPT, "text") == TRANSCRIPT.text + "\n"
    assert set(CONTENT_TYPES) == {"json", "text", "srt", "vtt", "verbose_json"}
    with pytest.raises(BadRequestError, match="response_format"):
        render(TRANSCRIPT, "docx")


def test_compression_ratio_flags_repetition():
    assert compression_ratio("") == 0.0
    assert compression_ratio("the cat sat on the mat") < 1.5
    assert compression_ratio("thank you. " * 40) > 5
