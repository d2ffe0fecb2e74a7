"""Whether a call lets other Python threads run: a counter thread's rate while the call runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def counter_rates(action: Callable[[], object]) -> tuple[float, float]:
    """Ticks per second of a counting thread while this thread sleeps, then while it runs ``action``.

    A call that holds the GIL leaves the counter a few percent of its free
    rate (its switch-interval slices); one that releases it leaves most.
    """
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    def ticks_during(step: Callable[[], object]) -> float:
        before, started = ticks, time.perf_counter()
        step()
        return (ticks - before) / (time.perf_counter() - started)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        return ticks_during(lambda: time.sleep(0.3)), ticks_during(action)
    finally:
        stop.set()
        counter.join()
