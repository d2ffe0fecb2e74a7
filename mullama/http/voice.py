"""``POST /api/voice``: the streaming voice loop over HTTP (Mullama's own route, Ollama's error body).

The request body is the audio as it is captured, sent chunked: raw
little-endian 16-bit PCM (``rate`` and ``channels`` in the query, 16 kHz
mono by default) or a streamed WAV. Settings are query parameters, since the
body is audio: ``model`` (the chat model, required), ``speech_model``
(default ``whisper``), ``system``, ``messages`` (the conversation so far, as
``/api/chat``'s ``messages`` in JSON), ``language``, ``options`` (Ollama's
options as a JSON object), ``think``, ``keep_alive`` and ``partial``
(``true``: partial transcripts of an utterance going on, each second). The answer is
server-sent events, written while the audio is still arriving: the events of
:mod:`mullama.voice`, each named (``event: transcript``) with its JSON
``data``. A missing model or a bad parameter is a plain error before the
stream; a failure inside it ends the stream with an ``error`` event.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from urllib.parse import parse_qs

from mullama.errors import BadRequestError, MullamaError
from mullama.http.common import INTERNAL_ERROR, generation_options, shutting_down, sse
from mullama.http.ollama import chat_messages
from mullama.http.server import Request, Router
from mullama.speech.audio import PcmStream, limits
from mullama.types import Message, VoiceRequest
from mullama.voice import VoiceSession

log = logging.getLogger("mullama.http.voice")

SSE = "text/event-stream"
#: The speech model when the request names none (whisper:latest, which is whisper:base in the catalogue).
DEFAULT_SPEECH_MODEL = "whisper"
#: Seconds of speech between two partial transcripts, when asked for.
PARTIAL_EVERY = 1.0
#: Characters of ``messages`` JSON taken: a history rides in the request line, which the server caps at 64 KiB.
MAX_HISTORY_CHARS = 48 * 1024
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def register(router: Router) -> None:
    """Add ``POST /api/voice``."""
    router.add("POST", "/api/voice", voice)


class Query:
    """A request's query parameters, each given at most once."""

    def __init__(self, text: str) -> None:
        try:
            self._values = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=64)
        except ValueError as error:
            raise BadRequestError(f"invalid query string: {error}") from None

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name``; ``default`` when absent or empty."""
        values = self._values.get(name) or []
        if len(values) > 1:
            raise BadRequestError(f"{name} was given {len(values)} times", param=name)
        return (values[0] if values else "") or default

    def integer(self, name: str, default: int) -> int:
        """A whole number."""
        value = self.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise BadRequestError(f"{name} must be a whole number", param=name) from None

    def _json(self, name: str, kind: type, refusal: str) -> Any:
        """The value of ``name`` read as JSON of ``kind``; None when absent; else a 400 saying ``refusal``."""
        text = self.get(name)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise BadRequestError(refusal, param=name) from None
        if not isinstance(value, kind):
            raise BadRequestError(refusal, param=name)
        return value

    def boolean(self, name: str) -> bool | None:
        """``true`` or ``false``; None when absent."""
        value = self.get(name)
        if value is None:
            return None
        if value.lower() not in _BOOLEANS:
            raise BadRequestError(f"{name} must be true or false", param=name)
        return _BOOLEANS[value.lower()]

    def options(self) -> dict[str, Any]:
        """``options``: Ollama's options as a JSON object."""
        value = self._json("options", dict, "options must be a JSON object")
        return {} if value is None else generation_options({"options": value}, top_level=False)

    def messages(self) -> list[Message]:
        """``messages``: the conversation so far, a JSON list of ``/api/chat`` messages."""
        text = self.get("messages")
        if text is not None and len(text) > MAX_HISTORY_CHARS:
            raise BadRequestError(f"messages is {len(text)} characters of JSON, more than {MAX_HISTORY_CHARS}: "
                                  "send fewer (or shorter) earlier turns", param="messages")
        value = self._json("messages", list, "messages must be a JSON list of messages")
        if value is None:
            return []
        return chat_messages(value)


def voice_request(query: Query) -> VoiceRequest:
    """The session a query describes."""
    model = query.get("model")
    if model is None:
        raise BadRequestError("model is required: the chat model that answers (?model=NAME)", param="model")
    system = query.get("system")
    history = ([Message(role="system", content=system)] if system else []) + query.messages()
    return VoiceRequest(model=model, speech_model=query.get("speech_model", DEFAULT_SPEECH_MODEL) or "",
                        messages=history,
                        language=query.get("language"), options=query.options(), think=query.boolean("think"),
                        keep_alive=query.get("keep_alive"),
                        partial_every=PARTIAL_EVERY if query.boolean("partial") else None)


def voice(request: Request) -> None:
    """Listen, transcribe each utterance, answer it, as server-sent events."""
    handler = request.handler
    # A web page may send a body without a preflight only as a CORS-safe type: such uploads must come with one.
    handler.check_upload_type()
    query = Query(request.query)
    req = voice_request(query)
    pcm = PcmStream(query.integer("rate", 16000), query.integer("channels", 1))
    # The longest stream accepted: MULLAMA_MAX_AUDIO_SECONDS of the declared format, and room for a WAV header.
    limit = int(limits().max_seconds * pcm.sample_rate * pcm.channels * 2) + PcmStream.MAX_HEADER
    lock = threading.Lock()

    def emit(event: str, data: dict[str, Any]) -> None:
        with lock:
            if handler.app.stopping.is_set():
                raise shutting_down()
            handler.write_chunk(sse(data, event))

    session = VoiceSession(handler.app.manager, req, emit, context=request.context)
    try:
        session.start()
        handler.start_stream(SSE)
    except BaseException:
        session.close()
        raise
    try:
        session.run(pcm.feed(piece) for piece in handler.body_chunks(limit))
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        raise
    except MullamaError as error:
        _fail(handler, lock, error)
    except Exception:  # noqa: BLE001 - the client gets an error event, the log gets the traceback
        log.exception("unexpected error in the voice stream")
        _fail(handler, lock, MullamaError(INTERNAL_ERROR))
    handler.end_stream()


def _fail(handler: Any, lock: threading.Lock, error: MullamaError) -> None:
    with lock:
        handler.stream_failed(error.status)
        handler.write_chunk(sse({"error": error.message}, "error"))
