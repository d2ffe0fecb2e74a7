"""Voice activity detection (whisper.cpp's Silero VAD) on recordings whose speech sox placed."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import pytest
from speech_helpers import duration, sox, spoken_sentence

from mullama.errors import ModelLoadError
from mullama.speech import SpeechSegment, VadOptions, VoiceDetector, load_audio

#: How far a detected boundary may lie from where sox put the speech: the VAD decides per 32 ms window,
#: pads 30 ms, and under loud noise lets a segment run on by up to about 0.16 s.
TOLERANCE_S = 0.25
LEAD_S, GAP_S, TAIL_S = 1.5, 2.0, 1.5


@dataclass(frozen=True)
class Placed:
    """A recording and where its speech truly is."""

    path: Path
    speech: list[SpeechSegment]
    total: float


def silence(dest: Path, seconds: float) -> Path:
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", dest, "trim", "0", str(seconds))
    return dest


def noise(dest: Path, seconds: float, color: str = "whitenoise", volume: float = 0.05) -> Path:
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", dest, "synth", str(seconds), color, "vol", str(volume))
    return dest


@pytest.fixture(scope="module")
def placed(tmp_path_factory) -> Placed:
    """Two sentences, trimmed of espeak's own silence, at known offsets: 1.5 s lead, 2 s gap, 1.5 s tail."""
    work = tmp_path_factory.mktemp("vad")
    trimmed = []
    for index in (0, 6):
        out = work / f"sentence-{index}.wav"
        sox(spoken_sentence(index), out, "silence", "1", "0.02", "1%", "reverse", "silence", "1", "0.02", "1%",
            "reverse")
        trimmed.append(out)
    first, second = duration(trimmed[0]), duration(trimmed[1])
    path = work / "placed.wav"
    sox(silence(work / "lead.wav", LEAD_S), trimmed[0], silence(work / "gap.wav", GAP_S), trimmed[1],
        silence(work / "tail.wav", TAIL_S), path)
    speech = [SpeechSegment(LEAD_S, LEAD_S + first),
              SpeechSegment(LEAD_S + first + GAP_S, LEAD_S + first + GAP_S + second)]
    return Placed(path, speech, duration(path))


@pytest.fixture(scope="module")
def detector():
    with VoiceDetector(num_thread=2) as vad:
        yield vad


def assert_matches(found: list[SpeechSegment], truth: list[SpeechSegment]) -> None:
    assert len(found) == len(truth), found
    for got, want in zip(found, truth):
        assert got.start == pytest.approx(want.start, abs=TOLERANCE_S), (found, truth)
        assert got.end == pytest.approx(want.end, abs=TOLERANCE_S), (found, truth)


def test_finds_the_speech_sox_placed(detector, placed):
    assert_matches(detector.segments(load_audio(placed.path).samples), placed.speech)


@pytest.mark.parametrize("volume", [0.01, 0.05, 0.2])
def test_finds_the_same_speech_under_white_noise(detector, placed, tmp_path, volume):
    noisy = tmp_path / "noisy.wav"
    sox("-m", placed.path, noise(tmp_path / "noise.wav", placed.total, volume=volume), noisy)
    assert_matches(detector.segments(load_audio(noisy).samples), placed.speech)


@pytest.mark.parametrize("color,volume", [("whitenoise", 0.2), ("pinknoise", 0.3), ("brownnoise", 0.3)])
def test_noise_alone_is_not_speech(detector, tmp_path, color, volume):
    assert detector.segments(load_audio(noise(tmp_path / "noise.wav", 5, color, volume)).samples) == []


def test_silence_and_tiny_inputs_are_not_speech(detector):
    assert detector.segments(array("f", bytes(4 * 16000 * 3))) == []
    assert detector.segments(array("f", [0.5] * 100)) == []
    assert detector.segments([]) == []


def test_options_change_the_segmentation(detector, placed):
    samples = load_audio(placed.path).samples
    # A minimum silence longer than the 2 s gap joins both sentences into one segment (which the 1.5 s
    # tail does not end either).
    joined = detector.segments(samples, VadOptions(min_silence_ms=2500))
    assert len(joined) == 1
    assert joined[0].start == pytest.approx(placed.speech[0].start, abs=TOLERANCE_S)
    assert placed.speech[1].end - TOLERANCE_S <= joined[0].end <= placed.total
    # A minimum speech length above both sentences' drops them all.
    assert detector.segments(samples, VadOptions(min_speech_ms=4000)) == []
    # Padding widens each segment by about that much on both sides.
    padded = detector.segments(samples, VadOptions(pad_ms=300))
    assert padded[0].start == pytest.approx(placed.speech[0].start - 0.3, abs=TOLERANCE_S)


def test_a_closed_detector_refuses_work():
    vad = VoiceDetector()
    vad.close()
    with pytest.raises(ModelLoadError, match="closed"):
        vad.segments(array("f", bytes(4 * 16000)))
