"""A compact latency histogram whose percentiles are within a few percent, stored as a short string.

Buckets grow geometrically by ``2 ** (1/8)`` (9 %) from 1 ms, so any
percentile read back is within about 4.5 % of the true value, whatever the
scale, in at most 200 buckets (1 ms to about 8.5 hours). Histograms of many
hours merge by adding counts, which is what lets statistics keep one per
model, API, key and hour and still answer "p99 over the last week".
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Smallest latency told apart (seconds); anything at or below it is in bucket 0.
FLOOR = 0.001
_GROWTH = 2 ** (1 / 8)
_LOG_GROWTH = math.log(_GROWTH)
_MAX_INDEX = 199


def bucket_of(seconds: float) -> int:
    """The bucket holding ``seconds``: 0 up to :data:`FLOOR`, then one per 9 % step, capped."""
    if not seconds > FLOOR:  # also NaN
        return 0
    return min(_MAX_INDEX, 1 + int(math.log(seconds / FLOOR) / _LOG_GROWTH))


def bucket_value(index: int) -> float:
    """The value a bucket stands for: the geometric middle of its bounds."""
    if index <= 0:
        return FLOOR
    return FLOOR * _GROWTH ** (index - 0.5)


class LatencyHistogram:
    """Counts per bucket; :meth:`encode` and :meth:`decode` store it as ``"index:count ..."``."""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def add(self, seconds: float, count: int = 1) -> None:
        """Record ``seconds`` ``count`` times."""
        index = bucket_of(seconds)
        self.counts[index] = self.counts.get(index, 0) + count

    def merge(self, other: "LatencyHistogram") -> None:
        """Add ``other``'s counts to these."""
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count

    @property
    def total(self) -> int:
        """Observations recorded."""
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 to 1) in seconds, None when empty."""
        total = self.total
        if total == 0:
            return None
        rank = q * (total - 1)
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return bucket_value(index)
        return bucket_value(max(self.counts))

    def encode(self) -> str:
        """``"index:count"`` pairs in bucket order, space-separated."""
        return " ".join(f"{index}:{self.counts[index]}" for index in sorted(self.counts) if self.counts[index])

    @classmethod
    def decode(cls, text: str) -> "LatencyHistogram":
        """The histogram :meth:`encode` wrote; raises :class:`ValueError` for anything else."""
        counts: dict[int, int] = {}
        for pair in text.split():
            index_text, sep, count_text = pair.partition(":")
            index, count = int(index_text), int(count_text)
            if not sep or not 0 <= index <= _MAX_INDEX or count < 0:
                raise ValueError(f"not a latency histogram: {text[:80]!r}")
            counts[index] = counts.get(index, 0) + count
        return cls(counts)

    @classmethod
    def merged(cls, histograms: Iterable["LatencyHistogram"]) -> "LatencyHistogram":
        """One histogram holding all of ``histograms``."""
        result = cls()
        for histogram in histograms:
            result.merge(histogram)
        return result
