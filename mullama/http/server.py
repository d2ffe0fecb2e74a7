"""The transport: one ``ThreadingHTTPServer`` and the handler of its connections.

A request enters in :class:`Handler`, passes the safety checks (Host header,
API key and its scope, CORS, body size), and is routed by the :class:`Router`
to a route function that some module registered; the application's
operations (:mod:`mullama.ops`) give it an id, count it and log it. This
module knows no API family: the composition root (:mod:`mullama.http.app`) gives the server its application,
whose router holds the routes and the error formatters, so an error raised
anywhere becomes the error body of the API family its path belongs to.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from mullama import __version__
from mullama.errors import (
    BadRequestError,
    ForbiddenError,
    MullamaError,
    NotFoundError,
    PayloadTooLargeError,
    TooManyRequestsError,
)
from mullama.ops.logs import request_id
from mullama.ops.operations import Operations, RequestContext, RequestRecord, api_of

log = logging.getLogger("mullama.server")

DEFAULT_PORT = 11434
#: Bodies above this are refused (blob uploads stream to disk and are exempt).
DEFAULT_MAX_BODY = 64 * 1024 * 1024
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
    #: Who sent the request and what it did, for the layers below (see :mod:`mullama.ops.operations`).
    context: RequestContext | None = None
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


@dataclass(frozen=True)
class RouteMatch:
    """What the router found for a request: the route (None when none), its pattern and path parameters."""

    route: Route | None
    #: The pattern the route was registered with (``/api/blobs/{digest}``), never the raw path; "" when none.
    pattern: str = ""
    params: dict[str, str] = field(default_factory=dict)
    #: Whether the path exists under another method (405 rather than 404).
    path_known: bool = False


@dataclass
class Router:
    """Routes by method and path pattern; each API family registers its routes and its error body."""

    #: The error body of a path under no registered prefix.
    default_error: ErrorFormatter
    routes: list[tuple[str, str, re.Pattern[str], Route]] = field(default_factory=list)
    #: (path prefix, error formatter), longest prefix wins.
    error_formats: list[tuple[str, ErrorFormatter]] = field(default_factory=list)

    def add(self, method: str, pattern: str, route: Route) -> None:
        """Route ``method`` on ``pattern``: ``{name}`` captures one path segment, ``{name...}`` the rest."""
        regex = re.compile("^" + re.sub(r"\{(\w+)(\.\.\.)?\}",
                                        lambda m: f"(?P<{m[1]}>{'.+' if m[2] else '[^/]+'})", pattern) + "$")
        self.routes.append((method, pattern, regex, route))

    def add_error_format(self, prefix: str, formatter: ErrorFormatter) -> None:
        """Report the errors of paths under ``prefix`` with ``formatter``."""
        self.error_formats.append((prefix, formatter))

    def match(self, method: str, path: str) -> RouteMatch:
        """The route of ``method`` on ``path``, with its pattern and path parameters."""
        path_known = False
        for route_method, pattern, regex, route in self.routes:
            found = regex.match(path)
            if found:
                path_known = True
                if route_method == method:
                    return RouteMatch(route, pattern, found.groupdict(), True)
        return RouteMatch(None, path_known=path_known)

    def error_body(self, path: str, error: MullamaError) -> dict[str, Any]:
        """``error`` as the body of the API family ``path`` belongs to."""
        best = ""
        formatter = self.default_error
        for prefix, candidate in self.error_formats:
            if path.startswith(prefix) and len(prefix) > len(best):
                best, formatter = prefix, candidate
        return formatter(error)


class Application(Protocol):
    """What the transport needs of the application it serves (:class:`mullama.http.app.App` is the one).

    Route functions reach the whole application as ``request.handler.app``.
    """

    router: Router
    #: Keys, metrics, statistics and limits: every request passes through them.
    ops: Operations
    #: Bound to loopback: Host headers naming another machine are refused.
    loopback: bool
    #: CORS origins allowed beyond Ollama's defaults (``*`` wildcards).
    extra_origins: tuple[str, ...]
    max_body: int
    #: Set on shutdown: every response closes its connection.
    stopping: threading.Event

    def answering(self) -> AbstractContextManager[None]:
        """Count a request as in flight while the block runs."""


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
    #: Set by socketserver for each connection.
    server: Server

    @property
    def app(self) -> Any:
        """The application of this connection's server.

        An :class:`Application`, typed loosely: route functions also reach
        what the transport does not know of it (the model registry).
        """
        return self.server.app

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

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing: :meth:`_answer` logs each request once it ends, with its id, duration and model."""

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
        self._status = 0
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        # Operations: an id echoed in X-Request-Id, the key and its scope checked before the path is
        # (no probing which routes exist without a key), the request counted and logged however it ends.
        self._request_id = request_id(self.headers.get("X-Request-Id"))
        ops: Operations = self.app.ops
        record = ops.start(api_of(path), "")
        try:
            self._check_host()
            match = self.app.router.match(method, path)
            identity = ops.authorize(path, self.headers) if match.route else ops.keys.authenticate(self.headers)
            record.key, record.route = identity.name, match.pattern
            if match.route is None:
                if match.path_known:
                    raise MethodNotAllowed(f"method {method} not allowed for {path}")
                raise NotFoundError(f"404 page not found: {path}")
            context = RequestContext(ops, identity, record, self._request_id)
            match.route(Request(method, path, split.query, self.headers, self, match.params, context))
        except MullamaError as error:
            self._fail(path, error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - the client gets a clean 500, the log gets the traceback
            log.error("unexpected error on %s %s\n%s", method, path, traceback.format_exc())
            self._fail(path, MullamaError("internal server error"))
        finally:
            self._finish(method, path, record)
        self._skip_unread_body()

    def _finish(self, method: str, path: str, record: RequestRecord) -> None:
        """Count the request and write its log line (499 when the client left before any answer)."""
        record.status = self._status or 499
        self.app.ops.finish(record)
        seconds = time.monotonic() - record.started
        log.info("%s %s %s %d %.3fs", self.address_string(), method, path, record.status, seconds, extra={"fields": {
            "request_id": self._request_id, "client": self.address_string(), "method": method, "path": path,
            "status": record.status, "duration_seconds": round(seconds, 6), "api": record.api, "route": record.route,
            "model": record.model, "key": record.key, "prompt_tokens": record.prompt_tokens,
            "generated_tokens": record.generated_tokens}})

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
        # Retry-After is read by the OpenAI and Anthropic SDKs (and any HTTP client) to pace retries.
        retry = {"Retry-After": str(error.retry_after)} if isinstance(error, TooManyRequestsError) else None
        self.send_json(error.status, self.app.router.error_body(path, error), retry)

    # --- safety ------------------------------------------------------------

    def _check_host(self) -> None:
        """When bound to loopback, refuse Host headers naming another machine (DNS rebinding)."""
        if not self.app.loopback:
            return
        host = self.headers.get("Host", "")
        if not host_allowed(host):
            raise ForbiddenError(f"forbidden host {host!r}")

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
        self.send_header("X-Request-Id", self._request_id)
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
        self._status = status
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
        """A complete JSON response."""
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8",
                        headers)

    def start_stream(self, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Begin a chunked response; follow with :meth:`write_chunk` and :meth:`end_stream`."""
        self._started_response = True
        self._status = 200
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()

    def stream_failed(self, status: int) -> None:
        """The stream begun with a 200 ends with an error event: the request is counted and logged with ``status``."""
        self._status = status

    def write_chunk(self, data: bytes) -> None:
        """Send one chunk and flush it (one per token when streaming)."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_stream(self) -> None:
        """End a chunked response begun by :meth:`start_stream`."""
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class MethodNotAllowed(MullamaError):
    """A known path asked with a method it does not take."""

    status = 405
    kind = "invalid_request_error"


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
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    """The HTTP server; request threads are daemons so shutdown never waits on a stuck client."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of clients
    # (eight agents starting at once), which then wait a full second to retry.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Application) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        #: What every handler reaches as ``self.server.app``.
        self.app = app
        super().__init__(address, Handler)
