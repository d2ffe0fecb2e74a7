"""Reading audio: WAV of any layout to 16 kHz mono, compressed formats via ffmpeg, limits, hostile input."""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import wave
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from speech_helpers import require, sox, spoken_sentence

from mullama.errors import BadRequestError, PayloadTooLargeError
from mullama.speech.audio import AudioLimits, decode_audio, limits, load_audio, pcm16_to_audio, read_wav, resample


def wav_bytes(frames: bytes, rate: int, channels: int, width: int) -> bytes:
    """A PCM WAV written by the standard library's own writer."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(frames)
    return out.getvalue()


def riff(fmt_chunk: bytes, data: bytes) -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def float_wav(values: list[float], rate: int = 16000, extensible: bool = False) -> bytes:
    channels, bits = 1, 32
    if extensible:
        # WAVE_FORMAT_EXTENSIBLE whose sub-format GUID starts with IEEE float's tag (3).
        guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * 4, 4, bits, 22, bits, 4) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4, 4, bits)
    return riff(fmt, struct.pack(f"<{len(values)}f", *values))


def test_pcm16_mono_16k_is_read_exactly():
    values = [0, 1, -1, 16384, -16384, 32767, -32768]
    audio = read_wav(wav_bytes(struct.pack(f"<{len(values)}h", *values), 16000, 1, 2))
    assert audio.sample_rate == 16000
    assert list(audio.samples) == pytest.approx([v / 32768 for v in values])


@settings(max_examples=60, deadline=None)
@given(width=st.sampled_from([1, 2, 3, 4]), channels=st.integers(1, 3),
       rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
       frames=st.integers(0, 400), seed=st.integers(0, 2**32 - 1))
def test_any_pcm_layout_written_by_wave_reads_as_mono_16k(width, channels, rate, frames, seed):
    """The standard library writes the file; every channel carries the same signal, so mono equals it."""
    signal = [math.sin(seed % 97 + i * 0.05) * 0.8 for i in range(frames)]
    scale = 1 << (8 * width - 1)
    ints = [max(-scale, min(scale - 1, round(v * scale))) for v in signal]
    if width == 1:
        payload = bytes((i + 128) for i in ints for _ in range(channels))
    else:
        payload = b"".join(i.to_bytes(width, "little", signed=True) for i in ints for _ in range(channels))
    audio = read_wav(wav_bytes(payload, rate, channels, width))
    expected = resample(array("f", [i / scale for i in ints]), rate)
    assert len(audio.samples) == len(expected)
    assert abs(len(expected) - frames * 16000 / rate) <= 1
    assert list(audio.samples) == pytest.approx(list(expected), abs=1e-6)


def test_float_and_extensible_wav_which_the_wave_module_refuses():
    values = [0.0, 0.25, -0.5, 1.0, -1.0]
    for data in (float_wav(values), float_wav(values, extensible=True)):
        with pytest.raises(wave.Error):
            wave.open(io.BytesIO(data))
        assert list(read_wav(data).samples) == pytest.approx(values)


def test_non_finite_float_samples_become_silence_or_full_scale():
    audio = read_wav(float_wav([float("nan"), float("inf"), -float("inf"), 0.5]))
    assert list(audio.samples) == [0.0, 1.0, -1.0, 0.5]


def test_stereo_channels_are_averaged():
    frames = struct.pack("<4h", 16384, -16384, 8192, 8192)
    assert list(read_wav(wav_bytes(frames, 16000, 2, 2)).samples) == pytest.approx([0.0, 0.25])


@pytest.mark.parametrize("source,target", [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 16000)])
def test_resampled_sine_stays_the_same_sine(source, target):
    freq = 440.0
    samples = array("f", [math.sin(2 * math.pi * freq * i / source) for i in range(source // 2)])
    out = resample(samples, source, target)
    assert len(out) == target // 2
    for j in range(0, len(out), 97):
        assert out[j] == pytest.approx(math.sin(2 * math.pi * freq * j / target), abs=0.02)


def test_resampling_keeps_a_recordings_duration():
    path = spoken_sentence(0, rate=22050)
    audio = load_audio(path)
    with wave.open(str(path)) as reader:
        assert audio.duration == pytest.approx(reader.getnframes() / 22050, abs=1e-3)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"RIFF\x00\x00\x00\x00WAVE", "no fmt chunk"),
    (riff(struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16), b"")[:-8], "no data chunk"),
    (riff(struct.pack("<HHIIHH", 85, 1, 16000, 32000, 2, 16), b"\0\0"), "format tag 0x55"),
    (riff(struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 12), b"\0\0"), "12-bit pcm"),
    (riff(struct.pack("<HHIIHH", 1, 0, 16000, 32000, 2, 16), b"\0\0"), "0 channels"),
    (riff(struct.pack("<HHIIHH", 1, 1, 0, 32000, 2, 16), b"\0\0"), "sample rate of 0"),
    (riff(b"\x01\x00", b"\0\0"), "fmt chunk is too short"),
    (b"RIFF\x10\x00\x00\x00WAVEdata\x02\x00\x00\x00\x00\x00", "before the fmt chunk"),
])
def test_corrupt_wav_is_a_bad_request_naming_the_problem(data, message):
    with pytest.raises(BadRequestError, match=message):
        decode_audio(data, audio_limits=AudioLimits(1 << 20, 60))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_a_riff_header_never_raise_anything_else(tail):
    for data in (b"RIFF" + struct.pack("<I", len(tail) + 4) + b"WAVE" + tail, b"RIFF\0\0\0\0WAVEfmt " + tail):
        try:
            audio = read_wav(data, max_seconds=60)
        except BadRequestError:
            continue
        assert all(-1.0 <= s <= 1.0 for s in audio.samples)


def test_truncated_data_chunk_reads_what_is_there():
    data = wav_bytes(struct.pack("<100h", *range(100)), 16000, 1, 2)
    assert len(read_wav(data[:-51]).samples) == 74  # the odd trailing byte is dropped


def test_size_and_duration_limits():
    one_second = wav_bytes(bytes(32000), 16000, 1, 2)
    with pytest.raises(PayloadTooLargeError, match="MULLAMA_MAX_AUDIO_BYTES"):
        decode_audio(one_second, audio_limits=AudioLimits(1000, 60))
    with pytest.raises(BadRequestError, match="MULLAMA_MAX_AUDIO_SECONDS"):
        decode_audio(one_second, audio_limits=AudioLimits(1 << 20, 0.5))
    assert decode_audio(one_second, audio_limits=AudioLimits(1 << 20, 1.0)).duration == 1.0


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_BYTES", "1234")
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_SECONDS", "7.5")
    assert limits() == AudioLimits(1234, 7.5)
    monkeypatch.setenv("MULLAMA_MAX_AUDIO_SECONDS", "soon")
    with pytest.raises(BadRequestError, match="MULLAMA_MAX_AUDIO"):
        limits()


def test_raw_pcm_stream_is_read_like_wav():
    raw = struct.pack("<4h", 0, 16384, -16384, 32767)
    assert list(pcm16_to_audio(raw).samples) == pytest.approx([0, 0.5, -0.5, 32767 / 32768])


def test_compressed_audio_without_ffmpeg_names_the_missing_tool(tmp_path, monkeypatch):
    flac = tmp_path / "speech.flac"
    sox(spoken_sentence(0), flac)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BadRequestError, match="needs ffmpeg, which is not installed"):
        decode_audio(flac.read_bytes(), "speech.flac")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.parametrize("suffix", ["flac", "ogg"])
def test_compressed_audio_is_decoded_by_ffmpeg(tmp_path, suffix):
    source = spoken_sentence(1)
    encoded = tmp_path / f"speech.{suffix}"
    sox(source, encoded)
    audio = decode_audio(encoded.read_bytes(), encoded.name)
    reference = load_audio(source)
    assert audio.duration == pytest.approx(reference.duration, abs=0.05)
    if suffix == "flac":  # lossless: the very samples
        assert list(audio.samples[:5000]) == pytest.approx(list(reference.samples[:5000]), abs=1e-4)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_garbage_for_ffmpeg_is_a_bad_request(tmp_path):
    with pytest.raises(BadRequestError, match="could not decode the audio"):
        decode_audio(b"ID3" + bytes(range(256)) * 4, "song.mp3")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_duration_limit_applies_to_compressed_audio(tmp_path):
    encoded = tmp_path / "long.flac"
    subprocess.run([require("sox"), "-n", "-r", "16000", "-c", "1", str(encoded), "synth", "3", "sine", "300"],
                   check=True)
    with pytest.raises(BadRequestError, match="longer than the limit of 2 s"):
        decode_audio(encoded.read_bytes(), audio_limits=AudioLimits(1 << 20, 2))
