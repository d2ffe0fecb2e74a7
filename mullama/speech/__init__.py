"""Speech in-process: audio decoding, voice activity detection and transcription over whisper.cpp.

``SpeechModel(path).transcribe(samples)`` turns 16 kHz mono audio into a
:class:`Transcript`; ``load_audio``/``decode_audio`` read WAV (and, with
ffmpeg, compressed formats) into such samples; ``VoiceDetector`` finds the
speech in a recording; ``EncoderWindow`` shortens Whisper's 30 s window
for short audio; ``formats`` renders a transcript as OpenAI's
response formats.
"""

from mullama.speech.audio import Audio, decode_audio, load_audio
from mullama.speech.transcribe import Segment, SpeechModel, Transcript, Word
from mullama.speech.vad import SpeechSegment, VadOptions, VoiceDetector
from mullama.speech.window import EncoderWindow

__all__ = ["Audio", "EncoderWindow", "Segment", "SpeechModel", "SpeechSegment", "Transcript", "VadOptions",
           "VoiceDetector", "Word", "decode_audio", "load_audio"]
