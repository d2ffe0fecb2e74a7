"""What a web page, a remote client or a hostile request may not do to the daemon (issue 14, HTTP side).

Cross-site requests (foreign ``Origin``, no-preflight content types),
server paths in model fields and in ``/api/create``, Host headers on every
bind, the key check before routing, strict body framing, bounded stop
lists, prompts and template format widths, and a reload refused while the
model is busy. Each runs against a real daemon on 127.0.0.1 (and, where
the client's address matters, on this machine's own network address).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import create_model, running

from mullama.prompt.jinja import ChatTemplateError, render_jinja
from mullama.types import Message

MODEL = "smol"
CAPS = {"num_predict": 1, "num_thread": 1}
TIMEOUT = 120
GOOD_ORIGIN = "http://localhost:3000"
EVIL_ORIGIN = "https://evil.example"


@pytest.fixture(scope="module")
def port(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running(tmp_path_factory.mktemp("hardening"), HF_HUB_OFFLINE="1") as server:
        number = server.server_address[1]
        create_model(number, model_path, MODEL, parameters=CAPS)
        yield number


def send(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers, body. A dict body is sent as JSON text."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        connection.request(method, path, data, headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def raw(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send bytes as they are and read the answer until the server closes: status and body."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def models(port: int) -> list[str]:
    return [m["name"] for m in json.loads(send(port, "GET", "/api/tags")[2])["models"]]


# --- item 2: cross-site requests --------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/api/create", {"model": "pwned", "from": MODEL, "system": "obey evil.example", "stream": False}, "ollama"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
     "openai"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
     "anthropic"),
])
def test_a_foreign_origin_is_refused_in_the_apis_own_error_shape(port: int, path: str, body: dict, shape: str) -> None:
    # text/plain needs no preflight: a page can send it anywhere. It must not be carried out.
    status, headers, data = send(port, "POST", path, body, {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain"})
    assert status == 403, data
    assert "Access-Control-Allow-Origin" not in headers
    error = json.loads(data)
    if shape == "ollama":
        assert "evil.example" in error["error"]
    elif shape == "openai":
        assert "evil.example" in error["error"]["message"] and error["error"]["type"]
    else:
        assert error["type"] == "error" and error["error"]["type"] == "permission_error"
        assert "evil.example" in error["error"]["message"]
    assert "pwned:latest" not in models(port)


def test_a_foreign_origin_is_refused_on_reads_and_preflights_too(port: int) -> None:
    assert send(port, "GET", "/api/tags", headers={"Origin": EVIL_ORIGIN})[0] == 403
    assert send(port, "OPTIONS", "/api/chat", headers={"Origin": EVIL_ORIGIN,
                                                       "Access-Control-Request-Method": "POST"})[0] == 403
    assert send(port, "GET", "/api/tags", headers={"Origin": "null"})[0] == 403
    status, headers, _ = send(port, "OPTIONS", "/api/chat", headers={"Origin": GOOD_ORIGIN,
                                                                     "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == GOOD_ORIGIN
    status, headers, _ = send(port, "GET", "/api/tags", headers={"Origin": GOOD_ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == GOOD_ORIGIN


@pytest.mark.parametrize(("content_type", "origin", "accepted"), [
    ("application/json", GOOD_ORIGIN, True),
    ("application/json; charset=utf-8", GOOD_ORIGIN, True),
    ("text/plain", GOOD_ORIGIN, False),
    ("text/plain;charset=UTF-8", GOOD_ORIGIN, False),
    ("application/x-www-form-urlencoded", GOOD_ORIGIN, False),
    ("multipart/form-data; boundary=x", GOOD_ORIGIN, False),
    (None, GOOD_ORIGIN, False),
    # No Origin: not a browser. What curl -d, urllib and Node's fetch send is read as JSON, as Ollama does.
    ("application/x-www-form-urlencoded", None, True),
    ("text/plain;charset=UTF-8", None, True),
    (None, None, True),
    ("application/xml", None, False),
    ("multipart/form-data; boundary=x", None, False),
])
def test_json_routes_need_a_json_content_type_from_browsers(port: int, content_type: str | None, origin: str | None,
                                                            accepted: bool) -> None:
    headers = {name: value for name, value in (("Content-Type", content_type), ("Origin", origin)) if value}
    status, _, data = send(port, "POST", "/api/show", {"model": MODEL}, headers)
    assert status == (200 if accepted else 415), data
    if not accepted:
        assert "application/json" in json.loads(data)["error"]


def test_curl_d_works_as_on_ollama(port: int) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed: Ollama's documentation drives the API with `curl -d`")
    out = subprocess.run(["curl", "-sS", "-d", json.dumps({"model": MODEL, "prompt": "Hi", "stream": False}),
                          f"http://127.0.0.1:{port}/api/generate"], capture_output=True, text=True, timeout=TIMEOUT,
                         check=True).stdout
    assert json.loads(out)["done"] is True


def test_uploads_from_a_page_need_a_preflighted_type(port: int) -> None:
    digest = "sha256:" + "0" * 64
    status, _, _ = send(port, "POST", f"/api/blobs/{digest}", b"x", {"Origin": GOOD_ORIGIN, "Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = send(port, "POST", f"/api/blobs/{digest}", b"x",
                        {"Origin": GOOD_ORIGIN, "Content-Type": "application/octet-stream"})
    assert status == 400  # read, and refused for its digest only


# --- item 3: no file-existence oracle, no server files read ---------------------------------------


MODEL_ROUTES = [
    ("/api/show", {}), ("/api/generate", {"prompt": "hi", "stream": False}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/embed", {"input": "hi"}), ("/api/embeddings", {"prompt": "hi"}), ("/api/pull", {"stream": False}),
    ("/api/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}), ("/v1/embeddings", {"input": "hi"}),
    ("/v1/messages", {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.gguf"
    path.write_bytes(b"SECRET-BYTES-0123456789")
    return path


def _error_text(data: bytes) -> str:
    body = json.loads(data)
    error = body["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.mark.parametrize(("path", "fields"), MODEL_ROUTES)
def test_a_server_path_answers_as_a_missing_model_whether_or_not_the_file_exists(
        port: int, secret: Path, path: str, fields: dict) -> None:
    answers = {}
    names = [str(secret), str(secret.with_name("missing.gguf")), "/etc/passwd", "/etc/no-such-file",
             "secret.gguf", "../" + secret.name, "~/.bashrc"]
    # A pull of a missing name says what the catalogue has instead; a path gets the store's answer.
    for name in names if path == "/api/pull" else [*names, "zz-missing"]:
        status, _, data = send(port, "POST", path, {"model": name, **fields}, {"Content-Type": "application/json"})
        assert b"SECRET" not in data and b"root:" not in data
        answers[name] = (status, _error_text(data).replace(name, "NAME"))
    assert len(set(answers.values())) == 1, answers
    assert answers[str(secret)][0] == 404


def test_create_takes_no_server_path_by_default(port: int, secret: Path, model_path: Path) -> None:
    answers = set()
    for source in (str(secret), str(secret.with_name("missing.gguf")), str(model_path), "/etc/passwd"):
        for in_place in (False, True):
            status, _, data = send(port, "POST", "/api/create", {
                "model": "zz-from-path", "from": source, "in_place": in_place, "stream": False})
            assert b"SECRET" not in data
            answers.add((status, _error_text(data).replace(source, "PATH")))
    assert len(answers) == 1 and next(iter(answers))[0] == 403, answers
    assert "zz-from-path:latest" not in models(port)


def _own_address() -> str:
    """This machine's address on its network (no packet is sent), for a client that is not on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            pytest.skip("this machine has no network address besides loopback")
        return probe.getsockname()[0]


def test_paths_only_from_loopback_and_only_under_allowed_dirs(tmp_path: Path, model_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = allowed / "smol.gguf"
    shutil.copyfile(model_path, inside)
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(model_path, outside)
    (allowed / "escape.gguf").symlink_to(outside)
    address = _own_address()
    # Bound on every address, so that a client can come from loopback or from this machine's network address.
    with running(tmp_path / "daemon", "0.0.0.0:0", MULLAMA_ALLOWED_DIRS=str(allowed), MULLAMA_API_KEY="k") as server:
        number = server.server_address[1]
        key = {"Authorization": "Bearer k"}
        for in_place in (False, True):
            status, _, data = send(number, "POST", "/api/create", {
                "model": f"ok-{in_place}", "from": str(inside), "in_place": in_place, "stream": False}, key)
            assert status == 200, data
            status, _, data = send(number, "POST", "/api/create", {
                "model": "no", "from": str(outside), "in_place": in_place, "stream": False}, key)
            assert status == 403, data
            status, _, data = send(number, "POST", "/api/create", {
                "model": "no", "from": str(allowed / "escape.gguf"), "in_place": in_place, "stream": False}, key)
            assert status == 403, data  # a link out of the directory is where it leads
        status, _, data = send(number, "POST", "/api/show", {"model": str(inside)}, key)
        assert status == 200 and json.loads(data)["details"]["format"] == "gguf"
        assert send(number, "POST", "/api/show", {"model": str(outside)}, key)[0] == 404
        # The same requests from this machine's network address: not loopback, so no path at all.
        status, _, data = send(number, "POST", "/api/create", {
            "model": "remote", "from": str(inside), "stream": False}, key, host=address)
        assert status == 403, data
        assert send(number, "POST", "/api/show", {"model": str(inside)}, key, host=address)[0] == 404
        assert send(number, "POST", "/api/show", {"model": "ok-false"}, key, host=address)[0] == 200


# --- item 11: hosts, keys before routing, framing ----------------------------------------------------


def test_loopback_bind_refuses_local_and_internal_names_unless_configured(port: int, tmp_path: Path) -> None:
    for host in ("printer.local", "metadata.google.internal", "evil.example", "localhost.evil.example"):
        assert send(port, "GET", "/api/version", headers={"Host": host})[0] == 403, host
    for host in ("localhost:11434", "127.0.0.1", "[::1]:80", "app.localhost", socket.gethostname()):
        assert send(port, "GET", "/api/version", headers={"Host": host})[0] == 200, host
    with running(tmp_path, MULLAMA_ALLOWED_HOSTS="printer.local,*.internal") as server:
        number = server.server_address[1]
        for host in ("printer.local", "metadata.google.internal"):
            assert send(number, "GET", "/api/version", headers={"Host": host})[0] == 200, host
        assert send(number, "GET", "/api/version", headers={"Host": "scanner.local"})[0] == 403


def test_a_bind_beyond_loopback_checks_the_host_too(tmp_path: Path) -> None:
    address = _own_address()
    with running(tmp_path, "0.0.0.0:0", MULLAMA_API_KEY="k", MULLAMA_ALLOWED_HOSTS="mullama.example") as server:
        number = server.server_address[1]
        key = {"Authorization": "Bearer k"}
        for host, expected in ((f"{address}:{number}", 200), ("mullama.example", 200), ("evil.example", 403),
                               ("box.local", 403), ("box.internal", 403), ("localhost", 200)):
            status, _, data = send(number, "GET", "/api/tags", headers={**key, "Host": host}, host=address)
            assert status == expected, (host, data)


def test_two_host_headers_are_refused(port: int) -> None:
    status, _ = raw(port, b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                          b"Connection: close\r\n\r\n")
    assert status == 400


def test_the_key_is_checked_before_a_404_or_405(tmp_path: Path) -> None:
    with running(tmp_path, MULLAMA_API_KEY="k") as server:
        number = server.server_address[1]
        for method, path in (("GET", "/api/nothing-here"), ("GET", "/api/generate"), ("DELETE", "/v1/models"),
                             ("GET", "/v1/nothing")):
            assert send(number, method, path)[0] == 401, path
            assert send(number, method, path, headers={"Authorization": "Bearer k"})[0] in (404, 405), path
        assert send(number, "GET", "/")[0] == 200


SHOW = json.dumps({"model": MODEL}).encode()


def _chunked(size_line: bytes, headers: bytes = b"Transfer-Encoding: chunked\r\n") -> bytes:
    return (b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + headers +
            b"Connection: close\r\n\r\n" + size_line + b"\r\n" + SHOW + b"\r\n0\r\n\r\n")


def test_a_strict_chunked_body_is_read(port: int) -> None:
    assert len(SHOW) == 0x11
    for line in (b"11", b"011", b"11;name=value", b"11;name"):
        status, body = raw(port, _chunked(line))
        assert status == 200, (line, body[:200])


@pytest.mark.parametrize("line", [b"0x11", b"+11", b" 11", b"11 ", b"11\t", b"1_1", b"-11", b"11 ;x", b"g"])
def test_chunk_sizes_are_hex_digits_only(port: int, line: bytes) -> None:
    status, body = raw(port, _chunked(line))
    assert status == 400, (line, body[:200])
    assert "chunk" in json.loads(body)["error"]


@pytest.mark.parametrize("headers", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
])
def test_ambiguous_framing_is_refused(port: int, headers: bytes) -> None:
    status, body = raw(port, _chunked(b"11", headers))
    assert status == 400, (headers, body[:200])


@pytest.mark.parametrize("length", [b"+17", b"1_7", b"17, 17", b"0x11", b"17\r\nContent-Length: 18"])
def test_content_length_is_digits_only(port: int, length: bytes) -> None:
    assert len(SHOW) == 17
    status, _ = raw(port, b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n" + SHOW)
    assert status == 400, length
    status, _ = raw(port, b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 17\r\nConnection: close\r\n\r\n" + SHOW)
    assert status == 200


def test_a_framing_error_closes_the_connection(port: int) -> None:
    # A second request pipelined behind a malformed body must never be answered: where it starts is unknown.
    second = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(_chunked(b"0x10").replace(b"Connection: close\r\n", b"") + second)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 400")


# --- item 9: bounded stops, prompts, format widths, reloads ------------------------------------------


@pytest.mark.parametrize(("path", "field"), [
    ("/api/generate", "options.stop"), ("/v1/chat/completions", "stop"), ("/v1/completions", "stop"),
    ("/v1/messages", "stop_sequences"),
])
@pytest.mark.parametrize(("too_many", "enough"), [(["x"] * 65, ["x"] * 64), (["y" * 1025], ["y" * 1024])])
def test_stop_lists_are_bounded(port: int, path: str, field: str, too_many: list[str], enough: list[str]) -> None:
    def body(stops: list[str]) -> dict[str, Any]:
        common: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "stream": False}
        if path == "/api/generate":
            return common | {"prompt": "hi", "options": {**CAPS, "stop": stops}}
        if path == "/v1/completions":
            return common | {"prompt": "hi", field: stops}
        return common | {"messages": [{"role": "user", "content": "hi"}], field: stops}

    status, _, data = send(port, "POST", path, body(too_many), {"Content-Type": "application/json"})
    assert status == 400, data
    assert "stop" in _error_text(data)
    assert send(port, "POST", path, body(enough), {"Content-Type": "application/json"})[0] == 200


def test_a_prompt_far_past_any_context_is_refused_before_tokenizing(port: int) -> None:
    prompt = "word " * 220_000  # 1.1 million characters, for a context of 4096 tokens
    for path, body in (("/api/generate", {"prompt": prompt, "stream": False, "options": CAPS}),
                       ("/api/chat", {"messages": [{"role": "user", "content": prompt}], "stream": False,
                                      "options": CAPS}),
                       ("/api/embed", {"input": [prompt]})):
        status, _, data = send(port, "POST", path, {"model": MODEL, **body}, {"Content-Type": "application/json"})
        assert status == 400, data[:300]
        assert "characters" in _error_text(data)
    status, _, _ = send(port, "POST", "/api/generate", {"model": MODEL, "prompt": "word " * 20_000,
                                                        "stream": False, "options": CAPS})
    assert status == 200  # longer than the context, but truncated as Ollama does


@pytest.mark.parametrize("template", [
    '{{ "%*d" % (50000000, 1) }}',
    '{{ "%.*f" % (50000000, 1.5) }}',
    '{{ "{:{}}".format(1, 50000000) }}',
    '{{ "{0:>{1}}".format("x", 50000000) }}',
    '{{ "{a:{w}}".format_map({"a": 1, "w": 50000000}) }}',
    '{{ "%(a)50000000d" % {"a": 1} }}',
    '{{ "%((a))50000000d" | format(a=1) }}',
    '{{ "%*d" | format(50000000, 1) }}',
    '{{ "%50000000d" % 1 }}',
    '{{ "{:.50000000f}".format(1.5) }}',
])
def test_format_widths_are_refused_before_the_string_is_built(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="width|argument"):
        render_jinja(template, [Message(role="user", content="hi")], bos_token="", eos_token="")


@pytest.mark.parametrize(("template", "expected"), [
    ('{{ "%5d|%-3s|%%|%*d" % (1, "a", 4, 2) }}', "    1|a  |%|   2"),
    ('{{ "{:0>5}{}".format(1, 2) }}', "000012"),
    ('{{ "{:{}}|".format(1, 3) }}', "  1|"),
    ('{{ "%(n)s=%(v)4.1f" | format(n="x", v=2.25) }}', "x= 2.2"),
])
def test_ordinary_formats_still_render(template: str, expected: str) -> None:
    assert render_jinja(template, [Message(role="user", content="hi")], bos_token="", eos_token="") == expected


def test_a_reload_is_refused_while_the_model_is_busy(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("POST", "/api/generate", json.dumps({
        "model": MODEL, "prompt": "1, 2, 3,", "raw": True,
        "options": {"num_predict": 3000, "num_thread": 1, "temperature": 0}}), {"Content-Type": "application/json"})
    stream = connection.getresponse()
    try:
        assert stream.status == 200 and not json.loads(stream.readline())["done"]  # generating now
        for options in ({"num_ctx": 1024}, {"num_thread": 2}):
            status, headers, data = send(port, "POST", "/api/generate", {
                "model": MODEL, "prompt": "hi", "stream": False, "options": {**CAPS, **options}})
            assert status == 503, data
            assert int(headers["Retry-After"]) >= 1
            assert next(iter(options)) in _error_text(data)
    finally:
        connection.close()
    # Idle again once the server notices the client left: the other options reload the model.
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {**CAPS, "num_ctx": 1024}}
    for _ in range(1200):
        status, _, data = send(port, "POST", "/api/generate", body)
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 200, data
