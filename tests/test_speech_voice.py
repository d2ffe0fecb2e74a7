"""The streaming voice loop: utterances found as audio arrives, transcribed, answered, and barge-in."""

from __future__ import annotations

import json
import queue
import socket
import threading
import wave
from array import array
from pathlib import Path
from urllib.parse import urlencode

import pytest
from daemon import exchange
from hypothesis import given, settings
from hypothesis import strategies as st
from speech_helpers import SENTENCES, sox, speech_daemon, spoken_sentence, word_errors

from mullama.errors import BadRequestError
from mullama.http.voice import MAX_HISTORY_CHARS, Query, voice_request
from mullama.speech.audio import SAMPLE_RATE, PcmStream
from mullama.speech.utterances import UtteranceDetector, UtteranceEnded, UtteranceStarted
from mullama.speech.vad import VoiceDetector

SPEECH = "whisper:tiny.en"
#: 16-bit samples per second of 16 kHz mono.
SECOND = 2 * SAMPLE_RATE


def pcm(path: Path) -> bytes:
    """The samples of a 16-bit mono WAV file, as raw bytes."""
    with wave.open(str(path)) as reader:
        assert reader.getsampwidth() == 2 and reader.getnchannels() == 1
        return reader.readframes(reader.getnframes())


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * SAMPLE_RATE) * 2)


# --- the detector, on a stream ---------------------------------------------------------------------------


def test_utterances_are_found_as_the_audio_arrives():
    stream = silence(1.0) + pcm(spoken_sentence(12)) + silence(1.5) + pcm(spoken_sentence(17)) + silence(1.5)
    first_end = 1.0 + len(pcm(spoken_sentence(12))) / SECOND
    second_start = first_end + 1.5
    with VoiceDetector() as vad:
        detector = UtteranceDetector(vad.segments)
        events = []
        for i in range(0, len(stream), 3200):  # 0.1 s pieces
            piece = array("h", stream[i:i + 3200])
            events += detector.feed(array("f", (s / 32768 for s in piece)))
        events += detector.finish()
    kinds = [type(e) for e in events]
    assert kinds == [UtteranceStarted, UtteranceEnded, UtteranceStarted, UtteranceEnded]
    assert events[0].start == pytest.approx(1.0, abs=0.3) and events[1].end == pytest.approx(first_end, abs=0.3)
    assert events[2].start == pytest.approx(second_start, abs=0.3)
    # Each utterance's audio is its speech, with a margin: the whole sentence, not more.
    assert abs(len(events[1].samples) / SAMPLE_RATE - (first_end - 1.0)) < 0.8


def test_silence_and_noise_start_no_utterance(tmp_path):
    noise = tmp_path / "noise.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", noise, "synth", "4", "whitenoise", "vol", "0.2")
    with VoiceDetector() as vad:
        detector = UtteranceDetector(vad.segments)
        samples = array("f", (s / 32768 for s in array("h", silence(3) + pcm(noise))))
        events = [e for i in range(0, len(samples), 1600) for e in detector.feed(samples[i:i + 1600])]
        assert events + detector.finish() == []


def test_a_pcm_stream_in_odd_pieces_and_a_streamed_wav_header(tmp_path):
    raw = pcm(spoken_sentence(3))
    stream = PcmStream()
    pieces = [stream.feed(raw[i:i + 777]) for i in range(0, len(raw), 777)]
    # All but the last 20 ms, which waits for more (odd bytes included: no sample is split or lost on the way).
    total = sum(len(p) for p in pieces)
    assert len(raw) // 2 - SAMPLE_RATE // 50 <= total <= len(raw) // 2
    assert array("f", (x for p in pieces for x in p))[:total] == array("f", (s / 32768 for s in array("h", raw)))[:total]
    wav = spoken_sentence(3, rate=8000).read_bytes()
    eight = PcmStream()
    total = sum(len(eight.feed(wav[i:i + 1000])) for i in range(0, len(wav), 1000))
    assert eight.sample_rate == 8000 and total == pytest.approx(len(raw) // 2, rel=0.02)


# --- the loop over HTTP -----------------------------------------------------------------------------------------


class VoiceClient:
    """``POST /api/voice`` with a chunked body sent while the events are read, as a microphone client does."""

    def __init__(self, port: int, **query: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.sendall((f"POST /api/voice?{urlencode(query)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        self.events: queue.Queue = queue.Queue()
        self.status = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), 3200):
            piece = data[i:i + 3200]
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))

    def end(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")

    def next(self) -> tuple[str, dict]:
        event = self.events.get(timeout=600)
        assert event is not None, "the stream ended"
        return event

    def until(self, name: str) -> list[tuple[str, dict]]:
        """Every event up to and including the first ``name``."""
        seen = []
        while True:
            seen.append(self.next())
            if seen[-1][0] == name:
                return seen

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        self.status = int(stream.readline().split()[1])
        while stream.readline() not in (b"\r\n", b""):
            pass
        buffer = b""
        while True:
            size = int(stream.readline().strip() or b"0", 16)
            if size == 0:
                break
            buffer += stream.read(size)
            stream.readline()
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().splitlines())
                self.events.put((fields.get("event", ""), json.loads(fields["data"])))
        self.events.put(None)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    with speech_daemon(tmp_path_factory.mktemp("voice"), model_path) as server:
        yield server


def session(server, **query) -> VoiceClient:
    settings = {"model": "smol", "speech_model": SPEECH, "options": json.dumps({"temperature": 0, "num_predict": 24})}
    return VoiceClient(server.server_address[1], **(settings | query))


def names(events):
    return [name for name, _ in events]


def test_the_loop_answers_each_utterance_in_turn(server):
    client = session(server)
    try:
        client.send(silence(0.5) + pcm(spoken_sentence(12)) + silence(1.5))
        first = client.until("answer.done")
        client.send(pcm(spoken_sentence(17)) + silence(1.5))
        second = client.until("answer.done")
        client.end()
        (done,) = [client.next()]
    finally:
        client.close()
    assert client.status == 200
    for events, sentence in ((first, 12), (second, 17)):
        order = [n for n in names(events) if n != "answer.delta"]
        assert order == ["utterance.start", "utterance.end", "transcript", "answer.done"], names(events)
        transcript = dict(events)["transcript"]
        assert word_errors(SENTENCES[sentence], transcript["text"])[0] <= 1 and transcript["language"] == "en"
        deltas = "".join(data["content"] for name, data in events if name == "answer.delta")
        assert deltas and deltas == dict(events)["answer.done"]["text"]
    assert dict(first)["utterance.start"]["start"] == pytest.approx(0.5, abs=0.3)
    second_start = 0.5 + len(pcm(spoken_sentence(12))) / SECOND + 1.5
    assert dict(second)["utterance.start"]["start"] == pytest.approx(second_start, abs=0.3)
    assert done == ("done", {"turns": 2})


def test_speech_during_an_answer_cancels_it(server):
    options = json.dumps({"temperature": 0, "num_predict": 400})
    client = session(server, options=options, system="Tell a very long story about the question, in ten parts.")
    try:
        client.send(pcm(spoken_sentence(12)) + silence(1.5))
        before = client.until("answer.delta")
        client.send(pcm(spoken_sentence(17)) + silence(1.5))
        client.end()
        after = client.until("done")
    finally:
        client.close()
    assert names(before)[:3] == ["utterance.start", "utterance.end", "transcript"]
    order = [n for n in names(after) if n != "answer.delta"]
    assert order == ["utterance.start", "answer.cancelled", "utterance.end", "transcript", "answer.done", "done"]
    assert word_errors(SENTENCES[17], dict(after)["transcript"]["text"])[0] <= 1
    assert dict(after)["done"] == {"turns": 2}


def test_silence_alone_gets_no_answer(server):
    client = session(server)
    try:
        client.send(silence(3))
        client.end()
        events = client.until("done")
    finally:
        client.close()
    assert events == [("done", {"turns": 0})]


def test_a_streamed_wav_at_another_rate(server):
    client = session(server)
    try:
        # espeak's own rate; the WAV header's format replaces the query's, and a second of silence follows.
        client.send(spoken_sentence(12, rate=22050).read_bytes() + bytes(2 * 22050))
        client.end()
        events = client.until("done")
    finally:
        client.close()
    assert word_errors(SENTENCES[12], dict(events)["transcript"]["text"])[0] <= 1


@pytest.mark.parametrize("query,status,message", [
    ({"speech_model": SPEECH}, 400, "model is required"),
    ({"model": "nothing-here", "speech_model": SPEECH}, 404, "not found"),
    ({"model": "smol", "speech_model": "smol"}, 400, "not a speech model"),
    ({"model": SPEECH, "speech_model": SPEECH}, 400, "is a speech model"),
    ({"model": "smol", "speech_model": SPEECH, "options": "[1]"}, 400, "options"),
    ({"model": "smol", "speech_model": SPEECH, "rate": "fast"}, 400, "rate"),
    ({"model": "smol", "speech_model": SPEECH, "channels": "0"}, 400, "channel"),
    ({"model": "smol", "speech_model": SPEECH, "messages": '{"role": "user"}'}, 400, "JSON list of messages"),
    ({"model": "smol", "speech_model": SPEECH, "messages": "[{"}, 400, "JSON list of messages"),
    ({"model": "smol", "speech_model": SPEECH, "messages": '[{"content": "hi"}]'}, 400, "messages[0]"),
    ({"model": "smol", "speech_model": SPEECH, "messages": '[{"role": "user", "content": 7}]'}, 400, "content"),
    ({"model": "smol", "speech_model": SPEECH,
      "messages": json.dumps([{"role": "user", "content": "x" * MAX_HISTORY_CHARS}])}, 400, "fewer"),
])
def test_bad_sessions_are_refused_before_the_stream(server, query, status, message):
    answer_status, body = exchange(server, "POST", f"/api/voice?{urlencode(query)}")
    assert answer_status == status and message in json.loads(body)["error"]


def test_partial_transcripts_while_an_utterance_goes_on(server):
    client = session(server, partial="true")
    try:
        client.send(pcm(spoken_sentence(12)) + silence(1.5))
        client.end()
        events = client.until("done")
    finally:
        client.close()
    before_end = names(events)[:names(events).index("utterance.end")]
    partials = [data["text"] for name, data in events if name == "transcript.partial"]
    assert before_end[0] == "utterance.start" and set(before_end[1:]) == {"transcript.partial"}
    # Each second of the 2.6 s sentence: the first words, then more of them.
    assert len(partials) == 2 and partials[0] and len(partials[1]) > len(partials[0])
    assert word_errors(SENTENCES[12], dict(events)["transcript"]["text"])[0] <= 1


# --- the conversation so far ------------------------------------------------------------------------------------

HISTORY = [{"role": "system", "content": "You are a pirate. Answer every message as a pirate would."},
           {"role": "user", "content": "My name is Ada and my cat is called Biscuit."},
           {"role": "assistant", "content": "Arr, Ada! Biscuit be a fine name for a ship's cat."}]


def chat_answer(server, messages: list[dict]) -> str:
    """The test model's greedy answer to ``messages`` through ``/api/chat``, with the voice tests' options."""
    status, body = exchange(server, "POST", "/api/chat", {
        "model": "smol", "messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": 24}})
    assert status == 200, body
    return json.loads(body)["message"]["content"]


def test_each_answer_sees_the_history_sent_and_the_turns_before_it(server):
    client = session(server, messages=json.dumps(HISTORY))
    try:
        client.send(pcm(spoken_sentence(12)) + silence(1.5))
        first = dict(client.until("answer.done"))
        client.send(pcm(spoken_sentence(17)) + silence(1.5))
        second = dict(client.until("answer.done"))
        client.end()
        client.until("done")
    finally:
        client.close()
    heard = [first["transcript"]["text"], second["transcript"]["text"]]
    said = [first["answer.done"]["text"], second["answer.done"]["text"]]
    # Greedy decoding: each answer is the one /api/chat gives the same conversation, and not the one without it.
    turn = [{"role": "user", "content": heard[0]}]
    assert said[0] == chat_answer(server, HISTORY + turn)
    assert said[0] != chat_answer(server, turn)
    later = HISTORY + turn + [{"role": "assistant", "content": said[0]}, {"role": "user", "content": heard[1]}]
    assert said[1] == chat_answer(server, later)


def test_the_system_parameter_comes_ahead_of_the_history():
    query = Query("model=m&system=Be+brief.&" + urlencode({"messages": json.dumps(HISTORY[1:])}))
    messages = voice_request(query).messages
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief.")] + [
        (m["role"], m["content"]) for m in HISTORY[1:]]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["role", "content", "images", "tool_calls", "thinking", "x"]), inner,
                        max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                 "content": st.text(max_size=40)})


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGE, max_size=6))
def test_a_history_arrives_as_it_was_sent(history):
    query = Query(urlencode({"model": "m", "messages": json.dumps(history)}))
    assert [(m.role, m.content) for m in voice_request(query).messages] == [
        (m["role"], m["content"]) for m in history]


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON.map(json.dumps), st.text(max_size=60)))
def test_any_messages_value_is_a_history_or_a_400(text):
    try:
        messages = voice_request(Query(urlencode({"model": "m", "messages": text}))).messages
    except BadRequestError as error:
        assert error.status == 400 and error.message
        return
    value = json.loads(text) if text else []
    assert isinstance(value, list) and len(messages) == len(value)
