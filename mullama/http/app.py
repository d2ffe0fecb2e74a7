"""The composition root of the daemon: the API families on one route table, and the server that runs them.

The transport (:mod:`mullama.http.server`) knows no API; each API family is a
module with ``register(router)`` that adds its routes (and, under its path
prefix, its error body). This module imports every family, builds the one
router with Ollama's error body as the default, puts the daemon's
operations (:mod:`mullama.ops`: keys, limits, metrics, statistics, health)
beside the model registry, and makes, runs and winds down the server. A
family that cannot be imported stops startup with one line naming it: the
daemon never runs with an API silently missing; neither does it run with a
keys or limits file it cannot read.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from mullama import __version__, config
from mullama.client import is_loopback
from mullama.engine.residency import ModelManager, parse_keep_alive
from mullama.errors import ModelNotFoundError, MullamaError
from mullama.http.server import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    Request,
    Router,
    Server,
    parse_address,
)
from mullama.ops import systemd
from mullama.ops.limits import ModelLimits
from mullama.ops.logs import configure_logging
from mullama.ops.operations import Operations
from mullama.store import ollama_store
from mullama.store.pull import pull
from mullama.store.sweep import sweep

log = logging.getLogger("mullama.server")

#: Seconds shutdown waits for requests in flight to write their last line.
SHUTDOWN_GRACE = 5.0
#: glibc's malloc arenas for the whole daemon (glibc's own default is 8 per core).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8


class StartupError(MullamaError):
    """The daemon cannot start: a part of it failed to load."""


def _api(name: str) -> ModuleType:
    """Import the API family ``mullama.http.NAME``; failing to, for whatever reason, is a :class:`StartupError`."""
    module = f"mullama.http.{name}"
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - a syntax slip stops startup as clearly as a missing import
        raise StartupError(f"cannot load {module}, the daemon cannot start without it: "
                           f"{type(error).__name__}: {error}") from error


# Imported here, at load time, so that a broken family fails every use of the daemon at once.
ollama = _api("ollama")
openai = _api("openai")
anthropic = _api("anthropic")
rerank = _api("rerank")
audio = _api("audio")
voice = _api("voice")
webui = _api("webui")
#: Every API family (and the web UI's static files), each a module with ``register(router)``.
API_FAMILIES = (ollama, openai, anthropic, rerank, audio, voice, webui)


def build_router() -> Router:
    """Every API family's routes and the operations routes on one router.

    A path under no family's prefix gets Ollama's error body.
    """
    router = Router(default_error=ollama.error_body)
    for family in API_FAMILIES:
        family.register(router)
    router.add("GET", "/metrics", metrics_route)
    router.add("GET", "/api/stats", stats_route)
    router.add("GET", "/api/status", status_route)
    # llama-server's liveness probe, for the containers and load balancers set up for it.
    router.add("GET", "/health", health_route)
    router.add("GET", "/v1/health", health_route)
    return router


def metrics_route(request: Request) -> None:
    """``GET /metrics``: the application's metrics (see :meth:`Operations.metrics_route`)."""
    request.handler.app.ops.metrics_route(request)


def stats_route(request: Request) -> None:
    """``GET /api/stats``: the application's statistics (see :meth:`Operations.stats_route`)."""
    request.handler.app.ops.stats_route(request)


def status_route(request: Request) -> None:
    """``GET /api/status``: health, loaded models and queue (see :meth:`Operations.status_route`)."""
    request.handler.app.ops.status_route(request)


def health_route(request: Request) -> None:
    """``GET /health``: llama-server's liveness answer, ``{"status": "ok"}``; 503 while stopping."""
    request.handler.app.ops.health_route(request)


@dataclass
class App:
    """Everything the handlers share: the model registry, the operations, the routes and the server's settings."""

    manager: ModelManager
    ops: Operations
    router: Router
    loopback: bool = True
    #: Host names accepted beyond localhost and IP addresses (MULLAMA_ALLOWED_HOSTS and this machine's name).
    allowed_hosts: tuple[str, ...] = ()
    extra_origins: tuple[str, ...] = ()
    #: Directories whose GGUF files loopback clients may name as server paths (MULLAMA_ALLOWED_DIRS).
    allowed_dirs: tuple[Path, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    #: Set on shutdown: streams end with an error event, responses close their connection.
    stopping: threading.Event = field(default_factory=threading.Event)
    #: Requests being answered, so shutdown can wait for their last line.
    _active: int = field(default=0, init=False, repr=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Count a request as in flight while the block runs."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still are after ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


def _positive_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    value = parse_keep_alive(text)
    if not value > 0 or math.isinf(value):
        raise ValueError(text)
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


def _directories(text: str) -> tuple[Path, ...]:
    return tuple(Path(item).expanduser().resolve() for item in text.split(os.pathsep) if item.strip())


def make_server(address: str | None = None, manager: ModelManager | None = None) -> Server:
    """A ready-to-serve server on ``address`` (default MULLAMA_HOST/OLLAMA_HOST or 127.0.0.1:11434).

    Raises :class:`MullamaError` for a keys or limits file that cannot be read.
    """
    # Settings first: one that does not parse stops startup before anything is opened.
    host, port = parse_address(address) if address is not None else config.setting("HOST", ("127.0.0.1", 11434),
                                                                                    parse_address)
    origins = tuple(o.strip() for o in (config.env("ORIGINS") or "").split(",") if o.strip())
    allowed_hosts = (*config.setting("ALLOWED_HOSTS", (), _names), socket.gethostname().lower())
    allowed_dirs = config.setting("ALLOWED_DIRS", (), _directories)
    max_body = config.setting("MAX_BODY", DEFAULT_MAX_BODY, _positive_count)
    max_connections = config.setting("MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, _positive_count)
    header_timeout = config.setting("HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT, _seconds)
    body_timeout = config.setting("BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT, _seconds)
    owned = manager is None
    manager = manager or ModelManager()
    stopping = threading.Event()
    try:
        ops = Operations.create(manager, stopping=stopping.is_set)
    except BaseException:
        if owned:
            manager.close()
        raise
    # The registry keeps each model within its limits and counts its loads and evictions.
    manager.limits, manager.metrics = ops.limits.for_model, ops.metrics
    app = App(manager=manager, ops=ops, router=build_router(), loopback=is_loopback(host),
              allowed_hosts=allowed_hosts, extra_origins=origins, allowed_dirs=allowed_dirs, max_body=max_body,
              max_connections=max_connections, header_timeout=header_timeout, body_timeout=body_timeout,
              stopping=stopping)
    if not app.loopback and not ops.keys.enabled:
        log.warning("listening on %s without MULLAMA_API_KEY or a keys file: ANYONE ON THE NETWORK CAN USE, CREATE "
                    "AND DELETE MODELS on this server", host)
    try:
        return Server((host, port), app)
    except BaseException:
        ops.close()
        raise


def limit_malloc_arenas() -> None:
    """Keep glibc to :data:`MALLOC_ARENAS` arenas, unless ``MALLOC_ARENA_MAX`` says otherwise.

    With a thread per connection, glibc gives threads arenas of their own
    up to 8 per core, and memory freed in one is not reused by another: a
    daemon that has served a few hundred concurrent requests holds tens of
    MiB more than it uses (``bench/soak.py`` measured +10% over 2,000
    requests at 8 arenas, under 5% at 2). Called before any thread starts.
    """
    if sys.platform != "linux" or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no arenas to limit)


def describe_settings(manager: ModelManager) -> str:
    """The settings models load with, in one line for the log (as Ollama logs its server config at start)."""
    defaults = manager.defaults
    flash = {None: "auto", True: "on", False: "off"}[defaults.flash_attention]
    ollama = ollama_store.ollama_root()
    return (f"settings: num_ctx {defaults.num_ctx}{' (automatic)' if manager.automatic_context else ''}, "
            f"num_parallel {defaults.num_parallel}, max loaded models {manager.max_loaded}, max queue "
            f"{manager.max_queue}, keep_alive {parse_keep_alive(None):g}s, load timeout {manager.stall_timeout:g}s, "
            f"KV cache {defaults.kv_cache_type}, flash attention {flash}; Ollama's store "
            f"{ollama if ollama is not None else 'not found'}")


def pin_models(manager: ModelManager, names: Sequence[str]) -> None:
    """Load each of ``names`` now (pulling one the store lacks) and keep it loaded whatever requests say.

    ``mullama serve --model NAME``: the models are pinned as ``limits.json``'s
    ``pinned`` pins, so only an explicit unload or ``mullama stop`` removes
    one, and the next request loads it again, pinned. Raises
    :class:`MullamaError` naming the model that cannot be pulled or loaded.
    """
    pinned: set[str] = set()
    resolutions = []
    for name in names:
        try:
            resolution = manager.resolve(name)
        except ModelNotFoundError:
            log.info("pulling %s", name)
            pull(name, manager.store)
            resolution = manager.resolve(name)
        resolutions.append(resolution)
        pinned.add(resolution.record.name)
    limits = manager.limits

    def pinning(model: str) -> ModelLimits:
        found = limits(model)
        return replace(found, pinned=True) if model in pinned and not found.pinned else found

    manager.limits = pinning
    for resolution in resolutions:
        log.info("loading %s and keeping it loaded (--model)", resolution.record.name)
        with manager.hold(resolution):
            pass


def serve(address: str | None = None, models: Sequence[str] = ()) -> int:
    """Run the daemon in the foreground until SIGINT/SIGTERM; a second signal skips the grace period.

    ``models`` are loaded and pinned before the first request is answered
    (:func:`pin_models`). Under systemd (``NOTIFY_SOCKET``) it reports
    ``READY=1`` once it listens and ``STOPPING=1`` on the first stop
    signal; SIGHUP rereads the limits and keys files without dropping a
    request. Ollama's variables that mean nothing here are named in the log.
    """
    limit_malloc_arenas()
    try:
        configure_logging()
        server = make_server(address)
    except OSError as exc:
        print(f"Error: could not listen: {exc}", file=sys.stderr)
        return 1
    except MullamaError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    app = cast(App, server.app)
    for line in config.ignored_settings():
        log.warning("%s", line)
    swept = sweep(app.manager.store)
    if swept.temporary or swept.unreferenced:
        log.info("removed %d temporary files and %d unreferenced blobs left in the store", swept.temporary,
                 swept.unreferenced)
    try:
        pin_models(app.manager, models)
    except MullamaError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        server.server_close()
        app.manager.close()
        app.ops.close()
        return 1
    host, port = server.server_address[:2]
    log.info("Mullama %s listening on %s:%s (models in %s)", __version__, host, port, app.manager.store.root)
    # Ollama's GPU-based defaults may need a child process to find the GPUs (mullama.engine.gpus): the
    # daemon answers meanwhile, and the first request that needs them waits for the same discovery.
    threading.Thread(target=lambda: log.info("%s", describe_settings(app.manager)), name="mullama-settings",
                     daemon=True).start()
    hurry = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if app.stopping.is_set():
            log.info("received %s again, stopping now", signal.Signals(signum).name)
            hurry.set()
            return
        log.info("received %s, shutting down", signal.Signals(signum).name)
        app.stopping.set()
        systemd.stopping()
        # shutdown() waits for serve_forever to return, so it cannot run in the thread serving.
        threading.Thread(target=server.shutdown, daemon=True).start()

    def reload() -> None:
        systemd.reloading()
        app.ops.reload()
        systemd.ready(f"listening on {host}:{port}")

    def hangup(_signum: int, _frame: Any) -> None:
        log.info("received SIGHUP, rereading the limits and keys files")
        # Off the signal handler: it interrupts the serving thread, which may hold a lock the reload takes.
        threading.Thread(target=reload, name="mullama-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, hangup)
    systemd.ready(f"listening on {host}:{port}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        app.stopping.set()
        wind_down(app, SHUTDOWN_GRACE, hurry)
        server.server_close()
        app.ops.close()
    log.info("stopped")
    return 0


def wind_down(app: App, grace: float, hurry: threading.Event | None = None) -> None:
    """End every generation, give requests in flight up to ``grace`` seconds to finish, then unload all models.

    Generations are cancelled again on each pass, since a request may load
    its model and start generating after the first pass. Connections idle
    between requests are not waited for: their threads are daemons.
    """
    deadline = time.monotonic() + grace
    while True:
        for loaded in app.manager.running():
            loaded.cancel_all()
        if app.wait_idle(0.1):
            break
        if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            log.warning("closing with requests still in flight")
            break
    app.manager.close()
