"""A small client of the daemon's Ollama API, for the command line.

Only the standard library: ``http.client`` for requests, NDJSON for the
streamed answers (one JSON object per line), and the ``{"error": ...}``
bodies turned into :class:`APIError`. ``MULLAMA_API_KEY``, when set, is
sent as ``Authorization: Bearer KEY`` (the daemon's all-scopes key, or any
key of its keys file).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mullama import config
from mullama.errors import MullamaError

DEFAULT_PORT = 11434
_DEFAULT_PORTS = {"http": 80, "https": 443}


class APIError(MullamaError):
    """The server answered with an error; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectError(MullamaError):
    """No server answered at the address."""


@dataclass(frozen=True)
class Host:
    """Where the daemon listens, read the way Ollama's ``envconfig.Host`` reads it."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""

    @property
    def connect_host(self) -> str:
        """The host a client connects to: a wildcard bind address means loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def url(self) -> str:
        """The base URL, for messages."""
        host = self.connect_host
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}{self.path}"

    @property
    def is_local(self) -> bool:
        """Whether the address is this machine, where the CLI may start a daemon."""
        if self.host == "localhost":
            return True
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host(text: str | None) -> Host:
    """Parse ``host``, ``host:port``, ``:port`` or ``scheme://host[:port][/path]``.

    As in Ollama, a missing host is ``127.0.0.1``, a missing port is 11434
    (80 or 443 when the scheme is spelt out), and a bad port falls back to
    the default instead of failing.
    """
    text = (text or "").strip()
    scheme, sep, rest = text.partition("://")
    default_port = DEFAULT_PORT
    if not sep:
        scheme, rest = "http", text
    else:
        scheme = scheme.lower()
        default_port = _DEFAULT_PORTS.get(scheme, DEFAULT_PORT)
    hostport, slash, path = rest.partition("/")
    host, port_text = split_host_port(hostport)
    if host is None:
        host, port_text = hostport.strip("[]") or "127.0.0.1", ""
    port = int(port_text) if port_text.isdigit() and int(port_text) <= 65535 else default_port
    return Host(scheme, host or "127.0.0.1", port, f"/{path}".rstrip("/") if slash else "")


def host_from_env() -> Host:
    """The daemon's address: ``MULLAMA_HOST``, else ``OLLAMA_HOST``, else the default."""
    return parse_host(config.env("HOST"))


def split_host_port(text: str) -> tuple[str | None, str]:
    """Split like Go's ``net.SplitHostPort``; ``None`` when ``text`` has no port."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text.startswith(":", close + 1):
            return None, ""
        return text[1:close], text[close + 2 :]
    host, colon, port = text.rpartition(":")
    if not colon or ":" in host:
        return None, ""
    return host, port


class Client:
    """Requests to one daemon; every method raises :class:`APIError` or :class:`ConnectError`."""

    def __init__(self, host: Host, *, timeout: float | None = None) -> None:
        self.host = host
        self.timeout = timeout

    def get(self, path: str) -> Any:
        """``GET`` a JSON document."""
        return self._json("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """``POST`` a JSON body and return the JSON answer (``None`` when empty)."""
        return self._json("POST", path, body)

    def delete(self, path: str, body: dict[str, Any]) -> Any:
        """``DELETE`` with a JSON body, as Ollama's ``/api/delete`` wants."""
        return self._json("DELETE", path, body)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``POST`` and yield each object of the NDJSON answer.

        A line carrying ``error`` (Ollama reports failures mid-stream that
        way) raises :class:`APIError`.  Closing the generator closes the
        connection, which is how a caller cancels a generation.
        """
        connection, response = self._send("POST", path, _encode(body))
        try:
            for raw in response:
                if not raw.strip():
                    continue
                item = _decode(raw, response.status)
                if not isinstance(item, dict):
                    raise APIError(response.status, f"invalid answer from the server: {raw[:80]!r}")
                if "error" in item:
                    raise APIError(response.status, str(item["error"]))
                yield item
        except (OSError, http.client.HTTPException) as error:
            raise ConnectError(f"lost the connection to the server: {_reason(error)}") from None
        finally:
            connection.close()

    def heartbeat(self, timeout: float = 2.0) -> bool:
        """Whether a server answers ``GET /`` within ``timeout`` seconds."""
        try:
            connection, _ = self._send("GET", "/", None, timeout=timeout)
        except (ConnectError, APIError):
            return False
        connection.close()
        return True

    def blob_exists(self, digest: str) -> bool:
        """Whether the server already has the blob ``sha256:<hex>``."""
        try:
            connection, _ = self._send("HEAD", f"/api/blobs/{digest}", None)
        except APIError as error:
            if error.status == 404:
                return False
            raise
        connection.close()
        return True

    def upload_blob(self, digest: str, file: BinaryIO, size: int) -> None:
        """Send a local file as the blob ``digest``; the server checks the hash."""
        connection, _ = self._send("POST", f"/api/blobs/{digest}", file, length=size)
        connection.close()

    def post_form(self, path: str, fields: dict[str, str], file: Path) -> tuple[http.client.HTTPConnection,
                                                                                http.client.HTTPResponse]:
        """``POST`` a multipart form of ``fields`` and ``file`` (as OpenAI's audio routes take it).

        Returns the open connection and its successful response, for the
        caller to read (a JSON body, a text, or server-sent events) and close.
        """
        try:
            data = file.read_bytes()
        except OSError as error:
            raise MullamaError(f"{file}: {_reason(error)}") from None
        body, content_type = encode_form(fields, file.name, data)
        return self._send("POST", path, body, content_type=content_type)

    def duplex(self, path: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``POST`` ``chunks`` as a chunked body while yielding the answer's lines as they come.

        The body is sent from a thread of its own, so the answer (the voice
        loop's events) streams back while the audio is still being sent.
        """
        factory = http.client.HTTPSConnection if self.host.scheme == "https" else http.client.HTTPConnection
        connection = factory(self.host.connect_host, self.host.port, timeout=self.timeout)
        try:
            connection.putrequest("POST", self.host.path + path)
            for name, value in self._headers().items():
                connection.putheader(name, value)
            connection.putheader("Content-Type", "application/octet-stream")
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ConnectError(f"could not connect to a Mullama server at {self.host.url}: {_reason(error)}") from None

        def send() -> None:
            try:
                for chunk in chunks:
                    if chunk:
                        connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                connection.send(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed: the answer says why

        threading.Thread(target=send, name="mullama-upload", daemon=True).start()
        try:
            response = connection.getresponse()
            if response.status >= 400:
                raise APIError(response.status, _error_message(response.read(), response))
            yield from response
        except (OSError, http.client.HTTPException) as error:
            raise ConnectError(f"lost the connection to the server: {_reason(error)}") from None
        finally:
            connection.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/x-ndjson, application/json", "User-Agent": "mullama-cli"}
        key = os.environ.get("MULLAMA_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        connection, response = self._send(method, path, None if body is None else _encode(body))
        try:
            data = response.read()
        finally:
            connection.close()
        return _decode(data, response.status) if data.strip() else None

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | None,
        *,
        length: int | None = None,
        timeout: float | None = None,
        content_type: str | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; return the open connection and a successful response."""
        factory = http.client.HTTPSConnection if self.host.scheme == "https" else http.client.HTTPConnection
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type or (
                "application/json" if isinstance(body, bytes) else "application/octet-stream")
            headers["Content-Length"] = str(len(body) if isinstance(body, bytes) else length)
        try:
            connection = factory(self.host.connect_host, self.host.port, timeout=timeout or self.timeout)
            connection.request(method, self.host.path + path, body=body, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            raise ConnectError(f"could not connect to a Mullama server at {self.host.url}: {_reason(error)}") from None
        if response.status >= 400:
            data = response.read()
            connection.close()
            raise APIError(response.status, _error_message(data, response))
        return connection, response


def encode_form(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of ``fields`` and one ``file``, and its Content-Type."""
    boundary = uuid.uuid4().hex
    while boundary.encode() in data:
        boundary = uuid.uuid4().hex
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _decode(data: bytes, status: int) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise APIError(status, f"invalid answer from the server: {data[:80]!r}") from None


def _error_message(data: bytes, response: http.client.HTTPResponse) -> str:
    """The server's own message when it sent one, else the status line."""
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError, RecursionError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else f"{response.status} {response.reason}"


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
