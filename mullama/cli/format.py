"""Text the command prints: human sizes, times and durations, Go's number formats, tables, summaries.

Each matches what ``ollama`` prints, so scripts that read its output carry
over.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TextIO

_TIMESTAMP_FRACTION = re.compile(r"(\.[0-9]{6})[0-9]+")


# Numbers, sizes and times -------------------------------------------------


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


# Widths and tables --------------------------------------------------------


def format_table(rows: Iterable[Iterable[str]], header: Iterable[str] | None = None) -> str:
    """Columns padded to their widest cell and four spaces apart, as ``ollama list`` prints."""
    table = [list(header)] if header is not None else []
    table += [list(row) for row in rows]
    if not table:
        return ""
    widths = [max(text_width(row[i]) for row in table if i < len(row)) for i in range(max(map(len, table)))]
    lines = []
    for row in table:
        cells = [cell + " " * (widths[i] - text_width(cell)) for i, cell in enumerate(row)]
        lines.append("    ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def text_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide East Asian characters count two, combining marks none."""
    return sum(char_width(char) for char in text)


def char_width(char: str) -> int:
    """Columns one character takes on a terminal (0, 1 or 2)."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def terminal_width(stream: TextIO) -> int:
    """The width of the terminal behind ``stream``, 80 when it cannot be told."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


# Timings and show sections ------------------------------------------------


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
            item_width = text_width(go_value(item)) + (2 if index else 0)
            if width + item_width > 10 and index:
                break
            width += item_width
            shown += 1
        if shown < len(value):
            return _go_list(value[:shown])[:-1] + f" ...+{len(value) - shown} more]"
        return _go_list(value)
    return type(value).__name__


def go_value(value: Any) -> str:
    """Format like Go's ``%v`` of a decoded JSON value: ``true``, ``1e+06``, ``[a b]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return go_float(value)
    return _go_list(value) if isinstance(value, list) else str(value)


def _go_list(values: list[Any]) -> str:
    return "[" + " ".join(go_value(value) for value in values) + "]"


# The list and ps tables ---------------------------------------------------


def json_int(value: Any) -> int:
    """A JSON number as an ``int``; 0 for anything else (missing, text, a boolean, NaN)."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def list_table(models: list[dict[str, Any]], prefix: str = "", now: datetime | None = None) -> str:
    """The ``NAME ID SIZE MODIFIED`` table of ``mullama list``; ``prefix`` filters names, ignoring case."""
    wanted = prefix.lower()
    rows = []
    for model in models:
        name = str(model.get("name") or model.get("model") or "")
        if not name.lower().startswith(wanted):
            continue
        size = "-" if model.get("remote_model") else human_bytes(json_int(model.get("size")))
        rows.append([name, _short_digest(model.get("digest")), size, human_time(parse_time(model.get("modified_at")), "Never", now)])
    return format_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"])


def ps_table(models: list[dict[str, Any]], prefix: str = "", now: datetime | None = None) -> str:
    """The ``NAME ID SIZE PROCESSOR CONTEXT UNTIL`` table of ``mullama ps``; ``prefix`` filters names.

    A ``LIMITS`` column follows when a model has limits (``limits.json``, ``MULLAMA_MAX_QUEUE``...).
    """
    wanted = prefix
    rows = []
    now = now or datetime.now(timezone.utc)
    for model in models:
        name = str(model.get("name") or model.get("model") or "")
        if not name.startswith(wanted):
            continue
        size, vram = json_int(model.get("size")), json_int(model.get("size_vram"))
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
        context = str(json_int(model.get("context_length")))
        rows.append([name, _short_digest(model.get("digest")), human_bytes(size), processor, context, until,
                     limits_cell(model)])
    header = ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL", "LIMITS"]
    if all(row[-1] == "-" for row in rows):
        # Ollama's own table when no model is limited: scripts that read it keep working.
        rows, header = [row[:-1] for row in rows], header[:-1]
    return format_table(rows, header)


#: How ``mullama ps`` names each limit of ``/api/ps``.
_LIMIT_WORDS = (("max_parallel", "parallel"), ("max_queue", "queue"), ("max_context", "ctx"),
                ("max_memory", "memory"), ("keep_alive", "keep"), ("pinned", "pinned"), ("keys", "keys"))


def limits_cell(model: dict[str, Any]) -> str:
    """A loaded model's limits and use, as ``mullama ps`` shows them: ``queue 1/64, parallel 4, pinned``; ``-``."""
    limits = model.get("limits")
    if not isinstance(limits, dict) or not limits:
        return "-"
    parts = []
    for name, word in _LIMIT_WORDS:
        value = limits.get(name)
        if value is None or value is False:
            continue
        if name == "max_queue":
            parts.append(f"{word} {json_int(model.get('queued'))}/{json_int(value)}")
        elif name == "max_memory":
            parts.append(f"{word} {human_bytes(json_int(value))}")
        elif name == "keys":
            parts.append(f"{word} {','.join(str(k) for k in value) if isinstance(value, list) else value}")
        elif name == "keep_alive" and isinstance(value, (int, float)):
            parts.append(f"{word} {'forever' if value < 0 else f'{value:g}s'}")
        elif value is True:
            parts.append(word)
        else:
            parts.append(f"{word} {value}")
    return ", ".join(parts) or "-"


def _short_digest(digest: Any) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]
