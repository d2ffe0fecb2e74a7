"""``mullama transcribe``: a recording to text through the daemon's ``/v1/audio/transcriptions``.

The file is sent as OpenAI's multipart form, as any client sends it; the
daemon decodes it (WAV here, other formats with ffmpeg), runs the VAD and
Whisper. Plain text streams as segments finish; the other formats (srt,
vtt, json, verbose_json) print once the whole recording is done. A speech
model that is not in the store is pulled first, as ``run`` pulls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mullama.cli.daemon import connect
from mullama.cli.progress import Progress, follow
from mullama.client import APIError, Client
from mullama.errors import MullamaError

#: The speech model used when none is named (whisper:latest is whisper:base in the catalogue).
DEFAULT_SPEECH_MODEL = "whisper"
FORMATS = ("text", "json", "verbose_json", "srt", "vtt")

Verb = Callable[..., argparse.ArgumentParser]


def add_speech_verbs(verb: Verb) -> None:
    """Add ``transcribe`` to the command line."""
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
            _print_stream(_events(response))
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


def _events(response: Any) -> Iterator[dict[str, Any]]:
    """The JSON of each server-sent event's ``data:`` line."""
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("data:"):
            try:
                yield json.loads(line[len("data:"):])
            except ValueError:
                raise MullamaError(f"invalid event from the server: {line[:80]!r}") from None


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
