"""The encoder's window for short audio: sized to the audio, really used by whisper.cpp, and the text still right."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st
from speech_helpers import SENTENCES, harvard_recording, spoken_sentence, word_errors, words
from whisper_weights import whisper_tiny_en_path

from mullama.config import SettingError
from mullama.speech import SpeechModel, load_audio
from mullama.speech.audio import SAMPLE_RATE
from mullama.speech.window import DEFAULT_WINDOW, FRAME_STEP, FRAMES_PER_SECOND, EncoderWindow, speech_window

#: Whisper's whole window, in encoder frames (30 s).
FULL = 1500


@given(st.floats(0, 60), st.floats(0, 5), st.floats(0, 10))
def test_the_window_covers_the_audio_and_its_margin_and_is_shorter_than_the_whole(seconds, margin, floor):
    frames = EncoderWindow(margin_s=margin, floor_s=floor).audio_ctx(seconds, FULL)
    wanted = max(seconds + margin, floor) * FRAMES_PER_SECOND
    if frames == 0:  # whisper.cpp's whole window
        assert wanted > FULL - FRAME_STEP
    else:
        assert frames % FRAME_STEP == 0 and wanted <= frames < max(wanted, 1) + FRAME_STEP and frames < FULL


def test_a_two_second_utterance_gets_a_short_window():
    assert DEFAULT_WINDOW is not None
    assert DEFAULT_WINDOW.audio_ctx(2.0, FULL) == 512  # 10.24 s of 20 ms frames: not 1500
    assert DEFAULT_WINDOW.audio_ctx(29.0, FULL) == 0


@pytest.fixture(scope="module")
def models():
    """Whisper tiny.en with the default window, and with the whole 30 s always."""
    with (SpeechModel(whisper_tiny_en_path(), num_thread=2) as short,
          SpeechModel(whisper_tiny_en_path(), num_thread=2, window=None) as whole):
        yield short, whole


@pytest.mark.parametrize("index", [12, 17])
def test_short_audio_is_transcribed_right_under_the_short_window(models, index):
    short, whole = models
    audio = load_audio(spoken_sentence(index))
    heard, full = short.transcribe(audio, vad=False), whole.transcribe(audio, vad=False)
    assert word_errors(SENTENCES[index], heard.text)[0] <= 1, heard.text
    assert word_errors(SENTENCES[index], full.text)[0] <= 1, full.text
    # The encoder read other input (a window of 10 s, not 30 s): the decoder's confidence moved.
    assert [s.avg_logprob for s in heard.segments] != [s.avg_logprob for s in full.segments]


def test_the_window_bounds_what_whisper_hears():
    """Two sentences, the second starting at 5.6 s: a 5.12 s window never hears it, the whole one does."""
    first, second = load_audio(spoken_sentence(12)).samples, load_audio(spoken_sentence(17)).samples
    audio = first + array("f", bytes(4 * (int(5.6 * SAMPLE_RATE) - len(first)))) + second
    seconds = len(audio) / SAMPLE_RATE
    cut = EncoderWindow(margin_s=5.0 - seconds, floor_s=0.0)
    assert cut.audio_ctx(seconds, FULL) == 256
    heard = {}
    for name, window in (("cut", cut), ("whole", None)):
        with SpeechModel(whisper_tiny_en_path(), num_thread=2, window=window) as model:
            # Without timestamps whisper.cpp reads one window and moves on by 30 s: here, to the end.
            heard[name] = words(model.transcribe(audio, vad=False, timestamps=False).text)
    assert {"river", "spring"} <= set(heard["cut"]) and not {"cushion", "fall"} & set(heard["cut"])
    assert {"river", "spring", "cushion", "fall"} <= set(heard["whole"])


def test_a_short_window_hears_nothing_an_earlier_transcription_left():
    """The state's cross-attention cache holds the last audio encoded; a short window must not read past its own."""
    audio = load_audio(spoken_sentence(10))  # 2.2 s: a window of 3.7 s would not be a whole block of 256 frames
    window = EncoderWindow(margin_s=1.5, floor_s=0.0)
    with SpeechModel(whisper_tiny_en_path(), num_thread=2, window=window) as fresh:
        alone = fresh.transcribe(audio, vad=False)
    with SpeechModel(whisper_tiny_en_path(), num_thread=2, window=window) as used:
        used.transcribe(load_audio(harvard_recording()).samples[:25 * SAMPLE_RATE], vad=False)  # the whole window
        after = used.transcribe(audio, vad=False)
    assert after.text == alone.text
    assert [s.avg_logprob for s in after.segments] == [s.avg_logprob for s in alone.segments]


def test_the_daemon_reads_its_window_from_the_environment(monkeypatch):
    monkeypatch.delenv("MULLAMA_SPEECH_WINDOW", raising=False)
    monkeypatch.delenv("OLLAMA_SPEECH_WINDOW", raising=False)
    assert speech_window() == DEFAULT_WINDOW
    monkeypatch.setenv("MULLAMA_SPEECH_WINDOW", "off")
    assert speech_window() is None
    monkeypatch.setenv("MULLAMA_SPEECH_WINDOW", "2.5")
    assert speech_window() == EncoderWindow(margin_s=2.5, floor_s=DEFAULT_WINDOW.floor_s)
    for bad in ("soon", "-1", "nan", "31"):
        monkeypatch.setenv("MULLAMA_SPEECH_WINDOW", bad)
        with pytest.raises(SettingError, match="MULLAMA_SPEECH_WINDOW"):
            speech_window()
