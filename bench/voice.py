#!/usr/bin/env python3
"""The voice loop's reply latency: from the end of a spoken question to the first word of the answer.

    python bench/voice.py [--model PATH] [--rounds 3] [--threads N] [--speech-window off] [--json]

A ``mullama serve`` daemon gets Whisper tiny.en (tests/whisper_weights.py)
and a chat model (the test model unless ``--model``, answering greedily, 24
tokens at most). Each round opens ``POST /api/voice`` and sends a recording
in real time, in 20 ms pieces as a microphone would: half a second of
silence, an espeak Harvard sentence, then silence until the answer starts.
The clock starts when the piece holding the last loud sample of the speech
(above -34 dBFS) has been sent, and stops when the first ``answer.delta``
event arrives; the parts between are the events before it: ``utterance.end``
(the VAD's wait for silence, ``end_silence`` 0.8 s, and its step),
``transcript`` (Whisper on the utterance) and the first token (the chat
model's prompt and first step). One warm-up round loads both models first;
the figures are medians over the rounds, each a different sentence.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import wave
from array import array
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mullama.engine.model import default_threads  # noqa: E402

SAMPLE_RATE = 16000
#: Bytes in one 20 ms piece of 16-bit mono.
PIECE = 2 * SAMPLE_RATE // 50
#: The level that counts as speech when finding where it ends (about -34 dBFS).
LOUD = 650
SPEECH = "whisper:tiny.en"
CHAT = "voicebench"
#: Silence sent after the speech while waiting for the answer, at most.
WAIT_SECONDS = 20.0


def sentence_pcm(index: int) -> bytes:
    """Harvard sentence ``index`` spoken by espeak, as 16 kHz 16-bit mono samples."""
    from speech_helpers import spoken_sentence

    with wave.open(str(spoken_sentence(index))) as reader:
        return reader.readframes(reader.getnframes())


def speech_end(pcm: bytes) -> int:
    """The byte offset just past the last loud sample."""
    samples = array("h", pcm)
    last = max(i for i, sample in enumerate(samples) if abs(sample) > LOUD)
    return 2 * (last + 1)


class Round:
    """One session: the recording sent in real time, the events read with their arrival times."""

    def __init__(self, port: int, query: dict[str, str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.sock.sendall((f"POST /api/voice?{urlencode(query)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        self.events: list[tuple[float, str, dict]] = []
        self.answered = threading.Event()
        self.ended = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def run(self, pcm: bytes) -> float:
        """Send silence, ``pcm`` and silence in real time until the answer starts; when the speech's end was sent."""
        audio = bytes(SAMPLE_RATE) + pcm
        end = SAMPLE_RATE + speech_end(pcm)
        started = time.perf_counter()
        sent_end = 0.0
        offset = 0
        while not self.answered.is_set() and offset < len(audio) + WAIT_SECONDS * 2 * SAMPLE_RATE:
            piece = audio[offset:offset + PIECE] or bytes(PIECE)
            time.sleep(max(0.0, started + offset / (2 * SAMPLE_RATE) - time.perf_counter()))
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            offset += PIECE
            if not sent_end and offset >= end:
                sent_end = time.perf_counter()
        self.sock.sendall(b"0\r\n\r\n")
        self.ended.wait(300)
        self.sock.close()
        return sent_end

    def at(self, name: str) -> float:
        """When the first event ``name`` arrived."""
        for when, event, data in self.events:
            if event == "error":
                raise SystemExit(f"the voice loop failed: {data}")
            if event == name:
                return when
        raise SystemExit(f"no {name} event: {[event for _, event, _ in self.events]}")

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        status = stream.readline()
        if b" 200 " not in status:
            self.ended.set()
            raise SystemExit(f"/api/voice answered {status!r}")
        while stream.readline() not in (b"\r\n", b""):
            pass
        buffer = b""
        while (size := int(stream.readline().strip() or b"0", 16)) > 0:
            buffer += stream.read(size)
            stream.readline()
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().splitlines())
                self.events.append((time.perf_counter(), fields.get("event", ""), json.loads(fields["data"])))
                if self.events[-1][1] in ("answer.delta", "error"):
                    self.answered.set()
        self.answered.set()
        self.ended.set()


def main() -> None:
    from conftest import smollm2_path
    from daemon import create_model, serve
    from whisper_weights import whisper_tiny_en_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the chat model's GGUF (default: the test model)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--speech-window", help="the daemon's MULLAMA_SPEECH_WINDOW (off, or a margin in seconds)")
    args = parser.parse_args()

    query = {"model": CHAT, "speech_model": SPEECH,
             "options": json.dumps({"temperature": 0, "num_predict": 24, "num_thread": args.threads})}
    parts: dict[str, list[float]] = {"vad": [], "transcribe": [], "first_token": [], "total": []}
    with tempfile.TemporaryDirectory(prefix="mullama-voice-bench-") as tmp:
        daemon = serve(Path(tmp), **({"MULLAMA_SPEECH_WINDOW": args.speech_window} if args.speech_window else {}))
        try:
            create_model(daemon.port, whisper_tiny_en_path(), SPEECH)
            create_model(daemon.port, args.model or smollm2_path(), CHAT)
            for index in range(args.rounds + 1):
                session = Round(daemon.port, query)
                sent_end = session.run(sentence_pcm(10 + index))
                end, heard, first = (session.at(name) for name in ("utterance.end", "transcript", "answer.delta"))
                if index == 0:
                    continue  # the warm-up: both models loaded
                for name, value in (("vad", end - sent_end), ("transcribe", heard - end),
                                    ("first_token", first - heard), ("total", first - sent_end)):
                    parts[name].append(value)
                print(f"round {index}: {first - sent_end:6.3f} s from the end of speech to the first answer token "
                      f"(VAD {end - sent_end:.3f}, transcription {heard - end:.3f}, first token {first - heard:.3f})",
                      flush=True)
        finally:
            daemon.stop()
    medians = {name: statistics.median(values) for name, values in parts.items()}
    print(f"\nmedians of {args.rounds}, {args.threads} threads: end of speech to first answer token "
          f"{medians['total']:.3f} s = VAD {medians['vad']:.3f} + transcription {medians['transcribe']:.3f} "
          f"+ first token {medians['first_token']:.3f}")
    if args.json:
        print(json.dumps({"rounds": args.rounds, "threads": args.threads,
                          **{f"{name}_s": round(value, 3) for name, value in medians.items()}}))


if __name__ == "__main__":
    main()
