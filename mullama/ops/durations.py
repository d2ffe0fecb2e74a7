"""Durations and points in time as operators write them: ``30d``, ``24h``, ``1h30m``, ``90``, an ISO date.

One reader for every setting of :mod:`mullama.ops` (statistics retention,
``--since``, a model's default keep-alive), so each accepts the same words.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
          "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ns|us|µs|ms|s|m|h|d|w)")


def parse_duration(value: object, *, negative: bool = False) -> float:
    """Seconds from a number of seconds or a string such as ``"30d"``, ``"1h30m"``, ``"500ms"``, ``"-1"``.

    A negative value is refused unless ``negative`` is true (a keep-alive of
    ``-1`` means forever). Raises :class:`ValueError` with the reason.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration such as \"30d\", \"24h\" or a number of seconds, got {value!r}")
    if isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"the duration {value!r} is not finite")
    if seconds < 0 and not negative:
        raise ValueError(f"the duration {value!r} is negative")
    return seconds


def _parse_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in "+-" else text
    parts = _PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise ValueError(f"{text!r} is not a duration such as \"30d\", \"24h\", \"1h30m\" or a number of seconds")
    return sign * sum(float(number) * _UNITS[unit] for number, unit in parts)


def parse_instant(value: str, *, now: float) -> float:
    """A Unix time from ``"24h"`` (that long before ``now``), a Unix time in seconds, or an ISO 8601 date.

    A date without a zone is taken as UTC. Raises :class:`ValueError`.
    """
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{value!r} is not a time")
        return number
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (24h, 7d) nor a time (2024-05-01T12:00:00Z, "
                         f"a Unix time)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
