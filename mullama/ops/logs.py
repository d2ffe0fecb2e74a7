"""Logs a machine reads: one JSON object per line (``MULLAMA_LOG_FORMAT=json``), and request ids.

A request keeps the ``X-Request-Id`` its client sent when it is a sane
token (so a proxy's id follows the request through), or gets a new one; the
daemon echoes it in the response and puts it in the request's log line.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from mullama import config
from mullama.errors import MullamaError

FORMATS = ("text", "json")
#: Below DEBUG: Ollama's trace level (``OLLAMA_DEBUG=2``).
TRACE = 5
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class LogFormatError(MullamaError):
    """``MULLAMA_LOG_FORMAT`` names no known format."""


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, the record's ``fields``, any exception.

    Pass structured values with ``log.info("request", extra={"fields": {...}})``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry |= {key: value for key, value in extra.items() if key not in entry}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format() -> str:
    """``MULLAMA_LOG_FORMAT``: ``text`` (the default) or ``json``."""
    value = (config.env("LOG_FORMAT") or "text").strip().lower()
    if value not in FORMATS:
        raise LogFormatError(f"MULLAMA_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def configure_logging(stream: TextIO | None = None) -> None:
    """Set up the root logger for the daemon: the format of ``MULLAMA_LOG_FORMAT``, DEBUG with ``MULLAMA_DEBUG``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format() == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = log_level()
    root.setLevel(level)
    logging.getLogger("mullama.native").setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)


def log_level() -> int:
    """The daemon's log level from ``MULLAMA_DEBUG``/``OLLAMA_DEBUG``, read as Ollama reads ``OLLAMA_DEBUG``.

    ``1`` or ``true`` is debug (llama.cpp's log included), ``2`` trace
    (here the same), ``0``, ``false`` or unset info; a negative number is
    quieter (``-1`` warnings, ``-2`` errors), as Ollama's ``-4 * n`` slog
    levels are; anything else is info, as in Ollama.
    """
    text = config.env("DEBUG")
    if text is None:
        return logging.INFO
    try:
        return logging.DEBUG if config.go_bool(text) else logging.INFO
    except ValueError:
        pass
    try:
        number = int(text)
    except ValueError:
        return logging.INFO
    return min(logging.CRITICAL, max(TRACE, logging.INFO - 10 * number))


def request_id(given: str | None) -> str:
    """The id of a request: ``given`` (its ``X-Request-Id``) when it is 1 to 128 safe characters, else a new one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(16)
