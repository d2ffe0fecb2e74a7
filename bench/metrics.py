#!/usr/bin/env python3
"""What recording metrics and statistics costs, in nanoseconds per call (a few seconds in all).

    python bench/metrics.py [--json]

Each case runs in a loop of ``--calls`` calls, best of ``--rounds``: a
labelled counter increment, a histogram observation, everything one finished
generation records (:meth:`Operations.finish`: counters, histograms, the
statistics queue), a statistics record alone, and the whole of what the
daemon adds to a request (its id, the key check against a keys file, the
model's allowlist and queue limit, the record and its finish). Nothing here
runs per token: a request records once, when it ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mullama.engine.model import Timings  # noqa: E402
from mullama.ops.keys import Keyring, create_key  # noqa: E402
from mullama.ops.limits import Limits  # noqa: E402
from mullama.ops.metrics import Metrics  # noqa: E402
from mullama.ops.logs import request_id  # noqa: E402
from mullama.ops.operations import Operations, RequestContext, api_of  # noqa: E402
from mullama.ops.stats import StatsRecord, StatsStore  # noqa: E402


def best_ns(call: Callable[[], None], calls: int, rounds: int) -> float:
    """Nanoseconds per call: the best of ``rounds`` loops of ``calls`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


def main() -> int:
    """Run each case and print nanoseconds per call (and a JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        # A flush interval longer than the run: the statistics queue is measured, not SQLite.
        stats = StatsStore(home / "stats.db", flush_interval=3600, flush_records=10**9)
        headers = {"Authorization": "Bearer " + create_key(home / "keys.json", "ci", ["inference"]),
                   "X-Request-Id": "bench-1"}
        (home / "limits.json").write_text('{"models": {"smollm2": {"max_queue": 64}}}')
        ops = Operations(metrics=Metrics(), keys=Keyring(home / "keys.json"), limits=Limits(home / "limits.json"),
                         stats=stats)
        metrics = ops.metrics
        timings = Timings(0, 120, 30_000_000, 64, 500_000_000, 560_000_000)

        def counter() -> None:
            metrics.requests.labels("ollama", "/api/chat", "smollm2:135m", 200, "ci").inc()

        def histogram() -> None:
            metrics.request_duration.labels("ollama", "smollm2:135m").observe(0.42)

        def finish() -> None:
            record = ops.start("ollama", "/api/chat", "ci")
            record.model = "smollm2:135m"
            record.add_timings(timings)
            ops.finish(record)

        def request_path() -> None:
            rid = request_id(headers.get("X-Request-Id"))
            record = ops.start(api_of("/api/chat"), "")
            identity = ops.authorize("/api/chat", headers)
            record.key, record.route = identity.name, "/api/chat"
            context = RequestContext(ops, identity, record, rid)
            context.admit("smollm2:135m")
            ops.check_queue("smollm2:135m", 4, 1, 0)
            context.first_token()
            context.generated(timings, 120)
            ops.finish(record)

        record = StatsRecord(time.time(), "smollm2:135m", "ollama", "ci", False, 120, 64, 0.56)

        def stats_record() -> None:
            stats.record(record)

        results = {name: round(best_ns(case, args.calls, args.rounds))
                   for name, case in (("counter_inc_ns", counter), ("histogram_observe_ns", histogram),
                                      ("request_finish_ns", finish), ("request_path_ns", request_path),
                                      ("stats_record_ns", stats_record))}
        # The writer thread's share, off the request path: folding the queue into hourly rows.
        start = time.perf_counter_ns()
        written = stats.flush()
        results["stats_write_ns_per_record"] = round((time.perf_counter_ns() - start) / written)
        ops.close()
    for name, value in results.items():
        print(f"{name:24} {value:>8} ns")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
