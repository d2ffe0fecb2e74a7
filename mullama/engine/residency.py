"""Which models are loaded, and for how long.

A request's model name and options are resolved once into a
:class:`Resolution` (the store's record and the merged options), which then
picks the loaded model. ``ModelManager`` is the daemon's one registry of
loaded models: it loads on first use, keeps each model for its keep-alive,
and makes room for a new model by unloading the least recently used idle
ones when its estimated memory (see :mod:`mullama.engine.memory`) would exceed the
budget or ``MULLAMA_MAX_LOADED_MODELS`` would be exceeded. A model serving a
request is never unloaded: a load that needs its room waits for it. Speech
models (whisper.cpp) are loaded, kept and evicted the same way, under the
same budget and model count; they have no batcher, since each transcription
runs on a whisper.cpp state of its own.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from mullama import config
from mullama.engine import memory, probe
from mullama.engine.batching import Batcher
from mullama.engine.memory import Estimate
from mullama.engine.model import LoadOptions, Model
from mullama.engine.rpc import Placement, RpcWorkers
from mullama.errors import (BadRequestError, ModelLoadError, ModelNotFoundError, MullamaError, OverloadedError,
                            RpcWorkerError)
from mullama.engine.reloads import busy_reload_refusal
from mullama.engine.vision import projector_problem
from mullama.ffi import load as load_native
from mullama.options import KV_CACHE_TYPES, MAX_NUM_CTX, Options
from mullama.store.blobs import Store
from mullama.store.records import ModelRecord, find_model
from mullama.ops.limits import ModelLimits
from mullama.ops.metrics import Metrics
from mullama.speech.transcribe import SpeechModel
from mullama.speech.window import speech_window

log = logging.getLogger("mullama.engine.residency")

#: Ollama's default keep-alive.
DEFAULT_KEEP_ALIVE = 300.0
#: How long a load may stall, and wait for busy models to make room (Ollama's OLLAMA_LOAD_TIMEOUT default).
DEFAULT_LOAD_TIMEOUT = 300.0
#: Models loaded at once per GPU (or on a machine without one), as in Ollama.
MODELS_PER_GPU = 3
#: Ollama's default context by total GPU memory: (at least this many bytes, num_ctx), largest first.
#: Its thresholds are 47 and 23 GiB rather than 48 and 24, so a 48 GiB card that reports a little less counts.
CONTEXT_TIERS = ((47 << 30, 262144), (23 << 30, 32768), (0, 4096))


@dataclass(frozen=True)
class Resolution:
    """What one request runs on, worked out once: the model's record and the options merged for it.

    Everything a request needs below the API derives from it: the load
    options that pick (or load) the model, and the sampling options the
    batcher reads from :attr:`options` itself.
    """

    record: ModelRecord
    #: The Modelfile's parameters with the request's options over them, ``num_ctx`` capped.
    options: Options
    #: The load-time part of :attr:`options`; another value needs another load.
    load_options: LoadOptions
    #: ``think`` as the Modelfile or the request's options set it; None when neither does.
    think: bool | None


def parse_keep_alive(value: Any, default: float | None = None) -> float:
    """Seconds to keep a model loaded; negative means forever, 0 means unload now.

    Accepts what Ollama accepts: numbers (seconds) and Go durations
    (``"5m"``, ``"1h30m"``, ``"-1"``, ``"10s"``).
    """
    if value is None or value == "":
        if default is not None:
            return default
        env = config.env("KEEP_ALIVE")
        return parse_keep_alive(env, DEFAULT_KEEP_ALIVE) if env else DEFAULT_KEEP_ALIVE
    if isinstance(value, bool):
        raise BadRequestError("keep_alive must be a duration such as \"5m\" or a number of seconds",
                              param="keep_alive")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * units[u] for n, u in parts)
    raise BadRequestError(f"invalid keep_alive duration {value!r}", param="keep_alive")


@dataclass
class LoadedModel:
    """A model in memory with its batcher and residency bookkeeping.

    A speech model (``record.speech``) is a :class:`SpeechModel` with no
    batcher; everything the manager does with a model goes through the
    methods below, which know both kinds.
    """

    record: ModelRecord
    model: Model | SpeechModel
    #: The text model's batcher; None for a speech model.
    batcher: Batcher | None
    load_options: LoadOptions
    keep_alive: float
    expires_at: float = 0.0
    last_used: float = 0.0
    in_use: int = 0
    #: The memory the model was expected to take when it was loaded.
    estimate: Estimate | None = None
    #: The devices its layers went to, when RPC workers are configured.
    placement: Placement | None = None
    #: True once an RPC worker under it failed: a thread of it is stuck in ggml, so it is never freed.
    stranded: bool = False

    @property
    def pinned(self) -> bool:
        """True for a negative keep-alive: only an explicit unload or stop removes the model."""
        return self.keep_alive < 0

    @property
    def busy(self) -> bool:
        """True while a request holds the model or its batcher has work."""
        return self.in_use > 0 or (self.batcher is not None and self.batcher.busy)

    @property
    def active_count(self) -> int:
        """Requests being served now: generating sequences, or transcriptions running."""
        return self.batcher.active_count if self.batcher is not None else self.model.active_count

    @property
    def queued_count(self) -> int:
        """Requests waiting for a sequence (a speech model queues none: each transcription has its own state)."""
        return self.batcher.queued_count if self.batcher is not None else 0

    def cancel_all(self) -> None:
        """End every generation or transcription running on the model."""
        if self.batcher is not None:
            self.batcher.cancel_all()
        else:
            self.model.cancel_all()

    def close(self) -> None:
        """Free the model (and its batcher)."""
        if self.batcher is not None:
            self.batcher.close()
        self.model.close()

    @property
    def size(self) -> int:
        """Estimated bytes the model occupies (its files' size when not estimated)."""
        return self.estimate.total if self.estimate is not None else self.record.size

    @property
    def size_vram(self) -> int:
        """Estimated bytes in GPU memory: all when every layer is offloaded, the offloaded layers' when some are."""
        if isinstance(self.model, SpeechModel):
            return self.size if self.load_options.num_gpu != 0 and load_native().gpu_devices else 0
        placement = self.model.placement
        if not placement.num_gpu:
            return 0
        if placement.gpu_bytes >= placement.total_bytes:
            return self.size
        return min(self.size, placement.gpu_bytes)

    @property
    def context_length(self) -> int:
        """Tokens of context each sequence has (``num_ctx``)."""
        return self.load_options.num_ctx

    @property
    def num_parallel(self) -> int:
        """Requests the model serves at once."""
        return self.load_options.num_parallel


class ModelManager:
    """The registry of loaded models (the daemon's only shared mutable state).

    One condition guards the registry; loading a model happens outside it,
    so a long load never holds up requests to models already loaded. A load
    in progress reserves its estimated memory and its name, so concurrent
    first requests for one model load it once.
    """

    def __init__(self, store: Store | None = None, *, max_loaded: int | None = None, max_queue: int | None = None,
                 load_timeout: float | None = None) -> None:
        self.store = store or Store()
        # Every setting is read before the GPUs are discovered (which loads llama.cpp and logs its devices), so
        # a bad value stops the daemon with its one line.
        self._max_loaded = max_loaded or config.setting("MAX_LOADED_MODELS", 0, _count)
        self.max_queue = max_queue or config.setting("MAX_QUEUE", 0, _count) or 512
        #: Largest num_ctx any request may ask for; 0 for no cap.
        self.max_context = config.setting("MAX_CONTEXT", 0, _count)
        #: Seconds a load may stall (llama.cpp reporting no progress) before it is given up: Ollama's meaning.
        self.stall_timeout = config.setting("LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT, _load_timeout)
        #: Seconds a load waits for busy models to make room before answering 503 (the same setting by default).
        self.load_timeout = load_timeout if load_timeout is not None else self.stall_timeout
        # Read here so that a bad value stops the daemon at startup, not every request or load that reads it.
        config.setting("KEEP_ALIVE", DEFAULT_KEEP_ALIVE, parse_keep_alive)
        memory.max_memory()
        memory.gpu_memory_limit()
        memory.gpu_overhead()
        _option_settings()
        #: The encoder's window for short audio on speech models (``MULLAMA_SPEECH_WINDOW``).
        self.speech_window = speech_window()
        #: True when num_ctx is Ollama's automatic default (no MULLAMA_/OLLAMA_CONTEXT_LENGTH).
        self.automatic_context = config.setting("CONTEXT_LENGTH", 0, _count) == 0
        #: Operations hooks: a model's limits (``limits.json``) and where loads and evictions are counted.
        #: The daemon's composition root sets its own; the defaults limit nothing and count for no one.
        self.limits: Callable[[str], ModelLimits] = _no_limits
        self.metrics = Metrics()
        self._loaded: dict[str, LoadedModel] = {}
        #: Loads in progress: name to the bytes reserved for it.
        self._loading: dict[str, int] = {}
        self._lock = threading.Condition()
        self._closed = threading.Event()
        #: The RPC workers models are spread over (``MULLAMA_RPC``), or None.
        self.rpc = RpcWorkers.from_env(self._strand)
        self._reaper = threading.Thread(target=self._reap, name="mullama-keepalive", daemon=True)
        self._reaper.start()

    # --- public --------------------------------------------------------------

    @functools.cached_property
    def max_loaded(self) -> int:
        """Models kept loaded at once: ``MAX_LOADED_MODELS``, else Ollama's 3 per GPU (3 without one).

        Found on first use: discovering the GPUs starts a child process
        (:mod:`mullama.engine.gpus`), which a daemon that fails to start need not do.
        """
        return self._max_loaded or MODELS_PER_GPU * max(1, memory.gpu_count())

    @functools.cached_property
    def defaults(self) -> Options:
        """The options every model starts from, before its Modelfile's and a request's (found on first use)."""
        return default_options()

    def resolve(self, name: str, request_options: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> Resolution:
        """The record of ``name`` with the request's options merged over its Modelfile's, once per request.

        ``defaults`` (an API's own, such as OpenAI's temperature) go under the Modelfile's.

        Raises :class:`ModelNotFoundError` for a model the store lacks.
        """
        record = find_model(self.store, name)
        request_options = request_options or {}
        options = self.defaults.merged(defaults or {}, record.parameters, request_options)
        trained = _trained_context(record)
        if trained and options.num_ctx > trained:
            # As Ollama: a context longer than the model was trained for is cut to that length.
            log.debug("num_ctx %d for %s cut to its training context %d", options.num_ctx, record.name, trained)
            options = replace(options, num_ctx=trained)
        if self.automatic_context and "num_ctx" not in record.parameters and "num_ctx" not in request_options:
            options = _fitting(record, options)
        if self.max_context and options.num_ctx > self.max_context:
            log.debug("num_ctx %d for %s capped to %d by MULLAMA_MAX_CONTEXT", options.num_ctx, record.name,
                      self.max_context)
            options = replace(options, num_ctx=self.max_context)
        options = self.limits(record.name).capped(options)
        think = options.think if "think" in record.parameters or "think" in request_options else None
        return Resolution(record, options, LoadOptions.from_options(options), think)

    @contextmanager
    def hold(self, resolution: Resolution, keep_alive: Any = None) -> Iterator[LoadedModel]:
        """Load the resolved model if needed and hold it for the duration of a request.

        Raises :class:`OverloadedError` when busy models leave no room for it
        within the load timeout, :class:`ModelLoadError` when it cannot fit
        even alone.
        """
        loaded = self._acquire(resolution, keep_alive)
        try:
            yield loaded
        finally:
            self._release(loaded)

    def use(self, name: str, options: dict[str, Any] | None = None, keep_alive: Any = None,
            ) -> AbstractContextManager[LoadedModel]:
        """:meth:`resolve` then :meth:`hold`, for a caller that needs only the loaded model."""
        return self.hold(self.resolve(name, options), keep_alive)

    def sees_images(self, record: ModelRecord) -> bool:
        """Whether images work with ``record``: its projector loaded, or (while not loaded) looks loadable."""
        if record.projector_path is None:
            return False
        with self._lock:
            loaded = self._loaded.get(record.name)
        if loaded is not None and loaded.record.digest == record.digest:
            return loaded.model.projector is not None
        return not projector_problem(record.projector_path)

    def unload(self, name: str) -> bool:
        """Unload ``name`` as soon as it is idle; True if it was loaded."""
        key = self._key(name)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                return False
            loaded.keep_alive = 0
            loaded.expires_at = 0
            if loaded.in_use == 0:
                self._evict(loaded)
            return True

    def stop(self, name: str) -> bool:
        """End every generation of ``name`` and unload it (``mullama stop``)."""
        key = self._key(name)
        with self._lock:
            loaded = self._loaded.get(key)
        if loaded is None:
            return False
        loaded.cancel_all()
        return self.unload(name)

    def running(self) -> list[LoadedModel]:
        """Loaded models, most recently used first."""
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: m.last_used, reverse=True)

    def close(self) -> None:
        """Cancel everything and free every model (daemon shutdown).

        A model a request still holds is freed when that request lets go
        of it, never under it.
        """
        self._closed.set()
        with self._lock:
            for loaded in list(self._loaded.values()):
                loaded.cancel_all()
                if loaded.in_use:
                    loaded.keep_alive = 0
                else:
                    self._evict(loaded, "shutdown")
            self._lock.notify_all()
        if self.rpc is not None:
            self.rpc.close()

    # --- internals -----------------------------------------------------------

    def _key(self, name: str) -> str:
        try:
            return find_model(self.store, name).name
        except (ModelNotFoundError, BadRequestError):
            return name

    def _acquire(self, resolution: Resolution, keep_alive: Any) -> LoadedModel:
        record, load_options = resolution.record, resolution.load_options
        limits = self.limits(record.name)
        keep_alive = -1.0 if limits.pinned else parse_keep_alive(keep_alive, limits.keep_alive)
        with self._lock:
            loaded = self._take(record, load_options, keep_alive)
        if loaded is not None:
            return loaded
        need = estimate_record(record, load_options)
        limits.check_memory(record.name, need.total)
        deadline = time.monotonic() + self.load_timeout
        with self._lock:
            while True:
                loaded = self._take(record, load_options, keep_alive)
                if loaded is not None:
                    return loaded
                current = self._loaded.get(record.name)
                if record.name in self._loading:
                    self._wait(deadline, f"{record.name} is still loading after {self.load_timeout:g}s")
                elif current is not None:
                    # Other load options or a re-created model: reload once idle.
                    if current.busy and current.record.digest == record.digest:
                        raise busy_reload_refusal(record.name, current.load_options, load_options)
                    if current.busy:
                        self._wait(deadline, f"{record.name} is busy serving requests with other options "
                                             f"(num_ctx {current.load_options.num_ctx})")
                    else:
                        self._evict(current, "reload")
                else:
                    evict = self._plan_room(record.name, need, load_options)
                    if evict is not None:
                        break
                    self._wait(deadline, self._no_room(record.name, need.total, load_options))
            for idle in evict:
                log.info("unloading %s to make room for %s", idle.record.name, record.name)
                self._evict(idle, "room")
            self._loading[record.name] = need.total
        try:
            return self._load(record, load_options, keep_alive, need)
        finally:
            with self._lock:
                del self._loading[record.name]
                self._lock.notify_all()

    def _take(self, record: ModelRecord, load_options: LoadOptions, keep_alive: float) -> LoadedModel | None:
        """Hold the loaded model if it matches the request (called with the lock held)."""
        if self._closed.is_set():
            raise OverloadedError("the server is shutting down")
        loaded = self._loaded.get(record.name)
        if loaded is None or loaded.load_options != load_options or loaded.record.digest != record.digest:
            return None
        loaded.in_use += 1
        loaded.keep_alive = keep_alive
        loaded.last_used = time.monotonic()
        return loaded

    def _wait(self, deadline: float, reason: str) -> None:
        """Wait for the registry to change; past ``deadline`` raise OverloadedError with ``reason``.

        The wait is short because a batcher finishing its work does not notify.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OverloadedError(reason)
        self._lock.wait(min(remaining, 0.25))

    def _plan_room(self, name: str, need: Estimate, load_options: LoadOptions) -> list[LoadedModel] | None:
        """The idle models to unload, least recently used first, so ``need`` fits; None if it must wait.

        Raises when waiting cannot help: the model is larger than the budget,
        or models pinned by a negative keep-alive hold the room it needs.
        """
        models = list(self._loaded.values())
        used = sum(m.size for m in models) + sum(self._loading.values())
        budget = memory.budget(load_options, in_use=used)
        if need.total > budget:
            raise ModelLoadError(
                f"{name} needs {memory.describe(need.total)} (weights {memory.describe(need.weights)}, KV cache "
                f"{memory.describe(need.kv_cache)} for num_ctx {load_options.num_ctx} x num_parallel "
                f"{load_options.num_parallel}, compute {memory.describe(need.compute)}) but models may use at most "
                f"{memory.describe(budget)} here (MULLAMA_MAX_MEMORY); lower num_ctx or num_parallel")
        pinned = [m for m in models if m.pinned]
        pinned_size = sum(m.size for m in pinned)
        if need.total + pinned_size > budget or len(pinned) >= self.max_loaded:
            raise OverloadedError(
                f"no room to load {name}: {memory.describe(need.total)} needed, but models pinned by keep_alive -1 "
                f"({', '.join(m.record.name for m in pinned)}) hold {memory.describe(pinned_size)} of "
                f"{memory.describe(budget)} and {len(pinned)} of {self.max_loaded} model slots; "
                "unload one (keep_alive 0)")
        free = budget - used
        count = len(models) + len(self._loading)
        evict: list[LoadedModel] = []
        for idle in sorted((m for m in models if not m.pinned and not m.busy), key=lambda m: m.last_used):
            if free >= need.total and count < self.max_loaded:
                break
            evict.append(idle)
            free += idle.size
            count -= 1
        return evict if free >= need.total and count < self.max_loaded else None

    def _no_room(self, name: str, size: int, load_options: LoadOptions) -> str:
        used = sum(m.size for m in self._loaded.values()) + sum(self._loading.values())
        free = memory.budget(load_options, in_use=used) - used
        busy = [m.record.name for m in self._loaded.values() if m.busy] + list(self._loading)
        return (f"no room to load {name}: {memory.describe(size)} needed, {memory.describe(max(0, free))} free, "
                f"{len(self._loaded) + len(self._loading)} of {self.max_loaded} models loaded; "
                f"models busy: {', '.join(busy) or 'none'}; retry later")

    def _release(self, loaded: LoadedModel) -> None:
        with self._lock:
            loaded.in_use -= 1
            loaded.last_used = time.monotonic()
            loaded.expires_at = time.time() + loaded.keep_alive if loaded.keep_alive >= 0 else float("inf")
            if loaded.in_use == 0 and loaded.keep_alive == 0:
                self._evict(loaded, "expired")
            self._lock.notify_all()

    def _load(self, record: ModelRecord, load_options: LoadOptions, keep_alive: float, need: Estimate) -> LoadedModel:
        """Load outside the lock, then register the model already held by its first request."""
        capped = " (the MULLAMA_MAX_CONTEXT cap)" if load_options.num_ctx == self.max_context else ""
        log.info("loading %s (%s, num_ctx=%d%s, num_parallel=%d, about %s)", record.name, record.model_path,
                 load_options.num_ctx, capped, load_options.num_parallel, memory.describe(need.total))
        with self.metrics.loading(record.name):
            placement = self.rpc.placement(load_options.num_gpu) if self.rpc is not None and not record.speech \
                else None
            model, batcher = self._open(record, load_options, placement)
        loaded = LoadedModel(record=record, model=model, batcher=batcher, load_options=load_options,
                             keep_alive=keep_alive, last_used=time.monotonic(), in_use=1, estimate=need,
                             placement=placement)
        with self._lock:
            if self._closed.is_set():
                self._evict(loaded, "shutdown")
                raise OverloadedError("the server is shutting down")
            self._loaded[record.name] = loaded
        return loaded

    def _open(self, record: ModelRecord, load_options: LoadOptions,
              placement: Placement | None) -> tuple[Model | SpeechModel, Batcher | None]:
        """The model of ``record`` in memory (its layers on ``placement``'s devices), with its batcher.

        A speech model has no batcher, and runs on this machine.
        """
        if record.speech:
            # The file is validated in Python before whisper.cpp reads it (see mullama.speech.model_file).
            return SpeechModel(record.model_path, num_thread=load_options.num_thread or None,
                               use_gpu=load_options.num_gpu != 0, window=self.speech_window), None
        # A file that aborts llama.cpp kills a child, not the daemon.
        probe.verify(record.model_paths, record.digest, self.stall_timeout)
        if record.draft_path is not None:
            # A blob's name is its digest.
            probe.verify([record.draft_path], record.draft_path.name, self.stall_timeout)
        model = Model(record.model_paths, load_options, adapters=record.adapters, projector=record.projector_path,
                      stall_timeout=self.stall_timeout, devices=placement.devices if placement is not None else None,
                      draft=record.draft_path)
        try:
            return model, Batcher(model, max_queue=self.max_queue)
        except BaseException:
            model.close()
            raise

    def _evict(self, loaded: LoadedModel, reason: str = "unload") -> None:
        if self._loaded.get(loaded.record.name) is loaded:
            del self._loaded[loaded.record.name]
        if loaded.stranded:
            return
        log.info("unloading %s", loaded.record.name)
        started = time.monotonic()
        loaded.close()
        self.metrics.model_evicted(loaded.record.name, reason, time.monotonic() - started)
        self._lock.notify_all()

    def _strand(self, endpoints: frozenset[str], error: RpcWorkerError) -> None:
        """Fail and drop every model with layers on the failed RPC workers ``endpoints``, without freeing them."""
        with self._lock:
            victims = [loaded for loaded in self._loaded.values()
                       if loaded.placement is not None and loaded.placement.endpoints & endpoints]
            for loaded in victims:
                loaded.stranded = True
                del self._loaded[loaded.record.name]
            self._lock.notify_all()
        for loaded in victims:
            log.error("%s had layers on the failed RPC worker: unloaded (its memory stays taken)", loaded.record.name)
            loaded.batcher.strand(error)
            self.metrics.model_evicted(loaded.record.name, "rpc_failure", 0.0)

    def _reap(self) -> None:
        """Unload models whose keep-alive ran out."""
        while not self._closed.wait(1.0):
            now = time.time()
            with self._lock:
                for loaded in list(self._loaded.values()):
                    if not loaded.busy and not loaded.pinned and loaded.expires_at and loaded.expires_at <= now:
                        self._evict(loaded, "expired")


def _no_limits(name: str) -> ModelLimits:
    """The limits of every model outside the daemon: none."""
    return ModelLimits()


def estimate_record(record: ModelRecord, load_options: LoadOptions) -> Estimate:
    """The memory ``record``'s GGUF (all its parts) takes with ``load_options``.

    Its projector's weights are included, and its draft model (loaded with
    the same options, so with a KV cache of its own) whole.
    """
    if record.speech:
        return memory.estimate_speech(record.whisper, load_options)
    first, *rest = record.headers()
    need = memory.estimate(first, load_options, parts=rest)
    if record.projector_path is not None:
        projector = sum(t.nbytes for t in record.read_header(record.projector_path).tensors)
        need = replace(need, weights=need.weights + projector)
    if record.draft_path is not None:
        draft = memory.estimate(record.read_header(record.draft_path), load_options)
        need = Estimate(weights=need.weights + draft.weights, kv_cache=need.kv_cache + draft.kv_cache,
                        compute=need.compute + draft.compute)
    return need


def default_options() -> Options:
    """Ollama's options with the environment's defaults over them.

    ``num_ctx`` is ``MULLAMA_CONTEXT_LENGTH``/``OLLAMA_CONTEXT_LENGTH``, else
    Ollama's rule: 4096, 32768 or 262144 tokens by the GPUs' total memory
    (less ``GPU_OVERHEAD`` each); ``NUM_PARALLEL``, ``FLASH_ATTENTION`` and
    ``KV_CACHE_TYPE`` set what their names say. Raises
    :class:`~mullama.config.SettingError` for a value that does not parse.
    """
    context_length, num_parallel, flash_attention, kv_cache_type = _option_settings()
    # Last: the automatic rule discovers the GPUs, after every value was checked.
    num_ctx = context_length or automatic_context(memory.gpu_memory())
    return Options(num_ctx=min(num_ctx, MAX_NUM_CTX), num_parallel=num_parallel, flash_attention=flash_attention,
                   kv_cache_type=kv_cache_type)


def _option_settings() -> tuple[int, int, bool | None, str]:
    """The settings :func:`default_options` reads, checked: context length (0: automatic), parallel, FA, KV type."""
    return (config.setting("CONTEXT_LENGTH", 0, _count), config.setting("NUM_PARALLEL", 0, _count) or 1,
            config.optional_flag("FLASH_ATTENTION"), config.setting("KV_CACHE_TYPE", "f16", _kv_cache_type))


def automatic_context(gpu_bytes: int) -> int:
    """Ollama's default ``num_ctx`` for GPUs with ``gpu_bytes`` of memory in all (0 for none)."""
    return next(num_ctx for least, num_ctx in CONTEXT_TIERS if gpu_bytes >= least)


def _fitting(record: ModelRecord, options: Options) -> Options:
    """``options`` with an automatic ``num_ctx`` lowered a tier at a time while the model does not fit, as in Ollama."""
    lower = [num_ctx for _, num_ctx in CONTEXT_TIERS if num_ctx < options.num_ctx]
    for num_ctx in lower:
        load_options = LoadOptions.from_options(options)
        try:
            if estimate_record(record, load_options).total <= memory.budget(load_options):
                return options
        except (MullamaError, OSError):
            return options
        options = replace(options, num_ctx=num_ctx)
    return options


def _trained_context(record: ModelRecord) -> int:
    """The context ``record``'s model was trained with; 0 when its header does not say or cannot be read."""
    try:
        return record.info.context_length or 0
    except (MullamaError, OSError):
        return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _kv_cache_type(text: str) -> str:
    value = text.lower()
    if value not in KV_CACHE_TYPES:
        raise ValueError(f"use one of {', '.join(KV_CACHE_TYPES)}")
    return value


def _load_timeout(text: str) -> float:
    """Ollama's rule: a duration or seconds, 0 or negative meaning no limit."""
    value = parse_keep_alive(text)
    return value if value > 0 else math.inf
