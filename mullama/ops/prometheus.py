"""A small Prometheus client: labelled counters, gauges, histograms and info metrics, and their exposition.

Recording is a dictionary lookup of the label values and an addition under
the child's own lock: no allocation once a label set has been seen, and no
lock shared between label sets, so request threads do not contend.

Values read at scrape time (loaded models, process metrics) come from
*collectors*: functions returning :class:`Family` snapshots, called once per
scrape. :func:`render` writes Prometheus's text format 0.0.4 or OpenMetrics
1.0; :func:`negotiate` picks one from a scraper's ``Accept`` header.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("mullama.metrics")

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: Suffixes a family's samples may add; a family name ending in one would collide with another's samples.
_RESERVED_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    """One line of exposition: the suffix added to the family name, the labels, the value."""

    suffix: str
    labels: Labels
    value: float


@dataclass
class Family:
    """A metric family as a scrape sees it.

    ``name`` is the family's name without the suffixes its samples add
    (``_total`` for a counter, ``_info`` for an info metric); ``kind`` is
    ``counter``, ``gauge``, ``histogram`` or ``info``; ``unit`` (OpenMetrics
    only) must end the name.
    """

    name: str
    kind: str
    help: str
    unit: str = ""
    samples: list[Sample] = field(default_factory=list)


def check_names(name: str, labelnames: Sequence[str], kind: str = "gauge", unit: str = "") -> None:
    """Raise :class:`ValueError` unless ``name`` and ``labelnames`` are valid for a family of ``kind``."""
    if not _METRIC_NAME.fullmatch(name) or name.endswith(_RESERVED_SUFFIXES):
        raise ValueError(f"invalid metric family name {name!r}")
    if unit and not name.endswith("_" + unit):
        raise ValueError(f"the name {name!r} must end with its unit {unit!r}")
    reserved = {"le"} if kind == "histogram" else set()
    for label in labelnames:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"invalid label name {label!r} for {name}")
    if len(set(labelnames)) != len(labelnames):
        raise ValueError(f"repeated label name in {name}")


# Children: the value of one label set ------------------------------------------


class CounterChild:
    """A counter's value for one label set."""

    __slots__ = ("_lock", "value", "created")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount


class GaugeChild:
    """A gauge's value for one label set."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (negative to subtract)."""
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self.value -= amount


class HistogramChild:
    """A histogram's buckets, sum and creation time for one label set."""

    __slots__ = ("_lock", "_bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds
        #: Observations per bucket, not cumulative; the last is +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``value`` ``count`` times (``count`` > 1 records a per-item mean once per item, in one call)."""
        if value != value:  # NaN: it would poison the sum for good, and belongs to no bucket
            return
        index = bisect_left(self._bounds, value)
        with self._lock:
            self.counts[index] += count
            self.sum += value * count

    def snapshot(self) -> tuple[list[int], float]:
        """(counts per bucket, sum), read together."""
        with self._lock:
            return list(self.counts), self.sum


# Families with labels -----------------------------------------------------------


class _Labelled:
    """A family of children keyed by label values."""

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), unit: str = "") -> None:
        check_names(name, labelnames, self.kind, unit)
        self.name = name
        self.help = help
        self.unit = unit
        self.labelnames = tuple(labelnames)
        #: Label values as first given (an int status, say) to the child, so a repeat lookup converts nothing.
        self._lookup: dict[tuple[object, ...], object] = {}
        #: The same children by their label values as strings: what exposition reads.
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._default = self._child(())

    def _new(self) -> object:
        raise NotImplementedError

    def _child(self, values: tuple[object, ...]) -> object:
        found = self._lookup.get(values)
        if found is not None:
            return found
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {len(values)} values")
        text = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(text)
            if child is None:
                child = self._children[text] = self._new()
            self._lookup[values] = child
        return child

    def _items(self) -> list[tuple[Labels, object]]:
        with self._lock:
            items = list(self._children.items())
        return [(tuple(zip(self.labelnames, values)), child) for values, child in items]


class Counter(_Labelled):
    """A value that only goes up; exposed with the ``_total`` suffix."""

    kind = "counter"

    def _new(self) -> CounterChild:
        return CounterChild()

    def labels(self, *values: object) -> CounterChild:
        """The child of these label values (in the order of ``labelnames``)."""
        return self._child(values)  # type: ignore[return-value]

    def inc(self, amount: float = 1.0) -> None:
        """Add to the counter of a family without labels."""
        self._default.inc(amount)  # type: ignore[attr-defined]

    def collect(self) -> Family:
        """This family's samples now."""
        family = Family(self.name, "counter", self.help, self.unit)
        for labels, child in self._items():
            family.samples.append(Sample("_total", labels, child.value))  # type: ignore[attr-defined]
            family.samples.append(Sample("_created", labels, child.created))  # type: ignore[attr-defined]
        return family


class Gauge(_Labelled):
    """A value that goes up and down."""

    kind = "gauge"

    def _new(self) -> GaugeChild:
        return GaugeChild()

    def labels(self, *values: object) -> GaugeChild:
        """The child of these label values (in the order of ``labelnames``)."""
        return self._child(values)  # type: ignore[return-value]

    def set(self, value: float) -> None:
        """Set the gauge of a family without labels."""
        self._default.set(value)  # type: ignore[attr-defined]

    def inc(self, amount: float = 1.0) -> None:
        """Add to the gauge of a family without labels."""
        self._default.inc(amount)  # type: ignore[attr-defined]

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from the gauge of a family without labels."""
        self._default.dec(amount)  # type: ignore[attr-defined]

    def collect(self) -> Family:
        """This family's samples now."""
        family = Family(self.name, "gauge", self.help, self.unit)
        for labels, child in self._items():
            family.samples.append(Sample("", labels, child.value))  # type: ignore[attr-defined]
        return family


class Histogram(_Labelled):
    """Observations counted into buckets with upper bounds ``buckets`` (+Inf is added)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float],
                 unit: str = "") -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"the buckets of {name} must be finite and strictly increasing")
        self.bounds = bounds
        super().__init__(name, help, labelnames, unit)

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def labels(self, *values: object) -> HistogramChild:
        """The child of these label values (in the order of ``labelnames``)."""
        return self._child(values)  # type: ignore[return-value]

    def observe(self, value: float, count: int = 1) -> None:
        """Observe in a family without labels."""
        self._default.observe(value, count)  # type: ignore[attr-defined]

    def collect(self) -> Family:
        """This family's samples now: cumulative buckets, count, sum, creation time."""
        family = Family(self.name, "histogram", self.help, self.unit)
        for labels, child in self._items():
            counts, total = child.snapshot()  # type: ignore[attr-defined]
            cumulative = 0
            for bound, count in zip((*self.bounds, math.inf), counts):
                cumulative += count
                family.samples.append(Sample("_bucket", (*labels, ("le", format_value(bound))), cumulative))
            family.samples.append(Sample("_count", labels, cumulative))
            family.samples.append(Sample("_sum", labels, total))
            family.samples.append(Sample("_created", labels, child.created))  # type: ignore[attr-defined]
        return family


def info_family(name: str, help: str, labels: dict[str, str]) -> Family:
    """An info metric: one sample ``<name>_info{labels} 1``, for facts such as a build's version."""
    check_names(name, tuple(labels), "info")
    return Family(name, "info", help, "", [Sample("_info", tuple(labels.items()), 1)])


# The registry -----------------------------------------------------------------

Collector = Callable[[], Iterable[Family]]


class Registry:
    """The families of one process (or one test), in registration order."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []
        self._collectors: list[Collector] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def _add(self, metric: Counter | Gauge | Histogram) -> None:
        with self._lock:
            if metric.name in self._names:
                raise ValueError(f"a metric family {metric.name!r} is already registered")
            self._names.add(metric.name)
            self._metrics.append(metric)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = (), *, unit: str = "") -> Counter:
        """Register and return a counter (``name`` without ``_total``)."""
        metric = Counter(name, help, labelnames, unit)
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (), *, unit: str = "") -> Gauge:
        """Register and return a gauge."""
        metric = Gauge(name, help, labelnames, unit)
        self._add(metric)
        return metric

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float],
                  unit: str = "") -> Histogram:
        """Register and return a histogram."""
        metric = Histogram(name, help, labelnames, buckets=buckets, unit=unit)
        self._add(metric)
        return metric

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector`` at every scrape; the families it returns are exposed after the registered ones."""
        with self._lock:
            self._collectors.append(collector)

    def collect(self) -> list[Family]:
        """Every family now. A collector that fails is logged and left out: the rest of the scrape still works."""
        with self._lock:
            metrics, collectors = list(self._metrics), list(self._collectors)
        families = [metric.collect() for metric in metrics]
        seen = {family.name for family in families}
        for collector in collectors:
            try:
                found = list(collector())
            except Exception:  # noqa: BLE001 - one broken reading must not fail the whole scrape
                log.exception("a metrics collector failed")
                continue
            for family in found:
                if family.name in seen:
                    log.error("metric family %s exposed twice; the second is dropped", family.name)
                    continue
                seen.add(family.name)
                families.append(family)
        return families


# Exposition -----------------------------------------------------------------------


def negotiate(accept: str | None) -> bool:
    """True when the ``Accept`` header prefers OpenMetrics to the text format (as Prometheus's does)."""
    openmetrics = text = 0.0
    for part in (accept or "").split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media == "application/openmetrics-text":
            openmetrics = max(openmetrics, quality)
        elif media in ("text/plain", "text/*", "*/*"):
            text = max(text, quality)
    return openmetrics > 0 and openmetrics >= text


def format_value(value: float) -> str:
    """A sample value as both formats write it: integers without a fraction, ``+Inf``, ``-Inf``, ``NaN``."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels) + "}"


def render(families: Iterable[Family], *, openmetrics: bool, created: bool = False) -> bytes:
    """The exposition of ``families``: OpenMetrics 1.0 (ending ``# EOF``) or the text format 0.0.4.

    ``_created`` samples (the time a counter or histogram series started)
    are written only in OpenMetrics, and only when ``created`` is true.
    """
    lines: list[str] = []
    for family in families:
        if openmetrics:
            _render_openmetrics(family, created, lines)
        else:
            _render_text(family, lines)
    if openmetrics:
        lines.append("# EOF")
    return ("\n".join(lines) + "\n").encode()


def _render_text(family: Family, lines: list[str]) -> None:
    # The text format has no counter or info family name apart from its samples':
    # TYPE and HELP name the sample (``_total``, ``_info``), and an info metric is a gauge.
    name = family.name + {"counter": "_total", "info": "_info"}.get(family.kind, "")
    kind = "gauge" if family.kind == "info" else family.kind
    lines.append(f"# HELP {name} " + family.help.replace("\\", "\\\\").replace("\n", "\\n"))
    lines.append(f"# TYPE {name} {kind}")
    for sample in family.samples:
        if sample.suffix == "_created":
            continue
        lines.append(f"{family.name}{sample.suffix}{_labels(sample.labels)} {format_value(sample.value)}")


def _render_openmetrics(family: Family, created: bool, lines: list[str]) -> None:
    lines.append(f"# TYPE {family.name} {family.kind}")
    if family.unit:
        lines.append(f"# UNIT {family.name} {family.unit}")
    lines.append(f"# HELP {family.name} " + _escape_label(family.help))
    for sample in family.samples:
        if sample.suffix == "_created" and not created:
            continue
        lines.append(f"{family.name}{sample.suffix}{_labels(sample.labels)} {format_value(sample.value)}")
