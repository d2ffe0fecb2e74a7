"""The streaming voice loop, below the APIs: spoken turns in, transcripts and streamed answers out.

A :class:`VoiceSession` reads audio as it is captured. The speech model's
VAD finds each utterance (:mod:`mullama.speech.utterances`); when one ends
it is transcribed, and the text, with the conversation so far, goes to the
chat model, whose answer streams back while the audio keeps coming. Speech
that starts while an answer streams cancels it (barge-in); the part already
said stays in the conversation. What happens is told through ``emit(event,
data)``:

- ``utterance.start`` ``{"start"}``, ``utterance.end`` ``{"start", "end"}``
  (seconds into the stream);
- ``transcript.partial`` ``{"text", "start"}`` while an utterance goes on,
  when the request asks for partial transcripts;
- ``transcript`` ``{"text", "start", "end", "language"}``, once an utterance
  is transcribed (an utterance that gives no text is not answered);
- ``answer.delta`` ``{"content"}``, then ``answer.done`` ``{"text",
  "done_reason"}``, or ``answer.cancelled`` ``{"text"}`` on barge-in;
- ``error`` ``{"error"}`` when an answer fails (the session goes on);
- ``done`` ``{"turns"}`` when the audio has ended and the last answer with it.

``emit`` is called from two threads (the reader's and the answer's); the
caller serialises the writes. An exception from ``emit`` (the client gone)
ends the session.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

from mullama import service
from mullama.engine.residency import ModelManager
from mullama.errors import MullamaError
from mullama.ops.operations import RequestContext
from mullama.speech.transcribe import SpeechModel
from mullama.speech.utterances import (
    UtteranceDetector,
    UtteranceEnded,
    UtteranceEvent,
    UtteranceGoingOn,
    UtteranceStarted,
)
from mullama.types import ChatRequest, Message, VoiceRequest

log = logging.getLogger("mullama.voice")

Emit = Callable[[str, dict[str, Any]], None]


class VoiceSession:
    """One spoken conversation: :meth:`start` checks the models, :meth:`run` consumes the audio."""

    def __init__(self, manager: ModelManager, req: VoiceRequest, emit: Emit, *,
                 context: RequestContext | None = None) -> None:
        self._manager, self._req, self._emit, self._context = manager, req, emit, context
        self._history: list[Message] = list(req.messages)
        self._answer: _Answer | None = None
        self._turns = 0
        self._stack = ExitStack()
        self._speech: SpeechModel | None = None

    def start(self) -> None:
        """Resolve both models and load the speech model; errors here come before any event."""
        speech = self._manager.resolve(self._req.speech_model)
        chat = self._manager.resolve(self._req.model, self._req.options)
        if self._context is not None:  # operations: may this request use the models?
            self._context.admit(speech.record.name)
            self._context.admit(chat.record.name)
        service.require_speech_model(speech.record)
        service.require_text_model(chat.record)
        loaded = self._stack.enter_context(self._manager.hold(speech, self._req.keep_alive))
        assert isinstance(loaded.model, SpeechModel)
        self._speech = loaded.model

    def run(self, audio: Iterable[array]) -> None:
        """Consume 16 kHz mono pieces until the audio ends, then wait for the last answer and emit ``done``."""
        assert self._speech is not None, "start() first"
        try:
            detector = UtteranceDetector(self._speech.detect_speech, partial_every=self._req.partial_every)
            for samples in audio:
                for event in detector.feed(samples):
                    self._on(event)
            for event in detector.finish():
                self._on(event)
            if self._answer is not None:
                self._answer.join()
                self._answer.raise_failure()
            self._emit("done", {"turns": self._turns})
        finally:
            self.close()

    def close(self) -> None:
        """Cancel an answer still streaming and let go of the speech model."""
        if self._answer is not None:
            self._answer.cancel()
        self._stack.close()

    def _on(self, event: UtteranceEvent) -> None:
        assert self._speech is not None
        if isinstance(event, UtteranceGoingOn):
            partial = self._speech.transcribe(event.samples, language=self._req.language, vad=False)
            self._emit("transcript.partial", {"text": partial.text.strip(), "start": event.start})
            return
        if isinstance(event, UtteranceStarted):
            self._emit("utterance.start", {"start": event.start})
            if self._answer is not None:
                self._answer.cancel()  # barge-in
                self._answer.raise_failure()
            return
        assert isinstance(event, UtteranceEnded)
        self._emit("utterance.end", {"start": event.start, "end": event.end})
        transcript = self._speech.transcribe(event.samples, language=self._req.language, vad=False)
        text = transcript.text.strip()
        self._emit("transcript", {"text": text, "start": event.start, "end": event.end,
                                  "language": transcript.language})
        if not text:
            return
        if self._answer is not None:
            self._answer.cancel()
            self._answer.raise_failure()
        self._turns += 1
        self._history.append(Message(role="user", content=text))
        self._answer = _Answer(self._manager, self._req, list(self._history), self._emit, self._history.append)
        self._answer.start()


class _Answer(threading.Thread):
    """The chat model's answer to one utterance, streamed from a thread of its own so that listening goes on."""

    def __init__(self, manager: ModelManager, req: VoiceRequest, messages: list[Message], emit: Emit,
                 remember: Callable[[Message], None]) -> None:
        super().__init__(name="mullama-voice-answer", daemon=True)
        self._manager, self._req, self._messages, self._emit, self._remember = manager, req, messages, emit, remember
        self._lock = threading.Lock()
        self._cancelled = False
        self._reply: service.Reply | None = None
        self._failure: BaseException | None = None

    def cancel(self) -> None:
        """Stop the answer (if it still runs) and wait until it has said so."""
        with self._lock:
            self._cancelled = True
            if self._reply is not None:
                self._reply.cancel()
        if self.is_alive():
            self.join()

    def raise_failure(self) -> None:
        """Raise what ended the answer's writes (the client gone), in the session's thread."""
        if self._failure is not None:
            raise self._failure

    def run(self) -> None:
        request = ChatRequest(model=self._req.model, messages=self._messages, options=self._req.options,
                              think=self._req.think, keep_alive=self._req.keep_alive)
        try:
            reply = service.chat(self._manager, request)
            with self._lock:
                self._reply = reply
                if self._cancelled:
                    reply.cancel()
            try:
                for delta in reply:
                    if delta.content:
                        self._emit("answer.delta", {"content": delta.content})
            finally:
                reply.close()
            result = reply.result
            assert result is not None
            text = result.message.content
            self._remember(Message(role="assistant", content=text))
            if result.done_reason == "cancel":
                self._emit("answer.cancelled", {"text": text})
            else:
                self._emit("answer.done", {"text": text, "done_reason": result.done_reason})
        except MullamaError as error:
            self._report(error)
        except BaseException as error:  # noqa: BLE001 - the client gone, or a bug: the session raises it
            self._failure = error

    def _report(self, error: MullamaError) -> None:
        try:
            self._emit("error", {"error": error.message})
        except BaseException as failure:  # noqa: BLE001 - the client gone: the session raises it
            self._failure = failure
