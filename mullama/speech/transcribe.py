"""Speech to text in-process: ``SpeechModel`` over whisper.cpp.

A :class:`SpeechModel` holds one loaded Whisper model; each transcription
runs on its own whisper.cpp state (taken from a small pool), so several
transcriptions can run at once on one model, next to text models on the
same ggml. With ``vad`` on (the default), the Silero VAD finds the speech
first: silence and noise give an empty transcript without Whisper ever
seeing them (Whisper invents words for silence), and only the speech,
joined with short gaps, is transcribed; timestamps are mapped back onto the
original recording.
"""

from __future__ import annotations

import ctypes
import threading
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mullama.errors import BadRequestError, CancelledError, ModelLoadError, MullamaError
from mullama.ffi import loader
from mullama.ffi import whisper as W
from mullama.speech.audio import SAMPLE_RATE, Audio, resample
from mullama.speech.model_file import WhisperFile, read_whisper_file
from mullama.speech.vad import SpeechSegment, VadOptions, VoiceDetector
from mullama.speech.window import DEFAULT_WINDOW, EncoderWindow

#: Silence put between speech segments when only the speech is transcribed (as whisper.cpp does).
VAD_GAP_S = 0.1
#: The VAD's settings before a transcription: whisper.cpp's, but 200 ms of speech padding, not 30 ms, which
#: clips word starts (60 espeak Harvard sentences, each alone in silence, tiny.en: 33.5% WER with 30 ms, 27.5%
#: with 200 ms, 29.6% with 400 ms, which also moves the first timestamp further ahead of the speech).
TRANSCRIPTION_VAD = VadOptions(pad_ms=200)


@dataclass(frozen=True)
class Word:
    """One word with its time span (seconds) and the mean probability of its tokens."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """A stretch of transcript, as Whisper emits them, timed in seconds from the recording's start."""

    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Transcript:
    """The result of a transcription or translation."""

    text: str
    #: The spoken language's code (``en``), detected when not given.
    language: str
    #: Its name as OpenAI's verbose_json reports it (``english``).
    language_name: str
    #: Length of the input in seconds.
    duration: float
    segments: list[Segment]
    #: ``transcribe`` or ``translate``.
    task: str = "transcribe"
    #: What the VAD found, when it ran (an empty list: no speech at all).
    speech: list[SpeechSegment] | None = None


@dataclass(frozen=True)
class _Request:
    """One transcription's options, as :meth:`SpeechModel.transcribe` takes them."""

    task: str
    language: str | None
    prompt: str | None
    temperature: float
    timestamps: bool
    word_timestamps: bool
    vad: bool
    vad_options: VadOptions | None
    beam_size: int
    cancel: threading.Event | None
    on_segment: Callable[[Segment], None] | None


@dataclass(frozen=True)
class _Piece:
    """Where a speech segment of the original lies in the buffer Whisper reads (both in seconds)."""

    processed: float
    original: float
    length: float


class _TimeMap:
    """Maps times in the speech-only buffer back to the original recording."""

    def __init__(self, pieces: list[_Piece]) -> None:
        self._pieces = pieces
        self._starts = [p.processed for p in pieces]

    def __call__(self, t: float) -> float:
        if not self._pieces:
            return t
        piece = self._pieces[max(0, bisect_right(self._starts, t) - 1)]
        return piece.original + min(max(t - piece.processed, 0.0), piece.length)


def _as_samples(audio: Audio | Sequence[float]) -> array:
    if isinstance(audio, Audio):
        samples = audio.samples if audio.sample_rate == SAMPLE_RATE else resample(audio.samples, audio.sample_rate)
    else:
        samples = audio
    if isinstance(samples, array) and samples.typecode == "f":
        return samples
    return array("f", samples)


def _speech_only(samples: array, speech: list[SpeechSegment]) -> tuple[array, _TimeMap]:
    """The speech segments of ``samples`` joined with :data:`VAD_GAP_S` of silence, and the time map back."""
    out, pieces = array("f"), []
    gap = array("f", bytes(4 * int(VAD_GAP_S * SAMPLE_RATE)))
    for i, segment in enumerate(speech):
        if i:
            out.extend(gap)
        begin, end = int(segment.start * SAMPLE_RATE), int(segment.end * SAMPLE_RATE)
        pieces.append(_Piece(len(out) / SAMPLE_RATE, begin / SAMPLE_RATE, (end - begin) / SAMPLE_RATE))
        out.extend(samples[begin:end])
    return out, _TimeMap(pieces)


class SpeechModel:
    """A Whisper model loaded in this process (whisper.cpp's ggml format)."""

    def __init__(self, path: str | Path, *, num_thread: int | None = None, use_gpu: bool = True,
                 flash_attention: bool = True, vad_model: str | Path | None = None,
                 window: EncoderWindow | None = DEFAULT_WINDOW) -> None:
        """Validate and load ``path``; ``vad_model`` defaults to the Silero model installed by the build.

        ``window``: the encoder's window for audio shorter than 30 s (None: always the whole 30 s).
        """
        from mullama.engine.model import default_threads

        self.file: WhisperFile = read_whisper_file(path)
        self.path = self.file.path
        self.num_thread = num_thread or default_threads()
        self._lib = loader.load_whisper().lib
        params = self._lib.whisper_context_default_params()
        params.use_gpu = use_gpu
        params.flash_attn = flash_attention
        self._ctx = self._lib.whisper_init_from_file_with_params_no_state(str(self.path).encode(), params)
        if not self._ctx:
            raise ModelLoadError(f"whisper.cpp could not load {self.path}")
        self.multilingual = bool(self._lib.whisper_is_multilingual(self._ctx))
        self.model_type = self._lib.whisper_model_type_readable(self._ctx).decode()
        self._eot = self._lib.whisper_token_eot(self._ctx)
        self._vad_model = vad_model
        #: The encoder's window for short audio (:mod:`mullama.speech.window`); None: the whole 30 s.
        self.window = window
        self._vad: VoiceDetector | None = None
        self._idle_states: list[int] = []
        #: One event per transcription running, set by :meth:`cancel_all`.
        self._running: set[threading.Event] = set()
        self._active = 0
        self._closed = False
        self._cond = threading.Condition()

    # --- public API ------------------------------------------------------------

    def transcribe(self, audio: Audio | Sequence[float], *, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, timestamps: bool = True, word_timestamps: bool = False,
                   vad: bool = True, vad_options: VadOptions | None = None, beam_size: int = 1,
                   cancel: threading.Event | None = None,
                   on_segment: Callable[[Segment], None] | None = None) -> Transcript:
        """Transcribe 16 kHz mono samples (or an :class:`Audio`) in their own language.

        ``language`` is a code or name (``en``, ``german``); None detects it
        (English-only models are English). ``prompt`` conditions the first
        window (spellings, style). ``temperature`` 0 decodes greedily and
        falls back to higher temperatures where the text looks wrong, as
        OpenAI's Whisper does. ``cancel`` stops the work from another thread
        (:class:`CancelledError`); ``on_segment`` sees each segment as
        Whisper finishes it. ``vad_options`` defaults to
        :data:`TRANSCRIPTION_VAD`.
        """
        return self._run(audio, _Request("transcribe", language, prompt, temperature, timestamps, word_timestamps,
                                         vad, vad_options, beam_size, cancel, on_segment))

    def translate(self, audio: Audio | Sequence[float], *, prompt: str | None = None, temperature: float = 0.0,
                  timestamps: bool = True, word_timestamps: bool = False, vad: bool = True,
                  vad_options: VadOptions | None = None, beam_size: int = 1, cancel: threading.Event | None = None,
                  on_segment: Callable[[Segment], None] | None = None) -> Transcript:
        """Speech in any language as English text (multilingual models only); options as :meth:`transcribe`."""
        if not self.multilingual:
            raise BadRequestError(f"{self.path.name} is an English-only model: translation needs a multilingual "
                                  "Whisper model", param="model")
        return self._run(audio, _Request("translate", None, prompt, temperature, timestamps, word_timestamps,
                                         vad, vad_options, beam_size, cancel, on_segment))

    def detect_speech(self, audio: Audio | Sequence[float], options: VadOptions | None = None) -> list[SpeechSegment]:
        """The speech segments of a recording (the VAD alone, no transcription)."""
        return self._detector().segments(_as_samples(audio), options)

    def cancel_all(self) -> None:
        """Stop every transcription running now (each raises :class:`CancelledError`); later ones run as usual."""
        with self._cond:
            for stop in self._running:
                stop.set()

    @property
    def active_count(self) -> int:
        """Transcriptions running now."""
        with self._cond:
            return len(self._running)

    def close(self) -> None:
        """Wait for running transcriptions, then free the model, its states and its VAD."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._active == 0)
            for state in self._idle_states:
                self._lib.whisper_free_state(state)
            self._idle_states.clear()
            if self._ctx:
                self._lib.whisper_free(self._ctx)
                self._ctx = None
            if self._vad is not None:
                self._vad.close()
                self._vad = None

    def __enter__(self) -> SpeechModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------

    def _detector(self) -> VoiceDetector:
        with self._cond:
            if self._closed:
                raise ModelLoadError(f"{self.path.name} is closed")
            if self._vad is None:
                self._vad = VoiceDetector(self._vad_model)
            return self._vad

    def _language(self, language: str | None, task: str) -> str | None:
        """The language code to decode in; None means detect it."""
        if language is None or language.strip().lower() in ("", "auto"):
            return None if self.multilingual else "en"
        code = language.strip().lower()
        lang_id = self._lib.whisper_lang_id(code.encode())
        if lang_id < 0:
            raise BadRequestError(f"unknown language {language!r} (use an ISO 639-1 code such as en or de)",
                                  param="language")
        code = self._lib.whisper_lang_str(lang_id).decode()
        if not self.multilingual and code != "en":
            raise BadRequestError(f"{self.path.name} is an English-only model; it cannot {task} {language!r} speech",
                                  param="language")
        return code

    def _acquire_state(self) -> int:
        with self._cond:
            if self._closed or not self._ctx:
                raise ModelLoadError(f"{self.path.name} is closed")
            self._active += 1
            if self._idle_states:
                return self._idle_states.pop()
        state = self._lib.whisper_init_state(self._ctx)
        if not state:
            self._release_state(None)
            raise ModelLoadError(f"could not allocate a whisper.cpp state for {self.path.name}")
        return state

    def _release_state(self, state: int | None) -> None:
        with self._cond:
            if state:
                self._idle_states.append(state)
            self._active -= 1
            self._cond.notify_all()

    def _params(self, request: _Request, language: str | None, seconds: float,
                should_stop: Callable[[], bool]) -> tuple[W.whisper_full_params, dict]:
        """whisper.cpp's parameters for ``request``, and the objects they point into (keep them alive)."""
        strategy = W.WHISPER_SAMPLING_BEAM_SEARCH if request.beam_size > 1 else W.WHISPER_SAMPLING_GREEDY
        params = self._lib.whisper_full_default_params(strategy)
        params.n_threads = self.num_thread
        params.translate = request.task == "translate"
        params.no_timestamps = not request.timestamps
        params.token_timestamps = request.word_timestamps
        params.print_progress = params.print_realtime = params.print_timestamps = params.print_special = False
        params.temperature = request.temperature
        # OpenAI's Whisper suppresses non-speech symbols by default; without it "[BLANK_AUDIO]" and the like appear.
        params.suppress_nst = True
        params.beam_search.beam_size = request.beam_size
        if self.window is not None:
            params.audio_ctx = self.window.audio_ctx(seconds, self.file.n_audio_ctx)
        keep: dict[str, object] = {"language": (language or "auto").encode()}
        params.language = keep["language"]
        if request.prompt:
            keep["prompt"] = request.prompt.encode()
            params.initial_prompt = keep["prompt"]
        keep["abort"] = W.ggml_abort_callback(lambda _data: should_stop())
        params.abort_callback = keep["abort"]
        return params, keep

    def _run(self, audio: Audio | Sequence[float], request: _Request) -> Transcript:
        if not 0.0 <= request.temperature <= 1.0:
            raise BadRequestError("temperature must be between 0 and 1", param="temperature")
        if not 1 <= request.beam_size <= 16:
            raise BadRequestError("beam_size must be between 1 and 16", param="beam_size")
        language = self._language(request.language, request.task)
        samples = _as_samples(audio)
        duration = len(samples) / SAMPLE_RATE
        speech, time_map = None, _TimeMap([])
        if request.vad:
            speech = self._detector().segments(samples, request.vad_options or TRANSCRIPTION_VAD)
            if not speech:
                language = language or "en"
                return Transcript("", language, self._language_name(language), duration, [], request.task, speech)
            samples, time_map = _speech_only(samples, speech)
        # An exception in on_segment cannot cross the C callback: it is kept, stops the run, and is raised here.
        failures: list[BaseException] = []
        stopped = threading.Event()

        def cancelled() -> bool:
            return stopped.is_set() or (request.cancel is not None and request.cancel.is_set())

        def should_stop() -> bool:
            return bool(failures) or cancelled()

        params, keep = self._params(request, language, len(samples) / SAMPLE_RATE, should_stop)
        state = self._acquire_state()
        with self._cond:
            self._running.add(stopped)
        try:
            if request.on_segment is not None:
                keep["segment"] = W.whisper_new_segment_callback(
                    lambda _ctx, st, n_new, _data: self._emit(st, n_new, time_map, request, failures))
                params.new_segment_callback = keep["segment"]
            buffer = (ctypes.c_float * len(samples)).from_buffer(samples) if len(samples) else None
            code = self._lib.whisper_full_with_state(self._ctx, state, params, buffer, len(samples))
            if failures:
                raise failures[0]
            if cancelled():
                raise CancelledError("the transcription was cancelled")
            if code != 0:
                raise MullamaError(f"whisper.cpp failed to {request.task} (code {code})")
            count = self._lib.whisper_full_n_segments_from_state(state)
            segments = [self._segment(state, i, time_map, request) for i in range(count)]
            if language is None:
                language = self._lib.whisper_lang_str(self._lib.whisper_full_lang_id_from_state(state)).decode()
        finally:
            with self._cond:
                self._running.discard(stopped)
            self._release_state(state)
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, language, self._language_name(language), duration, segments, request.task, speech)

    def _language_name(self, code: str) -> str:
        return self._lib.whisper_lang_str_full(self._lib.whisper_lang_id(code.encode())).decode()

    def _emit(self, state: int, n_new: int, time_map: _TimeMap, request: _Request,
              failures: list[BaseException]) -> None:
        if failures:
            return
        count = self._lib.whisper_full_n_segments_from_state(state)
        try:
            for i in range(max(0, count - n_new), count):
                request.on_segment(self._segment(state, i, time_map, request))
        except BaseException as exc:  # noqa: BLE001 - re-raised by _run once whisper.cpp has stopped
            failures.append(exc)

    def _segment(self, state: int, i: int, time_map: _TimeMap, request: _Request) -> Segment:
        lib = self._lib
        tokens, logprobs, pieces = [], [], []
        for j in range(lib.whisper_full_n_tokens_from_state(state, i)):
            data = lib.whisper_full_get_token_data_from_state(state, i, j)
            if data.id >= self._eot:
                continue  # timestamps and other special tokens are not text
            tokens.append(data.id)
            logprobs.append(data.plog)
            if request.word_timestamps:
                pieces.append((lib.whisper_token_to_str(self._ctx, data.id), data))
        raw = lib.whisper_full_get_segment_text_from_state(state, i) or b""
        return Segment(
            id=i,
            start=round(time_map(lib.whisper_full_get_segment_t0_from_state(state, i) / 100), 3),
            end=round(time_map(lib.whisper_full_get_segment_t1_from_state(state, i) / 100), 3),
            text=raw.decode("utf-8", "replace"),
            tokens=tokens,
            avg_logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
            no_speech_prob=lib.whisper_full_get_segment_no_speech_prob_from_state(state, i),
            temperature=request.temperature,
            words=_words(pieces, time_map) if request.word_timestamps else [],
        )


def _words(pieces: list[tuple[bytes, W.whisper_token_data]], time_map: _TimeMap) -> list[Word]:
    """Tokens joined into words: a token that starts with a space starts a new word."""
    groups: list[list[tuple[bytes, W.whisper_token_data]]] = []
    for piece, data in pieces:
        if not groups or piece.startswith(b" "):
            groups.append([])
        groups[-1].append((piece, data))
    words = []
    for group in groups:
        text = b"".join(p for p, _ in group).decode("utf-8", "replace").strip()
        if text:
            words.append(Word(text, round(time_map(group[0][1].t0 / 100), 3), round(time_map(group[-1][1].t1 / 100), 3),
                              sum(d.p for _, d in group) / len(group)))
    return words
