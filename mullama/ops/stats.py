"""Persistent usage statistics: one SQLite row per model, API, key and hour.

A finished request hands :meth:`StatsStore.record` a :class:`StatsRecord`,
which only appends it to a list; a writer thread folds the list into the
hourly rows once a second (or sooner when it grows), in one transaction.
SQLite in WAL mode makes each transaction all-or-nothing, so a ``kill -9``
loses at most the records not yet written, never the file. Rows older than
the retention (``MULLAMA_STATS_RETENTION``, default ``30d``) are deleted.

Latency percentiles come from a :class:`~mullama.ops.latency.LatencyHistogram`
kept per row, so they can be computed over any range of hours.
"""

from __future__ import annotations

import fnmatch
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mullama import config
from mullama.errors import MullamaError
from mullama.ops.durations import parse_duration
from mullama.ops.latency import LatencyHistogram

log = logging.getLogger("mullama.stats")

DEFAULT_RETENTION = 30 * 86400.0
HOUR = 3600
#: The ways a query may group rows.
GROUPS = ("model", "api", "key", "hour")
#: Records kept in memory while the database cannot be written; beyond it the oldest are dropped.
_MAX_PENDING = 100_000
#: Seconds between deletions of rows past the retention.
_PRUNE_EVERY = 600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS hourly (
    hour INTEGER NOT NULL,
    model TEXT NOT NULL,
    api TEXT NOT NULL,
    key TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    latency TEXT NOT NULL,
    PRIMARY KEY (hour, model, api, key)
) WITHOUT ROWID
"""


class StatsError(MullamaError):
    """The statistics database cannot be opened or the retention setting is invalid."""


@dataclass(frozen=True)
class StatsRecord:
    """One finished request: when it ended (Unix seconds), whose it was, its counts and latency (seconds)."""

    time: float
    model: str
    api: str
    key: str
    error: bool
    prompt_tokens: int
    generated_tokens: int
    latency: float


@dataclass
class StatsRow:
    """The statistics of one group (the fields not grouped by are None)."""

    model: str | None = None
    api: str | None = None
    key: str | None = None
    hour: int | None = None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_dict(self) -> dict[str, Any]:
        """The row as ``/api/stats`` answers it: latency percentiles in seconds."""
        out: dict[str, Any] = {}
        for name in ("model", "api", "key"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.hour is not None:
            out["hour"] = iso_time(self.hour)
        out |= {"requests": self.requests, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "latency_seconds": {f"p{round(q * 100)}": _rounded(self.latency.quantile(q))
                                    for q in (0.5, 0.9, 0.99)}}
        return out


def iso_time(unix: float) -> str:
    """RFC 3339 in UTC, to the second."""
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def retention_from_env() -> float:
    """Seconds of statistics kept: ``MULLAMA_STATS_RETENTION`` (``30d``, ``12h``...), default 30 days."""
    text = config.env("STATS_RETENTION")
    if text is None:
        return DEFAULT_RETENTION
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise StatsError(f"MULLAMA_STATS_RETENTION: {exc}") from None
    if seconds <= 0:
        raise StatsError("MULLAMA_STATS_RETENTION must be a positive duration such as 30d")
    return seconds


class StatsStore:
    """The statistics database and its writer thread.

    ``flush_interval`` seconds pass at most between writes, or fewer when
    ``flush_records`` records wait. Call :meth:`close` to write what is left.
    """

    def __init__(self, path: Path, *, retention: float = DEFAULT_RETENTION, flush_interval: float = 1.0,
                 flush_records: int = 512) -> None:
        self.path = path
        self.retention = retention
        self._flush_interval = flush_interval
        self._flush_records = flush_records
        self._pending: list[StatsRecord] = []
        self._pending_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._last_prune = 0.0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed; only a power cut
            # may lose the last ones, and never corrupts the file.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._prune(time.time())
        except (sqlite3.Error, OSError) as exc:
            raise StatsError(f"cannot open the statistics database {path}: {exc}") from None
        self._writer = threading.Thread(target=self._run, name="mullama-stats", daemon=True)
        self._writer.start()

    @classmethod
    def open_default(cls) -> "StatsStore":
        """The daemon's store: ``stats.db`` in the data directory, retention from the environment."""
        return cls(config.data_dir() / "stats.db", retention=retention_from_env())

    # --- writing ---------------------------------------------------------------------

    def record(self, record: StatsRecord) -> None:
        """Queue ``record`` for the next write; never touches the disk."""
        with self._pending_lock:
            self._pending.append(record)
            full = len(self._pending) >= self._flush_records
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write every queued record now; return how many. A failed write keeps them queued (and raises)."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        try:
            with self._db_lock:
                self._write(batch)
        except sqlite3.Error:
            with self._pending_lock:
                self._pending[:0] = batch
                del self._pending[:-_MAX_PENDING]
            raise
        return len(batch)

    def _write(self, batch: Sequence[StatsRecord]) -> None:
        groups: dict[tuple[int, str, str, str], StatsRow] = {}
        for record in batch:
            hour = int(record.time // HOUR * HOUR)
            row = groups.get((hour, record.model, record.api, record.key))
            if row is None:
                row = groups[(hour, record.model, record.api, record.key)] = StatsRow(
                    record.model, record.api, record.key, hour)
            row.requests += 1
            row.errors += record.error
            row.prompt_tokens += record.prompt_tokens
            row.generated_tokens += record.generated_tokens
            row.latency.add(record.latency)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (hour, model, api, key), row in groups.items():
                found = db.execute("SELECT latency FROM hourly WHERE hour=? AND model=? AND api=? AND key=?",
                                   (hour, model, api, key)).fetchone()
                if found:
                    row.latency.merge(_histogram(found[0]))
                db.execute(
                    "INSERT INTO hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, model, api, key) "
                    "DO UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "generated_tokens = generated_tokens + excluded.generated_tokens, latency = excluded.latency",
                    (hour, model, api, key, row.requests, row.errors, row.prompt_tokens, row.generated_tokens,
                     row.latency.encode()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _prune(self, now: float) -> None:
        cutoff = int((now - self.retention) // HOUR * HOUR)
        with self._db_lock:
            self._db.execute("DELETE FROM hourly WHERE hour < ?", (cutoff,))
        self._last_prune = now

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            try:
                self.flush()
                now = time.time()
                if now - self._last_prune >= _PRUNE_EVERY:
                    self._prune(now)
            except sqlite3.Error as exc:
                log.warning("statistics not written yet (%s); retrying", exc)

    def close(self) -> None:
        """Stop the writer and write what is left; safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._writer.join()
        try:
            self.flush()
        except sqlite3.Error as exc:
            log.warning("the last statistics could not be written: %s", exc)
        with self._db_lock:
            self._db.close()

    # --- reading ---------------------------------------------------------------------

    def query(self, *, since: float, until: float, model: str | None = None, api: str | None = None,
              key: str | None = None, by: Iterable[str] = ("model",)) -> list[StatsRow]:
        """The rows of the hours overlapping ``[since, until)``, filtered, grouped by ``by`` (of :data:`GROUPS`).

        ``model`` is a name or a glob pattern (``llama3*``); a name without a
        tag matches every tag of it. Queued records are written first, so a
        query sees every request finished before it.
        """
        grouping = tuple(by)
        for name in grouping:
            if name not in GROUPS:
                raise ValueError(f"cannot group by {name!r}; use {', '.join(GROUPS)}")
        try:
            self.flush()
        except sqlite3.Error as exc:
            log.warning("statistics not written before a query (%s); the query misses the latest", exc)
        sql = "SELECT hour, model, api, key, requests, errors, prompt_tokens, generated_tokens, latency FROM hourly " \
              "WHERE hour > ? AND hour < ?"
        params: list[Any] = [since - HOUR, until]
        if api is not None:
            sql += " AND api = ?"
            params.append(api)
        if key is not None:
            sql += " AND key = ?"
            params.append(key)
        with self._db_lock:
            found = self._db.execute(sql, params).fetchall()
        groups: dict[tuple[Any, ...], StatsRow] = {}
        for hour, row_model, row_api, row_key, requests, errors, prompt, generated, latency in found:
            if model is not None and not _model_matches(model, row_model):
                continue
            values = {"model": row_model, "api": row_api, "key": row_key, "hour": hour}
            group = tuple(values[name] for name in grouping)
            row = groups.get(group)
            if row is None:
                row = groups[group] = StatsRow(**{name: values[name] for name in grouping})
            row.requests += requests
            row.errors += errors
            row.prompt_tokens += prompt
            row.generated_tokens += generated
            row.latency.merge(_histogram(latency))
        return sorted(groups.values(), key=lambda r: (r.hour or 0, -r.requests, r.model or "", r.api or "",
                                                      r.key or ""))

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        with self._db_lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


def _model_matches(wanted: str, name: str) -> bool:
    if fnmatch.fnmatchcase(name, wanted):
        return True
    return ":" not in wanted and name.startswith(wanted + ":")


def _histogram(text: str) -> LatencyHistogram:
    try:
        return LatencyHistogram.decode(text)
    except ValueError:
        log.warning("a statistics row holds an unreadable latency histogram; its latencies are left out")
        return LatencyHistogram()
