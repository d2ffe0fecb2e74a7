"""Persistent statistics: SQLite rows per model, API, key and hour that survive restarts and ``kill -9``."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon import REPO, running
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.cli import main
from mullama.ops.keys import Keyring
from mullama.ops.latency import FLOOR, LatencyHistogram
from mullama.ops.limits import Limits
from mullama.ops.metrics import Metrics
from mullama.ops.operations import Operations
from mullama.ops.stats import StatsError, StatsRecord, StatsStore, retention_from_env

HOUR = 3600
#: A fixed hour, so tests do not depend on the clock (well inside any retention from "now" below).
NOW = (time.time() // HOUR) * HOUR + 1800


def record(model: str = "smollm2:135m", *, at: float = NOW, api: str = "ollama", key: str = "", error: bool = False,
           prompt: int = 10, generated: int = 20, latency: float = 0.5) -> StatsRecord:
    return StatsRecord(at, model, api, key, error, prompt, generated, latency)


def rows_in(path: Path) -> list[tuple[int, ...]]:
    """The table as another process would read it: a separate connection."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT hour, model, api, key, requests, errors, prompt_tokens, generated_tokens FROM hourly "
                          "ORDER BY hour, model, api, key").fetchall()


def test_records_are_grouped_per_hour_model_api_and_key(tmp_path: Path) -> None:
    store = StatsStore(tmp_path / "stats.db")
    try:
        for _ in range(3):
            store.record(record())
        store.record(record(error=True, latency=2.0))
        store.record(record(api="openai", key="ci"))
        store.record(record("qwen2.5:0.5b", at=NOW - HOUR))
        assert store.flush() == 6
        assert rows_in(tmp_path / "stats.db") == [
            (NOW - 1800 - HOUR, "qwen2.5:0.5b", "ollama", "", 1, 0, 10, 20),
            (NOW - 1800, "smollm2:135m", "ollama", "", 4, 1, 40, 80),
            (NOW - 1800, "smollm2:135m", "openai", "ci", 1, 0, 10, 20),
        ]
        by_model = store.query(since=NOW - 2 * HOUR, until=NOW + HOUR)
        assert [(r.model, r.requests, r.errors, r.prompt_tokens, r.generated_tokens) for r in by_model] == [
            ("smollm2:135m", 5, 1, 50, 100), ("qwen2.5:0.5b", 1, 0, 10, 20)]
        by_hour = store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, by=["hour"])
        assert [(r.hour, r.requests) for r in by_hour] == [(NOW - 1800 - HOUR, 1), (NOW - 1800, 5)]
        assert [r.requests for r in store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, key="ci", by=[])] == [1]
        assert [r.requests for r in store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, api="openai", by=[])] == [1]
        assert [r.model for r in store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, model="smollm2")] == \
            ["smollm2:135m"]
        assert [r.model for r in store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, model="qwen*")] == \
            ["qwen2.5:0.5b"]
        assert store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, model="smollm2:1b") == []
        # Hours overlapping the range count; the hour before NOW's does not overlap [NOW - 1000, ...).
        assert [r.requests for r in store.query(since=NOW - 1000, until=NOW + HOUR, by=[])] == [5]
        with pytest.raises(ValueError):
            store.query(since=0, until=NOW, by=["colour"])
        assert store.integrity() == "ok"
    finally:
        store.close()


def test_percentiles_come_from_the_stored_histograms(tmp_path: Path) -> None:
    store = StatsStore(tmp_path / "stats.db")
    try:
        latencies = [0.01 * (i + 1) for i in range(100)]  # 10 ms .. 1 s
        for i, latency in enumerate(latencies):
            # Two hours, and two flushes: the percentiles merge histograms of rows and of writes.
            store.record(record(at=NOW - HOUR * (i % 2), latency=latency))
            if i == 49:
                store.flush()
        (row,) = store.query(since=NOW - 2 * HOUR, until=NOW + HOUR, by=[])
        assert row.requests == 100
        answer = row.as_dict()["latency_seconds"]
        for name, exact in (("p50", 0.505), ("p90", 0.9), ("p99", 0.99)):
            assert math.isclose(answer[name], exact, rel_tol=0.06), (name, answer)
    finally:
        store.close()


def test_statistics_survive_a_restart_and_the_writer_thread_writes_alone(tmp_path: Path) -> None:
    path = tmp_path / "stats.db"
    store = StatsStore(path, flush_interval=0.05)
    store.record(record())
    # No flush: the writer thread must write it within its interval; another connection sees it.
    deadline = time.monotonic() + 30
    while not rows_in(path):
        assert time.monotonic() < deadline, "the writer thread wrote nothing"
        time.sleep(0.05)
    store.record(record(generated=5))
    store.close()  # writes what is left
    store.close()
    again = StatsStore(path)
    try:
        (row,) = again.query(since=NOW - HOUR, until=NOW + HOUR, by=[])
        assert (row.requests, row.generated_tokens) == (2, 25)
    finally:
        again.close()


def test_retention_drops_old_hours_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "stats.db"
    now = time.time()
    store = StatsStore(path)
    store.record(record(at=now - 40 * 86400))
    store.record(record(at=now - 3 * 86400))
    store.record(record(at=now))
    store.close()
    assert len(rows_in(path)) == 3
    StatsStore(path, retention=7 * 86400).close()
    assert len(rows_in(path)) == 2
    StatsStore(path, retention=86400).close()
    assert len(rows_in(path)) == 1


def test_retention_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULLAMA_STATS_RETENTION", raising=False)
    monkeypatch.delenv("OLLAMA_STATS_RETENTION", raising=False)
    assert retention_from_env() == 30 * 86400
    monkeypatch.setenv("MULLAMA_STATS_RETENTION", "12h")
    assert retention_from_env() == 12 * 3600
    for bad in ("0", "-1d", "forever", "3 days"):
        monkeypatch.setenv("MULLAMA_STATS_RETENTION", bad)
        with pytest.raises(StatsError, match="MULLAMA_STATS_RETENTION"):
            retention_from_env()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "stats.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StatsError, match="cannot open the statistics database"):
        StatsStore(path)


_WRITER = """
import sys, time
from mullama.ops.stats import StatsRecord, StatsStore
# Only the explicit flushes below write (the thread's would split batches), so each write is one known batch.
store = StatsStore(__import__("pathlib").Path(sys.argv[1]), flush_interval=3600, flush_records=10**9)
total = 0
while True:
    for i in range(50):
        store.record(StatsRecord(time.time() - 3600 * (i % 3), f"m{i % 4}", "ollama", f"k{i % 2}", i % 7 == 0,
                                 i, 2 * i, 0.001 * i))
    total += 50
    store.flush()
    print(total, flush=True)
"""


def test_kill_9_loses_at_most_the_last_batch_and_never_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stats.db"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        confirmed = 0
        # Let it write a few hundred batches, so the kill lands in the middle of writing.
        while confirmed < 20_000:
            line = process.stdout.readline()
            assert line, "the writer died"
            confirmed = int(line)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        for line in process.stdout:
            confirmed = int(line)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        written = db.execute("SELECT sum(requests), sum(prompt_tokens), sum(generated_tokens) FROM hourly").fetchone()
    # Every batch confirmed (flushed) is there, and at most the one being written when killed is not:
    # a transaction lands whole or not at all.
    assert written[0] in (confirmed, confirmed + 50), (written, confirmed)
    batches = written[0] // 50
    assert written[1:] == (batches * sum(range(50)), batches * 2 * sum(range(50)))
    again = StatsStore(path)
    try:
        assert again.integrity() == "ok"
        assert sum(row.requests for row in again.query(since=time.time() - 4 * HOUR, until=time.time() + HOUR)) == \
            written[0]
    finally:
        again.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=FLOOR * 1.01, max_value=3600, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_histogram_percentiles_are_within_five_percent(values: list[float], q: float) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    ordered = sorted(values)
    exact = ordered[int(q * (len(values) - 1))]
    estimate = histogram.quantile(q)
    assert estimate is not None and abs(estimate - exact) / exact <= 0.045
    assert LatencyHistogram.decode(histogram.encode()).counts == histogram.counts


def test_histogram_decoding_refuses_garbage() -> None:
    for bad in ("x", "1:", ":2", "1:-1", "999:1", "1:2:3"):
        with pytest.raises(ValueError):
            LatencyHistogram.decode(bad)
    assert LatencyHistogram.decode("").total == 0


# The route and the command --------------------------------------------------------------


def test_stats_route_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = StatsStore(tmp_path / "stats.db")
    ops = Operations(metrics=Metrics(), keys=Keyring(tmp_path / "keys.json"), limits=Limits(tmp_path / "limits.json"),
                     stats=store)
    now = time.time()
    try:
        with running(tmp_path) as server:
            server.app.ops = ops
            port = server.server_address[1]
            for i in range(4):
                store.record(record("smollm2:135m", at=now, key="ci", latency=0.1 * (i + 1)))
            store.record(record("qwen2.5:0.5b", at=now - 2 * 86400, api="openai", error=True, latency=12))

            def get(query: str) -> tuple[int, dict]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats{query}", timeout=30) as answer:
                        return answer.status, json.loads(answer.read())
                except urllib.error.HTTPError as error:
                    return error.code, json.loads(error.read())

            status, body = get("")
            assert status == 200 and body["by"] == ["model"]
            assert [(row["model"], row["requests"]) for row in body["stats"]] == [("smollm2:135m", 4)]
            assert body["total"]["requests"] == 4 and body["total"]["latency_seconds"]["p50"] > 0
            status, body = get("?since=7d&by=model,api")
            assert [(row["model"], row["api"], row["errors"]) for row in body["stats"]] == [
                ("smollm2:135m", "ollama", 0), ("qwen2.5:0.5b", "openai", 1)]
            status, body = get("?since=7d&key=ci&by=key")
            assert [(row["key"], row["requests"]) for row in body["stats"]] == [("ci", 4)]
            status, body = get("?since=7d&until=1d")
            assert [row["model"] for row in body["stats"]] == ["qwen2.5:0.5b"]
            for bad in ("?since=yesterday", "?by=colour", "?until=nope"):
                status, body = get(bad)
                assert status == 400 and body["error"], bad

            monkeypatch.setenv("MULLAMA_HOST", f"127.0.0.1:{port}")
            assert main(["stats", "--since", "7d"]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].split() == ["MODEL", "REQUESTS", "ERRORS", "PROMPT", "TOKENS", "GENERATED", "TOKENS",
                                        "P50", "P90", "P99"]
            assert lines[1].split()[:5] == ["smollm2:135m", "4", "0", "40", "80"]
            assert lines[2].split()[:3] == ["qwen2.5:0.5b", "1", "1"] and lines[2].split()[-1] == "12s"
            assert main(["stats", "qwen2.5", "--since", "7d", "--by", "hour"]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].startswith("HOUR") and len(lines) == 2 and lines[1].endswith("12s")
            assert main(["stats", "--since", "nonsense"]) == 1
            assert "nonsense" in capsys.readouterr().err
    finally:
        store.close()
