"""``mullama transcribe`` and ``mullama listen``: speech through the daemon's API.

``transcribe`` sends a recording to ``/v1/audio/transcriptions`` as OpenAI's
multipart form, as any client sends it; the daemon decodes it (WAV here,
other formats with ffmpeg), runs the VAD and Whisper. Plain text streams as
segments finish; the other formats (srt, vtt, json, verbose_json) print once
the whole recording is done.

``listen`` streams raw PCM (from stdin, as ``arecord``/``sox`` write it, or
from a file) to the voice loop, ``/api/voice``, and prints each transcript
and the chat model's answer as they stream back. A model that is not in the
store is pulled first, as ``run`` pulls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

from mullama.cli.daemon import connect
from mullama.cli.progress import Progress, follow
from mullama.client import APIError, Client
from mullama.errors import MullamaError

#: The speech model used when none is named (whisper:latest is whisper:base in the catalogue).
DEFAULT_SPEECH_MODEL = "whisper"
FORMATS = ("text", "json", "verbose_json", "srt", "vtt")

Verb = Callable[..., argparse.ArgumentParser]


#: Bytes read from the audio source at a time: 0.1 s of 16 kHz mono 16-bit PCM.
PIECE = 3200


def add_speech_verbs(verb: Verb) -> None:
    """Add ``transcribe`` and ``listen`` to the command line."""
    sub = verb("transcribe", cmd_transcribe, "Transcribe a recording with a speech model")
    sub.add_argument("file", metavar="FILE", help="the recording (WAV; mp3, ogg, flac, m4a... with ffmpeg)")
    sub.add_argument("--model", "-m", default=DEFAULT_SPEECH_MODEL,
                     help=f"the speech model (default {DEFAULT_SPEECH_MODEL}, which is whisper:base)")
    sub.add_argument("--format", "-f", choices=FORMATS, default="text", help="what to print (default text)")
    sub.add_argument("--language", "-l", help="the spoken language (a code such as en; detected if not given)")
    sub.add_argument("--prompt", help="text that guides the transcription (spellings, the previous sentence)")
    sub.add_argument("--translate", action="store_true", help="translate into English (multilingual models)")
    sub.add_argument("--no-vad", dest="vad", action="store_false",
                     help="transcribe the whole recording instead of only the speech the VAD finds")
    sub.add_argument("--keepalive", help="how long to keep the model loaded (e.g. 5m)")
    sub = verb("listen", cmd_listen, "Talk to a model: transcribe speech from stdin or a file and answer it")
    sub.add_argument("model", metavar="MODEL", help="the chat model that answers")
    sub.add_argument("--speech-model", default=DEFAULT_SPEECH_MODEL,
                     help=f"the speech model (default {DEFAULT_SPEECH_MODEL}, which is whisper:base)")
    sub.add_argument("--file", help="read this file (raw PCM or WAV) in real time instead of stdin")
    sub.add_argument("--rate", type=int, default=16000, help="raw PCM's sample rate (default 16000)")
    sub.add_argument("--channels", type=int, default=1, help="raw PCM's channels (default 1)")
    sub.add_argument("--system", help="the chat model's system message")
    sub.add_argument("--language", "-l", help="the spoken language (a code such as en; detected if not given)")
    sub.add_argument("--keepalive", help="how long to keep the models loaded (e.g. 5m)")


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of ``args.file``."""
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise MullamaError(f"{args.file}: no such file")
    client = connect()
    _pull_if_missing(client, args.model)
    fields = {"model": args.model, "response_format": "json" if args.format == "text" else args.format,
              "vad": "true" if args.vad else "false"}
    for name in ("language", "prompt"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.keepalive:
        fields["keep_alive"] = args.keepalive
    streaming = args.format == "text"
    if streaming:
        fields["stream"] = "true"
    route = "/v1/audio/translations" if args.translate else "/v1/audio/transcriptions"
    connection, response = client.post_form(route, fields, path)
    try:
        if streaming:
            _print_stream(_events(iter(response)))
        else:
            body = response.read().decode("utf-8", "replace")
            sys.stdout.write(body if body.endswith("\n") else body + "\n")
    finally:
        connection.close()
    return 0


def _pull_if_missing(client: Client, name: str) -> None:
    try:
        client.post("/api/show", {"model": name})
    except APIError as error:
        if error.status != 404:
            raise
        follow(client.stream("/api/pull", {"model": name}), Progress(sys.stderr))


def _events(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON object of each server-sent event, with its ``event:`` name (if any) under ``"event"``."""
    name = ""
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            try:
                data = json.loads(line[len("data:"):])
            except ValueError:
                raise MullamaError(f"invalid event from the server: {line[:80]!r}") from None
            if not isinstance(data, dict):
                raise MullamaError(f"invalid event from the server: {line[:80]!r}")
            yield {"event": name, **data} if name else data
            name = ""


def _print_stream(events: Iterator[dict[str, Any]]) -> None:
    """Print text deltas as they come; an error event (OpenAI's body) becomes the command's error."""
    printed = False
    for event in events:
        if "error" in event:
            error = event["error"]
            raise MullamaError(error.get("message") if isinstance(error, dict) else str(error))
        if event.get("type") == "transcript.text.delta":
            sys.stdout.write(str(event.get("delta", "")))
            sys.stdout.flush()
            printed = True
        elif event.get("type") == "transcript.text.done":
            if not printed:
                sys.stdout.write(str(event.get("text", "")))
            sys.stdout.write("\n")
            sys.stdout.flush()


def cmd_listen(args: argparse.Namespace) -> int:
    """Stream audio to the voice loop; print what was heard and the answers."""
    client = connect()
    _pull_if_missing(client, args.speech_model)
    _pull_if_missing(client, args.model)
    query = {"model": args.model, "speech_model": args.speech_model, "rate": str(args.rate),
             "channels": str(args.channels)}
    for name, value in (("system", args.system), ("language", args.language), ("keep_alive", args.keepalive)):
        if value:
            query[name] = value
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise MullamaError(f"{args.file}: no such file")
        handle = path.open("rb")
        # A recording is sent as fast as it was spoken, so that an answer is not cut short by the next question.
        pieces = _paced(handle, 2 * args.rate * args.channels)
    else:
        handle = sys.stdin.buffer
        # os.read, not the buffered reader: the sending thread may still be reading when an error ends the command,
        # and a buffered reader's lock held by it would stop the interpreter's exit.
        fd = handle.fileno()
        pieces = iter(lambda: os.read(fd, PIECE), b"")
    try:
        _print_voice(_events(client.duplex(f"/api/voice?{urlencode(query)}", pieces)))
    finally:
        if args.file:
            handle.close()
    return 0


def _paced(handle: BinaryIO, bytes_per_second: int) -> Iterator[bytes]:
    """The file's bytes in 0.1 s pieces, each sent when it would have been captured."""
    started = time.monotonic()
    sent = 0
    while piece := handle.read(max(2, bytes_per_second // 10)):
        delay = started + sent / bytes_per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent += len(piece)
        yield piece


def _print_voice(events: Iterator[dict[str, Any]]) -> None:
    """Print each transcript as ``>>> text`` and the answer as it streams."""
    out = sys.stdout
    for event in events:
        kind = event.get("event")
        if "error" in event:
            raise MullamaError(str(event["error"]))
        if kind == "transcript" and event.get("text"):
            out.write(f">>> {event['text']}\n")
        elif kind == "answer.delta":
            out.write(str(event.get("content", "")))
        elif kind == "answer.done":
            out.write("\n\n")
        elif kind == "answer.cancelled":
            out.write(" [interrupted]\n\n")
        elif kind == "done":
            return
        out.flush()
