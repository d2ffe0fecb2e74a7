"""The request rules every API shares, asked through each API: one rule, one status, one message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from daemon import create_model, exchange, running

from mullama.errors import BadRequestError
from mullama.http import anthropic as anthropic_api
from mullama.http import ollama as ollama_api
from mullama.http import openai as openai_api
from mullama.http.server import Server

MODEL = "smol"
#: Only ever named in refused requests: it must never be loaded.
UNTOUCHED = "untouched"
HELLO = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("http-requests")) as server:
        create_model(server.server_address[1], model_path, MODEL)
        create_model(server.server_address[1], model_path, UNTOUCHED)
        yield server


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, data = exchange(server, "POST", path, body)
    return status, json.loads(data)


@pytest.mark.parametrize("limit", [0, -5])
def test_a_token_limit_below_one_is_the_same_bad_request_on_openai_and_anthropic(
        oai: openai.OpenAI, claude: anthropic.Anthropic, limit: int) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=limit)
    with pytest.raises(anthropic.BadRequestError) as messages:
        claude.messages.create(model=MODEL, messages=HELLO, max_tokens=limit)
    assert chat.value.status_code == messages.value.status_code == 400
    assert chat.value.body["message"] == messages.value.body["error"]["message"] == "max_tokens: must be at least 1"
    assert chat.value.body["param"] == "max_tokens"
    # OpenAI's other names for the limit follow the same rule.
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens: must be at least 1"):
        oai.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=limit)
    with pytest.raises(openai.BadRequestError, match="max_tokens: must be at least 1"):
        oai.completions.create(model=MODEL, prompt="Hi", max_tokens=limit)
    with pytest.raises(openai.BadRequestError, match="max_output_tokens: must be at least 1"):
        oai.responses.create(model=MODEL, input="Hi", max_output_tokens=limit)


@pytest.mark.parametrize("path, body, error_body", [
    ("/api/chat", {"messages": HELLO}, ollama_api.error_body),
    ("/api/generate", {"prompt": "Hi"}, ollama_api.error_body),
    ("/v1/chat/completions", {"messages": HELLO}, openai_api.error_body),
    ("/v1/responses", {"input": "Hi"}, openai_api.error_body),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 4}, anthropic_api.error_body),
])
def test_a_missing_model_is_the_same_bad_request_on_every_api(server: Server, path: str, body: dict[str, Any],
                                                              error_body: Any) -> None:
    for model in (None, "", "  ", 7):
        assert post(server, path, {**body, "model": model}) == (
            400, error_body(BadRequestError("model is required", param="model")))


@pytest.mark.parametrize("path, body, error_body", [
    ("/api/chat", {"messages": HELLO}, ollama_api.error_body),
    ("/api/generate", {"prompt": "Hi"}, ollama_api.error_body),
    ("/v1/chat/completions", {"messages": HELLO}, openai_api.error_body),
    ("/v1/completions", {"prompt": "Hi"}, openai_api.error_body),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 4}, anthropic_api.error_body),
])
def test_a_field_of_the_wrong_type_is_the_same_bad_request_on_every_api_and_loads_nothing(
        server: Server, path: str, body: dict[str, Any], error_body: Any) -> None:
    refused = post(server, path, {**body, "model": UNTOUCHED, "stream": "yes"})
    assert refused == (400, error_body(BadRequestError("stream: expected a boolean", param="stream")))
    status, loaded = exchange(server, "GET", "/api/ps")
    assert status == 200 and UNTOUCHED not in [model["name"].split(":")[0] for model in json.loads(loaded)["models"]]
