"""How much audio Whisper's encoder reads: its whole 30 s window, or a shorter one for short audio.

Whisper always encodes 30 s (1500 frames of 20 ms, the encoder's context),
padding short audio with silence; for a 2 s utterance most of that work is
silence, and it is most of a voice turn's latency. whisper.cpp's
``audio_ctx`` shortens the encoder's context: an :class:`EncoderWindow`
sizes it to the audio, with a margin and a floor, since Whisper, trained
on whole windows, drops or repeats words when its window is short or ends
right where the speech does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mullama import config

#: Encoder frames per second of audio (20 ms each).
FRAMES_PER_SECOND = 50
#: Windows are whole multiples of this many frames. whisper.cpp's decoder reads the encoder's output (the
#: cross-attention cache) in blocks of 256 with flash attention, unmasked: frames past a shorter window would be
#: whatever an earlier transcription left there, and Whisper repeats itself or hears that earlier audio.
FRAME_STEP = 256


@dataclass(frozen=True)
class EncoderWindow:
    """The encoder's window for audio shorter than the model's: the audio's length, a margin, and a floor."""

    #: Seconds of window beyond the audio's end.
    margin_s: float
    #: The shortest window, in seconds.
    floor_s: float

    def audio_ctx(self, seconds: float, full: int) -> int:
        """whisper.cpp's ``audio_ctx`` for ``seconds`` of audio on a model whose window is ``full`` frames.

        0 (whisper.cpp's own: the whole window) when the shortened window
        would not be shorter than the whole one.
        """
        wanted = max(seconds + self.margin_s, self.floor_s) * FRAMES_PER_SECOND
        frames = max(1, math.ceil(wanted / FRAME_STEP)) * FRAME_STEP
        return frames if frames < full else 0


#: The window :class:`~mullama.speech.transcribe.SpeechModel` uses unless told otherwise. The floor matters:
#: with 5 s windows Whisper (tiny.en) repeated itself or dropped words when little silence surrounded the speech
#: (65-70% WER against the whole window's 30-33%); from 10 s on its word error rate was the whole window's or better in every
#: setting measured (bench/speech.py --utterances), for a third of the encoder's work.
DEFAULT_WINDOW: EncoderWindow | None = EncoderWindow(margin_s=1.5, floor_s=10.0)


def speech_window() -> EncoderWindow | None:
    """The daemon's window, from ``MULLAMA_SPEECH_WINDOW``: ``off`` (the whole 30 s), or a margin in seconds.

    Unset: :data:`DEFAULT_WINDOW`.
    """
    return config.setting("SPEECH_WINDOW", DEFAULT_WINDOW, _parse_window)


def _parse_window(text: str) -> EncoderWindow | None:
    if text.lower() == "off":
        return None
    margin = float(text)
    if not 0 <= margin <= 30:
        raise ValueError(text)
    floor = DEFAULT_WINDOW.floor_s if DEFAULT_WINDOW is not None else 0.0
    return EncoderWindow(margin_s=margin, floor_s=floor)
