"""OpenAI's audio routes: ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``.

Each reads OpenAI's multipart form (``file``, ``model``, ``language``,
``prompt``, ``response_format``, ``temperature``,
``timestamp_granularities[]``, ``stream``) into a
:class:`~mullama.types.TranscriptionRequest` and writes back what the
official ``openai`` SDK parses: ``json`` (with OpenAI's duration usage),
``text``, ``srt``, ``vtt`` or ``verbose_json``, or with ``stream=true`` the
server-sent events ``transcript.text.delta`` (one per finished segment) and
``transcript.text.done``. Beyond OpenAI's fields: ``vad`` (``true`` by
default) turns voice activity detection off or on, ``keep_alive`` is
Ollama's, and ``verbose_json`` also carries ``vad_segments``, where the VAD
found speech.

A web page may not send a form here without a preflight (see
:meth:`~mullama.http.server.Handler.check_upload_type`); the SDK sends no
``Origin`` and is not concerned. Errors are OpenAI's error body (the
``/v1/`` prefix is the OpenAI family's); a stream that already started ends
with that body as its last event.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mullama import service
from mullama.errors import BadRequestError, MullamaError
from mullama.http.common import INTERNAL_ERROR, shutting_down, sse
from mullama.http.multipart import Part, parse_form
from mullama.http.openai import error_body
from mullama.http.server import Request, Router
from mullama.speech import formats
from mullama.speech.audio import limits
from mullama.speech.transcribe import Segment, Transcript
from mullama.types import TranscriptionRequest

log = logging.getLogger("mullama.http.audio")

SSE = "text/event-stream"
#: What a form may hold beside its file: field values, part headers, boundaries.
FORM_OVERHEAD = 1 << 20
_GRANULARITIES = ("segment", "word")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def register(router: Router) -> None:
    """Add OpenAI's audio routes (their errors take the ``/v1/`` family's body)."""
    router.add("POST", "/v1/audio/transcriptions", transcriptions)
    router.add("POST", "/v1/audio/translations", translations)


def transcriptions(request: Request) -> None:
    """``POST /v1/audio/transcriptions``: speech to text in its own language."""
    _answer(request, "transcribe")


def translations(request: Request) -> None:
    """``POST /v1/audio/translations``: speech in any language to English text."""
    _answer(request, "translate")


# --- the form ---------------------------------------------------------------------------------------------


class Form:
    """A form's fields by name (each with its values in order) and its one file."""

    def __init__(self, parts: list[Part]) -> None:
        self.fields: dict[str, list[str]] = {}
        files = [part for part in parts if part.name == "file"]
        if len(files) != 1:
            raise BadRequestError("the form needs one 'file': the audio to transcribe", param="file")
        self.file = files[0]
        for part in parts:
            if part.name != "file":
                self.fields.setdefault(part.name, []).append(part.text())

    def text(self, name: str, default: str | None = None) -> str | None:
        """The one value of ``name`` (stripped), or ``default`` when absent or empty."""
        values = self.fields.get(name) or []
        if len(values) > 1:
            raise BadRequestError(f"{name} was given {len(values)} times", param=name)
        value = values[0].strip() if values else ""
        return value or default

    def boolean(self, name: str, default: bool) -> bool:
        """``true``/``false`` (or 1/0), as the SDK writes booleans into a form."""
        value = self.text(name)
        if value is None:
            return default
        if value.lower() not in _BOOLEANS:
            raise BadRequestError(f"{name} must be true or false", param=name)
        return _BOOLEANS[value.lower()]

    def number(self, name: str, default: float) -> float:
        """A finite number."""
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise BadRequestError(f"{name} must be a number", param=name) from None
        if not math.isfinite(number):
            raise BadRequestError(f"{name} must be a finite number", param=name)
        return number

    def listed(self, name: str) -> list[str]:
        """Every value of an array field, sent as ``name[]`` (the SDK) or repeated ``name``."""
        return [value.strip() for key in (f"{name}[]", name) for value in self.fields.get(key, [])]


def read_form(request: Request) -> Form:
    """The request's multipart form, its size bounded by the audio limit (MULLAMA_MAX_AUDIO_BYTES) and a margin."""
    handler = request.handler
    # A web page may send a multipart form without a CORS preflight: only non-browser clients may, here.
    handler.check_upload_type()
    body = handler.read_body(limits().max_bytes + FORM_OVERHEAD)
    return Form(parse_form(body, request.headers.get("Content-Type")))


def transcription_request(form: Form, task: str) -> tuple[TranscriptionRequest, str, bool]:
    """The internal request a form describes, with its response format and whether to stream."""
    model = form.text("model")
    if model is None:
        raise BadRequestError("model is required (a speech model such as whisper:base)", param="model")
    response_format = form.text("response_format", "json")
    if response_format not in formats.RENDERERS:
        raise BadRequestError(f"response_format must be one of {', '.join(formats.RENDERERS)}",
                              param="response_format")
    granularities = form.listed("timestamp_granularities")
    unknown = [value for value in granularities if value not in _GRANULARITIES]
    if unknown:
        raise BadRequestError(f"timestamp_granularities[] may hold segment and word, not {unknown[0]!r}",
                              param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise BadRequestError("timestamp_granularities[] needs response_format verbose_json",
                              param="timestamp_granularities")
    req = TranscriptionRequest(
        model=model, audio=form.file.data, filename=form.file.filename or "the file", task=task,
        language=form.text("language") if task == "transcribe" else None, prompt=form.text("prompt"),
        temperature=form.number("temperature", 0.0), word_timestamps="word" in granularities,
        vad=form.boolean("vad", True), keep_alive=form.text("keep_alive"))
    return req, response_format, form.boolean("stream", False)


# --- answers ------------------------------------------------------------------------------------------------


def _answer(request: Request, task: str) -> None:
    form = read_form(request)
    req, response_format, stream = transcription_request(form, task)
    if stream:
        _stream(request, req)
        return
    transcript = service.transcribe(request.handler.app.manager, req, context=request.context)
    granularities = tuple(form.listed("timestamp_granularities")) or ("segment",)
    body = formats.to_verbose_json(transcript, granularities) if response_format == "verbose_json" \
        else formats.render(transcript, response_format)
    if isinstance(body, str):
        request.handler.send_bytes(200, body.encode(), formats.CONTENT_TYPES[response_format])
        return
    if response_format == "verbose_json" and transcript.speech is not None:
        body["vad_segments"] = [{"start": s.start, "end": s.end} for s in transcript.speech]
    if response_format == "json":
        # whisper-1's usage: the audio's length in whole seconds.
        body["usage"] = {"type": "duration", "seconds": math.ceil(transcript.duration)}
    request.handler.send_json(200, body)


class _TextDeltas:
    """Each segment's text as a delta, such that the deltas join into the final (stripped) text."""

    def __init__(self) -> None:
        self._raw = ""
        self._sent = ""

    def add(self, segment: Segment) -> str:
        """The text this segment adds to what was sent (may be empty)."""
        self._raw += segment.text
        current = self._raw.strip()
        delta, self._sent = current[len(self._sent):], current
        return delta


def _stream(request: Request, req: TranscriptionRequest) -> None:
    """Server-sent events as segments finish; the stream starts with the first event, so that a bad upload
    (decoded before any segment) is still a plain 400."""
    handler = request.handler
    started = False

    def write(data: bytes) -> None:
        nonlocal started
        if handler.app.stopping.is_set():
            raise shutting_down()
        if not started:
            handler.start_stream(SSE)
            started = True
        handler.write_chunk(data)

    deltas = _TextDeltas()

    def on_segment(segment: Segment) -> None:
        delta = deltas.add(segment)
        if delta:
            write(sse({"type": "transcript.text.delta", "delta": delta}))

    try:
        transcript = service.transcribe(handler.app.manager, req, context=request.context, on_segment=on_segment)
        write(sse(_done(transcript)))
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        raise
    except MullamaError as error:
        if not started:
            raise
        _fail_stream(handler, error)
    except Exception:  # noqa: BLE001 - the client gets OpenAI's error event, the log gets the traceback
        if not started:
            raise
        log.exception("unexpected error in the stream of %s", request.path)
        _fail_stream(handler, MullamaError(INTERNAL_ERROR))
    handler.end_stream()


def _done(transcript: Transcript) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": transcript.text}


def _fail_stream(handler: Any, error: MullamaError) -> None:
    handler.stream_failed(error.status)
    handler.write_chunk(sse(error_body(error)))
