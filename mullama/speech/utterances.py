"""Utterances in a live stream of audio: where each starts, and when it has ended.

The VAD (:class:`~mullama.speech.vad.VoiceDetector`) reads whole
recordings; a voice loop gets audio as it is captured. An
:class:`UtteranceDetector` keeps the audio since the last utterance ended
and runs the VAD over it each time a little more has arrived: the first
speech it finds starts an utterance, and the utterance ends once the speech
has been followed by enough silence (or has gone on too long). Silence alone
is trimmed as it comes, so the buffer stays short and each VAD run cheap.
With ``partial_every``, an utterance still going on is also handed out at
that interval, for partial transcripts.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

from mullama.speech.audio import SAMPLE_RATE
from mullama.speech.vad import SpeechSegment


@dataclass(frozen=True)
class UtteranceStarted:
    """Speech began, ``start`` seconds into the stream."""

    start: float


@dataclass(frozen=True)
class UtteranceEnded:
    """An utterance ended: its span in the stream and its audio (16 kHz mono, with some margin around it)."""

    start: float
    end: float
    samples: array


@dataclass(frozen=True)
class UtteranceGoingOn:
    """An utterance not ended yet: its start and its audio so far (for a partial transcript)."""

    start: float
    samples: array


UtteranceEvent = UtteranceStarted | UtteranceGoingOn | UtteranceEnded
#: Finds the speech in 16 kHz mono samples (``SpeechModel.detect_speech``).
Detect = Callable[[array], list[SpeechSegment]]


class UtteranceDetector:
    """Feed it audio as it arrives; it says when utterances start and end."""

    def __init__(self, detect: Detect, *, end_silence: float = 0.8, step: float = 0.25, margin: float = 0.3,
                 max_utterance: float = 30.0, keep_silence: float = 1.0, partial_every: float | None = None) -> None:
        """``end_silence``: the silence that ends an utterance; ``step``: audio between two VAD runs;
        ``margin``: audio kept before and after the speech the VAD found (it clips word edges);
        ``max_utterance``: longer speech is cut; ``keep_silence``: silence kept ahead of speech to come;
        ``partial_every``: seconds of speech between two :class:`UtteranceGoingOn` (None: none)."""
        self._partial_every = partial_every
        #: Seconds of the buffer that the last UtteranceGoingOn (or the start) covered.
        self._partial_at = 0.0
        self._detect = detect
        self._end_silence, self._step, self._margin = end_silence, step, margin
        self._max_utterance, self._keep_silence = max_utterance, keep_silence
        self._buffer = array("f")
        #: Seconds of stream before the buffer's first sample.
        self._offset = 0.0
        self._unread = 0
        self._speaking = False

    def feed(self, samples: array) -> list[UtteranceEvent]:
        """Add 16 kHz mono samples; the events they complete."""
        self._buffer.extend(samples)
        self._unread += len(samples)
        if self._unread < self._step * SAMPLE_RATE:
            return []
        self._unread = 0
        return self._scan(final=False)

    def finish(self) -> list[UtteranceEvent]:
        """The stream ended: the events of what is left (an utterance in progress ends here)."""
        return self._scan(final=True) if self._buffer else []

    def _scan(self, final: bool) -> list[UtteranceEvent]:
        segments = self._detect(self._buffer)
        duration = len(self._buffer) / SAMPLE_RATE
        if not segments:
            if self._speaking and final:
                return [self._end(0.0, duration)]
            if not self._speaking:
                self._trim_silence(duration)
            return []
        events: list[UtteranceEvent] = []
        first, last = segments[0].start, segments[-1].end
        if not self._speaking:
            self._speaking = True
            self._partial_at = first
            events.append(UtteranceStarted(round(self._offset + first, 3)))
        if final or duration - last >= self._end_silence or last - first >= self._max_utterance:
            events.append(self._end(first, last))
        elif self._partial_every is not None and duration - self._partial_at >= self._partial_every:
            self._partial_at = duration
            begin = max(0, int((first - self._margin) * SAMPLE_RATE))
            events.append(UtteranceGoingOn(round(self._offset + first, 3), self._buffer[begin:]))
        return events

    def _end(self, first: float, last: float) -> UtteranceEnded:
        """Cut the utterance out of the buffer; what follows it stays for the next one."""
        begin = max(0, int((first - self._margin) * SAMPLE_RATE))
        end = min(len(self._buffer), int((last + self._margin) * SAMPLE_RATE))
        event = UtteranceEnded(round(self._offset + first, 3), round(self._offset + last, 3),
                               self._buffer[begin:end])
        cut = int(last * SAMPLE_RATE)
        self._buffer = self._buffer[cut:]
        self._offset += cut / SAMPLE_RATE
        self._speaking = False
        return event

    def _trim_silence(self, duration: float) -> None:
        drop = int((duration - self._keep_silence) * SAMPLE_RATE)
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._offset += drop / SAMPLE_RATE
