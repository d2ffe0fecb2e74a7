"""Token buckets: a rate per minute with bursts up to a minute's worth.

A request takes one token of a requests-per-minute bucket before it runs.
Tokens per minute cannot be known before a generation ends, so that bucket
is checked (is it above zero?) before and charged after, and may go into
debt: the next requests wait until it is paid back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``per_minute`` tokens a minute, holding at most ``per_minute``; starts full."""

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not per_minute > 0:
            raise ValueError("a rate must be positive")
        self.capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self._rate)
        self._at = now

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` if there is that much: 0.0; else take nothing and return seconds until there is."""
        with self._lock:
            self._refill()
            if self._level >= amount:
                self._level -= amount
                return 0.0
            return (min(amount, self.capacity) - self._level) / self._rate

    def wait_time(self) -> float:
        """0.0 while the bucket holds more than nothing; else seconds until it does."""
        with self._lock:
            self._refill()
            return 0.0 if self._level > 0 else (-self._level) / self._rate + 1e-9

    def charge(self, amount: float) -> None:
        """Take ``amount`` whether or not it is there: the bucket may go below zero."""
        with self._lock:
            self._refill()
            self._level -= amount


def retry_after(seconds: float) -> int:
    """Whole seconds for a ``Retry-After`` header: rounded up, at least 1."""
    return max(1, math.ceil(seconds))
