"""A transcript in OpenAI's response formats: json, text, srt, vtt, verbose_json.

The OpenAI route renders with these; nothing here knows about HTTP. Each
function returns the body and :data:`CONTENT_TYPES` gives its media type.
"""

from __future__ import annotations

import zlib
from typing import Any

from mullama.errors import BadRequestError
from mullama.speech.transcribe import Segment, Transcript

CONTENT_TYPES = {"json": "application/json", "verbose_json": "application/json",
                 "text": "text/plain; charset=utf-8", "srt": "application/x-subrip; charset=utf-8",
                 "vtt": "text/vtt; charset=utf-8"}

def timestamp(seconds: float, separator: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``separator="."``, ``HH:MM:SS.mmm`` (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_text(transcript: Transcript) -> str:
    """The plain text, with a final newline as OpenAI sends it."""
    return transcript.text + "\n"


def to_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's ``json`` format: the text alone."""
    return {"text": transcript.text}


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues with start --> end."""
    cues = [f"{i}\n{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text.strip()}\n"
            for i, s in enumerate(_spoken(transcript), 1)]
    return "\n".join(cues)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: a header, then cues with start --> end."""
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in _spoken(transcript)]
    return "WEBVTT\n\n" + "\n".join(cues)


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes compressed: high for the repetition loops a failing decode produces."""
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _segment_json(segment: Segment) -> dict[str, Any]:
    return {
        "id": segment.id,
        "seek": 0,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": segment.tokens,
        "temperature": segment.temperature,
        "avg_logprob": segment.avg_logprob,
        "compression_ratio": compression_ratio(segment.text),
        "no_speech_prob": segment.no_speech_prob,
    }


def to_verbose_json(transcript: Transcript, granularities: tuple[str, ...] = ("segment",)) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: task, language name, duration, text, and segments and/or words."""
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": transcript.language_name,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    if "word" in granularities:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end}
                         for s in transcript.segments for w in s.words]
    if "segment" in granularities or "word" not in granularities:
        body["segments"] = [_segment_json(s) for s in transcript.segments]
    return body


RENDERERS = {"json": to_json, "text": to_text, "srt": to_srt, "vtt": to_vtt, "verbose_json": to_verbose_json}


def render(transcript: Transcript, response_format: str = "json") -> str | dict[str, Any]:
    """The body for OpenAI's ``response_format`` (a dict for the JSON formats, else text)."""
    renderer = RENDERERS.get(response_format)
    if renderer is None:
        raise BadRequestError(f"response_format must be one of {', '.join(RENDERERS)}", param="response_format")
    return renderer(transcript)


def _spoken(transcript: Transcript) -> list[Segment]:
    return [s for s in transcript.segments if s.text.strip()]
