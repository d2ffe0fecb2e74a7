"""The web UI: the static files under ``mullama/web``, served at ``/ui``.

The UI is a client of the daemon's public APIs and nothing else, so this
module only serves files.  A file is found by looking its name up among the
files that exist under ``mullama/web``, never by joining the request's path
onto a directory, so no spelling of ``..`` can reach anything else.
Every answer carries a strict Content-Security-Policy: scripts and styles
only from this origin, no inline script, no frames, calls only to this origin.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mullama.errors import NotFoundError
from mullama.http.server import Request, Router

#: Where the UI's files live (package data).
WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
#: The page every ``/ui`` address without a file name shows.
INDEX = "index.html"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))

#: Sent with every file: the policy, no sniffing, no framing, no referrer.
#: ``no-cache`` makes the browser revalidate (cheap, by ETag), so an upgraded daemon never runs a stale mix of modules.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def register(router: Router) -> None:
    """Serve the UI at ``/ui`` and its files below it (GET and HEAD)."""
    for method in ("GET", "HEAD"):
        router.add(method, "/ui", index_route)
        router.add(method, "/ui/{path...}", file_route)


def index_route(request: Request) -> None:
    """``/ui`` (and ``/ui/``): the page."""
    send_file(request, INDEX)


def file_route(request: Request) -> None:
    """``/ui/NAME``: one of the UI's files, or 404."""
    send_file(request, request.params["path"])


def web_files(root: Path = WEB_ROOT) -> dict[str, Path]:
    """Every file under ``root`` by its ``/``-separated name relative to ``root``."""
    if not root.is_dir():
        return {}
    return {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()}


def content_type(name: str) -> str:
    """The Content-Type of a UI file, by its extension."""
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def send_file(request: Request, name: str) -> None:
    """Answer with the UI file ``name`` (an exact name from :func:`web_files`), 304 when the ETag matches."""
    path = web_files().get(name)
    if path is None:
        raise NotFoundError(f"404 page not found: /ui/{name}")
    body = path.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if etag in (request.headers.get("If-None-Match") or ""):
        request.handler.send_bytes(304, b"", content_type(name), headers)
        return
    request.handler.send_bytes(200, body, content_type(name), headers)
