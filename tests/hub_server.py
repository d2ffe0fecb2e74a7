"""A local HTTP server speaking enough of the Hugging Face Hub's protocol for tests.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT``:
``GET /api/models/{repo}[/revision/{rev}]`` lists a repository's files, and
``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` serve a file with the headers
the client reads (``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` carrying the
sha256, ``X-Linked-Size``, ``Content-Length``), honouring ``Range``.

Knobs let a test cut a connection part-way, slow a download, require a
token, or advertise a hash the bytes do not have; every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    """A file served by the fake Hub: its bytes come from ``path``."""

    path: Path
    #: The sha256 advertised; defaults to the real one.
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = sha256_of(self.path)


@dataclass
class Request:
    """One request the server answered."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class HubState:
    """What the server serves and how it misbehaves; tests change it freely."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    #: Repositories answered with 401 unless the request carries this token.
    private: dict[str, str] = field(default_factory=dict)
    #: Close the connection after this many body bytes of the next GET, then answer 503.
    cut_after: int | None = None
    down: bool = False
    #: Seconds to sleep between 64 KiB chunks of a GET body.
    delay: float = 0.0
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, file: str) -> list[Request]:
        """The GET requests made for ``file``."""
        with self.lock:
            return [request for request in self.log if request.method == "GET" and request.path.endswith("/" + file)]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class HubServer:
    """The server, started on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: str, name: str, path: Path, sha256: str = "") -> HubFile:
        """Serve ``path`` as ``name`` in ``repo``."""
        hub_file = HubFile(path, sha256)
        self.state.repos.setdefault(repo, {})[name] = hub_file
        return hub_file

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the state's log is what tests read."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if self.state.down:
            return self._error(503, "ServiceUnavailable", path)
        if path.startswith("/api/models/"):
            return self._model_info(path)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), "/".join(parts[4:]), body, path)
        self._error(404, "RepoNotFound", path)

    def _authorized(self, repo: str) -> bool:
        token = self.state.private.get(repo)
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _model_info(self, path: str) -> None:
        rest = path[len("/api/models/"):]
        repo = "/".join(rest.split("/")[:2])
        if repo not in self.state.repos:
            return self._error(404, "RepoNotFound", path)
        if not self._authorized(repo):
            return self._error(401, "RepoNotFound", path)
        siblings = [{"rfilename": name} for name in sorted(self.state.repos[repo])]
        data = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self._log(path, 200, len(data))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _resolve(self, repo: str, name: str, body: bool, path: str) -> None:
        files = self.state.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound", path)
        if not self._authorized(repo):
            return self._error(401, "RepoNotFound", path)
        hub_file = files.get(name)
        if hub_file is None:
            return self._error(404, "EntryNotFound", path)
        size = hub_file.path.stat().st_size
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes="):
            start = int(requested[len("bytes="):].split("-")[0])
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hub_file.sha256}"')
        self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            self._log(path, status, 0, requested)
            return
        with self.state.lock:
            cut, self.state.cut_after = self.state.cut_after, None
            if cut is not None:
                self.state.down = True
        sent = 0
        with open(hub_file.path, "rb") as handle:
            handle.seek(start)
            while block := handle.read(1 << 16):
                if cut is not None and sent + len(block) > cut:
                    block = block[: cut - sent]
                self.wfile.write(block)
                sent += len(block)
                if cut is not None and sent >= cut:
                    self.close_connection = True
                    break
                if self.state.delay:
                    time.sleep(self.state.delay)
        self._log(path, status, sent, requested)

    def _error(self, status: int, code: str, path: str) -> None:
        data = json.dumps({"error": code}).encode()
        self._log(path, status, 0, self.headers.get("Range"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _log(self, path: str, status: int, sent: int, requested: str | None = None) -> None:
        with self.state.lock:
            self.state.log.append(Request(self.command, path, requested, status, sent))
