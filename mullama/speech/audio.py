"""Audio in: WAV of any rate and channel count, other formats through ffmpeg, as 16 kHz mono floats.

Speech models read 16 kHz mono samples in [-1, 1]. WAV (PCM 8/16/24/32-bit,
IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE) is parsed here with no extra tool:
a RIFF chunk reader rather than the stdlib ``wave`` module, which before
Python 3.12 refuses float and extensible files, the kinds audio libraries and
``ffmpeg`` write. Channels are averaged and the rate converted by linear
interpolation (Whisper's features stop at 8 kHz, well inside what
interpolation keeps). Compressed formats (mp3, ogg/opus, webm, flac, m4a)
are decoded by ``ffmpeg`` when it is installed; without it they are a
:class:`BadRequestError` naming the missing tool. Every malformed input is a
:class:`BadRequestError`, never another exception, and limits on size and
duration are checked before the samples are built.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from mullama import config
from mullama.errors import BadRequestError, PayloadTooLargeError

SAMPLE_RATE = 16000
#: WAVE format tags: integer PCM, IEEE float, and the extensible wrapper whose sub-format names one of them.
WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
#: How long ffmpeg may take to decode one upload.
FFMPEG_TIMEOUT_S = 300
_BIG_ENDIAN = sys.byteorder == "big"


@dataclass(frozen=True)
class Audio:
    """Mono samples in [-1, 1] at ``sample_rate`` Hz (16 kHz once decoded for a speech model)."""

    samples: array
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class AudioLimits:
    """The largest upload and the longest recording accepted."""

    max_bytes: int
    max_seconds: float


def limits() -> AudioLimits:
    """Limits from ``MULLAMA_MAX_AUDIO_BYTES`` (default 25 MiB, as OpenAI's) and ``MULLAMA_MAX_AUDIO_SECONDS`` (1 h)."""
    try:
        return AudioLimits(int(config.env("MAX_AUDIO_BYTES", str(25 << 20))),
                           float(config.env("MAX_AUDIO_SECONDS", "3600")))
    except ValueError as exc:
        raise BadRequestError(f"MULLAMA_MAX_AUDIO_BYTES / MULLAMA_MAX_AUDIO_SECONDS: {exc}") from exc


@dataclass(frozen=True)
class WavFormat:
    """What a WAV file's ``fmt`` chunk says."""

    encoding: str  # "pcm" or "float"
    channels: int
    sample_rate: int
    bits: int


def parse_fmt(chunk: bytes) -> WavFormat:
    """A WAV ``fmt`` chunk's format; a :class:`BadRequestError` for one this module cannot read."""
    if len(chunk) < 16:
        raise BadRequestError("WAV file: the fmt chunk is too short")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(chunk) < 40:
            raise BadRequestError("WAV file: an extensible fmt chunk without its sub-format")
        tag = struct.unpack_from("<H", chunk, 24)[0]
    encodings = {WAVE_FORMAT_PCM: "pcm", WAVE_FORMAT_IEEE_FLOAT: "float"}
    if tag not in encodings:
        raise BadRequestError(f"WAV file: format tag {tag:#x} is not PCM or IEEE float (compressed WAV is not read)")
    encoding = encodings[tag]
    if (encoding, bits) not in {("pcm", 8), ("pcm", 16), ("pcm", 24), ("pcm", 32), ("float", 32), ("float", 64)}:
        raise BadRequestError(f"WAV file: {bits}-bit {encoding} samples are not supported")
    if not 1 <= channels <= 64:
        raise BadRequestError(f"WAV file: {channels} channels")
    if not 1000 <= rate <= 768000:
        raise BadRequestError(f"WAV file: a sample rate of {rate} Hz")
    return WavFormat(encoding, channels, rate, bits)


def _chunks(data: bytes) -> tuple[WavFormat, memoryview]:
    """The format and the sample bytes of a RIFF/WAVE file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BadRequestError("not a WAV file (no RIFF/WAVE header)")
    view = memoryview(data)
    offset, fmt = 12, None
    while offset + 8 <= len(data):
        ident, size = bytes(view[offset:offset + 4]), struct.unpack_from("<I", data, offset + 4)[0]
        body = view[offset + 8:offset + 8 + size]
        if ident == b"fmt ":
            fmt = parse_fmt(bytes(body))
        elif ident == b"data":
            if fmt is None:
                raise BadRequestError("WAV file: the data chunk comes before the fmt chunk")
            # A streaming writer leaves the size at 0 or 0xFFFFFFFF; the samples then run to the end.
            return fmt, body if size not in (0, 0xFFFFFFFF) else view[offset + 8:]
        offset += 8 + size + (size & 1)
    raise BadRequestError("WAV file: no fmt chunk" if fmt is None else "WAV file: no data chunk")


def _to_floats(raw: memoryview, fmt: WavFormat) -> array:
    """Interleaved samples of any supported encoding as floats in [-1, 1]."""
    width = fmt.bits // 8
    usable = len(raw) - len(raw) % (width * fmt.channels)
    raw = raw[:usable]
    if fmt.encoding == "float":
        values = array("f" if width == 4 else "d", raw.tobytes())
        if _BIG_ENDIAN:
            values.byteswap()
        # NaN or infinity in a file would poison the model's input: clamp to silence/full scale.
        return array("f", (0.0 if v != v else max(-1.0, min(1.0, v)) for v in values))
    if width == 1:
        return array("f", ((b - 128) / 128.0 for b in raw.tobytes()))
    if width == 3:
        raw_bytes = raw.tobytes()
        scale = 1.0 / (1 << 23)
        return array("f", (int.from_bytes(raw_bytes[i:i + 3], "little", signed=True) * scale
                           for i in range(0, len(raw_bytes), 3)))
    values = array("h" if width == 2 else "i", raw.tobytes())
    if _BIG_ENDIAN:
        values.byteswap()
    scale = 1.0 / (1 << (fmt.bits - 1))
    return array("f", (v * scale for v in values))


def to_mono(samples: array, channels: int) -> array:
    """Average interleaved channels into one."""
    if channels == 1:
        return samples
    frames = len(samples) // channels
    return array("f", (sum(samples[i * channels:(i + 1) * channels]) / channels for i in range(frames)))


def resample(samples: array, source_rate: int, target_rate: int = SAMPLE_RATE) -> array:
    """Linear interpolation from ``source_rate`` to ``target_rate``; the first sample stays first."""
    if source_rate == target_rate or not samples:
        return samples
    count = max(1, int(len(samples) * target_rate / source_rate))
    step = source_rate / target_rate
    last = len(samples) - 1
    out = array("f", bytes(4 * count))
    for j in range(count):
        x = j * step
        i = int(x)
        if i >= last:
            out[j] = samples[last]
        else:
            frac = x - i
            out[j] = samples[i] + (samples[i + 1] - samples[i]) * frac
    return out


def read_wav(data: bytes, max_seconds: float | None = None) -> Audio:
    """A WAV file's samples as 16 kHz mono; the duration is checked against ``max_seconds`` first."""
    fmt, raw = _chunks(data)
    frames = len(raw) // (fmt.bits // 8 * fmt.channels)
    if max_seconds is not None and frames / fmt.sample_rate > max_seconds:
        raise BadRequestError(f"the audio is {frames / fmt.sample_rate:.0f} s long; the limit is {max_seconds:.0f} s "
                              "(MULLAMA_MAX_AUDIO_SECONDS)")
    mono = to_mono(_to_floats(raw, fmt), fmt.channels)
    return Audio(resample(mono, fmt.sample_rate))


def pcm16_to_audio(data: bytes, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> Audio:
    """Raw little-endian 16-bit PCM (what ``arecord``/``sox -t raw`` stream) as 16 kHz mono."""
    fmt = WavFormat("pcm", channels, sample_rate, 16)
    return Audio(resample(to_mono(_to_floats(memoryview(data), fmt), channels), sample_rate))


class PcmStream:
    """Audio as it is captured, in pieces of any size, as 16 kHz mono floats.

    The stream is raw little-endian 16-bit PCM at ``sample_rate`` with
    ``channels`` (what ``arecord -f S16_LE`` and ``sox -t raw`` write), or a
    WAV file as a streaming writer sends it: a RIFF header, whose format
    (16-bit PCM) then replaces those settings, and samples to the end.
    """

    #: How far into the stream a WAV header's data chunk must begin.
    MAX_HEADER = 64 * 1024

    def __init__(self, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        """Raw PCM's settings (a WAV header overrides them)."""
        if not 1000 <= sample_rate <= 768000 or not 1 <= channels <= 64:
            raise BadRequestError(f"a stream of {channels} channel(s) at {sample_rate} Hz cannot be read")
        self.sample_rate, self.channels = sample_rate, channels
        self._pending = b""
        self._started = False

    def feed(self, data: bytes) -> array:
        """The samples ``data`` completes (a partial frame waits for the next piece)."""
        data = self._pending + data
        if not self._started:
            if len(data) < 12 and b"RIFF".startswith(data[:4]):
                self._pending = data
                return array("f")
            self._started = True
            if data[:4] == b"RIFF":
                header = self._wav_header(data)
                if header is None:
                    self._started = False
                    self._pending = data
                    return array("f")
                data = data[header:]
        frame = 2 * self.channels
        usable = len(data) - len(data) % frame
        # Pieces of at least 20 ms, so that converting each to 16 kHz on its own barely shifts the rate.
        if usable < frame * (self.sample_rate // 50):
            self._pending = data
            return array("f")
        self._pending = data[usable:]
        return pcm16_to_audio(data[:usable], self.sample_rate, self.channels).samples

    def _wav_header(self, data: bytes) -> int | None:
        """Where the samples begin, once the header is complete (None until then); its format becomes ours."""
        if data[8:12] != b"WAVE":
            raise BadRequestError("the stream starts with RIFF but is not a WAV file")
        offset = 12
        while offset + 8 <= len(data):
            ident, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
            if ident == b"data":
                return offset + 8
            if ident == b"fmt ":
                if offset + 8 + size > len(data):
                    return None
                fmt = parse_fmt(data[offset + 8:offset + 8 + size])
                if (fmt.encoding, fmt.bits) != ("pcm", 16):
                    raise BadRequestError("a streamed WAV must hold 16-bit PCM")
                self.sample_rate, self.channels = fmt.sample_rate, fmt.channels
            offset += 8 + size + (size & 1)
        if len(data) > self.MAX_HEADER:
            raise BadRequestError("the stream's WAV header has no data chunk")
        return None


def _decode_with_ffmpeg(data: bytes, max_seconds: float | None, name: str) -> Audio:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise BadRequestError(f"{name} is not WAV, and decoding other formats (mp3, ogg/opus, webm, flac, m4a) "
                              "needs ffmpeg, which is not installed on the server")
    command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", "pipe:0",
               "-f", "s16le", "-acodec", "pcm_s16le", "-ac", "1", "-ar", str(SAMPLE_RATE)]
    if max_seconds is not None:
        # One sample past the limit is enough to know the recording is too long.
        command += ["-t", f"{max_seconds + 1.0 / SAMPLE_RATE:.6f}"]
    try:
        result = subprocess.run([*command, "pipe:1"], input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadRequestError(f"{name}: ffmpeg took more than {FFMPEG_TIMEOUT_S} s to decode it") from None
    if result.returncode != 0 or not result.stdout:
        reason = (result.stderr.decode(errors="replace").strip().splitlines() or ["no audio stream"])[-1]
        raise BadRequestError(f"{name}: could not decode the audio ({reason})")
    if max_seconds is not None and len(result.stdout) / 2 > max_seconds * SAMPLE_RATE:
        raise BadRequestError(f"the audio is longer than the limit of {max_seconds:.0f} s (MULLAMA_MAX_AUDIO_SECONDS)")
    return pcm16_to_audio(result.stdout)


def decode_audio(data: bytes, name: str = "the file", audio_limits: AudioLimits | None = None) -> Audio:
    """An uploaded file's audio as 16 kHz mono: WAV here, anything else through ffmpeg."""
    bounds = audio_limits or limits()
    if len(data) > bounds.max_bytes:
        raise PayloadTooLargeError(f"{name} is {len(data)} bytes; the limit is {bounds.max_bytes} "
                                   "(MULLAMA_MAX_AUDIO_BYTES)")
    if not data:
        raise BadRequestError(f"{name} is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return read_wav(data, bounds.max_seconds)
    return _decode_with_ffmpeg(data, bounds.max_seconds, name)


def load_audio(path: str | Path, audio_limits: AudioLimits | None = None) -> Audio:
    """A file's audio as 16 kHz mono (see :func:`decode_audio`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadRequestError(f"{path}: {exc.strerror or exc}") from exc
    return decode_audio(data, path.name, audio_limits)
