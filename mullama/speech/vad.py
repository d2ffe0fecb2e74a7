"""Voice activity detection: where in a recording someone speaks.

whisper.cpp's Silero VAD (a small LSTM over 32 ms windows, running on the
same ggml as everything else) gives a speech probability per window; its
segmenter turns those into speech segments with minimum durations and
padding. ``build_native.py --with-whisper`` installs the Silero v6.2.0
model that the pinned whisper.cpp source carries, so no download is needed.
"""

from __future__ import annotations

import ctypes
import math
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mullama.errors import ModelLoadError, NativeLibraryError
from mullama.ffi import loader
from mullama.speech.audio import SAMPLE_RATE


@dataclass(frozen=True)
class SpeechSegment:
    """A stretch of speech, in seconds from the start of the recording."""

    start: float
    end: float


@dataclass(frozen=True)
class VadOptions:
    """How speech probabilities become segments (whisper.cpp's defaults)."""

    #: Probability above which a window counts as speech.
    threshold: float = 0.5
    #: Shorter bursts of speech are dropped.
    min_speech_ms: int = 250
    #: Silence shorter than this does not end a segment.
    min_silence_ms: int = 100
    #: Longer speech is cut into segments of at most this length.
    max_speech_s: float = math.inf
    #: Kept around each segment, so word edges are not clipped.
    pad_ms: int = 30


def default_vad_model() -> Path:
    """The Silero VAD model installed beside libwhisper."""
    model = loader.load_whisper().vad_model
    if model is None:
        raise NativeLibraryError("no VAD model beside libwhisper: run `python build_native.py --with-whisper`")
    return model


class VoiceDetector:
    """A loaded Silero VAD model. One detection runs at a time (the model carries LSTM state)."""

    def __init__(self, model_path: str | Path | None = None, *, num_thread: int = 1) -> None:
        """Load the VAD model (by default the one ``build_native.py --with-whisper`` installed)."""
        self._lib = loader.load_whisper().lib
        self.path = Path(model_path) if model_path is not None else default_vad_model()
        params = self._lib.whisper_vad_default_context_params()
        params.n_threads = num_thread
        # The model is tiny and runs window by window; a GPU round trip per window would only slow it.
        params.use_gpu = False
        self._ctx = self._lib.whisper_vad_init_from_file_with_params(str(self.path).encode(), params)
        if not self._ctx:
            raise ModelLoadError(f"could not load the VAD model {self.path}")
        self._lock = threading.Lock()

    def segments(self, samples: Sequence[float], options: VadOptions | None = None) -> list[SpeechSegment]:
        """The speech segments of 16 kHz mono ``samples``, in order; empty for silence or noise."""
        options = options or VadOptions()
        if not isinstance(samples, array) or samples.typecode != "f":
            samples = array("f", samples)
        if len(samples) < SAMPLE_RATE // 10:
            return []
        params = self._lib.whisper_vad_default_params()
        params.threshold = options.threshold
        params.min_speech_duration_ms = options.min_speech_ms
        params.min_silence_duration_ms = options.min_silence_ms
        params.max_speech_duration_s = min(options.max_speech_s, 3.4e38)
        params.speech_pad_ms = options.pad_ms
        buffer = (ctypes.c_float * len(samples)).from_buffer(samples)
        with self._lock:
            if not self._ctx:
                raise ModelLoadError("the VAD model is closed")
            found = self._lib.whisper_vad_segments_from_samples(self._ctx, params, buffer, len(samples))
            if not found:
                raise ModelLoadError("voice activity detection failed")
            try:
                duration = len(samples) / SAMPLE_RATE
                # whisper.cpp reports centiseconds.
                return [SpeechSegment(max(0.0, self._lib.whisper_vad_segments_get_segment_t0(found, i) / 100),
                                      min(duration, self._lib.whisper_vad_segments_get_segment_t1(found, i) / 100))
                        for i in range(self._lib.whisper_vad_segments_n_segments(found))]
            finally:
                self._lib.whisper_vad_free_segments(found)

    def close(self) -> None:
        """Free the model; later calls to :meth:`segments` raise."""
        with self._lock:
            if self._ctx:
                self._lib.whisper_vad_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> VoiceDetector:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
