"""Hostile bodies against every route of the three APIs: always a clean JSON 4xx in the API's error shape (or a
200), never a 500, a traceback or a hang."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from daemon import create_model, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "smol"
#: Every generation the daemon runs here stops after one token, on one thread.
CAPS = {"num_predict": 1, "num_thread": 1}
TIMEOUT = 60

#: (method, path, the body fields that endpoint reads)
ENDPOINTS = [
    ("POST", "/api/generate", ["model", "prompt", "suffix", "system", "template", "context", "raw", "images",
                               "format", "options", "stream", "think", "keep_alive", "truncate"]),
    ("POST", "/api/chat", ["model", "messages", "tools", "format", "options", "stream", "think", "keep_alive",
                           "truncate"]),
    ("POST", "/api/embed", ["model", "input", "truncate", "dimensions", "options", "keep_alive"]),
    ("POST", "/api/embeddings", ["model", "prompt", "options", "keep_alive"]),
    ("POST", "/api/show", ["model", "name", "verbose"]),
    ("POST", "/api/create", ["model", "from", "files", "adapters", "template", "license", "system", "parameters",
                             "messages", "stream", "quantize"]),
    ("POST", "/api/copy", ["source", "destination"]),
    ("DELETE", "/api/delete", ["model", "name"]),
    ("POST", "/api/pull", ["model", "insecure", "stream"]),
    ("POST", "/api/push", ["model", "insecure", "stream"]),
    ("POST", "/api/apply-template", ["model", "messages", "tools", "think", "options"]),
    ("POST", "/v1/chat/completions", ["model", "messages", "tools", "tool_choice", "response_format", "stream",
                                      "stream_options", "max_tokens", "max_completion_tokens", "stop", "temperature",
                                      "top_p", "seed", "n", "logprobs", "top_logprobs", "frequency_penalty",
                                      "presence_penalty", "parallel_tool_calls", "reasoning_effort", "functions",
                                      "function_call"]),
    ("POST", "/v1/completions", ["model", "prompt", "suffix", "max_tokens", "stop", "stream", "temperature", "echo",
                                 "logprobs", "seed", "n", "best_of"]),
    ("POST", "/v1/embeddings", ["model", "input", "dimensions", "encoding_format"]),
    ("POST", "/v1/responses", ["model", "input", "instructions", "tools", "tool_choice", "stream", "max_output_tokens",
                               "text", "reasoning", "previous_response_id", "temperature", "top_p", "metadata"]),
    ("POST", "/v1/messages", ["model", "messages", "system", "max_tokens", "stop_sequences", "stream", "tools",
                              "tool_choice", "temperature", "top_k", "top_p", "thinking", "metadata"]),
    ("POST", "/v1/messages/count_tokens", ["model", "messages", "system", "tools", "tool_choice", "thinking"]),
]
GET_PATHS = ["/", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/v1/models/smol", "/v1/models/zz-missing"]
#: The token limits of the OpenAI and Anthropic routes: one token here, whatever the body says.
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
endpoints = st.sampled_from(ENDPOINTS)

huge_ints = st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**400, -1, 0])
scalars = (st.none() | st.booleans() | st.integers() | huge_ints
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
#: Names that exist, that do not, and that are not names at all.
model_names = (st.sampled_from([MODEL, "smol:latest", "zz-missing", "", " ", "../../etc/passwd", "a" * 300,
                                "hf.co/x", "bad name!", "smol:", ":tag", "/nonexistent.gguf"])
               | st.text(max_size=30).map(lambda text: "zz-" + text))


def capped(body: dict[str, Any]) -> dict[str, Any]:
    """Keep a valid generation short: whatever the options say, one token on one thread, one choice."""
    options = body.get("options")
    if isinstance(options, dict):
        body["options"] = {**options, **CAPS}
    for name in LIMITS:
        if _count(body.get(name)) > 1:
            body[name] = 1
    for name in ("n", "best_of"):
        if _count(body.get(name)) > 1:
            body[name] = 1
    return body


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@st.composite
def field_bodies(draw: st.DrawFn, fields: list[str]) -> dict[str, Any]:
    """A body with the endpoint's own fields holding values of any type."""
    chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
    body = {name: draw(json_values) for name in chosen}
    if "model" in fields and draw(st.booleans()):
        body["model"] = draw(model_names)
    return capped(body)


HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
#: A valid body per endpoint, for mutating one part at a time.
VALID = {
    "/api/generate": {"model": MODEL, "prompt": "hi", "stream": False, "options": CAPS},
    "/api/chat": {"model": MODEL, "messages": HI, "tools": [TOOL], "stream": False, "options": CAPS},
    "/api/embed": {"model": MODEL, "input": ["hi", "there"]},
    "/api/embeddings": {"model": MODEL, "prompt": "hi"},
    "/api/show": {"model": MODEL},
    "/api/create": {"model": "zz-new", "from": MODEL, "stream": False},
    "/api/copy": {"source": MODEL, "destination": "zz-copy"},
    "/api/delete": {"model": "zz-copy"},
    "/api/pull": {"model": "zz-missing", "stream": False},
    "/api/push": {"model": MODEL},
    "/api/apply-template": {"model": MODEL, "messages": HI, "tools": [TOOL]},
    "/v1/chat/completions": {"model": MODEL, "messages": HI, "tools": [TOOL], "max_tokens": 1, "stop": ["x"]},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stop": "x"},
    "/v1/embeddings": {"model": MODEL, "input": ["hi", "there"]},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 1, "instructions": "be brief"},
    "/v1/messages": {"model": MODEL, "messages": HI, "max_tokens": 1, "system": "be brief",
                     "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": HI, "system": "be brief"},
}
#: Paths inside a body, beyond its top-level fields, where validation must also hold.
INNER = [("messages", 0, "role"), ("messages", 0, "content"), ("messages", 0, "images"),
         ("messages", 0, "tool_calls"), ("messages", 0), ("tools", 0, "function", "parameters"),
         ("tools", 0, "function", "name"), ("tools", 0, "function"), ("tools", 0), ("options", "stop"),
         ("options", "temperature"), ("options", "num_ctx"), ("input", 0)]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """A valid body with one or two parts replaced by values of any type."""
    method, path, fields = draw(endpoints)
    body = json.loads(json.dumps(VALID[path]))
    targets = [(name,) for name in fields] + [p for p in INNER if p[0] in body]
    for target in draw(st.lists(st.sampled_from(targets), min_size=1, max_size=2, unique=True)):
        holder: Any = body
        for key in target[:-1]:
            # An earlier replacement may have turned a parent into a scalar.
            inside = isinstance(holder, dict) and key in holder or isinstance(holder, list) and \
                isinstance(key, int) and key < len(holder)
            holder = holder[key] if inside else None
        if isinstance(holder, dict) or isinstance(holder, list) and isinstance(target[-1], int) and \
                target[-1] < len(holder):
            holder[target[-1]] = draw(json_values)
    return method, path, capped(body)


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"model": "\xff"}', b"\x00" * 10,
                     b"[" * 100_000, b'{"a":' * 50_000, b"1e999999", b'"' + b"\\ud800" + b'"',
                     b'{"model": "smol", "prompt": "\\ud800"}']),
    json_values.map(encode),
)


@pytest.fixture(scope="module")
def port(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # Pulls must fail at once: no Hub, nothing reachable.
    with running(tmp_path_factory.mktemp("hostile"), HF_HUB_OFFLINE="1") as server:
        number = server.server_address[1]
        create_model(number, model_path, MODEL, parameters=CAPS)
        yield number


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response


def check(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str] | None = None) -> int:
    """Send one request and hold the answer to the contract; return its status."""
    status, response = request(port, method, path, body, headers)
    data = response.read()  # a socket timeout here is a hang
    content_type = response.headers.get("Content-Type", "")
    assert b"Traceback" not in data
    assert status < 500, (status, data[:500])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, data[:200])
        if method == "HEAD":
            assert data == b""
        else:
            error = error_message(path, json.loads(data))
            assert isinstance(error, str) and error
            assert "Error(" not in error and "object has no attribute" not in error, error
    elif content_type.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        assert lines and all(isinstance(line, dict) for line in lines)
    elif content_type.startswith("text/event-stream"):
        events = [line[5:].strip() for line in data.decode().splitlines() if line.startswith("data:")]
        assert events and all(event == "[DONE]" or isinstance(json.loads(event), dict) for event in events)
    elif content_type.startswith("application/json") and data:
        json.loads(data)
    still_serving(port)
    return status


def error_message(path: str, body: Any) -> Any:
    """The message of an error body: Ollama's ``{"error": "..."}``, OpenAI's and Anthropic's ``{"error": {...}}``."""
    error = body["error"]
    if path.rstrip("/").startswith("/v1/"):  # the server reads "/v1/" as "/v1", under no API's prefix
        assert isinstance(error, dict) and isinstance(error.get("type"), str), body
        if path.startswith("/v1/messages"):
            assert body["type"] == "error", body
        return error["message"]
    return error


def still_serving(port: int) -> None:
    status, response = request(port, "GET", "/api/version")
    assert status == 200 and "version" in json.loads(response.read())


fast = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


@fast
@given(endpoint=endpoints, body=raw_bodies)
def test_any_bytes(port: int, endpoint: tuple[str, str, list[str]], body: bytes) -> None:
    method, path, _ = endpoint
    check(port, method, path, body)


@fast
@given(data=st.data())
def test_wrong_types_in_every_field(port: int, data: st.DataObject) -> None:
    method, path, fields = data.draw(endpoints)
    check(port, method, path, encode(data.draw(field_bodies(fields))))


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_bodies())
def test_valid_bodies_with_a_part_replaced(port: int, case: tuple[str, str, dict[str, Any]]) -> None:
    method, path, body = case
    check(port, method, path, encode(body))


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["format", "tools", "messages", "options", "context", "images", "parameters"]),
       depth=st.sampled_from([50, 200, 900, 3000]))
def test_deep_nesting_in_fields(port: int, field: str, depth: int) -> None:
    # Written as text: json.dumps itself gives up on the deepest of these.
    leaf = '{"type": "string"}'
    if field == "format":
        nested = '{"type": "object", "properties": {"a": ' * depth + leaf + "}}" * depth
    else:
        nested = "[" * depth + leaf + "]" * depth
    path = "/api/create" if field == "parameters" else "/api/generate" if field in ("context", "images") \
        else "/api/chat"
    head = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": CAPS}
    if field == "options":
        body = json.dumps(head)[:-1] + f', "{field}": {{"num_predict": 1, "stop": {nested}}}}}'
    else:
        body = json.dumps(head)[:-1] + f', "{field}": {nested}}}'
    check(port, "POST", path, body.encode())


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(["num_ctx", "num_batch", "num_keep", "num_predict", "top_k", "top_p", "min_p",
                               "temperature", "repeat_last_n", "repeat_penalty", "seed", "num_gpu",
                               "main_gpu", "num_thread", "typical_p", "presence_penalty", "frequency_penalty",
                               "mirostat", "mirostat_tau", "stop", "keep_alive", "dimensions"]),
       value=st.sampled_from([2**31, 2**63, 10**30, -(2**31), -1, 0, 1e308, 1e-308, "nan", "inf", -0.0, "x", [],
                              {}, True]))
def test_extreme_numbers(port: int, option: str, value: Any) -> None:
    value = float(value) if value in ("nan", "inf") else value
    body: dict[str, Any] = {"model": MODEL, "input": "hi", "stream": False, "keep_alive": "5m"}
    if option in ("keep_alive", "dimensions"):
        body[option] = value
        path = "/api/embed"
    else:
        body["options"] = {**CAPS, option: value}
        body["prompt"] = "hi"
        path = "/api/generate"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if option == "num_predict" and number and value != 0:
        # Any other count would generate for real; the cap stays the point of this test.
        body["options"][option] = 1
    if option == "num_ctx" and number and 2**24 < value < 2**32:
        # Covered by test_huge_num_ctx_is_a_client_error: llama.cpp takes seconds to fail that allocation.
        body["options"][option] = 2**32
    check(port, "POST", path, json.dumps(body, allow_nan=True).encode())
    check(port, "GET", "/api/ps", None)


def test_huge_num_ctx_is_a_client_error(port: int) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {**CAPS, "num_ctx": 2**31}}
    assert check(port, "POST", "/api/generate", json.dumps(body).encode()) == 400


@settings(deadline=None, max_examples=40)
@given(digest=st.one_of(st.text(max_size=80), st.just("sha256:" + "0" * 64), st.just("sha256-" + "a" * 64),
                        st.just("sha256:" + "A" * 64), st.just("../../etc")),
       body=st.binary(max_size=100), method=st.sampled_from(["HEAD", "POST"]))
def test_blob_routes(port: int, digest: str, body: bytes, method: str) -> None:
    status = check(port, method, "/api/blobs/" + quote(digest, safe=""), body if method == "POST" else None)
    assert status in (200, 201, 400, 404)


@settings(deadline=None, max_examples=30)
@given(path=st.one_of(st.sampled_from(GET_PATHS), st.text(max_size=30).map(lambda text: "/api/" + text),
                     st.text(max_size=30).map(lambda text: "/v1/" + text)),
       method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]), body=st.binary(max_size=50))
def test_any_path_and_method(port: int, path: str, method: str, body: bytes) -> None:
    status, response = request(port, method, quote(path, safe="/"), body or None)
    data = response.read()
    assert status < 500 and b"Traceback" not in data
    if status >= 400 and method != "HEAD":
        assert isinstance(error_message(path, json.loads(data)), str)
    still_serving(port)


def test_malformed_framing(port: int) -> None:
    for headers, body in [
        ({"Content-Length": "-5"}, b""),
        ({"Content-Length": "abc"}, b""),
        ({"Transfer-Encoding": "chunked"}, b"zz\r\nhello\r\n0\r\n\r\n"),
        ({"Transfer-Encoding": "chunked"}, b"-5\r\nhello\r\n0\r\n\r\n"),
    ]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.putrequest("POST", "/api/show")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 400, (headers, data)
        assert json.loads(data)["error"]
        conn.close()
    still_serving(port)


size_lines = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEFxX+-_ ;=\t\r\n", max_size=12).map(str.encode),
    st.sampled_from([b"11", b"011", b"11;a=b", b"0x11", b" 11", b"11 ", b"1_1", b"+11", b"ffffffffffffffffff"]),
)


@settings(deadline=None, max_examples=60)
@given(size=size_lines, te=st.sampled_from(["chunked", "Chunked", "chunked, chunked", "gzip", "", "chunked "]),
       length=st.one_of(st.none(), st.sampled_from(["17", "+17", "1_7", "17, 17", "0x11", " 17", "-1"])),
       path=st.sampled_from(["/api/show", "/v1/chat/completions", "/v1/messages", "/api/blobs/sha256:" + "0" * 64]))
def test_any_framing(port: int, size: bytes, te: str, length: str | None, path: str) -> None:
    """Whatever the framing, an answer (or a closed connection) and a daemon still in step."""
    body = json.dumps({"model": MODEL}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if te:
        head += f"Transfer-Encoding: {te}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    message = head.encode() + b"\r\n" + (size + b"\r\n" + body + b"\r\n0\r\n\r\n" if te else body)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(message + b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # a chunk declared longer than what follows then ends early
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    assert b"Traceback" not in received
    statuses = [int(line.split(b" ")[1]) for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert all(status < 500 for status in statuses), received[:500]
    still_serving(port)
