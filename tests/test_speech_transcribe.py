"""SpeechModel on Whisper tiny.en: word error rate on spoken sentences, silence, timestamps, errors."""

from __future__ import annotations

import struct
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest
from speech_helpers import SENTENCES, harvard_recording, sox, spoken_sentence, whisper_cpp_source, word_errors, words
from whisper_weights import mel_filters, whisper_tiny_en_path

from mullama.errors import BadRequestError, CancelledError, InvalidModelFileError, ModelLoadError
from mullama.speech import Audio, SpeechModel, load_audio
from mullama.speech.model_file import read_whisper_file
from mullama.speech.transcribe import TRANSCRIPTION_VAD


@pytest.fixture(scope="module")
def speech_model():
    """Whisper tiny.en loaded with two threads."""
    with SpeechModel(whisper_tiny_en_path(), num_thread=2) as model:
        yield model


@pytest.fixture(scope="module")
def whisper_model_path():
    return whisper_tiny_en_path()

@pytest.fixture(scope="module")
def harvard(speech_model):
    """The transcript of the 20-sentence recording (VAD on, greedy): shared by several tests."""
    return speech_model.transcribe(load_audio(harvard_recording()))


@pytest.mark.slow
def test_word_error_rate_on_spoken_sentences(harvard):
    errors, total = word_errors(" ".join(SENTENCES), harvard.text)
    print(f"\nWER {errors}/{total} = {errors / total:.1%}: {harvard.text}")
    assert errors / total <= 0.15


@pytest.mark.slow
def test_segments_are_ordered_inside_the_recording_and_match_the_text(harvard):
    assert harvard.language == "en" and harvard.language_name == "english" and harvard.task == "transcribe"
    assert harvard.duration == pytest.approx(load_audio(harvard_recording()).duration)
    assert len(harvard.speech) >= 10  # the VAD found the sentences
    previous_end = 0.0
    for segment in harvard.segments:
        assert previous_end - 0.05 <= segment.start < segment.end <= harvard.duration + 0.01
        previous_end = segment.end
        assert segment.tokens and segment.avg_logprob < 0 and 0 <= segment.no_speech_prob <= 1
    assert "".join(s.text for s in harvard.segments).strip() == harvard.text


def test_a_real_voice_from_whisper_cpps_own_sample(speech_model):
    """President Kennedy's inaugural line, the recording whisper.cpp ships; its own VAD test expects 4 segments."""
    result = speech_model.transcribe(load_audio(whisper_cpp_source() / "samples" / "jfk.wav"))
    reference = ("And so my fellow Americans, ask not what your country can do for you, "
                 "ask what you can do for your country.")
    assert word_errors(reference, result.text) == (0, 22)
    assert len(result.speech) == 4


def test_silence_gives_no_text(speech_model):
    result = speech_model.transcribe(array("f", bytes(4 * 16000 * 5)))
    assert result.text == "" and result.segments == [] and result.speech == []


def test_noise_gives_no_text(speech_model, tmp_path):
    noise = tmp_path / "noise.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", noise, "synth", "8", "whitenoise", "vol", "0.2")
    assert speech_model.transcribe(load_audio(noise)).text == ""


def test_timestamps_point_into_the_original_recording(speech_model, tmp_path):
    """With VAD, Whisper reads only the speech; the segment times must still be the recording's."""
    placed = tmp_path / "placed.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", tmp_path / "lead.wav", "trim", "0", "6")
    sox(tmp_path / "lead.wav", spoken_sentence(12), placed)
    result = speech_model.transcribe(load_audio(placed), word_timestamps=True)
    assert word_errors(SENTENCES[12], result.text)[0] <= 1
    # The VAD's segment starts its padding ahead of the speech; Whisper's times are the recording's.
    pad = TRANSCRIPTION_VAD.pad_ms / 1000
    assert result.speech[0].start == pytest.approx(6.0 - pad, abs=0.3)
    assert result.segments[0].start >= 6.0 - pad - 0.2
    spoken = [w for s in result.segments for w in s.words]
    assert [w.word.strip(".,").lower() for w in spoken] == words(result.text)
    assert all(6.0 - pad - 0.3 <= w.start <= w.end <= result.duration for w in spoken)
    assert [w.start for w in spoken] == sorted(w.start for w in spoken)


def test_the_vad_before_a_transcription_pads_the_speech_more_than_whisper_cpp_does(speech_model):
    """whisper.cpp's 30 ms clips word starts; a transcription reads its speech with TRANSCRIPTION_VAD's padding."""
    second = array("f", bytes(4 * 16000))
    audio = Audio(second + load_audio(spoken_sentence(12)).samples + second, 16000)
    result = speech_model.transcribe(audio)
    assert result.speech == speech_model.detect_speech(audio, TRANSCRIPTION_VAD)
    (tight,) = speech_model.detect_speech(audio)
    (padded,) = result.speech
    assert TRANSCRIPTION_VAD.pad_ms >= 200 and padded.start < tight.start - 0.1 and padded.end > tight.end + 0.1
    assert word_errors(SENTENCES[12], result.text)[0] <= 1


def test_without_vad_the_whole_recording_is_read(speech_model):
    audio = load_audio(spoken_sentence(17))
    result = speech_model.transcribe(audio, vad=False)
    assert result.speech is None
    assert word_errors(SENTENCES[17], result.text)[0] <= 1


def test_audio_at_another_rate_is_resampled(speech_model):
    reference = load_audio(spoken_sentence(3))
    doubled = Audio(array("f", (s for s in reference.samples for _ in range(2))), 32000)
    assert speech_model.transcribe(doubled).text == speech_model.transcribe(reference).text


def test_segments_stream_as_whisper_finishes_them(speech_model):
    seen = []
    result = speech_model.transcribe(load_audio(spoken_sentence(5)), on_segment=seen.append)
    assert seen == result.segments and seen


def test_an_error_in_the_segment_callback_stops_the_run_and_is_raised(speech_model):
    class Stop(Exception):
        pass

    def refuse(_segment):
        raise Stop("the client went away")

    audio = load_audio(harvard_recording())
    with pytest.raises(Stop, match="went away"):
        speech_model.transcribe(audio, on_segment=refuse)
    assert speech_model.transcribe(load_audio(spoken_sentence(7))).text


def test_two_transcriptions_at_once_on_one_model(speech_model):
    audios = [load_audio(spoken_sentence(i)) for i in (7, 8)]
    alone = [speech_model.transcribe(a).text for a in audios]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda a: speech_model.transcribe(a).text, audios))
    assert together == alone


def test_cancel_stops_the_transcription_and_the_model_stays_usable(speech_model):
    cancel = threading.Event()
    cancel.set()
    audio = load_audio(spoken_sentence(7))
    with pytest.raises(CancelledError):
        speech_model.transcribe(audio, cancel=cancel)
    assert word_errors(SENTENCES[7], speech_model.transcribe(audio).text)[0] <= 1


def test_prompt_and_beam_search_are_accepted(speech_model):
    audio = load_audio(spoken_sentence(12))
    result = speech_model.transcribe(audio, prompt="A river and its spring.", beam_size=4, temperature=0.2)
    assert word_errors(SENTENCES[12], result.text)[0] <= 1


@pytest.mark.parametrize("options,message", [
    ({"language": "de"}, "English-only model"),
    ({"language": "klingon"}, "unknown language"),
    ({"temperature": 1.5}, "temperature"),
    ({"beam_size": 0}, "beam_size"),
])
def test_bad_options_are_bad_requests(speech_model, options, message):
    with pytest.raises(BadRequestError, match=message):
        speech_model.transcribe(array("f", bytes(4 * 16000)), **options)


def test_language_may_be_named_in_full(speech_model):
    assert speech_model.transcribe(array("f", bytes(4 * 16000)), language="English").language == "en"


def test_translation_needs_a_multilingual_model(speech_model):
    assert not speech_model.multilingual and speech_model.model_type == "tiny"
    with pytest.raises(BadRequestError, match="English-only"):
        speech_model.translate(array("f", bytes(4 * 16000)))


def test_a_closed_model_refuses_work(whisper_model_path):
    model = SpeechModel(whisper_model_path, num_thread=1)
    model.close()
    with pytest.raises(ModelLoadError, match="closed"):
        model.transcribe(array("f", bytes(4 * 16000)), vad=False)


# --- the model file ----------------------------------------------------------------


def test_the_converted_model_matches_whisper_cpps_own_header_filters_and_vocabulary(whisper_model_path):
    """whisper.cpp's source carries tiny.en's header, mel filters and vocabulary (no weights): ours must agree."""
    stub = (whisper_cpp_source() / "models" / "for-tests-ggml-tiny.en.bin").read_bytes()
    ours = whisper_model_path.read_bytes()
    assert ours[:56] == stub[:56]  # magic, hyperparameters, filter shape
    n = 80 * 201
    theirs = struct.unpack_from(f"<{n}f", stub, 56)
    assert struct.unpack_from(f"<{n}f", ours, 56) == pytest.approx(theirs, abs=1e-6)
    assert [round(x, 6) for row in mel_filters(80) for x in row] == pytest.approx(theirs, abs=1e-6)
    # Their converter wrote U+FFFD where a token is not UTF-8 by itself; ours keeps the token's bytes.
    theirs_tokens, mine_tokens = vocabulary(stub), vocabulary(whisper_model_path.read_bytes())
    assert len(theirs_tokens) == len(mine_tokens) == 50257
    assert [t.decode("utf-8", "replace").encode() for t in mine_tokens] == theirs_tokens
    assert sum(m != t for m, t in zip(mine_tokens, theirs_tokens)) < 400


def vocabulary(blob: bytes) -> list[bytes]:
    """The token list of a whisper.cpp model file."""
    offset = 56 + 4 * 80 * 201
    count = struct.unpack_from("<i", blob, offset)[0]
    offset += 4
    tokens = []
    for _ in range(count):
        length = struct.unpack_from("<I", blob, offset)[0]
        tokens.append(blob[offset + 4:offset + 4 + length])
        offset += 4 + length
    return tokens


def test_model_file_validation_accepts_the_model(whisper_model_path):
    info = read_whisper_file(whisper_model_path)
    assert (info.n_vocab, info.n_audio_layer, info.n_text_layer, info.n_mels) == (51864, 4, 4, 80)
    assert not info.multilingual and info.n_tensors == 11 + 15 * 4 + 24 * 4


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b"GGUF" + b[4:], "GGUF"),
    (lambda b: b"\0\0\0\0" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<i", -5) + b[8:], "n_vocab = -5"),
    (lambda b: b[:44] + struct.pack("<i", 77) + b[48:], "ftype"),
])
def test_damaged_model_files_are_refused_before_whisper_cpp_reads_them(whisper_model_path, tmp_path, damage,
                                                                       message):
    path = tmp_path / "damaged.bin"
    path.write_bytes(damage(whisper_model_path.read_bytes()))
    with pytest.raises(InvalidModelFileError, match=message):
        SpeechModel(path)


def test_a_tensor_record_with_too_many_dimensions_is_refused(whisper_model_path, tmp_path):
    """whisper.cpp would write past a four-entry stack array for this one."""
    data = bytearray(whisper_model_path.read_bytes())
    first_tensor = 56 + 4 * 80 * 201 + 4
    for _ in range(50257):
        first_tensor += 4 + struct.unpack_from("<I", data, first_tensor)[0]
    struct.pack_into("<i", data, first_tensor, 9)
    path = tmp_path / "dims.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFileError, match="9 dimensions"):
        read_whisper_file(path)


def test_vocabulary_only_files_and_text_models_are_refused(model_path):
    with pytest.raises(InvalidModelFileError, match="vocabulary-only"):
        read_whisper_file(whisper_cpp_source() / "models" / "for-tests-ggml-tiny.en.bin")
    with pytest.raises(InvalidModelFileError, match="GGUF"):
        SpeechModel(model_path)
