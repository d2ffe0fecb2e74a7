"""``mullama stats``: usage per model (or API, key, hour) from the daemon's ``/api/stats``, as a table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from mullama.cli.daemon import connect
from mullama.cli.format import format_table

_HEADERS = {"model": "MODEL", "api": "API", "key": "KEY", "hour": "HOUR"}


def add_stats_verb(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``stats`` with the ``verb`` helper of :func:`mullama.cli.verbs.build_parser`."""
    sub = verb("stats", cmd_stats, "Show usage statistics")
    sub.add_argument("model", metavar="MODEL", nargs="?", help="only this model (a name, a name without tag, or a "
                     "glob pattern)")
    sub.add_argument("--since", default="24h", help="start: a duration ago (24h, 7d) or a time (default 24h)")
    sub.add_argument("--until", help="end: a duration ago or a time (default now)")
    sub.add_argument("--key", help="only requests made with the key of this name")
    sub.add_argument("--api", help="only requests of this API (ollama, openai, anthropic)")
    sub.add_argument("--by", default="model", help="group by model, api, key or hour (comma-separated)")


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the table of ``/api/stats``."""
    params = {"since": args.since, "by": args.by}
    for name in ("model", "until", "key", "api"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    answer = connect().get("/api/stats?" + urlencode(params)) or {}
    sys.stdout.write(stats_table(answer))
    return 0


def stats_table(answer: dict[str, Any]) -> str:
    """The rows of a ``/api/stats`` answer, one per group, with request, error, token counts and percentiles."""
    groups = [name for name in answer.get("by") or [] if name in _HEADERS]
    header = [_HEADERS[name] for name in groups] + ["REQUESTS", "ERRORS", "PROMPT TOKENS", "GENERATED TOKENS",
                                                   "P50", "P90", "P99"]
    rows = []
    for row in answer.get("stats") or []:
        latency = row.get("latency_seconds") or {}
        cells = [_group_cell(name, row.get(name)) for name in groups]
        cells += [str(row.get(name, 0)) for name in ("requests", "errors", "prompt_tokens", "generated_tokens")]
        cells += [human_latency(latency.get(p)) for p in ("p50", "p90", "p99")]
        rows.append(cells)
    return format_table(rows, header)


def _group_cell(name: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    # "2024-05-01T13:00:00Z" reads better as "2024-05-01 13:00Z".
    return text[:10] + " " + text[11:16] + "Z" if name == "hour" and len(text) >= 16 else text


def human_latency(seconds: Any) -> str:
    """``850ms``, ``1.25s``, ``95s``; ``-`` for none."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.2f}s"
    return f"{seconds:.0f}s"
