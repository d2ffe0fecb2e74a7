"""One road for every reply: a stream that fails, or that the server's shutdown cuts, ends the same way on every API.

Once a stream's headers are out, its status can no longer tell a failure;
every API must then end the stream with its own error event (an NDJSON
``{"error": ...}`` line, an SSE ``data: {"error": {...}}``, an ``error``
event) and a complete chunked body, never a cut connection. The failures
are provoked in this process, right after a reply gave its first delta, on
a model whose template makes every API continue a count, so the generation
is far from over when they strike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from daemon import anthropic_client, create_model, exchange, openai_client, running

from mullama import service
from mullama.errors import CancelledError, MullamaError, OverloadedError
from mullama.http import anthropic as anthropic_api
from mullama.http import ollama as ollama_api
from mullama.http import openai as openai_api
from mullama.http.server import Server

MODEL = "counter"
#: The messages' text alone: a chat continues the count as a raw prompt would.
TEMPLATE = "{{ range .Messages }}{{ .Content }}{{ end }}"
COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"
CHAT = [{"role": "user", "content": COUNT}]
LIMIT = 500
OPTIONS = {"temperature": 0, "num_thread": 1}
SHUTDOWN = OverloadedError("the server is shutting down")
#: An event of a stream: its SSE event name ("" for none) and its JSON.
Event = tuple[str, dict[str, Any]]


def ndjson_events(body: bytes) -> list[Event]:
    return [("", json.loads(line)) for line in body.splitlines()]


def sse_events(body: bytes) -> list[Event]:
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        if fields and fields["data"] != "[DONE]":
            events.append((fields.get("event", ""), json.loads(fields["data"])))
    return events


def responses_error(error: MullamaError) -> Event:
    detail = openai_api.error_body(error)["error"]
    return "error", {"type": "error", "code": detail["code"] or detail["type"], "message": error.message,
                     "param": error.param}


@dataclass(frozen=True)
class Route:
    """A generation route of one API, and how its streams end on an error."""

    path: str
    body: dict[str, Any]
    events: Callable[[bytes], list[Event]]
    #: The stream's last event for an error.
    error_event: Callable[[MullamaError], Event]
    #: The body of the error as a (non-streamed) response.
    error_body: Callable[[MullamaError], dict[str, Any]]

    def request(self, stream: bool) -> dict[str, Any]:
        return {**self.body, "stream": stream}


ROUTES = {
    "ollama-chat": Route("/api/chat", {"model": MODEL, "messages": CHAT, "options": {**OPTIONS, "num_predict": LIMIT}},
                         ndjson_events, lambda error: ("", ollama_api.error_body(error)), ollama_api.error_body),
    "ollama-generate": Route("/api/generate", {"model": MODEL, "prompt": COUNT, "raw": True,
                                               "options": {**OPTIONS, "num_predict": LIMIT}},
                             ndjson_events, lambda error: ("", ollama_api.error_body(error)), ollama_api.error_body),
    "openai-chat": Route("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": LIMIT, **OPTIONS},
                         sse_events, lambda error: ("", openai_api.error_body(error)), openai_api.error_body),
    "openai-completions": Route("/v1/completions", {"model": MODEL, "prompt": COUNT, "max_tokens": LIMIT, **OPTIONS},
                                sse_events, lambda error: ("", openai_api.error_body(error)), openai_api.error_body),
    "openai-responses": Route("/v1/responses", {"model": MODEL, "input": COUNT, "max_output_tokens": LIMIT,
                                                **OPTIONS},
                              sse_events, responses_error, openai_api.error_body),
    "anthropic": Route("/v1/messages", {"model": MODEL, "messages": CHAT, "max_tokens": LIMIT, **OPTIONS},
                       sse_events, lambda error: ("error", anthropic_api.error_body(error)), anthropic_api.error_body),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("http-streams")) as server:
        create_model(server.server_address[1], model_path, MODEL, template=TEMPLATE)
        yield server


@pytest.fixture
def after_first_delta(monkeypatch: pytest.MonkeyPatch, server: Server) -> Iterator[Callable[..., None]]:
    """Install ``action(reply)``, run on every reply right after its first delta; the server runs again after."""

    def install(action: Callable[[service.Reply], None]) -> None:
        deltas = service.Reply.__iter__

        def first_then(reply: service.Reply) -> Iterator[service.Delta]:
            iterator = deltas(reply)
            try:
                yield next(iterator)
                action(reply)
                yield from iterator
            finally:
                iterator.close()

        monkeypatch.setattr(service.Reply, "__iter__", first_then)

    yield install
    server.app.stopping.clear()


def fail_with(error: Exception) -> Callable[[service.Reply], None]:
    def fail(_reply: service.Reply) -> None:
        raise error

    return fail


def post(server: Server, route: Route, stream: bool) -> tuple[int, bytes]:
    return exchange(server, "POST", route.path, route.request(stream))


def ended_with(route: Route, body: bytes, error: MullamaError) -> None:
    """``body`` is a stream that went on for a while, then ended with the API's error event for ``error``."""
    events = route.events(body)
    *before, (name, last) = events
    last.pop("sequence_number", None)  # the Responses API numbers its events
    assert (name, last) == route.error_event(error)
    assert before and not any(kind == "error" or "error" in data for kind, data in before), events


#: What strikes right after a reply's first delta, and the error the stream must end with.
MID_STREAM: dict[str, tuple[Callable[[Server], Callable[[service.Reply], None]], MullamaError]] = {
    # A bug: the client is told no more than that, the log gets the traceback.
    "bug": (lambda server: fail_with(RuntimeError("simulated fault")), MullamaError("internal server error")),
    "error": (lambda server: fail_with(CancelledError("generation cancelled")), CancelledError("generation cancelled")),
    "shutdown": (lambda server: lambda reply: server.app.stopping.set(), SHUTDOWN),
}


@pytest.mark.parametrize("api", ROUTES)
@pytest.mark.parametrize("strike", MID_STREAM)
def test_a_failure_mid_stream_ends_the_stream_with_the_apis_error_event(
        server: Server, after_first_delta: Callable[..., None], api: str, strike: str,
        caplog: pytest.LogCaptureFixture) -> None:
    action, error = MID_STREAM[strike]
    after_first_delta(action(server))
    route = ROUTES[api]
    with caplog.at_level(logging.ERROR, logger="mullama"):
        status, body = post(server, route, stream=True)
    assert status == 200
    ended_with(route, body, error)
    assert ("simulated fault" in caplog.text and "Traceback" in caplog.text) is (strike == "bug"), caplog.text


@pytest.mark.parametrize("api", ROUTES)
def test_shutdown_cutting_a_whole_answer_is_the_same_error_on_every_api(
        server: Server, after_first_delta: Callable[..., None], api: str) -> None:
    def shut_down(reply: service.Reply) -> None:
        server.app.stopping.set()
        reply.cancel()  # as wind_down cancels every generation

    after_first_delta(shut_down)
    route = ROUTES[api]
    status, body = post(server, route, stream=False)
    assert (status, json.loads(body)) == (503, route.error_body(SHUTDOWN))


# --- through the official clients ---------------------------------------------------


def test_official_clients_see_a_bug_mid_stream_as_an_error(server: Server,
                                                         after_first_delta: Callable[..., None]) -> None:
    after_first_delta(fail_with(RuntimeError("simulated fault")))
    with ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120) as client, \
            pytest.raises(ollama.ResponseError, match="internal server error"):
        for _ in client.chat(model=MODEL, messages=CHAT, stream=True, options={**OPTIONS, "num_predict": LIMIT}):
            pass
    with openai_client(server, timeout=120) as client, pytest.raises(openai.APIError) as failed:
        for _ in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=LIMIT, stream=True,
                                                extra_body=OPTIONS):
            pass
    assert failed.value.body == openai_api.error_body(MullamaError("internal server error"))["error"]
    with pytest.raises(anthropic.APIStatusError) as failed:
        for _ in anthropic_client(server, timeout=120).messages.create(
                model=MODEL, messages=CHAT, max_tokens=LIMIT, stream=True, extra_body=OPTIONS):
            pass
    assert failed.value.body == anthropic_api.error_body(MullamaError("internal server error"))
