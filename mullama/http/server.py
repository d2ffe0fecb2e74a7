"""The transport: one ``ThreadingHTTPServer`` and the handler of its connections.

A request enters in :class:`Handler`, passes the safety checks (framing,
Host header, Origin, API key and its scope, content type, body size), and is
routed by the :class:`Router` to a route function that some module
registered; the application's operations (:mod:`mullama.ops`) give it an id,
count it and log it. This module knows no API family: the composition root
(:mod:`mullama.http.app`) gives the server its application,
whose router holds the routes and the error formatters, so an error raised
anywhere becomes the error body of the API family its path belongs to.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from mullama import __version__
from mullama.client import parse_host, split_host_port
from mullama.errors import (
    BadRequestError,
    ForbiddenError,
    MullamaError,
    NotFoundError,
    PayloadTooLargeError,
)
from mullama.ops.logs import request_id
from mullama.ops.operations import Operations, RequestContext, RequestRecord, api_of

log = logging.getLogger("mullama.server")

DEFAULT_PORT = 11434
#: Bodies above this are refused (blob uploads stream to disk and are exempt).
DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: Connections served at once; more wait in the kernel's backlog (see :meth:`Server.process_request`).
DEFAULT_MAX_CONNECTIONS = 512
#: Seconds a connection has to deliver a request's line and headers, from its opening or its previous answer.
DEFAULT_HEADER_TIMEOUT = 30.0
#: Seconds one read of a body, or one write of an answer, may stall.
DEFAULT_BODY_TIMEOUT = 60.0
#: The most JSON values (about: commas and opening brackets outside strings) a body may hold. Each costs
#: Python up to ~70 bytes, so a 16 MiB body of ``{},`` would otherwise become ~400 MiB.
MAX_JSON_VALUES = 500_000
#: An unread body up to this size is skipped to keep the connection; a bigger one closes it.
_DRAIN_LIMIT = 1024 * 1024
#: A body is read and handed on in pieces of at most this many bytes.
_PIECE = 1 << 20
#: The longest chunk-size or trailer line of a chunked body.
_CHUNK_LINE = 4096
_MAX_TRAILERS = 64
#: A chunk-size line: hex digits only (no ``0x``, sign, ``_`` or spaces), an optional extension, CRLF.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
#: Content types a web page may send to any server without a CORS preflight (with none at all).
_CORS_SAFE_TYPES = ("", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
#: What ``curl -d`` (form), urllib (none) and Node's ``fetch`` with a string (text/plain) send: read as
#: JSON, as Ollama reads any body, but only from clients that are not browsers (no ``Origin`` header).
_LENIENT_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
#: How often the accept loop, waiting for a free connection slot, checks for shutdown.
_SLOT_POLL = 0.1
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
        """The body as a JSON object; 400 when it is not one, 415 when its content type may not hold one."""
        self.handler.check_json_type()
        raw = self.body()
        if not raw.strip():
            raise BadRequestError("missing request body")
        check_json_values(raw)
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
    #: Host names accepted beyond localhost and IP addresses (lower case, ``*`` wildcards).
    allowed_hosts: tuple[str, ...]
    #: CORS origins allowed beyond Ollama's defaults (``*`` wildcards).
    extra_origins: tuple[str, ...]
    max_body: int
    max_connections: int
    header_timeout: float
    body_timeout: float
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
    #: Set by socketserver for each connection.
    server: Server
    # The framing of the request being answered, set by _check_framing.
    _chunked = False
    _length = 0
    #: Whether the route began reading the body (then an unread rest closes the connection).
    _body_started = False
    #: Whether the body was read to its end.
    _body_read = False

    def setup(self) -> None:
        # Reads and writes that stall longer than the body timeout end the connection.
        self.timeout = self.server.app.body_timeout
        super().setup()
        self.rfile.close()
        self._reader = _ConnectionReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)
        self.server.track(self)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self)

    def handle_one_request(self) -> None:
        # The request line and headers must all arrive before the header deadline (slowloris).
        self._reader.expect_request(self.server.app.header_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self._reader.headers_read()
        return parsed

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
        """A CORS preflight: the transport's checks, then the methods and headers an allowed origin may use."""
        with self.app.answering():
            self._started_response = False
            self._request_id = request_id(self.headers.get("X-Request-Id"))
            path = urlsplit(self.path).path.rstrip("/") or "/"
            try:
                self._check_framing()
                self._check_host()
                self._check_origin()
            except MullamaError as error:
                self._fail(path, error)
            else:
                self._preflight()
            self._skip_unread_body()

    def _preflight(self) -> None:
        origin = self.headers.get("Origin")
        self.send_response(HTTPStatus.NO_CONTENT)
        if origin:
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
            self._check_framing()
            self._check_host()
            self._check_origin()
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
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
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
        if self._body_started or self._chunked or self._length > _DRAIN_LIMIT:
            self.close_connection = True
        elif self._length:
            try:
                self.rfile.read(self._length)
            except OSError:
                self.close_connection = True

    def _fail(self, path: str, error: MullamaError) -> None:
        if error.status >= 500:
            log.warning("%s: %s", path, error.message)
        if self._started_response:
            # Headers are gone: the streaming route reports errors in-stream; just close.
            self.close_connection = True
            return
        # Retry-After is read by the OpenAI and Anthropic SDKs (and any HTTP client) to pace retries.
        retry = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        try:
            self.send_json(error.status, self.app.router.error_body(path, error), retry)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left before its answer

    # --- safety ------------------------------------------------------------

    def _check_framing(self) -> None:
        """Read how the body is framed; refuse what two parsers could read differently (request smuggling)."""
        self._chunked, self._length, self._body_started, self._body_read = False, 0, False, False
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = [value.strip(" \t") for value in self.headers.get_all("Content-Length") or []]
        if encodings:
            if lengths:
                self._bad_framing("a request may not have both Transfer-Encoding and Content-Length")
            if len(encodings) != 1 or encodings[0].strip(" \t").lower() != "chunked":
                self._bad_framing(f"unsupported Transfer-Encoding {', '.join(encodings)!r}: only chunked is")
            self._chunked = True
        elif lengths:
            if len(set(lengths)) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0]):
                self._bad_framing("invalid Content-Length")
            self._length = int(lengths[0])

    def _bad_framing(self, message: str) -> None:
        # Where the body ends is unknown: nothing more can be read from this connection.
        self.close_connection = True
        raise BadRequestError(message)

    def _check_host(self) -> None:
        """Refuse Host headers that name no one this server answers to (DNS rebinding)."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise BadRequestError("more than one Host header")
        host = hosts[0] if hosts else ""
        if not host_allowed(host, loopback=self.app.loopback, allowed=self.app.allowed_hosts):
            raise ForbiddenError(f"forbidden host {host!r}: add it to MULLAMA_ALLOWED_HOSTS")

    def _check_origin(self) -> None:
        """Refuse any request from a web page whose origin is not allowed, as Ollama does (not only its CORS)."""
        origins = self.headers.get_all("Origin") or []
        if len(origins) > 1 or origins and not self._origin_allowed(origins[0]):
            raise ForbiddenError(f"origin {', '.join(origins)!r} is not allowed: add it to MULLAMA_ORIGINS")

    def check_json_type(self) -> None:
        """Refuse a content type that cannot be a JSON body, or that a web page could send without a preflight."""
        media = media_type(self.headers.get("Content-Type"))
        if media == "application/json" or media.endswith("+json"):
            return
        if media in _LENIENT_TYPES and "Origin" not in self.headers:
            return
        shown = media or "no content type"
        raise UnsupportedMediaType(f"{shown} is not accepted here: send the body as application/json")

    def check_upload_type(self) -> None:
        """Refuse an upload from a web page that needed no preflight to send it."""
        if "Origin" in self.headers and media_type(self.headers.get("Content-Type")) in _CORS_SAFE_TYPES:
            raise UnsupportedMediaType("send uploads from a web page as application/octet-stream")

    def client_is_loopback(self) -> bool:
        """Whether the client connected from this machine (IPv4-mapped IPv6 addresses included)."""
        try:
            address = ipaddress.ip_address(self.client_address[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    def _origin_allowed(self, origin: str) -> bool:
        return origin_allowed(origin, self.app.extra_origins)

    # --- bodies ------------------------------------------------------------

    def read_body(self, limit: int | None = None) -> bytes:
        """Read the request body, refusing more than ``limit`` bytes."""
        limit = self.app.max_body if limit is None else limit
        if not self._chunked:
            if self._length > limit:
                self.close_connection = True
                raise PayloadTooLargeError(f"request body of {self._length} bytes exceeds the limit of {limit}")
            # One read, into one buffer: the body is in memory once.
            self._body_started = True
            data = self.rfile.read(self._length)
            if len(data) < self._length:
                self._bad_framing("the body ended early")
            self._body_read = True
            return data
        pieces = bytearray()
        for piece in self.body_chunks(limit):
            pieces += piece
        return bytes(pieces)

    def body_chunks(self, limit: int = sys.maxsize) -> Iterator[bytes]:
        """The body in pieces of at most 1 MiB as they arrive, refusing more than ``limit`` bytes in all."""
        self._body_started = True
        if self._chunked:
            yield from self._chunks(limit)
        else:
            remaining = self._length
            while remaining > 0:
                piece = self.rfile.read(min(remaining, _PIECE))
                if not piece:
                    self._bad_framing("the body ended early")
                remaining -= len(piece)
                yield piece
        self._body_read = True

    def _chunks(self, limit: int) -> Iterator[bytes]:
        """A chunked body's data, parsed strictly: any deviation closes the connection."""
        total = 0
        while True:
            match = _CHUNK_SIZE_LINE.fullmatch(self.rfile.readline(_CHUNK_LINE))
            if match is None:
                self._bad_framing("malformed chunked body: a chunk size must be hex digits ending in CRLF")
            size = int(match[1], 16)
            if size == 0:
                break
            total += size
            if total > limit:
                self.close_connection = True
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            while size:
                piece = self.rfile.read(min(size, _PIECE))
                if not piece:
                    self._bad_framing("the chunked body ended early")
                size -= len(piece)
                yield piece
            if self.rfile.read(2) != b"\r\n":
                self._bad_framing("malformed chunked body: a chunk must end with CRLF")
        for _ in range(_MAX_TRAILERS):
            line = self.rfile.readline(_CHUNK_LINE)
            if line == b"\r\n":
                return
            if not line.endswith(b"\r\n") or b":" not in line:
                self._bad_framing("malformed chunked body: bad trailer")
        self._bad_framing("malformed chunked body: too many trailers")

    # --- responses ---------------------------------------------------------

    def _common_headers(self) -> None:
        self.send_header("X-Request-Id", self._request_id)
        if self.app.stopping.is_set() or self.close_connection:
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


class UnsupportedMediaType(MullamaError):
    """A body whose content type the route does not read."""

    status = 415
    kind = "invalid_request_error"


class _ConnectionReader(io.RawIOBase):
    """A connection's reads: each may stall ``idle`` seconds, and none may end past a deadline while one is set."""

    def __init__(self, sock: socket.socket, idle: float) -> None:
        self.sock = sock
        self.idle = idle
        self.deadline: float | None = None
        #: True while blocked for the first byte of a request after the first: closing the connection
        #: then loses nothing (a client retries a request on a kept-alive connection that was closed,
        #: not the first request of a new one, whose bytes may be on their way or already here).
        self.waiting = False
        self._fresh = False
        self._requests = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request line and headers did not arrive in time")
        self.sock.settimeout(timeout)
        self.waiting = self._fresh
        try:
            count = self.sock.recv_into(buffer)
        except ConnectionResetError:
            count = 0  # the client is gone: to the reader, the end of the stream
        finally:
            self.waiting = False
        if count:
            self._fresh = False
        return count

    def expect_request(self, timeout: float) -> None:
        """The next request's line and headers must arrive within ``timeout`` seconds."""
        self.deadline = time.monotonic() + timeout
        self._requests += 1
        self._fresh = self._requests > 1

    def headers_read(self) -> None:
        """The headers are in: back to the idle timeout for the body and the answer."""
        self.deadline = None
        self._fresh = False
        self.sock.settimeout(self.idle)


def host_allowed(host: str, *, loopback: bool, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a server answers a request with this Host header (DNS rebinding).

    ``localhost`` and the names in ``allowed`` (``*`` wildcards) always;
    an IP address on a server bound beyond loopback, and on a loopback one
    a loopback, private, link-local or unspecified address (Ollama's rule).
    No other name: a web page whose own name was made to resolve to this
    machine must not reach it. ``.local``/``.internal`` names too only when
    ``allowed`` names them.
    """
    if not host:
        return True
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if not loopback:
        return True
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def media_type(value: str | None) -> str:
    """The media type of a Content-Type header, lower case, without its parameters."""
    return (value or "").split(";", 1)[0].strip().lower()


def check_json_values(raw: bytes) -> None:
    """Refuse a JSON body that would become more than :data:`MAX_JSON_VALUES` Python objects.

    Counted before parsing, cheaply: commas and opening brackets, first in
    the whole body and, only when that is too many, outside its strings.
    Nesting needs no count of its own: the JSON decoder refuses what
    passes Python's recursion limit.
    """
    if _structure(raw) <= MAX_JSON_VALUES:
        return
    if _structure(_JSON_STRING.sub(b'""', raw)) > MAX_JSON_VALUES:
        raise PayloadTooLargeError(f"the JSON body holds more than {MAX_JSON_VALUES} values")


def _structure(data: bytes) -> int:
    return data.count(b",") + data.count(b"[") + data.count(b"{")


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
    """``host``, ``host:port``, ``:port`` or ``scheme://host[:port]`` → (host, port), as Ollama reads OLLAMA_HOST.

    The client's rules (:func:`mullama.client.parse_host`: port 80 or 443
    when only the scheme is given, 11434 otherwise), so the daemon listens
    where the CLI looks; an empty host (``:11435``) is every interface, as
    Go's listener reads it. A port that is not a number up to 65535 raises
    ``ValueError`` where Ollama would quietly use the default.
    """
    text = (value or "").strip()
    hostport = text.partition("://")[2] if "://" in text else text
    host, port_text = split_host_port(hostport.partition("/")[0])
    if host is not None and not (port_text.isdigit() and int(port_text) <= 65535):
        raise ValueError(f"invalid port {port_text!r}")
    parsed = parse_host(text)
    return ("0.0.0.0" if host == "" else parsed.host), parsed.port


class Server(ThreadingHTTPServer):
    """The HTTP server; request threads are daemons so shutdown never waits on a stuck client.

    At most ``app.max_connections`` connections are served at once, each by
    a thread. Past that, the accept loop waits for a slot and new
    connections wait in the kernel's backlog, where they cost no thread and
    no memory, rather than being refused: a burst is served late instead of
    failed. To make room, connections idle between requests (a client's
    keep-alive pool) are closed while a connection waits; a slow sender
    holds its slot no longer than the header or body timeout.
    """

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of clients
    # (eight agents starting at once), which then wait a full second to retry.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Application) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        #: What every handler reaches as ``self.server.app``.
        self.app = app
        self._slots = threading.Semaphore(app.max_connections)
        self._closing = threading.Event()
        self._open: set[Handler] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection in a thread of its own once a connection slot is free."""
        if not self._slots.acquire(blocking=False):
            self._close_waiting()
            while not self._slots.acquire(timeout=_SLOT_POLL):
                if self._closing.is_set():
                    self.shutdown_request(request)
                    return
                self._close_waiting()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        """Stop the accept loop, a wait for a connection slot included."""
        self._closing.set()
        super().shutdown()

    def track(self, handler: Handler) -> None:
        """Count ``handler``'s connection as open."""
        with self._open_lock:
            self._open.add(handler)

    def untrack(self, handler: Handler) -> None:
        """Forget a closed connection."""
        with self._open_lock:
            self._open.discard(handler)

    def open_connections(self) -> int:
        """How many connections are being served."""
        with self._open_lock:
            return len(self._open)

    def _close_waiting(self) -> None:
        """Close the connections idle between requests, so waiting ones get their slots."""
        with self._open_lock:
            idle = [handler for handler in self._open if handler._reader.waiting]
        for handler in idle:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
