"""The daemon: one ``ThreadingHTTPServer`` serving the Ollama, OpenAI and Anthropic APIs.

A request enters in :class:`Handler`, passes the safety checks (Host header,
API key, CORS, body size), and is routed to a function of one API module
(``ollama``, ``openai``, ``anthropic``). Those modules translate wire formats
into :mod:`mullama.service` calls; errors raised anywhere become the error body
of the API family the request came through.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from mullama import __version__, config
from mullama.errors import (
    BadRequestError,
    ForbiddenError,
    MullamaError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from mullama.engine.residency import ModelManager

log = logging.getLogger("mullama.server")

DEFAULT_PORT = 11434
#: Bodies above this are refused (blob uploads stream to disk and are exempt).
DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: Seconds shutdown waits for requests in flight to write their last line.
SHUTDOWN_GRACE = 5.0
#: An unread body up to this size is skipped to keep the connection; a bigger one closes it.
_DRAIN_LIMIT = 1024 * 1024
_DEFAULT_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
_DEFAULT_ORIGIN_SCHEMES = ("app://", "file://", "tauri://", "vscode-webview://", "vscode-file://")


@dataclass
class Request:
    """What a route function receives."""

    method: str
    path: str
    query: str
    headers: Any
    handler: "Handler"
    params: dict[str, str] = field(default_factory=dict)
    _body: bytes | None = None

    def body(self) -> bytes:
        """The whole body (at most the configured limit)."""
        if self._body is None:
            self._body = self.handler.read_body()
        return self._body

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; 400 when it is not one."""
        raw = self.body()
        if not raw.strip():
            raise BadRequestError("missing request body")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadRequestError(f"invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadRequestError("the request body must be a JSON object")
        return value


Route = Callable[[Request], None]
ErrorFormatter = Callable[[MullamaError], dict[str, Any]]


@dataclass
class Router:
    """Routes by method and path pattern; each API family registers its own."""

    routes: list[tuple[str, re.Pattern[str], Route]] = field(default_factory=list)
    #: (path prefix, error formatter), longest prefix wins.
    error_formats: list[tuple[str, ErrorFormatter]] = field(default_factory=list)

    def add(self, method: str, pattern: str, route: Route) -> None:
        """Route ``method`` on ``pattern``: ``{name}`` captures one path segment, ``{name...}`` the rest."""
        regex = re.compile("^" + re.sub(r"\{(\w+)(\.\.\.)?\}",
                                        lambda m: f"(?P<{m[1]}>{'.+' if m[2] else '[^/]+'})", pattern) + "$")
        self.routes.append((method, regex, route))

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, path parameters, whether the path exists under another method)."""
        path_known = False
        for route_method, regex, route in self.routes:
            found = regex.match(path)
            if found:
                path_known = True
                if route_method == method:
                    return route, found.groupdict(), True
        return None, {}, path_known

    def error_body(self, path: str, error: MullamaError) -> dict[str, Any]:
        best = ""
        formatter: ErrorFormatter = ollama_error
        for prefix, candidate in self.error_formats:
            if path.startswith(prefix) and len(prefix) > len(best):
                best, formatter = prefix, candidate
        return formatter(error)


def ollama_error(error: MullamaError) -> dict[str, Any]:
    """Ollama's error body: ``{"error": "..."}``."""
    return {"error": error.message}


@dataclass
class App:
    """Everything the handlers share: the model registry and the server's settings."""

    manager: ModelManager
    router: Router
    api_key: str | None = None
    loopback: bool = True
    extra_origins: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    #: Set on shutdown: streaming responses end with an error message.
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


class Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 with keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "mullama/" + __version__
    #: Streams write one small chunk per token: Nagle's algorithm would hold each
    #: one back until the previous is acknowledged (up to a delayed-ACK timeout).
    disable_nagle_algorithm = True
    #: Seconds a socket read or write may stall: a client that sends half a body
    #: (or stops reading a stream) must not hold a thread forever.
    timeout = 300
    app: App  # set on the subclass made by make_server

    # --- entry points ------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_OPTIONS(self) -> None:
        origin = self.headers.get("Origin")
        self.send_response(HTTPStatus.NO_CONTENT)
        if origin and self._origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, HEAD, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", self.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type, x-api-key, anthropic-version"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # --- dispatch ----------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        # Whether the connection ends is decided by the response's own headers
        # (``Connection: close`` once stopping, see _common_headers): deciding it
        # after the response went out would drop a connection the client was
        # told it could reuse.
        with self.app.answering():
            self._answer(method)

    def _answer(self, method: str) -> None:
        self._started_response = False
        self._body_read = False
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        try:
            self._check_host()
            route, params, known = self.app.router.match(method, path)
            if route is None:
                if known:
                    raise MethodNotAllowed(f"method {method} not allowed for {path}")
                raise NotFoundError(f"404 page not found: {path}")
            if path != "/":
                self._check_api_key()
            route(Request(method, path, split.query, self.headers, self, params))
        except MullamaError as error:
            self._fail(path, error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - the client gets a clean 500, the log gets the traceback
            log.error("unexpected error on %s %s\n%s", method, path, traceback.format_exc())
            self._fail(path, MullamaError("internal server error"))
        self._skip_unread_body()

    def _skip_unread_body(self) -> None:
        """Drain a small body the route did not read, so keep-alive stays in step; close on a big one."""
        if self._body_read or self.close_connection:
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        if chunked or not 0 <= length <= _DRAIN_LIMIT:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _fail(self, path: str, error: MullamaError) -> None:
        if error.status >= 500:
            log.warning("%s: %s", path, error.message)
        if self._started_response:
            # Headers are gone: the streaming route reports errors in-stream; just close.
            self.close_connection = True
            return
        self.send_json(error.status, self.app.router.error_body(path, error))

    # --- safety ------------------------------------------------------------

    def _check_host(self) -> None:
        """When bound to loopback, refuse Host headers naming another machine (DNS rebinding)."""
        if not self.app.loopback:
            return
        host = self.headers.get("Host", "")
        if not host_allowed(host):
            raise ForbiddenError(f"forbidden host {host!r}")

    def _check_api_key(self) -> None:
        key = self.app.api_key
        if not key:
            return
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else self.headers.get("x-api-key", "")
        if not given or not _constant_time_equal(given, key):
            raise UnauthorizedError("invalid or missing API key")

    def _origin_allowed(self, origin: str) -> bool:
        return origin_allowed(origin, self.app.extra_origins)

    # --- bodies ------------------------------------------------------------

    def read_body(self, limit: int | None = None) -> bytes:
        """Read the request body, refusing more than ``limit`` bytes."""
        limit = self.app.max_body if limit is None else limit
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequestError("invalid Content-Length") from None
        if length < 0:
            raise BadRequestError("invalid Content-Length")
        if length > limit:
            self.close_connection = True
            raise PayloadTooLargeError(f"request body of {length} bytes exceeds the limit of {limit}")
        self._body_read = True
        return self.rfile.read(length)

    def body_chunks(self) -> Iterable[bytes]:
        """The body in pieces, without a size limit (blob uploads)."""
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            yield self._read_chunked(sys.maxsize)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            block = self.rfile.read(min(remaining, 1 << 20))
            if not block:
                raise BadRequestError("the upload ended early")
            remaining -= len(block)
            yield block

    def _read_chunked(self, limit: int) -> bytes:
        data = bytearray()
        self._body_read = True
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                raise BadRequestError("malformed chunked body")
            if size == 0:
                self.rfile.readline(1024)
                return bytes(data)
            if len(data) + size > limit:
                self.close_connection = True
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            data += self.rfile.read(size)
            self.rfile.readline(1024)

    # --- responses ---------------------------------------------------------

    def _common_headers(self) -> None:
        if self.app.stopping.is_set():
            # Keep-alive ends with the server: the client must not send this connection another request.
            self.send_header("Connection", "close")
        origin = self.headers.get("Origin")
        if origin and self._origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """A complete response with a known length."""
        self._started_response = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8",
                        headers)

    def start_stream(self, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Begin a chunked response; follow with :meth:`write_chunk` and :meth:`end_stream`."""
        self._started_response = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        """Send one chunk and flush it (one per token when streaming)."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class MethodNotAllowed(MullamaError):
    """A known path asked with a method it does not take."""

    status = 405
    kind = "invalid_request_error"


def _constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def host_allowed(host: str) -> bool:
    """Ollama's rule for the Host header of a loopback-bound server."""
    if not host:
        return True
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.lower().rstrip(".")
    if name in ("localhost", socket.gethostname().lower()) or name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def origin_allowed(origin: str, extra: tuple[str, ...]) -> bool:
    """Ollama's default CORS origins plus ``MULLAMA_ORIGINS``/``OLLAMA_ORIGINS`` (``*`` wildcards)."""
    if origin.startswith(_DEFAULT_ORIGIN_SCHEMES):
        return True
    split = urlsplit(origin)
    netloc_host = split.netloc.rsplit(":", 1)[0] if not split.netloc.startswith("[") else split.netloc.split("]")[0] + "]"
    if split.scheme in ("http", "https") and netloc_host in _DEFAULT_ORIGIN_HOSTS:
        return True
    for pattern in extra:
        regex = "^" + re.escape(pattern).replace(r"\*", ".*") + "$"
        if re.match(regex, origin):
            return True
    return False


def parse_address(value: str | None) -> tuple[str, int]:
    """``host``, ``host:port``, ``:port`` or ``http://host:port`` → (host, port), as Ollama reads OLLAMA_HOST."""
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    text = value.strip()
    if "://" in text:
        split = urlsplit(text)
        host, port = split.hostname or "127.0.0.1", split.port
        if port is None:
            port = {"http": 80, "https": 443}.get(split.scheme, DEFAULT_PORT) if split.netloc.endswith(":") else DEFAULT_PORT
        return host, port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:] else DEFAULT_PORT
    if text.count(":") == 1:
        host, port_text = text.split(":")
        try:
            port = int(port_text) if port_text else DEFAULT_PORT
        except ValueError:
            raise BadRequestError(f"invalid port in {value!r}") from None
        return host or "0.0.0.0", port
    return text, DEFAULT_PORT


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_router() -> Router:
    """Every API family's routes on one router."""
    from mullama.http import ollama, webui

    router = Router()
    ollama.register(router)
    webui.register(router)
    for module_name in ("openai", "anthropic"):
        try:
            module = __import__(f"mullama.http.{module_name}", fromlist=["register"])
        except ImportError:
            continue
        module.register(router)
    return router


class Server(ThreadingHTTPServer):
    """The HTTP server; request threads are daemons so shutdown never waits on a stuck client."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of clients
    # (eight agents starting at once), which then wait a full second to retry.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        handler = type("BoundHandler", (Handler,), {"app": app})
        super().__init__(address, handler)
        self.app = app


def make_server(address: str | None = None, manager: ModelManager | None = None) -> Server:
    """A ready-to-serve server on ``address`` (default MULLAMA_HOST/OLLAMA_HOST or 127.0.0.1:11434)."""
    host, port = parse_address(address if address is not None else config.env("HOST"))
    origins = tuple(o.strip() for o in (config.env("ORIGINS") or "").split(",") if o.strip())
    app = App(manager=manager or ModelManager(), router=build_router(),
              api_key=os.environ.get("MULLAMA_API_KEY") or None, loopback=is_loopback(host),
              extra_origins=origins,
              max_body=int(os.environ.get("MULLAMA_MAX_BODY") or DEFAULT_MAX_BODY))
    if not app.loopback and not app.api_key:
        log.warning("listening on %s without MULLAMA_API_KEY: ANYONE ON THE NETWORK CAN USE, CREATE AND DELETE "
                    "MODELS on this server", host)
    return Server((host, port), app)


def serve(address: str | None = None) -> int:
    """Run the daemon in the foreground until SIGINT/SIGTERM; a second signal skips the grace period."""
    logging.basicConfig(level=logging.DEBUG if os.environ.get("MULLAMA_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    if not os.environ.get("MULLAMA_DEBUG"):
        logging.getLogger("mullama.native").setLevel(logging.WARNING)
    try:
        server = make_server(address)
    except OSError as exc:
        print(f"Error: could not listen: {exc}", file=sys.stderr)
        return 1
    except MullamaError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    log.info("Mullama %s listening on %s:%s (models in %s)", __version__, host, port, server.app.manager.store.root)
    hurry = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if server.app.stopping.is_set():
            log.info("received %s again, stopping now", signal.Signals(signum).name)
            hurry.set()
            return
        log.info("received %s, shutting down", signal.Signals(signum).name)
        server.app.stopping.set()
        # shutdown() waits for serve_forever to return, so it cannot run in the thread serving.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.app.stopping.set()
        wind_down(server.app, SHUTDOWN_GRACE, hurry)
        server.server_close()
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
            loaded.batcher.cancel_all()
        if app.wait_idle(0.1):
            break
        if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            log.warning("closing with requests still in flight")
            break
    app.manager.close()
