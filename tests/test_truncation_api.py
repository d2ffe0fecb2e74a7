"""Prompts cut to fit the context, reported on every API; ``truncate: false`` refuses them instead.

A model created with ``PARAMETER num_ctx 256`` gets a prompt of several
hundred tokens: each API's answer carries ``X-Mullama-Prompt-Truncated``
with the number of tokens dropped (streamed answers too, since the count is
known before the first token), and ``truncate: false`` is a 400 in the API's
own error shape that gives the token counts.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from daemon import create_model, running

import mullama
from mullama.http.common import TRUNCATED_HEADER
from mullama.http.server import Server

MODEL = "tiny"
LONG = "Tell me about the sea. " * 120
LONG_CHAT = [{"role": "user", "content": LONG}]
SHORT_CHAT = [{"role": "user", "content": "Hi"}]
OPTIONS = {"temperature": 0, "num_predict": 2}


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("truncation-api")) as server:
        create_model(server.server_address[1], model_path, MODEL, parameters={"num_ctx": 256, "num_thread": 1})
        yield server


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def dropped(headers: Any) -> int:
    """The header's count, checked to be a positive integer."""
    count = int(headers[TRUNCATED_HEADER])
    assert count > 0
    return count


# --- Ollama --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_reports_the_cut_in_header_and_body(server: Server, stream: bool) -> None:
    status, headers, data = post(server, "/api/chat", {"model": MODEL, "messages": LONG_CHAT, "stream": stream,
                                                       "options": OPTIONS})
    assert status == 200, data
    final = json.loads(data.splitlines()[-1])
    assert final["done"] and final["truncated"] == dropped(headers)
    assert final["prompt_eval_count"] < 256


def test_ollama_generate_reports_the_cut(server: Server) -> None:
    status, headers, data = post(server, "/api/generate", {"model": MODEL, "prompt": LONG, "options": OPTIONS})
    assert status == 200 and json.loads(data.splitlines()[-1])["truncated"] == dropped(headers)


def test_ollama_no_header_when_nothing_was_cut(server: Server) -> None:
    status, headers, data = post(server, "/api/chat", {"model": MODEL, "messages": SHORT_CHAT, "stream": False,
                                                       "options": OPTIONS})
    assert status == 200 and TRUNCATED_HEADER not in headers and "truncated" not in json.loads(data)


def test_ollama_truncate_false_is_a_400(server: Server) -> None:
    client = ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}")
    # The client has no ``truncate`` argument: send the body through its request method, to get its error.
    with pytest.raises(ollama.ResponseError) as error:
        client._request(ollama.ChatResponse, "POST", "/api/chat",
                        json={"model": MODEL, "messages": LONG_CHAT, "truncate": False, "stream": False})
    assert error.value.status_code == 400 and "256" in error.value.error and "tokens" in error.value.error
    status, _, data = post(server, "/api/generate", {"model": MODEL, "prompt": LONG, "truncate": False})
    assert status == 400 and "256" in json.loads(data)["error"]


def test_the_in_process_api_cuts_a_long_prompt_as_the_daemon_does(server: Server, model_path: Path) -> None:
    options = dict(OPTIONS, num_predict=8)
    status, _, data = post(server, "/api/generate", {"model": MODEL, "prompt": LONG, "raw": True, "stream": False,
                                                     "options": options})
    assert status == 200, data
    daemon = json.loads(data)
    with mullama.Model(model_path, num_ctx=256, num_thread=1) as model:
        # As /api/generate tokenizes a raw prompt.
        tokens = model.tokenize(LONG, add_special=model.add_bos)
        local = model.complete(tokens, options)
        keep = 4 + model.add_bos
    # Ollama's rule, num_keep 4: about half the context stays free for the answer.
    assert local.truncated == daemon["truncated"] == len(tokens) - (256 - (256 - keep) // 2)
    assert local.context == tokens[:keep] + tokens[keep + local.truncated:] + local.tokens
    assert local.text == daemon["response"] and local.done_reason == daemon["done_reason"]
    assert local.timings.eval_count == daemon["eval_count"] == 8


# --- OpenAI --------------------------------------------------------------------


def test_openai_reports_the_cut_in_a_header(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=LONG_CHAT, max_tokens=2, temperature=0)
    assert dropped(raw.headers) and raw.parse().choices[0].message.content is not None
    with oai.chat.completions.with_streaming_response.create(model=MODEL, messages=LONG_CHAT, max_tokens=2,
                                                             temperature=0, stream=True) as streamed:
        assert dropped(streamed.headers) == dropped(raw.headers)
        assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in streamed.parse())
    raw = oai.completions.with_raw_response.create(model=MODEL, prompt=LONG, max_tokens=2, temperature=0)
    assert dropped(raw.headers)
    raw = oai.responses.with_raw_response.create(model=MODEL, input=LONG, max_output_tokens=2, temperature=0)
    assert dropped(raw.headers)
    short = oai.chat.completions.with_raw_response.create(model=MODEL, messages=SHORT_CHAT, max_tokens=2)
    assert TRUNCATED_HEADER not in short.headers


def test_openai_truncate_false_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(model=MODEL, messages=LONG_CHAT, max_tokens=2, extra_body={"truncate": False})
    assert "256" in error.value.message and error.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=LONG_CHAT, max_tokens=2, stream=True,
                                    extra_body={"truncate": False})
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=LONG, max_tokens=2, extra_body={"truncate": False})
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, input=LONG, max_output_tokens=2, extra_body={"truncate": False})


# --- Anthropic -----------------------------------------------------------------


def test_anthropic_reports_the_cut_in_a_header(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(model=MODEL, max_tokens=2, messages=LONG_CHAT,
                                                   extra_body={"temperature": 0})
    assert dropped(raw.headers) and raw.parse().usage.input_tokens > 256
    with claude.messages.with_streaming_response.create(model=MODEL, max_tokens=2, messages=LONG_CHAT,
                                                        stream=True) as streamed:
        assert dropped(streamed.headers) == dropped(raw.headers)
        assert [event.type for event in streamed.parse()][-1] == "message_stop"
    short = claude.messages.with_raw_response.create(model=MODEL, max_tokens=2, messages=SHORT_CHAT)
    assert TRUNCATED_HEADER not in short.headers


def test_anthropic_truncate_false_is_a_400(claude: anthropic.Anthropic) -> None:
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as error:
            claude.messages.create(model=MODEL, max_tokens=2, messages=LONG_CHAT, stream=stream,
                                   extra_body={"truncate": False})
        assert error.value.body["error"]["type"] == "invalid_request_error"
        assert "256" in error.value.body["error"]["message"]
