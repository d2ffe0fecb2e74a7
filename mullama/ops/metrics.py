"""Mullama's metric families, named by Prometheus's conventions, and the collectors read at scrape time.

Every name starts with ``mullama_`` (the standard ``process_*`` families
excepted, so existing dashboards find them), durations are in seconds, sizes
in bytes, and counters end in ``_total`` when exposed. Labels stay bounded:
``model`` is a model of the store (the caller passes ``""`` for a name that
resolved to nothing), ``route`` a route pattern, never a raw path, ``key`` a
key's name, never the key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mullama import __version__
from mullama.errors import MullamaError
from mullama.ops.process import process_families
from mullama.ops.prometheus import (OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Family, Registry, Sample,
                                    info_family, negotiate, render)

log = logging.getLogger("mullama.metrics")

T = TypeVar("T")
#: A pull's progress callback (the events Ollama's ``/api/pull`` streams).
Progress = Callable[[dict[str, Any]], None]

#: Seconds: from a few milliseconds (a cached prefix on a GPU) to minutes (a long answer on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Seconds per generated token: 1 ms (1000 tokens/s) to 2.5 s.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
#: Seconds a model load or eviction takes.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


@dataclass(frozen=True)
class ModelUse:
    """What one loaded model holds now, read at scrape time."""

    name: str
    memory_bytes: int
    slots: int
    busy_slots: int
    queued: int
    kv_used_tokens: int
    kv_capacity_tokens: int


@dataclass(frozen=True)
class BuildInfo:
    """The labels of ``mullama_build_info``."""

    version: str
    llama_cpp_commit: str
    backends: str

    @classmethod
    def current(cls) -> "BuildInfo":
        """This installation: Mullama's version and the native build the daemon loads ("unknown" without one).

        Read from the build's manifest: the libraries load with the first model, not here.
        """
        from mullama.ffi import loader

        try:
            manifest: dict[str, Any] = loader.build_manifest()
        except MullamaError:
            manifest = {}
        backends = manifest.get("backends") or []
        return cls(__version__, str(manifest.get("llama_cpp_commit") or "unknown"),
                   ",".join(str(b) for b in backends) if isinstance(backends, list) else str(backends))


def manager_models(manager: Any) -> list[ModelUse]:
    """:class:`ModelUse` of each model a :class:`~mullama.engine.residency.ModelManager` holds."""
    found = []
    for loaded in manager.running():
        if loaded.batcher is None:
            # A speech model: no sequences or KV cells to report, only its memory and transcriptions running.
            found.append(ModelUse(loaded.record.name, loaded.size, 0, loaded.active_count, 0, 0, 0))
            continue
        try:
            context = loaded.model.context
        except MullamaError:
            continue  # unloaded between the listing and this reading
        busy = loaded.batcher.active_count
        found.append(ModelUse(
            name=loaded.record.name,
            memory_bytes=loaded.size,
            slots=context.n_seq,
            busy_slots=busy,
            queued=loaded.batcher.queued_count,
            kv_used_tokens=sum(len(tokens) for tokens in context.cached),
            kv_capacity_tokens=context.n_ctx_seq * context.n_seq,
        ))
    return found


class Metrics:
    """Mullama's metric families on one :class:`Registry`; the request path calls the ``record`` methods.

    ``models`` is read at each scrape for the per-model gauges
    (:func:`manager_models` over the daemon's manager).
    """

    def __init__(self, registry: Registry | None = None, *, models: Callable[[], Iterable[ModelUse]] = tuple,
                 build: BuildInfo | None = None) -> None:
        r = self.registry = registry or Registry()
        self._models = models
        self._build = build
        self.requests = r.counter("mullama_requests", "HTTP requests answered, by API, route, model, status and key.",
                                  ("api", "route", "model", "status", "key"))
        self.in_flight = r.gauge("mullama_requests_in_flight", "HTTP requests being answered now.", ("api",))
        self.prompt_tokens = r.counter("mullama_prompt_tokens", "Prompt tokens read (cached prefixes included).",
                                       ("api", "model", "key"))
        self.generated_tokens = r.counter("mullama_generated_tokens", "Tokens generated.", ("api", "model", "key"))
        self.request_duration = r.histogram(
            "mullama_request_duration_seconds", "Time from a request's arrival to its last byte.",
            ("api", "model"), buckets=LATENCY_BUCKETS, unit="seconds")
        self.time_to_first_token = r.histogram(
            "mullama_time_to_first_token_seconds", "Time from a request's arrival to its first generated token "
            "(a model load included).", ("api", "model"), buckets=LATENCY_BUCKETS, unit="seconds")
        self.time_per_output_token = r.histogram(
            "mullama_time_per_output_token_seconds", "Time between generated tokens, after the first (each "
            "request's mean, counted once per token).", ("model",), buckets=TOKEN_BUCKETS, unit="seconds")
        self.queue_wait = r.histogram(
            "mullama_queue_wait_seconds", "Time a generation waited for a free sequence of its model.", ("model",),
            buckets=LATENCY_BUCKETS, unit="seconds")
        self.loads = r.counter("mullama_model_loads", "Model loads, by outcome (ok or error).", ("model", "outcome"))
        self.load_duration = r.histogram("mullama_model_load_duration_seconds", "Time a model load took.",
                                         ("model",), buckets=LOAD_BUCKETS, unit="seconds")
        self.evictions = r.counter("mullama_model_evictions", "Models unloaded, by reason (expired, room, reload, "
                                   "unload, shutdown).", ("model", "reason"))
        self.eviction_duration = r.histogram("mullama_model_eviction_duration_seconds",
                                             "Time freeing an unloaded model took.", ("model",),
                                             buckets=LOAD_BUCKETS, unit="seconds")
        self.pulls = r.counter("mullama_pulls", "Model pulls, by outcome (ok or error).", ("outcome",))
        self.pull_bytes = r.counter("mullama_pull_bytes", "Bytes downloaded by pulls.", unit="bytes")
        r.add_collector(self._model_families)
        r.add_collector(process_families)
        r.add_collector(self._build_family)

    # --- recording (the request path) ---------------------------------------------

    def request_started(self, api: str) -> None:
        """A request of ``api`` began (pair with :meth:`request_finished`)."""
        self.in_flight.labels(api).inc()

    def request_finished(self, api: str, route: str, model: str, status: int, key: str, duration: float) -> None:
        """A request ended with ``status`` after ``duration`` seconds."""
        self.in_flight.labels(api).dec()
        self.requests.labels(api, route, model, status, key).inc()
        self.request_duration.labels(api, model).observe(duration)

    def tokens(self, api: str, model: str, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        """Tokens a request read and generated."""
        if prompt_tokens:
            self.prompt_tokens.labels(api, model, key).inc(prompt_tokens)
        if generated_tokens:
            self.generated_tokens.labels(api, model, key).inc(generated_tokens)

    def generation(self, api: str, model: str, *, queue_wait: float | None, time_to_first_token: float | None,
                   decode_seconds: float, generated_tokens: int) -> None:
        """One generation's times (seconds); ``decode_seconds`` is the time after its first token."""
        if queue_wait is not None:
            self.queue_wait.labels(model).observe(queue_wait)
        if time_to_first_token is not None:
            self.time_to_first_token.labels(api, model).observe(time_to_first_token)
        if generated_tokens > 1:
            self.time_per_output_token.labels(model).observe(decode_seconds / (generated_tokens - 1),
                                                             generated_tokens - 1)

    def model_loaded(self, model: str, seconds: float, ok: bool = True) -> None:
        """A load of ``model`` finished (or failed) after ``seconds``."""
        self.loads.labels(model, "ok" if ok else "error").inc()
        if ok:
            self.load_duration.labels(model).observe(seconds)

    @contextmanager
    def loading(self, model: str) -> Iterator[None]:
        """Time the load of ``model`` the block does: ``ok`` when it returns, ``error`` when it raises."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.model_loaded(model, time.monotonic() - started, ok=False)
            raise
        self.model_loaded(model, time.monotonic() - started)

    def model_evicted(self, model: str, reason: str, seconds: float) -> None:
        """``model`` was unloaded for ``reason``; freeing it took ``seconds``."""
        self.evictions.labels(model, reason).inc()
        self.eviction_duration.labels(model).observe(seconds)

    def pull_finished(self, ok: bool) -> None:
        """A pull ended."""
        self.pulls.labels("ok" if ok else "error").inc()

    def pulled(self, size: int) -> None:
        """``size`` more bytes were downloaded."""
        self.pull_bytes.inc(size)

    def counted_pull(self, work: Callable[[Progress], T], emit: Progress) -> T:
        """Run the pull ``work(emit)``, counting its outcome and the bytes its progress events show downloaded.

        A pull reports ``completed`` bytes per ``digest``; the first report of
        a digest is what was there before (a resumed download, a blob already
        held or linked from an Ollama store), each later rise was downloaded.
        """
        seen: dict[str, int] = {}

        def counted(event: dict[str, Any]) -> None:
            digest, completed = event.get("digest"), event.get("completed")
            if isinstance(digest, str) and isinstance(completed, int):
                before = seen.get(digest)
                seen[digest] = completed
                if before is not None and completed > before:
                    self.pulled(completed - before)
            emit(event)

        try:
            result = work(counted)
        except BaseException:
            self.pull_finished(False)
            raise
        self.pull_finished(True)
        return result

    # --- read at scrape time ----------------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) of a scrape: OpenMetrics when ``accept`` prefers it, else the text format."""
        openmetrics = negotiate(accept)
        body = render(self.registry.collect(), openmetrics=openmetrics)
        return body, OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE

    def _model_families(self) -> list[Family]:
        models = list(self._models())
        gauges = (
            ("mullama_model_memory_bytes", "Estimated memory a loaded model takes.", "bytes",
             lambda m: m.memory_bytes),
            ("mullama_slots_busy", "Sequences of a loaded model generating now.", "", lambda m: m.busy_slots),
            ("mullama_slots_free", "Sequences of a loaded model free for a request.", "",
             lambda m: max(0, m.slots - m.busy_slots)),
            ("mullama_queue_depth", "Requests waiting for a free sequence of a loaded model.", "", lambda m: m.queued),
            ("mullama_kv_cache_used_tokens", "Tokens held in a loaded model's KV cache.", "",
             lambda m: m.kv_used_tokens),
            ("mullama_kv_cache_capacity_tokens", "Tokens a loaded model's KV cache holds at most.", "",
             lambda m: m.kv_capacity_tokens),
            ("mullama_kv_cache_usage_ratio", "Share of a loaded model's KV cache in use (0 to 1).", "",
             lambda m: m.kv_used_tokens / m.kv_capacity_tokens if m.kv_capacity_tokens else 0.0),
        )
        families = [Family("mullama_loaded_models", "gauge", "Models loaded now.", "",
                           [Sample("", (), len(models))])]
        for name, help, unit, read in gauges:
            families.append(Family(name, "gauge", help, unit,
                                   [Sample("", (("model", m.name),), read(m)) for m in models]))
        return families

    def _build_family(self) -> list[Family]:
        build = self._build or BuildInfo(__version__, "unknown", "")
        return [info_family("mullama_build", "Mullama's version, the llama.cpp commit and backends it runs.",
                            {"version": build.version, "llama_cpp_commit": build.llama_cpp_commit,
                             "backends": build.backends})]
