"""The daemon's operations in one object: what the request path calls, and the routes it adds.

The composition root makes one :class:`Operations` next to the model
manager. The HTTP handler wraps each request as::

    record = ops.start(api_of(path), "")                  # counted from here, whatever happens
    identity = ops.authorize(path, headers)              # 401 / 403 / 429 before anything runs
    record.key, record.route = identity.name, route_pattern
    route(request with RequestContext(ops, identity, record, request_id))
    record.status = status
    ops.finish(record)                                     # metrics, statistics, the key's token rate

and the layers below HTTP see only the :class:`RequestContext`: the service
calls :meth:`RequestContext.admit` once the model's name resolves (403 for
a model the key may not use), :meth:`RequestContext.check_queue` before it
queues a generation (429 past the model's ``max_queue``) and hands it each
generation's timings. ``/metrics``, ``/api/stats`` and ``/api/status`` are
:meth:`Operations.metrics_route`, :meth:`Operations.stats_route` and
:meth:`Operations.status_route`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from mullama import __version__
from mullama.errors import BadRequestError, ForbiddenError, OverloadedError, TooManyRequestsError
from mullama.ops.durations import parse_instant
from mullama.ops.keys import Identity, Keyring, KeysFileError
from mullama.ops.limits import Limits, LimitsError
from mullama.ops.metrics import BuildInfo, Metrics, ModelUse, manager_models
from mullama.ops.stats import GROUPS, StatsError, StatsRecord, StatsStore, iso_time

log = logging.getLogger("mullama.ops")

#: Path prefixes of each API, longest first: the ``api`` label of a request.
_API_PREFIXES = (("/v1/messages", "anthropic"), ("/v1/", "openai"), ("/api/", "ollama"))
#: Seconds a generation is assumed to take for a model none has finished on yet (Retry-After).
_FIRST_GUESS = 5.0


def api_of(path: str) -> str:
    """The API family of a request path: ``ollama``, ``openai``, ``anthropic``; ``""`` for others (``/metrics``)."""
    for prefix, api in _API_PREFIXES:
        if path == prefix.rstrip("/") or path.startswith(prefix):
            return api
    return ""


@dataclass
class _Generation:
    queue_wait: float | None
    time_to_first_token: float | None
    decode_seconds: float
    generated_tokens: int


@dataclass
class RequestRecord:
    """What one request did, filled in along the request path and handed to :meth:`Operations.finish`.

    ``api`` is ``ollama``, ``openai`` or ``anthropic`` (``""`` for other
    routes), ``route`` the route's pattern (never the raw path), ``key`` the
    key's name, ``model`` the resolved model name (``""`` until one is).
    """

    api: str
    route: str
    key: str = ""
    model: str = ""
    status: int = 200
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    #: When the first token went out (``time.monotonic``), for streams; see :meth:`first_token`.
    first_token_at: float | None = None
    generations: list[_Generation] = field(default_factory=list)

    def first_token(self) -> None:
        """Mark now as the moment the first generated text went to the client (the first call counts)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def add_timings(self, timings: Any, prompt_tokens: int | None = None) -> None:
        """Count one generation from its :class:`~mullama.engine.model.Timings` (durations in nanoseconds).

        ``prompt_tokens`` is the whole prompt's length when known: the timings
        count only the tokens read, not a prefix reused from the cache.

        Its queue wait is what its total leaves after loading, reading the
        prompt and generating; its time to first token is the mark of
        :meth:`first_token` when there is one, else its total before the
        first generated token.
        """
        prompt = int(timings.prompt_eval_count if prompt_tokens is None else prompt_tokens)
        generated = int(timings.eval_count)
        total, load = int(timings.total_duration), int(timings.load_duration)
        prompt_ns, eval_ns = int(timings.prompt_eval_duration), int(timings.eval_duration)
        self.prompt_tokens += prompt
        self.generated_tokens += generated
        ttft = None
        if generated:
            ttft = (self.first_token_at - self.started if self.first_token_at is not None and not self.generations
                    else (total - eval_ns) / 1e9)
        queue_wait = max(0, total - load - prompt_ns - eval_ns) / 1e9 if total else None
        self.generations.append(_Generation(queue_wait, ttft, eval_ns / 1e9, generated))


@dataclass
class RequestContext:
    """One request as the layers below HTTP see it: who sent it, and the record of what it did.

    The HTTP handler makes one per request and hands it down (``Request.context``,
    then the ``context`` argument of :mod:`mullama.service`); nothing keeps it
    after the request ends.
    """

    ops: "Operations"
    identity: Identity
    record: RequestRecord
    #: The request's id (its ``X-Request-Id``), for log lines.
    request_id: str = ""

    def require(self, scope: str) -> None:
        """403 unless the request's key has ``scope`` (an unload through a generate route needs ``admin``)."""
        self.identity.require(scope)

    def admit(self, model: str) -> None:
        """403 unless the request may use ``model`` (its resolved name); from now on it is the request's model."""
        self.ops.check_model(self.identity, model)
        self.record.model = model

    def check_queue(self, loaded: Any) -> None:
        """429 with a Retry-After when a generation on ``loaded`` would wait beyond the model's ``max_queue``.

        ``loaded`` is a :class:`~mullama.engine.residency.LoadedModel`: its
        ``num_parallel`` sequences and its batcher's active and queued counts.
        """
        batcher = loaded.batcher
        self.ops.check_queue(loaded.record.name, loaded.num_parallel, batcher.active_count, batcher.queued_count)

    def first_token(self) -> None:
        """The first generated text is on its way to the client (later calls change nothing)."""
        self.record.first_token()

    def generated(self, timings: Any, prompt_tokens: int | None = None) -> None:
        """Count a finished generation from its :class:`~mullama.engine.model.Timings` and whole prompt's length."""
        self.record.add_timings(timings, prompt_tokens)

    def embedded(self, prompt_tokens: int) -> None:
        """Count the tokens an embedding request read."""
        self.record.prompt_tokens += prompt_tokens


class Operations:
    """Metrics, statistics, keys and limits of one daemon."""

    def __init__(self, *, metrics: Metrics, keys: Keyring, limits: Limits, stats: StatsStore | None = None,
                 models: Callable[[], list[ModelUse]] = list, stopping: Callable[[], bool] = lambda: False) -> None:
        self.metrics = metrics
        self.keys = keys
        self.limits = limits
        #: None when the statistics database could not be opened (the daemon runs on without it).
        self.stats = stats
        self._models = models
        self._stopping = stopping
        self._started = time.time()
        #: Recent seconds per request of each model (a moving average), to tell a refused request when to retry.
        self._seconds: dict[str, float] = {}
        self._seconds_lock = threading.Lock()

    @classmethod
    def create(cls, manager: Any, stopping: Callable[[], bool] = lambda: False) -> "Operations":
        """The daemon's operations from the environment, over ``manager`` (a ``ModelManager``).

        Raises :class:`KeysFileError` or :class:`LimitsError` for a bad keys
        or limits file: a daemon must not start with access rules it cannot
        read. A statistics database that cannot be opened is logged and
        statistics are off.
        """
        try:
            stats: StatsStore | None = StatsStore.open_default()
        except StatsError as exc:
            log.error("%s; statistics are off", exc.message)
            stats = None

        def models() -> list[ModelUse]:
            return manager_models(manager)

        return cls(metrics=Metrics(models=models, build=BuildInfo.current()), keys=Keyring.from_env(),
                   limits=Limits.from_env(), stats=stats, models=models, stopping=stopping)

    # --- the request path ---------------------------------------------------------------

    def authorize(self, path: str, headers: Any) -> Identity:
        """The identity of a request for ``path``; 401, 403 or 429 (see :meth:`Keyring.authorize`)."""
        return self.keys.authorize(path, headers)

    def check_model(self, identity: Identity, model: str) -> None:
        """403 unless ``identity`` may use ``model``: the key's allowlist and the model's allowed keys."""
        identity.require_model(model)
        if not self.limits.for_model(model).allows_key(identity.name):
            who = f'the key "{identity.name}"' if identity.name else "a request without a key"
            raise ForbiddenError(f'{who} may not use the model "{model}"', param="model")

    def check_queue(self, model: str, slots: int, busy: int, queued: int) -> None:
        """429 when a new generation of ``model`` would wait and ``queued`` already fill its ``max_queue``.

        A request waits when ``busy`` and ``queued`` take all ``slots``; its
        Retry-After is the model's recent time per request for each request
        ahead of it, shared among the slots.
        """
        limit = self.limits.for_model(model).max_queue
        if limit is None or busy + queued < slots or queued < limit:
            return
        with self._seconds_lock:
            seconds = self._seconds.get(model, _FIRST_GUESS)
        wait = seconds * (queued + 1) / max(1, slots)
        raise TooManyRequestsError(f"{model} is busy: {queued} requests already wait for its {slots} sequences "
                                   f"(its max_queue is {limit}); retry later",
                                   retry_after=max(1, math.ceil(wait)))

    def start(self, api: str, route: str, key: str = "") -> RequestRecord:
        """Begin counting a request; hand the record to :meth:`finish` however the request ends."""
        self.metrics.request_started(api)
        return RequestRecord(api, route, key)

    def finish(self, record: RequestRecord) -> None:
        """Count a finished request in metrics and statistics and charge its tokens to its key.

        Statistics are per model: a request that never resolved one (a
        listing, a 404) is counted in metrics only.
        """
        duration = time.monotonic() - record.started
        metrics = self.metrics
        metrics.request_finished(record.api, record.route, record.model, record.status, record.key, duration)
        metrics.tokens(record.api, record.model, record.key, record.prompt_tokens, record.generated_tokens)
        for generation in record.generations:
            metrics.generation(record.api, record.model, queue_wait=generation.queue_wait,
                               time_to_first_token=generation.time_to_first_token,
                               decode_seconds=generation.decode_seconds, generated_tokens=generation.generated_tokens)
        if record.prompt_tokens or record.generated_tokens:
            self.keys.charge(record.key, record.prompt_tokens + record.generated_tokens)
        if record.generations and record.status < 400:
            with self._seconds_lock:
                previous = self._seconds.get(record.model)
                self._seconds[record.model] = duration if previous is None else 0.8 * previous + 0.2 * duration
        if self.stats is not None and record.model:
            self.stats.record(StatsRecord(time.time(), record.model, record.api, record.key, record.status >= 400,
                                          record.prompt_tokens, record.generated_tokens, duration))

    def reload(self) -> bool:
        """Reread the limits and keys files (SIGHUP); a bad file is logged and the old rules stay. True if both read."""
        ok = True
        for name, reload in (("limits", self.limits.reload), ("keys", self.keys.reload)):
            try:
                reload()
            except (LimitsError, KeysFileError) as exc:
                log.error("%s not reloaded: %s", name, exc.message)
                ok = False
        if ok:
            log.info("limits and keys reloaded")
        return ok

    def close(self) -> None:
        """Write the last statistics (daemon shutdown)."""
        if self.stats is not None:
            self.stats.close()

    # --- routes -------------------------------------------------------------------------

    def metrics_route(self, request: Any) -> None:
        """``GET /metrics``: OpenMetrics when the scraper asks for it, else Prometheus's text format."""
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        request.handler.send_bytes(200, body, content_type)

    def stats_route(self, request: Any) -> None:
        """``GET /api/stats?model=&key=&api=&since=24h&until=&by=model``: usage per group, latency percentiles."""
        if self.stats is None:
            raise OverloadedError("statistics are off: the statistics database could not be opened (see the log)")
        query = {name: values[-1] for name, values in parse_qs(request.query).items()}
        now = time.time()
        try:
            since = parse_instant(query.get("since") or "24h", now=now)
            until = parse_instant(query["until"], now=now) if query.get("until") else now
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        by = [name.strip() for name in (query.get("by") or "model").split(",") if name.strip()]
        unknown = [name for name in by if name not in GROUPS]
        if unknown:
            raise BadRequestError(f"cannot group by {unknown[0]!r}; use some of {', '.join(GROUPS)}", param="by")
        rows = self.stats.query(since=since, until=until, model=query.get("model"), api=query.get("api"),
                                key=query.get("key"), by=by)
        total = self.stats.query(since=since, until=until, model=query.get("model"), api=query.get("api"),
                                 key=query.get("key"), by=())
        request.handler.send_json(200, {
            "since": iso_time(since), "until": iso_time(until), "by": by,
            "stats": [row.as_dict() for row in rows],
            "total": total[0].as_dict() if total else None,
        })

    def health_route(self, request: Any) -> None:
        """``GET /health``: ``{"status": "ok"}`` as llama-server answers it, without a key; 503 while stopping."""
        stopping = self._stopping()
        request.handler.send_json(503 if stopping else 200, {"status": "stopping" if stopping else "ok"})

    def status_route(self, request: Any) -> None:
        """``GET /api/status``: health, loaded models with their use and limits, the queue; 503 while stopping."""
        models = self._models()
        stopping = self._stopping()
        request.handler.send_json(503 if stopping else 200, {
            "status": "stopping" if stopping else "ok",
            "version": __version__,
            # Ollama's /api/status body is only this: its cloud, which Mullama does not have.
            "cloud": {"disabled": True, "source": "config"},
            "uptime_seconds": round(time.time() - self._started, 3),
            "queued": sum(m.queued for m in models),
            "models": [{"name": m.name, "memory_bytes": m.memory_bytes, "slots": m.slots, "busy_slots": m.busy_slots,
                        "queued": m.queued, "kv_cache_used_tokens": m.kv_used_tokens,
                        "kv_cache_capacity_tokens": m.kv_capacity_tokens,
                        "limits": self.limits.for_model(m.name).as_dict()} for m in models],
        })

