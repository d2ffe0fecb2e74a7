"""The ``mullama`` command: Ollama's verbs, each a client of the daemon.

Output follows ``ollama``'s (tables, ``show`` sections, progress bars,
``--verbose`` timings, the interactive ``>>>`` session) so scripts and
habits carry over.  Errors print one ``Error: ...`` line and exit 1;
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from mullama import __version__, config, modelfile, ollama_store
from mullama.client import APIError, Client, ConnectError, file_digest, host_from_env
from mullama.errors import BadRequestError, MullamaError, NotFoundError
from mullama.names import ModelName
from mullama.options import parse_parameter

#: Seconds to wait for a daemon started in the background to answer.
SERVER_START_TIMEOUT = 30.0

_GREY, _BOLD, _RESET = "\x1b[90m", "\x1b[1m", "\x1b[0m"
_THINK_VALUES = {"": True, "true": True, "false": False, "high": "high", "medium": "medium", "low": "low", "max": "max"}
_GO_DURATION = re.compile(r"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0")
_TIMESTAMP_FRACTION = re.compile(r"(\.[0-9]{6})[0-9]+")
_MULTILINE = '"""'


# Formatting ---------------------------------------------------------------


def human_bytes(size: int) -> str:
    """Ollama's ``format.HumanBytes``: decimal units, ``1.3 GB``, ``512 MB``, ``12 B``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            value = size / scale
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def human_number(count: int) -> str:
    """Ollama's ``format.HumanNumber``: ``135M``, ``1.5B``, ``8K``."""
    if count >= 10**9:
        value = count / 10**9
        return f"{value:.0f}B" if value == math.floor(value) else f"{value:.1f}B"
    if count >= 10**6:
        value = count / 10**6
        return f"{value:.0f}M" if value == math.floor(value) else f"{value:.2f}M"
    if count >= 10**3:
        return f"{count / 10**3:.0f}K"
    return str(count)


def human_duration(seconds: float) -> str:
    """Ollama's rough duration: ``Less than a second``, ``2 minutes``, ``About an hour``."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


def human_time(when: datetime | None, zero: str, now: datetime | None = None) -> str:
    """``2 minutes ago``, ``4 minutes from now``, ``Forever``, or ``zero`` for no time."""
    if when is None:
        return zero
    delta = ((now or datetime.now(timezone.utc)) - when).total_seconds()
    if int(delta // 3600) // 24 // 365 < -20:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def parse_time(text: Any) -> datetime | None:
    """Read an API timestamp; ``None`` for Go's zero time or anything unreadable."""
    if not isinstance(text, str) or text.startswith("0001-01-01"):
        return None
    text = _TIMESTAMP_FRACTION.sub(r"\1", text.strip()).replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def go_duration(nanoseconds: int) -> str:
    """Format like Go's ``time.Duration.String``: ``1.5s``, ``250ms``, ``2m3.5s``."""
    if nanoseconds == 0:
        return "0s"
    sign, value = ("-" if nanoseconds < 0 else ""), abs(nanoseconds)
    if value < 10**9:
        for unit, scale in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if value >= scale:
                return sign + _decimal(value, scale) + unit
    hours, rest = divmod(value, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds = _decimal(rest, 10**9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    return f"{sign}{minutes}m{seconds}" if minutes else sign + seconds


def _decimal(value: int, scale: int) -> str:
    whole, fraction = divmod(value, scale)
    digits = str(fraction).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def go_float(value: float) -> str:
    """Format like Go's ``%v`` of a JSON number (shortest ``%g``): ``131072``, ``1e+06``, ``0.5``."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value == 0:
        return "0"
    exact = Decimal(repr(float(value)))
    exponent = exact.adjusted()
    if -4 <= exponent < 6:
        return _plain_number(value)
    digits = "".join(map(str, exact.as_tuple().digits)).rstrip("0")
    mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return f"{'-' if value < 0 else ''}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _plain_number(value: float) -> str:
    """Go's ``FormatFloat(v, 'f', -1, 64)``: the shortest digits, no exponent."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_table(rows: Iterable[Iterable[str]], header: Iterable[str] | None = None) -> str:
    """Columns padded to their widest cell and four spaces apart, as ``ollama list`` prints."""
    table = [list(header)] if header is not None else []
    table += [list(row) for row in rows]
    if not table:
        return ""
    widths = [max(_width(row[i]) for row in table if i < len(row)) for i in range(max(map(len, table)))]
    lines = []
    for row in table:
        cells = [cell + " " * (widths[i] - _width(cell)) for i, cell in enumerate(row)]
        lines.append("    ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def timing_summary(response: dict[str, Any]) -> str:
    """The ``--verbose`` lines Ollama prints after a response (durations in nanoseconds)."""
    lines = []

    def number(key: str) -> int:
        value = response.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    if number("total_duration") > 0:
        lines.append(f"total duration:       {go_duration(number('total_duration'))}")
    if number("load_duration") > 0:
        lines.append(f"load duration:        {go_duration(number('load_duration'))}")
    if number("prompt_eval_count") > 0:
        lines.append(f"prompt eval count:    {number('prompt_eval_count')} token(s)")
    if number("prompt_eval_duration") > 0:
        lines.append(f"prompt eval duration: {go_duration(number('prompt_eval_duration'))}")
        rate = number("prompt_eval_count") / (number("prompt_eval_duration") / 1e9)
        lines.append(f"prompt eval rate:     {rate:.2f} tokens/s")
    if number("eval_count") > 0:
        lines.append(f"eval count:           {number('eval_count')} token(s)")
    if number("eval_duration") > 0:
        lines.append(f"eval duration:        {go_duration(number('eval_duration'))}")
        lines.append(f"eval rate:            {number('eval_count') / (number('eval_duration') / 1e9):.2f} tokens/s")
    return "".join(line + "\n" for line in lines)


def show_info(info: dict[str, Any], verbose: bool = False) -> str:
    """The sections ``ollama show MODEL`` prints: Model, Capabilities, Parameters, License..."""
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    sections: list[tuple[str, list[list[str]]]] = []

    rows = []
    if info.get("remote_host"):
        rows += [["", "Remote model", str(info.get("remote_model", ""))], ["", "Remote URL", str(info["remote_host"])]]
    if model_info:
        arch = model_info.get("general.architecture")
        arch = arch if isinstance(arch, str) else ""
        if arch:
            rows.append(["", "architecture", arch])
        parameters = details.get("parameter_size") or ""
        count = model_info.get("general.parameter_count")
        if not parameters and isinstance(count, (int, float)):
            parameters = human_number(int(count))
        if parameters:
            rows.append(["", "parameters", str(parameters)])
        for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
            value = model_info.get(f"{arch}.{key}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append(["", label, _plain_number(value)])
    else:
        rows += [["", "architecture", str(details.get("family", ""))]]
        rows += [["", "parameters", str(details.get("parameter_size", ""))]]
    rows.append(["", "quantization", str(details.get("quantization_level", ""))])
    if info.get("requires"):
        rows.append(["", "requires", str(info["requires"])])
    sections.append(("Model", rows))

    if info.get("capabilities"):
        sections.append(("Capabilities", [["", str(name)] for name in info["capabilities"]]))
    projector = info.get("projector_info")
    if projector:
        arch = projector.get("general.architecture") or ""
        rows = [["", "architecture", str(arch)]] if arch else []
        if isinstance(projector.get("general.parameter_count"), (int, float)):
            rows.append(["", "parameters", human_number(int(projector["general.parameter_count"]))])
        for suffix, label in (("embedding_length", "embedding length"), ("projection_dim", "dimensions")):
            for modality in ("vision", "audio"):
                value = projector.get(f"{arch}.{modality}.{suffix}")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append(["", label, _plain_number(value)])
                    break
        sections.append(("Projector", rows))
    if info.get("parameters"):
        rows = [["", *line.split()] for line in str(info["parameters"]).splitlines() if line.strip()]
        sections.append(("Parameters", rows))
    if model_info and verbose:
        sections.append(("Metadata", [["", key, _metadata_value(model_info[key])] for key in sorted(model_info)]))
    if info.get("tensors") and verbose:
        rows = [["", str(t.get("name", "")), str(t.get("type", "")), _go_list(t.get("shape") or [])] for t in info["tensors"]]
        sections.append(("Tensors", rows))
    for key, title in (("system", "System"), ("license", "License")):
        if info.get(key):
            sections.append((title, _head(str(info[key]), 2)))
    return "".join(f"  {title}\n{format_table(rows)}\n" for title, rows in sections)


def _head(text: str, count: int) -> list[list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [["", line] for line in lines[:count]] + ([["", "..."]] if len(lines) > count else [])


def _metadata_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return go_float(value)
    if isinstance(value, list):
        shown, width = 0, 1
        for index, item in enumerate(value):
            item_width = _width(_go_value(item)) + (2 if index else 0)
            if width + item_width > 10 and index:
                break
            width += item_width
            shown += 1
        if shown < len(value):
            return _go_list(value[:shown])[:-1] + f" ...+{len(value) - shown} more]"
        return _go_list(value)
    return type(value).__name__


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return go_float(value)
    return _go_list(value) if isinstance(value, list) else str(value)


def _go_list(values: list[Any]) -> str:
    return "[" + " ".join(_go_value(value) for value in values) + "]"


# Progress -----------------------------------------------------------------


@dataclass
class _Bar:
    """One layer's transfer; ``samples`` keeps recent (time, bytes) points for the rate."""

    label: str
    total: int
    completed: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def update(self, completed: int, now: float) -> None:
        self.completed = min(completed, self.total) if self.total > 0 else completed
        self.samples = [(t, v) for t, v in self.samples if now - t <= 10.0] + [(now, self.completed)]

    @property
    def done(self) -> bool:
        return self.total > 0 and self.completed >= self.total

    def rate(self) -> float:
        (start, first), (end, last) = self.samples[0], self.samples[-1]
        return (last - first) / (end - start) if end - start >= 0.5 else 0.0

    def render(self, width: int) -> str:
        """Ollama's bar: label, percent, ``▕███  ▏``, sizes, speed and time left."""
        percent = 100 * self.completed / self.total if self.total > 0 else 0.0
        head = f"{self.label} {percent:3.0f}%"
        rate = 0.0 if self.done else self.rate()
        if self.done:
            tail = f"{human_bytes(self.total):>6}" + " " * 7
        else:
            tail = f"{human_bytes(self.completed):>6}/{human_bytes(self.total):>6}"
        if rate > 0:
            left = (self.total - self.completed) / rate
            tail += f"  {human_bytes(int(rate)):>6}/s  {_eta(left):>6}"
        else:
            tail += " " * 18
        room = max(width - len(head) - len(tail) - 5, 0)
        filled = int(room * percent / 100)
        return f"{head} ▕{'█' * filled}{' ' * (room - filled)}▏ {tail}"

    def plain(self) -> str:
        return f"{self.label} {human_bytes(self.total)}"


def _eta(seconds: float) -> str:
    if seconds >= 100 * 3600:
        return "99h+"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds // 60) % 60}m"
    return go_duration(round(seconds) * 10**9)


class Progress:
    """Status lines and bars of a pull, push or create, written to ``stream``.

    On a terminal the lines are redrawn in place (at most ten times a
    second); otherwise each status, and each finished layer, is printed
    once as a plain line, which suits logs and pipes.
    """

    def __init__(self, stream: TextIO, *, verb: str = "pulling") -> None:
        self.stream = stream
        self.verb = verb
        self.live = stream.isatty()
        self.lines: dict[str, _Bar | str] = {}
        self.drawn = 0
        self.last_draw = 0.0
        self.printed: set[str] = set()

    def status(self, text: str, key: str = "") -> None:
        """Show a status line (``pulling manifest``, ``success``); ``key`` names a line to rewrite."""
        key = key or text
        if text and self.lines.get(key) != text:
            self.lines[key] = text
            self.printed.discard(key)
            self._refresh(force=True)

    def update(self, event: dict[str, Any]) -> None:
        """Show one progress object of an Ollama stream."""
        digest = event.get("digest")
        if not digest:
            self.status(str(event.get("status") or ""))
            return
        total, completed = _int(event.get("total")), _int(event.get("completed"))
        bar = self.lines.get(digest)
        if not isinstance(bar, _Bar):
            if completed == 0:
                # The server announces every layer before downloading; a row of 0% bars says nothing.
                return
            hexdigits = digest.removeprefix("sha256:").strip()[:12]
            if self.verb == "pulling":
                label = f"pulling {hexdigits}:"
            else:
                label = str(event.get("status") or f"{self.verb} {hexdigits}...")
            bar = self.lines[digest] = _Bar(label, total)
        bar.total = max(bar.total, total)
        bar.update(completed, time.monotonic())
        self._refresh(force=bar.done)

    def close(self) -> None:
        """Draw the final state and leave the cursor on a fresh line."""
        self._refresh(force=True)
        if self.live and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = 0

    def _refresh(self, *, force: bool) -> None:
        if not self.live:
            for key, line in self.lines.items():
                if key not in self.printed and (isinstance(line, str) or line.done):
                    self.printed.add(key)
                    self.stream.write((line if isinstance(line, str) else line.plain()) + "\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        width = _columns(self.stream)
        text = [line if isinstance(line, str) else line.render(width) for line in self.lines.values()]
        up = f"\x1b[{self.drawn - 1}A" if self.drawn > 1 else ""
        self.stream.write(up + "\r" + "\n".join(f"{line[:width - 1]}\x1b[K" for line in text))
        self.stream.flush()
        self.drawn = len(text)


def _columns(stream: TextIO) -> int:
    """The width of the terminal behind ``stream``, 80 when it cannot be told."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def _follow(events: Iterator[dict[str, Any]], progress: Progress) -> None:
    try:
        for event in events:
            progress.update(event)
    finally:
        progress.close()


# The daemon ---------------------------------------------------------------


def connect(*, start: bool = True) -> Client:
    """A client of the daemon at ``MULLAMA_HOST``; start one in the background if none answers.

    Only a local address gets a daemon started; a remote one that does not
    answer is an error.
    """
    client = Client(host_from_env())
    if not start or client.heartbeat():
        return client
    if not client.host.is_local:
        raise ConnectError(f"could not connect to a Mullama server at {client.host.url}, is it running?")
    log = config.data_dir() / "logs" / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mullama", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Detached, so the daemon outlives this command and Ctrl-C here does not reach it.
            **({"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}),
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if client.heartbeat(timeout=1.0):
            return client
        code = process.poll()
        if code is not None:
            raise ConnectError(f"the Mullama server exited with status {code} while starting, see {log}")
        time.sleep(0.1)
    raise ConnectError(f"the Mullama server did not answer at {client.host.url} within {SERVER_START_TIMEOUT:g} s, see {log}")


# create -------------------------------------------------------------------


@dataclass
class CreatePlan:
    """An ``/api/create`` body, plus the local files to upload as blobs first (digest to path)."""

    request: dict[str, Any]
    uploads: dict[str, Path] = field(default_factory=dict)


def create_request(recipe: modelfile.Modelfile, base_dir: Path, *, in_place: bool = False) -> CreatePlan:
    """Turn a parsed Modelfile into what current Ollama's ``create`` sends.

    ``FROM`` and ``ADAPTER`` paths (absolute, ``~``, or relative to the
    Modelfile's directory) that exist become ``files``/``adapters`` maps of
    file name to digest; a ``FROM`` that is not a local path is a model name.
    With ``in_place``, ``FROM`` must be a GGUF file, sent as its absolute
    path with Mullama's ``in_place`` flag so the daemon references it
    instead of storing a copy.
    """
    plan = CreatePlan({})
    request = plan.request
    source = _expand_path(recipe.from_, base_dir)
    if in_place:
        if not source.is_file():
            raise BadRequestError(f"--in-place needs FROM to name a GGUF file: {recipe.from_}")
        request["from"], request["in_place"] = str(source.resolve()), True
    elif source.exists():
        request["files"] = _digests(source, plan)
    else:
        request["from"] = recipe.from_
    if recipe.adapters:
        request["adapters"] = {}
        for adapter in recipe.adapters:
            request["adapters"].update(_digests(_expand_path(adapter, base_dir), plan))
    if recipe.draft:
        draft = _expand_path(recipe.draft, base_dir)
        if not draft.exists():
            raise BadRequestError(f"DRAFT must be a local path: {recipe.draft}")
        request["draft_files"] = _digests(draft, plan)
    for key in ("template", "system", "renderer", "parser", "requires"):
        if getattr(recipe, key):
            request[key] = getattr(recipe, key)
    if recipe.parameters:
        request["parameters"] = dict(recipe.parameters)
    if recipe.messages:
        request["messages"] = [{"role": m.role, "content": m.content} for m in recipe.messages]
    if recipe.licenses:
        request["license"] = list(recipe.licenses)
    return plan


def _expand_path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser() if text.startswith("~") else Path(text)
    return (path if path.is_absolute() else base_dir / path).absolute()


def _digests(path: Path, plan: CreatePlan) -> dict[str, str]:
    """Digest ``path`` (a file, or a directory's GGUF files) and note the uploads."""
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    if not files:
        raise NotFoundError(f"no GGUF files found in {path}")
    names = {}
    for file in files:
        digest = file_digest(file.resolve())
        plan.uploads[digest] = file.resolve()
        names[file.name] = digest
    return names


def _upload(client: Client, digest: str, path: Path, progress: Progress) -> None:
    if client.blob_exists(digest):
        return
    progress.status(f"copying file {digest} 0%", key=digest)
    with path.open("rb") as file:
        client.upload_blob(digest, file, path.stat().st_size)
    progress.status(f"copying file {digest} 100%", key=digest)


# Generation output --------------------------------------------------------


class Display:
    """Writes a streamed answer: the thinking block first, words wrapped at the terminal's edge.

    ``width`` 0 turns wrapping off.  A word that would cross the edge is
    erased and written again on the next line, as Ollama does, since the
    text arrives a few characters at a time.
    """

    def __init__(self, out: TextIO, *, width: int = 0, color: bool = False, hide_thinking: bool = False) -> None:
        self.out = out
        self.width = width
        self.color = color
        self.hide_thinking = hide_thinking
        self.column = 0
        self.word = ""
        self.in_thinking = False
        self.thinking_newline = True

    def show(self, thinking: str, content: str) -> None:
        """Write the next pieces of thinking and of the answer."""
        if thinking and not self.hide_thinking:
            if not self.in_thinking:
                self.out.write(self._styled("Thinking...\n", after=_GREY))
                self.in_thinking = True
            self.write(thinking)
            self.thinking_newline = thinking.endswith("\n")
        if content and self.in_thinking:
            self.out.write(("" if self.thinking_newline else "\n") + self._styled("...done thinking.\n\n"))
            self.in_thinking = False
            self.column, self.word = 0, ""
        self.write(content)
        self.out.flush()

    def finish(self) -> None:
        """Restore the colour if the answer ended inside the thinking block."""
        if self.in_thinking and self.color:
            self.out.write(_RESET)

    def write(self, text: str) -> None:
        """Write ``text``, wrapping words when a width is set."""
        if self.width < 10:
            self.out.write(text)
            return
        for char in text:
            if char in "\r\n":
                self.out.write(char)
                self.column, self.word = 0, ""
                continue
            char_width = _char_width(char)
            if self.column + char_width > self.width - 5:
                if char in " \t":
                    self.out.write("\n")
                    self.column, self.word = 0, ""
                    continue
                word_width = _width(self.word)
                if 0 < word_width <= self.width - 10:
                    self.out.write(f"\x1b[{word_width}D\x1b[K\n{self.word}")
                    self.column = word_width
                else:
                    self.out.write("\n")
                    self.column, self.word = 0, ""
            self.out.write(char)
            self.column += char_width
            self.word = "" if char in " \t" or char_width > 1 else self.word + char

    def _styled(self, text: str, after: str = "") -> str:
        return f"{_GREY}{_BOLD}{text}{_RESET}{after}" if self.color else text


@dataclass
class RunOptions:
    """What ``run`` and the interactive session send with each request."""

    model: str
    prompt: str = ""
    system: str = ""
    format: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: str | None = None
    think: bool | str | None = None
    hide_thinking: bool = False
    wordwrap: bool = True
    verbose: bool = False
    #: The conversation of the interactive session (Ollama message objects).
    messages: list[dict[str, Any]] = field(default_factory=list)
    #: The model's own MESSAGE history, kept apart so ``/save`` can write both.
    loaded_messages: list[dict[str, Any]] = field(default_factory=list)
    parent_model: str = ""

    def common(self) -> dict[str, Any]:
        """The request fields shared by ``/api/generate`` and ``/api/chat``."""
        body: dict[str, Any] = {"model": self.model}
        for key, value in (("format", self.format), ("keep_alive", self.keep_alive), ("think", self.think)):
            if value is not None:
                body[key] = value
        if self.options:
            body["options"] = dict(self.options)
        return body


def _display(opts: RunOptions, out: TextIO, *, color: bool) -> Display:
    width = _columns(out) if opts.wordwrap and out.isatty() else 0
    return Display(out, width=width, color=color, hide_thinking=opts.hide_thinking)


def generate_once(client: Client, opts: RunOptions, out: TextIO, err: TextIO) -> None:
    """A one-shot prompt through ``/api/generate``, streamed to ``out``."""
    body = opts.common() | {"prompt": opts.prompt}
    if opts.system:
        body["system"] = opts.system
    display = _display(opts, out, color=out.isatty())
    last: dict[str, Any] = {}
    for event in client.stream("/api/generate", body):
        last = event
        display.show(str(event.get("thinking") or ""), str(event.get("response") or ""))
    display.finish()
    if opts.prompt:
        out.write("\n\n")
    out.flush()
    if opts.verbose and last.get("done"):
        err.write(timing_summary(last))


def chat_turn(client: Client, opts: RunOptions, out: TextIO, err: TextIO) -> dict[str, Any] | None:
    """Send the conversation to ``/api/chat``, stream the answer; ``None`` when Ctrl-C cut it short."""
    body = opts.common() | {"messages": opts.messages}
    display = _display(opts, out, color=True)
    last: dict[str, Any] = {}
    thinking, content, role = [], [], "assistant"
    events = client.stream("/api/chat", body)
    try:
        for event in events:
            last = event
            message = event.get("message") or {}
            role = message.get("role") or role
            thinking.append(str(message.get("thinking") or ""))
            content.append(str(message.get("content") or ""))
            display.show(thinking[-1], content[-1])
    except KeyboardInterrupt:
        events.close()
        display.finish()
        out.write("\n")
        return None
    display.finish()
    out.write("\n\n")
    out.flush()
    if opts.verbose and last.get("done"):
        err.write(timing_summary(last))
    answer = {"role": role, "content": "".join(content)}
    if any(thinking):
        answer["thinking"] = "".join(thinking)
    return answer


def load_model(client: Client, opts: RunOptions) -> None:
    """Load (or, with ``keep_alive`` 0, unload) a model: a generate request with no prompt."""
    for _ in client.stream("/api/generate", opts.common()):
        pass


# The interactive session --------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One entry of the interactive session: a ``/command`` or (``name`` empty) a message."""

    name: str
    args: tuple[str, ...] = ()
    #: The message, or the text that follows ``/set system``.
    text: str = ""


def read_entry(read: Callable[[str], str]) -> str:
    """Read one entry with ``read(prompt)``; a ``\"\"\"`` block goes on until a line ends with ``\"\"\"``.

    ``/set system \"\"\"`` opens a block too.  The lines are returned joined
    by newlines, quotes included, for :func:`parse_command`.
    """
    line = read(">>> ")
    body = _block_body(line)
    if body is None or body.endswith(_MULTILINE):
        return line
    lines = [line]
    while True:
        lines.append(read("... "))
        if lines[-1].endswith(_MULTILINE):
            return "\n".join(lines)


def _block_body(line: str) -> str | None:
    """What follows the quotes that open a block on ``line``, or ``None`` if none opens."""
    if line.startswith(_MULTILINE):
        return line[3:]
    words = line.split(None, 2)
    if len(words) == 3 and words[:2] == ["/set", "system"] and words[2].startswith(_MULTILINE):
        return words[2].rstrip()[3:]
    return None


def parse_command(entry: str) -> Command:
    """Split an entry into a command and its arguments, or a message to send."""
    if entry.startswith(_MULTILINE):
        return Command("", text=_unquote(entry))
    if not entry.startswith("/"):
        return Command("", text=entry)
    words = entry.split()
    text = ""
    if words[:2] == ["/set", "system"] and len(words) > 2:
        rest = entry.split(None, 2)[2].strip()
        text = _unquote(rest) if rest.startswith(_MULTILINE) else " ".join(rest.split())
    return Command(words[0], tuple(words[1:]), text)


def _unquote(text: str) -> str:
    text = text.removeprefix(_MULTILINE)
    return text.removesuffix(_MULTILINE)


_HELP = """\
Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.

"""
_HELP_SET = """\
Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking

"""
_HELP_SHOW = """\
Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template

"""
_HELP_PARAMETERS = """\
Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter stop <string> <string> ...   Set the stop parameters

"""
_HELP_SHORTCUTS = """\
Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit mullama (/bye)

"""


class Session:
    """The ``>>>`` loop of ``mullama run``: commands change ``opts``, messages go to ``/api/chat``."""

    def __init__(self, client: Client, opts: RunOptions, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.opts = opts
        self.out = out
        self.err = err
        self.think_set = opts.think is not None

    def run(self, read: Callable[[str], str]) -> int:
        """Read and handle entries until ``/bye`` or end of input."""
        while True:
            try:
                entry = read_entry(read)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if not self.handle(parse_command(entry)):
                return 0

    def handle(self, command: Command) -> bool:
        """Carry out one entry; ``False`` ends the session."""
        if not command.name:
            if command.text:
                self.opts.messages.append({"role": "user", "content": command.text})
                answer = chat_turn(self.client, self.opts, self.out, self.err)
                if answer is not None:
                    self.opts.messages.append(answer)
            return True
        if command.name in ("/bye", "/exit"):
            return False
        handler = {
            "/set": self._set,
            "/show": self._show,
            "/load": self._load,
            "/save": self._save,
            "/clear": self._clear,
            "/list": self._list,
            "/?": self._help,
            "/help": self._help,
        }.get(command.name)
        if handler is None:
            self._say(f"Unknown command '{command.name}'. Type /? for help")
        else:
            handler(command)
        return True

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _help(self, command: Command) -> None:
        topic = command.args[0].removeprefix("/") if command.args else ""
        pages = {"set": _HELP_SET, "show": _HELP_SHOW, "shortcut": _HELP_SHORTCUTS, "shortcuts": _HELP_SHORTCUTS}
        self.err.write(pages.get(topic, _HELP) if topic in pages or not topic else "")
        self.err.flush()

    def _set(self, command: Command) -> None:
        opts, args = self.opts, command.args
        what = args[0] if args else ""
        if not what:
            self.err.write(_HELP_SET)
        elif what in ("history", "nohistory"):
            pass
        elif what in ("wordwrap", "nowordwrap"):
            opts.wordwrap = what == "wordwrap"
            self._say(f"Set '{what}' mode.")
        elif what in ("verbose", "quiet"):
            opts.verbose = what == "verbose"
            self._say(f"Set '{what}' mode.")
        elif what == "think":
            opts.think = args[1] if len(args) > 1 else True
            self.think_set = True
            self._say(f"Set 'think' mode to '{args[1]}'." if len(args) > 1 else "Set 'think' mode.")
        elif what == "nothink":
            opts.think, self.think_set = False, True
            self._say("Set 'nothink' mode.")
        elif what == "format":
            if len(args) < 2 or args[1] != "json":
                self._say("Invalid or missing format. For 'json' mode use '/set format json'")
            else:
                opts.format = "json"
                self._say("Set format to 'json' mode.")
        elif what == "noformat":
            opts.format = None
            self._say("Disabled format.")
        elif what == "parameter":
            self._set_parameter(args[1:])
        elif what == "system":
            if not command.text:
                self.err.write(_HELP_SET)
                return
            opts.system = command.text
            message = {"role": "system", "content": command.text}
            if opts.messages and opts.messages[-1]["role"] == "system":
                opts.messages[-1] = message
            else:
                opts.messages.append(message)
            self._say("Set system message.")
        else:
            self._say(f"Unknown command '/set {what}'. Type /? for help")

    def _set_parameter(self, args: tuple[str, ...]) -> None:
        if len(args) < 2:
            self.err.write(_HELP_PARAMETERS)
            return
        name, values = args[0], args[1:]
        try:
            parsed = [parse_parameter(name, value) for value in values]
        except BadRequestError as error:
            self._say(f"Couldn't set parameter: {error.message}")
            return
        self.opts.options[name] = [item for value in parsed for item in value] if isinstance(parsed[0], list) else parsed[0]
        self._say(f"Set parameter '{name}' to '{', '.join(values)}'")

    def _show(self, command: Command) -> None:
        if not command.args:
            self.err.write(_HELP_SHOW)
            return
        body: dict[str, Any] = {"model": self.opts.model}
        if self.opts.system:
            body["system"] = self.opts.system
        if self.opts.options:
            body["options"] = self.opts.options
        info = self.client.post("/api/show", body) or {}
        what = command.args[0]
        if what == "info":
            self.err.write(show_info(info))
        elif what == "license":
            self._say(info.get("license") or "No license was specified for this model.")
        elif what == "modelfile":
            self._say(info.get("modelfile") or "")
        elif what == "parameters":
            self._say("Model defined parameters:")
            parameters = info.get("parameters") or ""
            lines = parameters.split("\n") if parameters else ["No additional parameters were specified for this model."]
            self._say("\n".join(f"  {line}" for line in lines) + "\n")
            if self.opts.options:
                self._say("User defined parameters:")
                self._say("".join(f"  {key:<30} {_go_value(value)}\n" for key, value in self.opts.options.items()))
        elif what == "system":
            system = self.opts.system or info.get("system")
            self._say(f"{system}\n" if system else "No system message was specified for this model.")
        elif what == "template":
            self._say(info.get("template") or "No prompt template was specified for this model.")
        else:
            self._say(f"Unknown command '/show {what}'. Type /? for help")

    def _load(self, command: Command) -> None:
        if len(command.args) != 1:
            self._say("Usage:\n  /load <modelname>")
            return
        previous = self.opts
        self._say(f"Loading model '{command.args[0]}'")
        self.opts = replace(previous, model=command.args[0], messages=[], loaded_messages=[], options=dict(previous.options))
        try:
            info = self.client.post("/api/show", {"model": self.opts.model}) or {}
            _apply_show(self.opts, info, think_set=self.think_set)
            load_model(self.client, self.opts)
        except APIError as error:
            if error.status != 404 and "not found" not in error.message:
                raise
            self._say(f"Couldn't find model '{command.args[0]}'")
            self.opts = previous

    def _save(self, command: Command) -> None:
        if len(command.args) != 1:
            self._say("Usage:\n  /save <modelname>")
            return
        name = command.args[0]
        try:
            ModelName.parse(name)
        except BadRequestError:
            self._say(f"error: The model name '{name}' is invalid")
            return
        opts = self.opts
        body: dict[str, Any] = {"model": name, "from": opts.parent_model or opts.model}
        if opts.system:
            body["system"] = opts.system
        if opts.options:
            body["parameters"] = opts.options
        if opts.loaded_messages or opts.messages:
            body["messages"] = opts.loaded_messages + opts.messages
        for _ in self.client.stream("/api/create", body):
            pass
        self._say(f"Created new model '{name}'")

    def _clear(self, command: Command) -> None:
        self.opts.messages = [{"role": "system", "content": self.opts.system}] if self.opts.system else []
        self._say("Cleared session context")

    def _list(self, command: Command) -> None:
        self.out.write(list_table((self.client.get("/api/tags") or {}).get("models") or [], "".join(command.args[:1])))


def _apply_show(opts: RunOptions, info: dict[str, Any], *, think_set: bool) -> None:
    """Take what a model's ``/api/show`` says into the session, as Ollama does on run and /load."""
    details = info.get("details") or {}
    opts.parent_model = str(details.get("parent_model") or "")
    opts.loaded_messages = [dict(m) for m in info.get("messages") or [] if isinstance(m, dict)]
    if not think_set:
        opts.think = True if "thinking" in (info.get("capabilities") or []) else None


# Verbs --------------------------------------------------------------------


def list_table(models: list[dict[str, Any]], prefix: str = "", now: datetime | None = None) -> str:
    """The ``NAME ID SIZE MODIFIED`` table of ``mullama list``; ``prefix`` filters names, ignoring case."""
    wanted = prefix.lower()
    rows = []
    for model in models:
        name = str(model.get("name") or model.get("model") or "")
        if not name.lower().startswith(wanted):
            continue
        size = "-" if model.get("remote_model") else human_bytes(_int(model.get("size")))
        rows.append([name, _short_digest(model.get("digest")), size, human_time(parse_time(model.get("modified_at")), "Never", now)])
    return format_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"])


def ps_table(models: list[dict[str, Any]], prefix: str = "", now: datetime | None = None) -> str:
    """The ``NAME ID SIZE PROCESSOR CONTEXT UNTIL`` table of ``mullama ps``; ``prefix`` filters names."""
    wanted = prefix
    rows = []
    now = now or datetime.now(timezone.utc)
    for model in models:
        name = str(model.get("name") or model.get("model") or "")
        if not name.startswith(wanted):
            continue
        size, vram = _int(model.get("size")), _int(model.get("size_vram"))
        if vram == 0:
            processor = "100% CPU"
        elif vram == size:
            processor = "100% GPU"
        elif vram > size or size == 0:
            processor = "Unknown"
        else:
            cpu = round((size - vram) / size * 100)
            processor = f"{cpu}%/{100 - cpu}% CPU/GPU"
        expires = parse_time(model.get("expires_at"))
        until = "Stopping..." if expires is not None and expires < now else human_time(expires, "Never", now)
        context = str(_int(model.get("context_length")))
        rows.append([name, _short_digest(model.get("digest")), human_bytes(size), processor, context, until])
    return format_table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"])


def _short_digest(digest: Any) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]


def _show_or_pull(client: Client, name: str) -> dict[str, Any]:
    try:
        return client.post("/api/show", {"model": name}) or {}
    except APIError as error:
        if error.status != 404:
            raise
    _follow(client.stream("/api/pull", {"model": name}), Progress(sys.stderr))
    return client.post("/api/show", {"model": name}) or {}


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from mullama.http.server import serve

    return serve()


def cmd_run(args: argparse.Namespace) -> int:
    """Answer one prompt, or start the interactive session."""
    opts = RunOptions(
        model=args.model,
        keep_alive=_keep_alive(args.keepalive),
        think=_think(args.think),
        hide_thinking=args.hidethinking,
        wordwrap=not args.nowordwrap,
        verbose=args.verbose,
        format=_format(args.format),
    )
    prompts = list(args.prompt)
    interactive = not prompts and sys.stdout.isatty()
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped:
            prompts.insert(0, piped)
        interactive = False
    opts.prompt = " ".join(prompts)
    client = connect()
    info = _show_or_pull(client, opts.model)
    _apply_show(opts, info, think_set=opts.think is not None)
    if "embedding" in (info.get("capabilities") or []):
        if not opts.prompt:
            raise BadRequestError(f'embedding models require input text. Usage: mullama run {opts.model} "your text here"')
        body = {"model": opts.model, "input": opts.prompt} | ({"keep_alive": opts.keep_alive} if opts.keep_alive else {})
        embeddings = (client.post("/api/embed", body) or {}).get("embeddings") or []
        if not embeddings:
            raise MullamaError("no embeddings returned")
        print(json.dumps(embeddings[0], separators=(",", ":")))
        return 0
    if not interactive:
        generate_once(client, opts, sys.stdout, sys.stderr)
        return 0
    load_model(client, opts)
    for message in opts.loaded_messages:
        if message.get("role") == "user":
            print(f">>> {message.get('content', '')}")
        elif message.get("role") == "assistant":
            print(f"{message.get('content', '')}\n")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return Session(client, opts, sys.stdout, sys.stderr).run(input)


def _think(value: str | None) -> bool | str | None:
    if value is None:
        return None
    if value not in _THINK_VALUES:
        raise BadRequestError(f'invalid value for --think: "{value}" (must be true, false, high, medium, low, or max)')
    return _THINK_VALUES[value]


def _keep_alive(value: str | None) -> str | None:
    if value and not _GO_DURATION.fullmatch(value):
        raise BadRequestError(f'time: invalid duration "{value}"')
    return value or None


def _format(value: str | None) -> Any:
    if not value:
        return None
    if value == "json":
        return "json"
    try:
        return json.loads(value)
    except ValueError:
        raise BadRequestError(f"invalid --format: {value} (use json or a JSON schema)") from None


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model, showing progress on stderr."""
    body = {"model": args.model} | ({"insecure": True} if args.insecure else {})
    _follow(connect().stream("/api/pull", body), Progress(sys.stderr))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a model to its registry."""
    body = {"model": args.model} | ({"insecure": True} if args.insecure else {})
    try:
        _follow(connect().stream("/api/push", body), Progress(sys.stderr, verb="pushing"))
    except APIError as error:
        if "access denied" in error.message.lower() or "unauthorized" in error.message.lower():
            raise APIError(error.status, "you are not authorized to push to this namespace, create the model under a namespace you own") from None
        raise
    print(f"\nYou can find your model at:\n\n\t{args.model}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the models in the store, or with ``--ollama`` those Ollama's store holds that ``pull`` imports."""
    models = ollama_models() if args.ollama else (connect().get("/api/tags") or {}).get("models") or []
    sys.stdout.write(list_table(models, args.prefix or ""))
    return 0


def ollama_models() -> list[dict[str, Any]]:
    """The importable models of this machine's Ollama store, shaped like ``/api/tags`` entries.

    Read from this machine's disk, not asked of the daemon: it tells what
    ``pull`` imports when the daemon runs here, which is the usual case.
    """
    root = ollama_store.ollama_root()
    if root is None:
        raise NotFoundError("no Ollama model store found: set OLLAMA_MODELS to its directory "
                            "(default ~/.ollama/models)")
    return [{"name": entry.name.display, "digest": entry.digest, "size": entry.size,
             "modified_at": datetime.fromtimestamp(entry.modified, timezone.utc).isoformat()}
            for entry in ollama_store.list_importable(root)]


def cmd_ps(args: argparse.Namespace) -> int:
    """Print the loaded models."""
    sys.stdout.write(ps_table((connect().get("/api/ps") or {}).get("models") or [], args.prefix or ""))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    """Create a model from a Modelfile, uploading its local files first."""
    try:
        ModelName.parse(args.model)
    except BadRequestError:
        raise BadRequestError(f"invalid model name: {args.model}") from None
    path = Path(args.file or "Modelfile").absolute()
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"{path} is not UTF-8 text") from None
    elif args.file:
        raise NotFoundError(f"specified Modelfile wasn't found: {args.file}")
    else:
        text = "FROM .\n"
    progress = Progress(sys.stderr, verb="copying")
    try:
        progress.status("gathering model components")
        plan = create_request(modelfile.parse(text), path.parent, in_place=args.in_place)
        client = connect()
        for digest, file in plan.uploads.items():
            _upload(client, digest, file, progress)
        if args.quantize:
            plan.request["quantize"] = args.quantize
        for event in client.stream("/api/create", {"model": args.model, **plan.request}):
            progress.update(event)
    finally:
        progress.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a model's details, or one part of it."""
    chosen = [flag for flag in ("license", "modelfile", "parameters", "system", "template") if getattr(args, flag)]
    if len(chosen) > 1:
        raise BadRequestError("only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified")
    body = {"model": args.model} | ({"verbose": True} if args.verbose else {})
    info = connect().post("/api/show", body) or {}
    if not chosen:
        sys.stdout.write(show_info(info, args.verbose))
    elif chosen[0] in ("system", "template"):
        sys.stdout.write(str(info.get(chosen[0]) or ""))
    else:
        print(info.get(chosen[0]) or "")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete models, unloading each first."""
    client = connect()
    for name in args.models:
        try:
            load_model(client, RunOptions(model=name, keep_alive="0"))
        except APIError as error:
            if "not found" not in error.message.lower():
                print(f"Warning: unable to stop model '{name}'", file=sys.stderr)
        client.delete("/api/delete", {"model": name})
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a model under a new name."""
    connect().post("/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Unload a running model: a generate request with ``keep_alive`` 0, as Ollama sends."""
    try:
        load_model(connect(), RunOptions(model=args.model, keep_alive="0"))
    except APIError as error:
        if "not found" in error.message.lower():
            raise NotFoundError(f'couldn\'t find model "{args.model}" to stop') from None
        raise
    return 0


def print_version() -> int:
    """``mullama version is X``, and the server's version when one answers."""
    client = connect(start=False)
    try:
        answer = client.get("/api/version") or {}
        # Mullama reports an Ollama version for Ollama's clients, and its own beside it.
        server = str(answer.get("mullama_version") or answer.get("version") or "")
    except (ConnectError, APIError):
        server = ""
    if not server:
        print("Warning: could not connect to a running Mullama instance", file=sys.stderr)
        print(f"mullama version is {__version__}")
        return 0
    print(f"mullama version is {server}")
    if server != __version__:
        print(f"Warning: client version is {__version__}")
    return 0


# Arguments ----------------------------------------------------------------


class _UsageError(BadRequestError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = _Parser(prog="mullama", description="Large language model runner (an Ollama drop-in).")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, handler: Callable[[argparse.Namespace], int], help: str, aliases: Iterable[str] = ()) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, aliases=list(aliases), description=help)
        sub.set_defaults(handler=handler)
        return sub

    verb("serve", cmd_serve, "Start the server", ["start"])
    sub = verb("create", cmd_create, "Create a model from a Modelfile")
    sub.add_argument("model", metavar="MODEL")
    sub.add_argument("-f", "--file", help='name of the Modelfile (default "Modelfile")')
    sub.add_argument("-q", "--quantize", help="quantize the model to this level (e.g. q4_K_M)")
    sub.add_argument("--in-place", action="store_true",
                     help="use the GGUF file named by FROM where it lies instead of copying it into the store")
    sub = verb("show", cmd_show, "Show information for a model")
    sub.add_argument("model", metavar="MODEL")
    for flag in ("license", "modelfile", "parameters", "template", "system"):
        sub.add_argument(f"--{flag}", action="store_true", help=f"show the {flag} of a model")
    sub.add_argument("-v", "--verbose", action="store_true", help="show detailed model information")
    sub = verb("run", cmd_run, "Run a model", ["chat"])
    sub.add_argument("model", metavar="MODEL")
    sub.add_argument("prompt", metavar="PROMPT", nargs="*", default=[])
    sub.add_argument("--keepalive", help="how long to keep the model loaded (e.g. 5m)")
    sub.add_argument("--verbose", action="store_true", help="show timings for the response")
    sub.add_argument("--insecure", action="store_true", help="use an insecure registry")
    sub.add_argument("--nowordwrap", action="store_true", help="don't wrap words to the next line")
    sub.add_argument("--format", help="response format (json, or a JSON schema)")
    sub.add_argument("--think", help="enable thinking: true/false, or high/medium/low")
    sub.add_argument("--hidethinking", action="store_true", help="hide the thinking output")
    sub = verb("stop", cmd_stop, "Stop a running model")
    sub.add_argument("model", metavar="MODEL")
    for name, handler, help in (("pull", cmd_pull, "Pull a model from a registry"), ("push", cmd_push, "Push a model to a registry")):
        sub = verb(name, handler, help)
        sub.add_argument("model", metavar="MODEL")
        sub.add_argument("--insecure", action="store_true", help="use an insecure registry")
    sub = verb("list", cmd_list, "List models", ["ls"])
    sub.add_argument("prefix", nargs="?", help="show only names starting with this")
    sub.add_argument("--ollama", action="store_true",
                     help="list the models of Ollama's store that `pull` imports without downloading")
    sub = verb("ps", cmd_ps, "List running models")
    sub.add_argument("prefix", nargs="?", help="show only names starting with this")
    sub = verb("cp", cmd_cp, "Copy a model")
    sub.add_argument("source", metavar="SOURCE")
    sub.add_argument("destination", metavar="DESTINATION")
    sub = verb("rm", cmd_rm, "Remove a model")
    sub.add_argument("models", metavar="MODEL", nargs="+")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """A bare ``--think`` means ``--think=true``, so it never swallows the prompt that follows."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [("--think=true" if arg == "--think" else arg) for arg in argv[:end]] + argv[end:]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(_normalise_argv(list(sys.argv[1:] if argv is None else argv)))
        if extra and getattr(args, "prompt", None) is not None and not any(word.startswith("-") for word in extra):
            # Flags may come between prompt words, as with Ollama's ``run MODEL --verbose why is the sky blue``.
            args.prompt += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.version:
            return print_version()
        if args.verb is None:
            parser.print_help()
            return 0
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0
    except MullamaError as error:
        print(f"Error: {_one_line(error.message)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``mullama list | head``): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"Error: {_one_line(str(error))}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown error"
