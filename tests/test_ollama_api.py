"""Ollama's ``/api/*`` on a real daemon, driven by the official ``ollama`` Python client."""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ollama
import pytest
from daemon import create_model, running

from mullama.prompt.grammar import validate
from mullama.http.server import Server
from mullama.store.modelfile import parse as parse_modelfile

MODEL = "smol"
#: One thread: llama.cpp's spinning worker threads crawl when the two cores are shared with other work.
THREADS = {"num_thread": 1}
#: Short, deterministic generations keep the module fast on two busy cores.
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 8, **THREADS}


@dataclass
class Daemon:
    """A running server and the official client pointed at it."""

    server: Server
    client: ollama.Client
    port: int
    model_path: Path
    tmp: Path


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ollama-api")
    with running(tmp) as server:
        port = server.server_address[1]
        create_model(port, model_path, MODEL, parameters=THREADS)
        with ollama.Client(host=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield Daemon(server, client, port, model_path, tmp)


def raw(port: int, method: str, path: str, body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request with http.client: (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def error_of(port: int, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, str]:
    """(status, error message) of a request that must fail with Ollama's error body."""
    status, response_headers, data = raw(port, method, path, body, headers)
    assert status >= 400, data
    assert response_headers["Content-Type"].startswith("application/json")
    return status, json.loads(data)["error"]


def loaded_names(client: ollama.Client) -> list[str]:
    return [m.model for m in client.ps().models]


# --- root and version --------------------------------------------------------


def test_root_says_ollama_is_running(daemon: Daemon) -> None:
    status, headers, body = raw(daemon.port, "GET", "/")
    assert (status, body) == (200, b"Ollama is running")
    assert headers["Content-Type"].startswith("text/plain")
    status, headers, body = raw(daemon.port, "HEAD", "/")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len("Ollama is running"))


def test_version(daemon: Daemon) -> None:
    version = daemon.client._request_raw("GET", "/api/version").json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 5, 0]
    status, _, body = raw(daemon.port, "HEAD", "/api/version")
    assert (status, body) == (200, b"")


def test_unknown_path_and_wrong_method(daemon: Daemon) -> None:
    assert error_of(daemon.port, "GET", "/api/nothing")[0] == 404
    assert error_of(daemon.port, "GET", "/api/generate")[0] == 405


# --- generate ----------------------------------------------------------------


def test_generate_not_streamed(daemon: Daemon) -> None:
    r = daemon.client.generate(model=MODEL, prompt="Say hello.", options=GREEDY)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.model == "smol:latest"
    assert r.response
    assert 0 < r.eval_count <= GREEDY["num_predict"]
    assert r.total_duration >= r.eval_duration > 0
    assert r.context and all(isinstance(t, int) for t in r.context)
    assert datetime.fromisoformat(r.created_at.replace("Z", "+00:00")).tzinfo is not None


def test_generate_stream_equals_non_stream(daemon: Daemon) -> None:
    whole = daemon.client.generate(model=MODEL, prompt="Name three colours.", options=GREEDY)
    parts = list(daemon.client.generate(model=MODEL, prompt="Name three colours.", options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert len(parts) > 2
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].response == ""
    assert parts[-1].context == whole.context
    assert parts[-1].eval_count == whole.eval_count


def test_generate_context_round_trip(daemon: Daemon) -> None:
    first = daemon.client.generate(model=MODEL, prompt="My name is Bob.", options=GREEDY)
    second = daemon.client.generate(model=MODEL, prompt="What is my name?", context=first.context, options=GREEDY)
    assert second.context[:len(first.context)] == first.context
    assert len(second.context) > len(first.context) + second.eval_count


def test_generate_raw_uses_the_prompt_as_is(daemon: Daemon) -> None:
    r = daemon.client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    assert r.done and r.response
    # Ollama returns no context in raw mode.
    assert not r.context
    templated = daemon.client.generate(model=MODEL, prompt="The capital of France is", options=GREEDY)
    assert templated.response != r.response


def test_generate_raw_refuses_template_system_and_context(daemon: Daemon) -> None:
    for extra in ({"template": "{{ .Prompt }}"}, {"system": "Be brief."}, {"context": [1, 2]}):
        status, message = error_of(daemon.port, "POST", "/api/generate",
                                   {"model": MODEL, "prompt": "x", "raw": True, "stream": False, **extra})
        assert status == 400 and "raw" in message


def test_generate_system_and_template(daemon: Daemon) -> None:
    template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
    one = {**GREEDY, "num_predict": 1}
    bare = daemon.client.generate(model=MODEL, prompt="Hello there", template=template, options=one)
    with_system = daemon.client.generate(model=MODEL, prompt="Hello there", template=template,
                                         system="You are a pirate who speaks in rhymes.", options=one)
    default = daemon.client.generate(model=MODEL, prompt="Hello there", options=one)
    prompt_tokens = [len(r.context) - r.eval_count for r in (bare, with_system, default)]
    # The bare template is far shorter than SmolLM2's chat template with its default system prompt,
    # and the system text lengthens it.
    assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]
    assert prompt_tokens[1] - prompt_tokens[0] >= 8


@pytest.mark.parametrize("fmt", ["json", {
    "type": "object",
    "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}, "available": {"type": "boolean"}},
    "required": ["age", "available"],
}])
def test_generate_format(daemon: Daemon, fmt: Any) -> None:
    r = daemon.client.generate(model=MODEL, prompt="Ollama is 22 years old and busy. Respond using JSON.",
                               format=fmt, options={"temperature": 0, "num_predict": 48, **THREADS})
    assert r.done_reason == "stop", r.response
    value = json.loads(r.response)
    if isinstance(fmt, dict):
        assert validate(value, fmt) == []
    else:
        assert isinstance(value, dict)


def test_generate_bad_format_is_400(daemon: Daemon) -> None:
    status, message = error_of(daemon.port, "POST", "/api/generate",
                               {"model": MODEL, "prompt": "x", "format": "yaml", "stream": False})
    assert status == 400 and "format" in message


@pytest.mark.parametrize("think", [False, True, "high"])
def test_generate_think_accepted(daemon: Daemon, think: Any) -> None:
    r = daemon.client.generate(model=MODEL, prompt="Hi", think=think, options=GREEDY)
    assert r.done and r.response


def test_generate_missing_model(daemon: Daemon) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        daemon.client.generate(model="no-such-model", prompt="Hi")
    assert info.value.status_code == 404 and "not found" in info.value.error
    assert error_of(daemon.port, "POST", "/api/generate", {"prompt": "x"})[0] == 400


def test_load_and_unload_with_empty_prompt(daemon: Daemon) -> None:
    loaded = daemon.client.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert "smol:latest" in loaded_names(daemon.client)
    running = next(m for m in daemon.client.ps().models if m.model == "smol:latest")
    assert running.context_length and running.context_length > 0
    assert running.size > 0 and running.digest
    ahead = (running.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 200 < ahead <= 301
    unloaded = daemon.client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert "smol:latest" not in loaded_names(daemon.client)


def test_chat_load_and_unload_with_no_messages(daemon: Daemon) -> None:
    assert daemon.client.chat(model=MODEL, messages=[]).done_reason == "load"
    assert "smol:latest" in loaded_names(daemon.client)
    assert daemon.client.chat(model=MODEL, messages=[], keep_alive=0).done_reason == "unload"
    assert "smol:latest" not in loaded_names(daemon.client)


def test_keep_alive_forever_and_duration(daemon: Daemon) -> None:
    daemon.client.generate(model=MODEL, prompt="", keep_alive=-1)
    running = next(m for m in daemon.client.ps().models if m.model == "smol:latest")
    assert running.expires_at.year > 2200
    daemon.client.generate(model=MODEL, prompt="", keep_alive="1h")
    running = next(m for m in daemon.client.ps().models if m.model == "smol:latest")
    assert 3500 < (running.expires_at - datetime.now(timezone.utc)).total_seconds() <= 3601
    status, message = error_of(daemon.port, "POST", "/api/generate",
                               {"model": MODEL, "prompt": "", "keep_alive": "soon"})
    assert status == 400 and "keep_alive" in message


def test_first_stream_line_arrives_before_generation_ends(daemon: Daemon) -> None:
    daemon.client.generate(model=MODEL, prompt="")
    body = {"model": MODEL, "prompt": "Tell me a long story about a dragon.",
            "options": {"temperature": 0, "num_predict": 40, **THREADS}}
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        started = time.perf_counter()
        conn.request("POST", "/api/generate", body=json.dumps(body))
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = json.loads(response.readline())
        first_at = time.perf_counter() - started
        lines = [first] + [json.loads(line) for line in response.read().splitlines() if line]
        total = time.perf_counter() - started
    finally:
        conn.close()
    assert not first["done"] and lines[-1]["done"]
    assert len(lines) > 20
    assert first_at < total / 2, (first_at, total)


# --- chat --------------------------------------------------------------------


def test_chat_stream_equals_non_stream(daemon: Daemon) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = daemon.client.chat(model=MODEL, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length")
    parts = list(daemon.client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_chat_history_and_system(daemon: Daemon) -> None:
    r = daemon.client.chat(model=MODEL, options=GREEDY, messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ])
    assert r.message.content


def test_chat_with_tools(daemon: Daemon) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a given city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    r = daemon.client.chat(model=MODEL, messages=messages, tools=tools,
                           options={"temperature": 0, "num_predict": 24, **THREADS})
    assert r.done
    assert r.message.content or r.message.tool_calls
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    # A finished tool call fed back with its result is accepted too.
    history = messages + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 22 C"},
    ]
    assert daemon.client.chat(model=MODEL, messages=history, tools=tools, options=GREEDY).done


def test_chat_format_schema(daemon: Daemon) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"]}
    r = daemon.client.chat(model=MODEL, format=schema, options={"temperature": 0, "num_predict": 40, **THREADS},
                           messages=[{"role": "user", "content": "Capital of France, as JSON."}])
    assert r.done_reason == "stop"
    assert validate(json.loads(r.message.content), schema) == []


def test_chat_bad_messages_are_400(daemon: Daemon) -> None:
    for messages in ("hi", [{"content": "no role"}], [{"role": "user", "content": 3}]):
        status, _ = error_of(daemon.port, "POST", "/api/chat", {"model": MODEL, "messages": messages})
        assert status == 400


# --- embeddings --------------------------------------------------------------


def test_embed(daemon: Daemon) -> None:
    one = daemon.client.embed(model=MODEL, input="Why is the sky blue?")
    assert one.model == "smol:latest" and len(one.embeddings) == 1
    width = len(one.embeddings[0])
    assert width == 576
    assert math.isclose(sum(x * x for x in one.embeddings[0]), 1.0, rel_tol=1e-3)
    assert one.prompt_eval_count > 0
    several = daemon.client.embed(model=MODEL, input=["Why is the sky blue?", "Why is the grass green?"])
    assert len(several.embeddings) == 2
    assert several.embeddings[0] == pytest.approx(one.embeddings[0], abs=1e-4)
    assert several.embeddings[1] != pytest.approx(several.embeddings[0], abs=1e-3)
    short = daemon.client.embed(model=MODEL, input="Why is the sky blue?", dimensions=16)
    assert len(short.embeddings[0]) == 16
    assert math.isclose(sum(x * x for x in short.embeddings[0]), 1.0, rel_tol=1e-3)


def test_embed_empty_input_gives_no_vectors(daemon: Daemon) -> None:
    for value in ("", []):
        status, _, data = raw(daemon.port, "POST", "/api/embed", {"model": MODEL, "input": value})
        assert status == 200 and json.loads(data)["embeddings"] == []


def test_embed_errors(daemon: Daemon) -> None:
    long_input = "word " * 400
    small = {"num_ctx": 256, **THREADS}
    status, message = error_of(daemon.port, "POST", "/api/embed",
                               {"model": MODEL, "input": long_input, "truncate": False, "options": small})
    assert status == 400 and "context" in message
    truncated = daemon.client.embed(model=MODEL, input=long_input, options=small)
    assert len(truncated.embeddings[0]) == 576
    for bad in ({"input": 3}, {"input": ["a", 1]}, {"input": "a", "dimensions": 0},
                {"input": "a", "dimensions": 100000}, {"input": "a", "dimensions": "8"}, {"input": ["a", ""]}):
        assert error_of(daemon.port, "POST", "/api/embed", {"model": MODEL, **bad})[0] == 400


def test_legacy_embeddings(daemon: Daemon) -> None:
    r = daemon.client.embeddings(model=MODEL, prompt="Here is an article about llamas...")
    assert len(r.embedding) == 576 and any(r.embedding)
    status, _, data = raw(daemon.port, "POST", "/api/embeddings", {"model": MODEL, "prompt": ""})
    assert status == 200 and json.loads(data)["embedding"] == []


# --- models ------------------------------------------------------------------


def test_tags(daemon: Daemon) -> None:
    entry = next(m for m in daemon.client.list().models if m.model == "smol:latest")
    assert entry.size == daemon.model_path.stat().st_size or entry.size > daemon.model_path.stat().st_size
    assert len(entry.digest) == 64
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1"
    assert entry.details.parameter_size.endswith("M")
    assert entry.modified_at.tzinfo is not None


def test_show(daemon: Daemon) -> None:
    r = daemon.client.show(MODEL)
    assert "FROM " in r.modelfile
    assert "<|im_start|>" in r.template
    assert r.details.family == "llama" and r.details.quantization_level == "Q4_1"
    assert r.modelinfo["general.architecture"] == "llama"
    assert r.modelinfo["llama.context_length"] == 8192
    assert "completion" in r.capabilities
    assert error_of(daemon.port, "POST", "/api/show", {"model": "nope"})[0] == 404


def test_create_from_existing_with_overrides(daemon: Daemon) -> None:
    progress = list(daemon.client.create(
        model="smol-pirate", from_=MODEL, system="You are a pirate.", template="{{ .System }} {{ .Prompt }}",
        parameters={"num_predict": 3, "stop": ["\n\n", "###"], "temperature": 0, **THREADS}, stream=True))
    assert progress[-1].status == "success"
    shown = daemon.client.show("smol-pirate")
    # The client's ShowResponse has no ``system`` field: read it from the raw answer.
    assert json.loads(raw(daemon.port, "POST", "/api/show", {"model": "smol-pirate"})[2])["system"] == \
        "You are a pirate."
    assert shown.template == "{{ .System }} {{ .Prompt }}"
    assert "num_predict" in shown.parameters and '"###"' in shown.parameters
    assert 'SYSTEM' in shown.modelfile and "PARAMETER num_predict 3" in shown.modelfile
    r = daemon.client.generate(model="smol-pirate", prompt="Hello")
    assert r.eval_count <= 3
    # The request's options beat the Modelfile's.
    assert daemon.client.generate(model="smol-pirate", prompt="Hello", options={"num_predict": 6}).eval_count > 3
    # A model made from it inherits the parameters it does not override.
    daemon.client.create(model="smol-pirate2", from_="smol-pirate", parameters={"top_k": 5})
    assert "num_predict" in daemon.client.show("smol-pirate2").parameters
    assert "top_k" in daemon.client.show("smol-pirate2").parameters


def test_create_from_blobs(daemon: Daemon) -> None:
    digest = daemon.client.create_blob(daemon.model_path)
    assert raw(daemon.port, "HEAD", f"/api/blobs/{digest}")[0] == 200
    # Uploading a blob the store already has answers 200 and keeps the connection usable.
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request("POST", f"/api/blobs/{digest}", body=b"ignored body that is not read")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        conn.request("GET", "/api/version")
        response = conn.getresponse()
        assert response.status == 200 and "version" in json.loads(response.read())
    finally:
        conn.close()
    progress = list(daemon.client.create(model="smol-blob", files={"smol.gguf": digest}, stream=True))
    assert progress[-1].status == "success"
    assert daemon.client.generate(model="smol-blob", prompt="Hi", options=GREEDY).response


def test_create_from_a_modelfile(daemon: Daemon) -> None:
    modelfile = parse_modelfile(f'FROM {MODEL}\nPARAMETER num_predict 2\nSYSTEM """Answer briefly."""\n'
                                'MESSAGE user Hi\nMESSAGE assistant Hello!\nLICENSE "MIT"\n')
    daemon.client.create(model="smol-modelfile", from_=modelfile.from_, system=modelfile.system,
                         parameters=modelfile.parameters, license=modelfile.licenses,
                         messages=[{"role": m.role, "content": m.content} for m in modelfile.messages])
    shown = json.loads(raw(daemon.port, "POST", "/api/show", {"model": "smol-modelfile"})[2])
    assert shown["system"] == "Answer briefly." and shown["license"] == "MIT"
    assert shown["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert daemon.client.generate(model="smol-modelfile", prompt="Tell me about the sea.").eval_count <= 2


def test_create_errors(daemon: Daemon) -> None:
    cases = [
        ({"model": "x"}, 400),
        ({"model": "x", "from": "no-such-base"}, 404),
        ({"model": "x", "files": {"m.gguf": "sha256:" + "0" * 64}}, 400),
        ({"model": "x", "files": {"m.gguf": "not-a-digest"}}, 400),
        ({"model": "x", "from": MODEL, "quantize": "q9_9"}, 400),
        ({"model": "bad name!", "from": MODEL}, 400),
        ({"from": MODEL}, 400),
    ]
    for body, expected in cases:
        status, message = error_of(daemon.port, "POST", "/api/create", {**body, "stream": False})
        assert status == expected, (body, status, message)
    assert "x:latest" not in [m.model for m in daemon.client.list().models]


def test_create_error_in_stream(daemon: Daemon) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        list(daemon.client.create(model="x", from_="no-such-base", stream=True))
    assert "not found" in info.value.error


def test_copy_and_delete(daemon: Daemon) -> None:
    assert daemon.client.copy(MODEL, "smol-copy").status == "success"
    names = [m.model for m in daemon.client.list().models]
    assert "smol-copy:latest" in names
    assert daemon.client.show("smol-copy").details.family == "llama"
    with pytest.raises(ollama.ResponseError) as info:
        daemon.client.copy("no-such-model", "other")
    assert info.value.status_code == 404
    assert daemon.client.delete("smol-copy").status == "success"
    assert "smol-copy:latest" not in [m.model for m in daemon.client.list().models]
    with pytest.raises(ollama.ResponseError) as info:
        daemon.client.delete("smol-copy")
    assert info.value.status_code == 404
    # The original keeps working: deleting a copy leaves shared blobs alone.
    assert daemon.client.generate(model=MODEL, prompt="Hi", options=GREEDY).done


def test_delete_a_loaded_model_unloads_it(daemon: Daemon) -> None:
    daemon.client.copy(MODEL, "smol-doomed")
    daemon.client.generate(model="smol-doomed", prompt="")
    assert "smol-doomed:latest" in loaded_names(daemon.client)
    daemon.client.delete("smol-doomed")
    assert "smol-doomed:latest" not in loaded_names(daemon.client)


def test_pull_of_an_unknown_model_fails_promptly(daemon: Daemon) -> None:
    started = time.monotonic()
    with pytest.raises(ollama.ResponseError) as info:
        daemon.client.pull("no-such-model-anywhere")
    assert 400 <= info.value.status_code < 600 and info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        list(daemon.client.pull("hf.co/no-owner/no-repo", stream=True))
    assert info.value.error
    assert time.monotonic() - started < 30


def test_push_is_a_clear_error(daemon: Daemon) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        daemon.client.push(MODEL)
    assert info.value.status_code == 400 and "push" in info.value.error


def test_blobs(daemon: Daemon) -> None:
    import hashlib

    data = b"some blob bytes"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    assert raw(daemon.port, "HEAD", f"/api/blobs/{wrong}")[0] == 404
    status, message = error_of(daemon.port, "POST", f"/api/blobs/{wrong}", data)
    assert status == 400 and "mismatch" in message
    assert raw(daemon.port, "HEAD", f"/api/blobs/{wrong}")[0] == 404
    assert raw(daemon.port, "POST", f"/api/blobs/{good}", data)[0] == 201
    assert raw(daemon.port, "HEAD", f"/api/blobs/{good}")[0] == 200
    assert raw(daemon.port, "POST", f"/api/blobs/{good}", data)[0] == 200
    assert error_of(daemon.port, "POST", "/api/blobs/sha256:xyz", data)[0] == 400
    assert raw(daemon.port, "HEAD", "/api/blobs/not-a-digest")[0] == 400
    assert not list((daemon.tmp / "models").rglob(".upload-*"))


def test_apply_template(daemon: Daemon) -> None:
    status, _, data = raw(daemon.port, "POST", "/api/apply-template", {
        "model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}]})
    assert status == 200
    prompt = json.loads(data)["prompt"]
    assert "<|im_start|>user\nWhy is the sky blue?<|im_end|>" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")


# --- safety ------------------------------------------------------------------


def test_foreign_host_header_is_forbidden(daemon: Daemon) -> None:
    status, message = error_of(daemon.port, "GET", "/api/tags", Host="evil.example")
    assert status == 403 and "evil.example" in message
    for host in ("localhost:11434", "127.0.0.1", "[::1]:11434"):
        assert raw(daemon.port, "GET", "/api/version", headers={"Host": host})[0] == 200


def test_a_burst_of_clients_is_accepted_at_once(daemon: Daemon) -> None:
    """64 clients connecting together are all answered without a SYN retry (one second each)."""
    sockets = [socket.socket() for _ in range(64)]
    started = time.monotonic()
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", daemon.port))
        for sock in sockets:
            sock.settimeout(5)
            sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        for sock in sockets:
            assert sock.recv(64).startswith(b"HTTP/1.")
    finally:
        for sock in sockets:
            sock.close()
    assert time.monotonic() - started < 0.9


def test_cors(daemon: Daemon) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = raw(daemon.port, "OPTIONS", "/api/chat",
                             headers={"Origin": "http://localhost:3000", **preflight})
    assert status in (200, 204)
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    status, headers, _ = raw(daemon.port, "OPTIONS", "/api/chat",
                             headers={"Origin": "https://evil.example", **preflight})
    assert "Access-Control-Allow-Origin" not in headers
    _, headers, _ = raw(daemon.port, "GET", "/api/version", headers={"Origin": "http://127.0.0.1:8080"})
    assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    _, headers, _ = raw(daemon.port, "GET", "/api/version", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A second daemon with an API key and a tiny body limit."""
    tmp = tmp_path_factory.mktemp("guarded")
    with running(tmp, MULLAMA_API_KEY="s3cret", MULLAMA_MAX_BODY="1024") as server:
        yield server.server_address[1]


def test_api_key(guarded: int) -> None:
    status, message = error_of(guarded, "GET", "/api/tags")
    assert status == 401 and message
    assert error_of(guarded, "GET", "/api/tags", Authorization="Bearer wrong")[0] == 401
    assert raw(guarded, "GET", "/api/tags", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert raw(guarded, "GET", "/api/tags", headers={"x-api-key": "s3cret"})[0] == 200
    client = ollama.Client(host=f"http://127.0.0.1:{guarded}", headers={"Authorization": "Bearer s3cret"})
    assert client.list().models == []
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=f"http://127.0.0.1:{guarded}").list()
    assert info.value.status_code == 401
    # "Ollama is running" stays public, as health checks expect.
    assert raw(guarded, "GET", "/")[0] == 200


def test_body_over_the_limit_is_413(guarded: int) -> None:
    key = {"Authorization": "Bearer s3cret"}
    body = {"model": "m", "prompt": "x" * 4096}
    status, message = error_of(guarded, "POST", "/api/generate", body, **key)
    assert status == 413 and "limit" in message
    conn = http.client.HTTPConnection("127.0.0.1", guarded, timeout=30)
    try:
        conn.putrequest("POST", "/api/show")
        for name, value in {**key, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        chunk = b"x" * 4096
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        response = conn.getresponse()
        assert response.status == 413 and "error" in json.loads(response.read())
    finally:
        conn.close()
    assert raw(guarded, "POST", "/api/show", {"model": "m"}, key)[0] == 404
