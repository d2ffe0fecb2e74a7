"""Which models are loaded, for how long, and how they are found.

``ModelRecord`` is what the store says about a model (its GGUF, template,
system prompt, parameters). ``ModelManager`` is the daemon's one registry of
loaded models: it loads on first use, keeps each model for its keep-alive,
evicts the least recently used idle model when ``MULLAMA_MAX_LOADED_MODELS``
would be exceeded, and never unloads a model while it serves a request.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mullama import config
from mullama.engine import LoadOptions, Model
from mullama.errors import BadRequestError, ModelNotFoundError
from mullama.options import Options, parse_options
from mullama.registry import resolve
from mullama.scheduler import Scheduler
from mullama.store import MEDIA_TYPES, Store
from mullama.types import Message

log = logging.getLogger("mullama.models")

#: Ollama's default keep-alive.
DEFAULT_KEEP_ALIVE = 300.0


@dataclass
class ModelRecord:
    """A model as stored: its files and the Modelfile settings layered on it."""

    name: str
    digest: str
    model_path: Path
    projector_path: Path | None = None
    adapters: list[Path] = field(default_factory=list)
    #: A Go template from the Modelfile's TEMPLATE; None means the GGUF's own.
    template: str | None = None
    system: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    size: int = 0
    modified: float = 0.0


def find_model(store: Store, text: str) -> ModelRecord:
    """The record for ``text`` (a name in the store, or a local ``.gguf`` path)."""
    resolved = resolve(text)
    if resolved.path is not None:
        stat = resolved.path.stat()
        return ModelRecord(name=str(resolved.path), digest="", model_path=resolved.path,
                           size=stat.st_size, modified=stat.st_mtime)
    name = resolved.name
    if not store.has_model(name):
        raise ModelNotFoundError(text)
    manifest = store.read_manifest(name)
    entry = next((e for e in store.list_models() if e.name.key == name.key), None)
    record = ModelRecord(name=name.display, digest=entry.digest if entry else "", model_path=Path(),
                         size=manifest.size, modified=entry.modified if entry else 0.0)
    for layer in manifest.layers:
        path = store.layer_path(layer)
        kind = layer.media_type.rsplit(".", 1)[-1]
        if layer.media_type == MEDIA_TYPES["model"]:
            record.model_path = path
        elif kind == "projector":
            record.projector_path = path
        elif kind == "adapter":
            record.adapters.append(path)
        elif kind == "template":
            record.template = path.read_text()
        elif kind == "system":
            record.system = path.read_text()
        elif kind == "params":
            record.parameters = parse_options(json.loads(path.read_text()))
        elif kind == "messages":
            record.messages = [Message(role=m.get("role", ""), content=m.get("content", ""))
                               for m in json.loads(path.read_text())]
        elif kind == "license":
            record.license.append(path.read_text())
    if record.model_path == Path():
        raise BadRequestError(f"{name.display} has no model layer")
    return record


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
    """A model in memory with its scheduler and residency bookkeeping."""

    record: ModelRecord
    model: Model
    scheduler: Scheduler
    load_options: LoadOptions
    keep_alive: float
    expires_at: float = 0.0
    last_used: float = 0.0
    in_use: int = 0

    @property
    def pinned(self) -> bool:
        return self.keep_alive < 0


class ModelManager:
    """The registry of loaded models (the daemon's only shared mutable state)."""

    def __init__(self, store: Store | None = None, *, max_loaded: int | None = None, max_queue: int | None = None) -> None:
        self.store = store or Store()
        self.max_loaded = max_loaded or int(config.env("MAX_LOADED_MODELS") or 3)
        self.max_queue = max_queue or int(config.env("MAX_QUEUE") or 512)
        self.default_parallel = int(config.env("NUM_PARALLEL") or 1)
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Condition()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="mullama-keepalive", daemon=True)
        self._reaper.start()

    # --- public --------------------------------------------------------------

    def record(self, name: str) -> ModelRecord:
        """The stored record of ``name`` (raises ModelNotFoundError)."""
        return find_model(self.store, name)

    @contextmanager
    def use(self, name: str, options: dict[str, Any] | None = None, keep_alive: Any = None) -> Iterator[LoadedModel]:
        """Load ``name`` if needed and hold it for the duration of a request."""
        loaded = self._acquire(name, options or {}, parse_keep_alive(keep_alive))
        try:
            yield loaded
        finally:
            self._release(loaded)

    def options_for(self, record: ModelRecord, request_options: dict[str, Any]) -> Options:
        """The Modelfile's parameters with the request's options over them."""
        defaults = Options(num_parallel=self.default_parallel)
        return defaults.merged(record.parameters, request_options)

    def unload(self, name: str) -> bool:
        """Unload ``name`` as soon as it is idle; True if it was loaded."""
        with self._lock:
            loaded = self._find_loaded(name)
            if loaded is None:
                return False
            loaded.keep_alive = 0
            loaded.expires_at = 0
            if loaded.in_use == 0:
                self._evict(loaded)
            return True

    def stop(self, name: str) -> bool:
        """End every generation of ``name`` and unload it (``mullama stop``)."""
        with self._lock:
            loaded = self._find_loaded(name)
        if loaded is None:
            return False
        loaded.scheduler.cancel_all()
        return self.unload(name)

    def running(self) -> list[LoadedModel]:
        """Loaded models, most recently used first."""
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: m.last_used, reverse=True)

    def close(self) -> None:
        """Cancel everything and free every model (daemon shutdown)."""
        self._closed.set()
        with self._lock:
            for loaded in list(self._loaded.values()):
                loaded.scheduler.cancel_all()
                self._evict(loaded)
            self._lock.notify_all()

    # --- internals -----------------------------------------------------------

    def _find_loaded(self, name: str) -> LoadedModel | None:
        try:
            key = find_model(self.store, name).name
        except (ModelNotFoundError, BadRequestError):
            key = name
        return self._loaded.get(key)

    def _acquire(self, name: str, request_options: dict[str, Any], keep_alive: float) -> LoadedModel:
        record = self.record(name)
        options = self.options_for(record, request_options)
        load_options = LoadOptions.from_options(options)
        with self._lock:
            loaded = self._loaded.get(record.name)
            if loaded is not None and (loaded.load_options != load_options or loaded.record.digest != record.digest):
                # Different context size, parallelism or a re-created model: reload once idle.
                while loaded.in_use and not self._closed.is_set():
                    self._lock.wait(0.5)
                self._evict(loaded)
                loaded = None
            if loaded is None:
                self._make_room()
                loaded = self._load(record, load_options, keep_alive)
            loaded.in_use += 1
            loaded.keep_alive = keep_alive
            loaded.last_used = time.monotonic()
            return loaded

    def _release(self, loaded: LoadedModel) -> None:
        with self._lock:
            loaded.in_use -= 1
            loaded.last_used = time.monotonic()
            loaded.expires_at = time.time() + loaded.keep_alive if loaded.keep_alive >= 0 else float("inf")
            if loaded.in_use == 0 and loaded.keep_alive == 0:
                self._evict(loaded)
            self._lock.notify_all()

    def _load(self, record: ModelRecord, load_options: LoadOptions, keep_alive: float) -> LoadedModel:
        log.info("loading %s (%s, num_ctx=%d, num_parallel=%d)", record.name, record.model_path,
                 load_options.num_ctx, load_options.num_parallel)
        model = Model(record.model_path, load_options)
        loaded = LoadedModel(record=record, model=model, scheduler=Scheduler(model, max_queue=self.max_queue),
                             load_options=load_options, keep_alive=keep_alive)
        self._loaded[record.name] = loaded
        return loaded

    def _make_room(self) -> None:
        """Evict idle models, least recently used first, until one more fits."""
        while len(self._loaded) >= self.max_loaded:
            idle = [m for m in self._loaded.values() if m.in_use == 0 and not m.scheduler.busy]
            if not idle:
                # Every model is serving: wait for one to finish rather than cut a generation.
                self._lock.wait(0.5)
                if self._closed.is_set():
                    return
                continue
            self._evict(min(idle, key=lambda m: m.last_used))

    def _evict(self, loaded: LoadedModel) -> None:
        if self._loaded.get(loaded.record.name) is loaded:
            del self._loaded[loaded.record.name]
        log.info("unloading %s", loaded.record.name)
        loaded.scheduler.close()
        loaded.model.close()

    def _reap(self) -> None:
        """Unload models whose keep-alive ran out."""
        while not self._closed.wait(1.0):
            now = time.time()
            with self._lock:
                for loaded in list(self._loaded.values()):
                    if loaded.in_use == 0 and not loaded.pinned and loaded.expires_at and loaded.expires_at <= now:
                        self._evict(loaded)
