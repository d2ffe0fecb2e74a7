"""Token log probabilities on Ollama's and OpenAI's APIs, driven by the official ``ollama`` and ``openai`` clients."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from daemon import create_model, openai_client, running

from mullama import service
from mullama.engine.model import Timings
from mullama.http.server import Server
from mullama.engine.sampling import TokenLogprob
from mullama.types import Message

MODEL = "smol"
#: Greedy and short: the chosen token is always the likeliest, and two busy cores stay quick.
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}
PROMPT = "Name three colours."
MESSAGES: Any = [{"role": "user", "content": PROMPT}]
TOKENS = 8


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("logprobs-api")) as server:
        # One thread: llama.cpp's spinning workers crawl when the two cores are shared.
        create_model(server.server_address[1], model_path, MODEL, parameters={"num_thread": 1, "num_ctx": 512})
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server, timeout=120) as sdk:
        yield sdk


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One JSON request; an NDJSON reply comes back as a list of objects."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = response.read().decode().splitlines()
        parsed = [json.loads(line) for line in lines if line]
        return response.status, parsed[0] if len(parsed) == 1 else parsed
    finally:
        connection.close()


def check_greedy(entries: list[Any], top: int) -> None:
    """Each chosen token is the likeliest, with ``top`` alternatives in falling order."""
    assert len(entries) > 3
    for entry in entries:
        assert entry["logprob"] <= 0
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert (alternatives[0]["token"], alternatives[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(alternatives, alternatives[1:]))


def plain(entries: Any) -> list[dict[str, Any]]:
    """Client models (or dicts) as plain dicts, to compare streamed and whole replies."""
    return [entry if isinstance(entry, dict) else entry.model_dump(exclude_none=True) for entry in entries or []]


HI = TokenLogprob(1, "Hi", -0.5, b"Hi", (TokenLogprob(1, "Hi", -0.5, b"Hi"),))
TAG = TokenLogprob(2, "<tool_call>", -1.5, b"<tool_call>", (TokenLogprob(3, "<", -0.25, b"<"),))


class ScriptedReply:
    """A reply whose last delta carries only logprobs, as when a parser swallows the final text."""

    model_name = MODEL
    truncated = 0

    def __init__(self) -> None:
        self.result: service.ChatResult | None = None

    def __iter__(self) -> Iterator[service.Delta]:
        yield service.Delta(content="Hi", logprobs=[HI])
        yield service.Delta(logprobs=[TAG])
        self.result = service.ChatResult(MODEL, Message(role="assistant", content="Hi"), "stop", Timings(),
                                      logprobs=[HI, TAG])

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Routes answer with a :class:`ScriptedReply`; the list collects the requests they built."""
    requests: list[Any] = []

    def start(_manager: Any, request: Any, **_operations: Any) -> ScriptedReply:
        requests.append(request)
        return ScriptedReply()

    monkeypatch.setattr(service, "chat", start)
    monkeypatch.setattr(service, "generate", start)
    return requests


def entry_json(entry: TokenLogprob) -> dict[str, Any]:
    top = [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in entry.top_logprobs]
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.raw), "top_logprobs": top}


def test_a_logprobs_only_delta_gets_its_own_chunk(server: Server, scripted: list[Any]) -> None:
    for path, extra, text in (("/api/generate", {"prompt": PROMPT}, lambda c: c["response"]),
                              ("/api/chat", {"messages": MESSAGES}, lambda c: c["message"]["content"])):
        status, lines = post(server, path, {"model": MODEL, **extra, "logprobs": True, "top_logprobs": 1})
        assert status == 200
        assert [(text(c), c.get("logprobs")) for c in lines[:-1]] == [("Hi", [entry_json(HI)]),
                                                                       ("", [entry_json(TAG)])]
        assert lines[-1]["done"] and "logprobs" not in lines[-1]
        status, whole = post(server, path, {"model": MODEL, **extra, "logprobs": True, "top_logprobs": 1,
                                            "stream": False})
        assert whole["logprobs"] == [entry_json(HI), entry_json(TAG)]
    assert [(r.logprobs, r.top_logprobs) for r in scripted] == [(True, 1)] * 4


def test_a_logprobs_only_delta_gets_its_own_openai_chunk(sdk: openai.OpenAI, scripted: list[Any]) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=1,
                                              stream=True))
    carried = [(c.choices[0].delta.content, plain(c.choices[0].logprobs.content)) for c in chunks
               if c.choices and c.choices[0].logprobs]
    assert carried == [("Hi", [entry_json(HI)]), ("", [entry_json(TAG)])]
    pieces = list(sdk.completions.create(model=MODEL, prompt=PROMPT, logprobs=1, stream=True))
    legacy = [(c.choices[0].text, c.choices[0].logprobs) for c in pieces if c.choices and c.choices[0].logprobs]
    assert [(text, p.tokens, p.text_offset, p.top_logprobs) for text, p in legacy] == [
        ("Hi", ["Hi"], [0], [{"Hi": -0.5}]), ("", ["<tool_call>"], [2], [{"<": -0.25}])]
    assert [(r.logprobs, r.top_logprobs) for r in scripted] == [(True, 1), (True, 1)]


# --- Ollama -----------------------------------------------------------------


def test_ollama_generate_streamed_and_whole_agree(client: ollama.Client) -> None:
    options = {**GREEDY, "num_predict": TOKENS}
    whole = client.generate(MODEL, PROMPT, options=options, logprobs=True, top_logprobs=3)
    entries = plain(whole.logprobs)
    check_greedy(entries, 3)
    assert "".join(e["token"] for e in entries) == whole.response
    chunks = list(client.generate(MODEL, PROMPT, options=options, logprobs=True, top_logprobs=3, stream=True))
    assert [e for c in chunks for e in plain(c.logprobs)] == entries
    assert not chunks[-1].logprobs and chunks[-1].done
    # Each chunk carries exactly the tokens that spell its text.
    assert all("".join(e["token"] for e in plain(c.logprobs)) == c.response for c in chunks)


def test_ollama_chat_sends_bytes_and_no_alternatives_unless_asked(server: Server, client: ollama.Client) -> None:
    request: Any = {"model": MODEL, "messages": MESSAGES, "options": {**GREEDY, "num_predict": TOKENS}, "logprobs": True}
    status, whole = post(server, "/api/chat", {**request, "stream": False})
    assert status == 200, whole
    entries = whole["logprobs"]
    assert len(entries) > 3 and "".join(e["token"] for e in entries) == whole["message"]["content"]
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes"} and entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode() == entry["token"]
    status, lines = post(server, "/api/chat", request)
    assert status == 200 and [e for line in lines for e in line.get("logprobs", [])] == entries
    streamed = list(client.chat(MODEL, MESSAGES, options=request["options"], logprobs=True, top_logprobs=2,
                                stream=True))
    check_greedy([e for c in streamed for e in plain(c.logprobs)], 2)
    assert "".join(c.message.content or "" for c in streamed) == whole["message"]["content"]


def test_ollama_reports_no_logprobs_unless_asked(server: Server) -> None:
    options = {**GREEDY, "num_predict": 3}
    status, reply = post(server, "/api/generate", {"model": MODEL, "prompt": PROMPT, "options": options,
                                                   "stream": False, "top_logprobs": 5})
    assert status == 200 and reply["response"] and "logprobs" not in reply
    status, lines = post(server, "/api/chat", {"model": MODEL, "messages": MESSAGES, "options": options})
    assert status == 200 and not any("logprobs" in line for line in lines)


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "3", True])
def test_ollama_top_logprobs_out_of_range_is_400(server: Server, bad: Any) -> None:
    for path, extra in (("/api/generate", {"prompt": PROMPT}), ("/api/chat", {"messages": MESSAGES})):
        status, reply = post(server, path, {"model": MODEL, **extra, "logprobs": True, "top_logprobs": bad})
        assert status == 400 and "top_logprobs" in reply["error"]


def test_ollama_client_sees_the_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(MODEL, MESSAGES, logprobs=True, top_logprobs=21)
    assert caught.value.status_code == 400


# --- OpenAI -----------------------------------------------------------------


def test_openai_chat_streamed_and_whole_agree(sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "logprobs": True,
                              "top_logprobs": 2, **GREEDY}
    whole = sdk.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    entries = plain(content)
    check_greedy(entries, 2)
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    assert all(e.bytes == list(e.token.encode()) for e in content)
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert plain(streamed) == entries
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_openai_chat_without_alternatives_keeps_an_empty_list(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == 3 and all(e.top_logprobs == [] and e.logprob <= 0 for e in content)


@pytest.mark.parametrize("fields", [{"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 2},
                                    {"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1}])
def test_openai_bad_top_logprobs_is_a_bad_request(sdk: openai.OpenAI, fields: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **fields)


def test_openai_completions_use_the_legacy_shape(sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": TOKENS,
                              "logprobs": 2, "echo": True, **GREEDY}
    whole = sdk.completions.create(**kwargs)
    choice = whole.choices[0]
    legacy = choice.logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset)
    assert choice.text == kwargs["prompt"] + "".join(legacy.tokens)
    for token, logprob, top, offset in zip(legacy.tokens, legacy.token_logprobs, legacy.top_logprobs,
                                           legacy.text_offset):
        assert choice.text[offset:offset + len(token)] == token
        assert len(top) == 2 and max(top.values()) == logprob == top[token] and logprob <= 0
    chunks = list(sdk.completions.create(**kwargs, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == legacy.tokens
    assert [t for p in parts for t in p.token_logprobs] == legacy.token_logprobs
    assert [t for p in parts for t in p.text_offset] == legacy.text_offset


def test_openai_logprobs_are_null_unless_asked(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert reply.choices[0].logprobs is None
    reply = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **GREEDY)
    assert reply.choices[0].logprobs is None
