"""OpenAI's ``/v1`` on a real daemon, driven by the official ``openai`` SDK, plus its request parsers."""

from __future__ import annotations

import base64
import http.client
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon import create_model, openai_client, running
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama import service
from mullama.engine.model import Timings
from mullama.errors import BadRequestError
from mullama.prompt.grammar import validate
from mullama.http import openai as api
from mullama.http.server import Server
from mullama.ops.keys import Keyring
from mullama.types import Message, ToolCall

MODEL = "smol"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}
HELLO = [{"role": "user", "content": "Say hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("openai-api")) as server:
        create_model(server.server_address[1], model_path, MODEL)
        create_model(server.server_address[1], model_path, "cool", parameters={"temperature": 0})
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server, timeout=180) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def hello(client: openai.OpenAI) -> Any:
    """The greedy answer to "Say hi", which other tests compare against."""
    return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, **GREEDY)


def raw(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=180)
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


# --- models -----------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("cool:latest", "model", "library"),
                                                             ("smol:latest", "model", "library")]
    assert models[1].created > 0
    assert client.models.retrieve("smol").id == "smol:latest"
    assert client.models.retrieve("smol:latest").model_dump() == models[1].model_dump()


def test_missing_model_is_openai_not_found(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("hf.co/someone/missing:Q4_K_M")  # the SDK percent-encodes the slashes
    assert caught.value.body["code"] == "model_not_found"
    status, body = raw(server, "GET", "/v1/models/hf.co/someone/missing:Q4_K_M")
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "hf.co/someone/missing:Q4_K_M" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="missing", messages=HELLO)


def test_unknown_v1_path_and_method_have_openai_errors(server: Server) -> None:
    status, body = raw(server, "POST", "/v1/nothing-here", {})
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, body = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and "message" in body["error"]


def test_wrong_api_key_is_authentication_error(client: openai.OpenAI, server: Server, tmp_path: Path) -> None:
    keys = server.app.ops.keys
    server.app.ops.keys = Keyring(tmp_path / "keys.json", "secret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert client.with_options(api_key="secret").models.list().data
    finally:
        server.app.ops.keys = keys


# --- chat completions -------------------------------------------------------


def test_chat_completion_shape_and_usage(hello: Any) -> None:
    assert hello.object == "chat.completion" and hello.id.startswith("chatcmpl-")
    assert hello.model == MODEL
    choice = hello.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = hello.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_equals_non_streaming(client: openai.OpenAI, hello: Any) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, logprobs=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == hello.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [hello.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == hello.usage.model_dump()


def test_stop_strings_end_the_reply(client: openai.OpenAI, hello: Any) -> None:
    text = hello.choices[0].message.content
    word = text.split()[2]
    for stop in (word, ["never-appears", word]):
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, stop=stop, **GREEDY)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content.rstrip() == text[:text.index(word)].rstrip()


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI, hello: Any, field: str) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, **{field: 3}, **GREEDY)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert hello.choices[0].message.content.startswith(reply.choices[0].message.content)


def test_json_schema_response_format_is_valid(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                 "strict": True}}, **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    assert validate(json.loads(reply.choices[0].message.content), schema) == []


def test_required_tool_choice_streams_a_valid_call(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER, CLOCK],
        tool_choice="required", parallel_tool_calls=False, max_tokens=40, stream=True, **GREEDY))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas and {d.index for d in deltas} == {0}
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    name = deltas[0].function.name
    arguments = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert validate(arguments, PARAMETERS[name]) == []
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=40, **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    assert validate(json.loads(call.function.arguments), PARAMETERS["get_time"]) == []


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather"}, {"type": "text",
                                                                                        "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=12, **GREEDY)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"functions": [WEATHER["function"]]}, "functions"),
])
def test_invalid_requests_are_bad_request_errors(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": HELLO, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_error_during_a_stream_is_an_sse_error(client: openai.OpenAI, server: Server) -> None:
    server.app.stopping.set()
    try:
        stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True, **GREEDY)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
    finally:
        server.app.stopping.clear()


# --- completions ------------------------------------------------------------


def test_completions_templated_prompt_stream_and_echo(client: openai.OpenAI, server: Server) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.finish_reason == "length"
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    # As Ollama's: the prompt is one user message in the model's template, as chat renders it...
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                          **GREEDY)
    assert reply.usage.prompt_tokens == chat.usage.prompt_tokens and reply.usage.completion_tokens == 6
    # ... and as Ollama's /api/generate without raw renders it, so the answer is the same.
    status, generated = raw(server, "POST", "/api/generate", {"model": MODEL, "prompt": prompt, "stream": False,
                                                              "options": {"num_predict": 6, **GREEDY}})
    assert status == 200 and choice.text == prompt + generated["response"] == prompt + chat.choices[0].message.content
    chunks = list(client.completions.create(model=MODEL, prompt=[prompt], max_tokens=6, stream=True, **GREEDY))
    assert prompt + "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


def _ollama_chat(server: Server, model: str, options: dict[str, Any], prompt: str = "Tell me a story") -> str:
    status, reply = raw(server, "POST", "/api/chat", {"model": model, "stream": False, "options": options,
                                                      "messages": [{"role": "user", "content": prompt}]})
    assert status == 200, reply
    return reply["message"]["content"]


def test_sampling_defaults_are_ollamas_openai_defaults(client: openai.OpenAI, server: Server) -> None:
    story = [{"role": "user", "content": "Tell me a story"}]
    # Ollama's OpenAI layer samples at temperature 1.0 and top_p 1.0 when a request names neither...
    chat = client.chat.completions.create(model=MODEL, messages=story, max_tokens=24, seed=7)
    assert chat.choices[0].message.content == _ollama_chat(
        server, MODEL, {"seed": 7, "num_predict": 24, "temperature": 1.0, "top_p": 1.0})
    assert chat.choices[0].message.content != _ollama_chat(server, MODEL, {"seed": 7, "num_predict": 24})
    # ... its Responses layer only at temperature 1.0, leaving top_p to the model (0.9) ...
    response = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=24,
                                       extra_body={"seed": 7})
    assert response.output_text == _ollama_chat(server, MODEL, {"seed": 7, "num_predict": 24, "temperature": 1.0})
    # ... and, unlike Ollama's (ollama/ollama#17744), under a Modelfile's PARAMETER: "cool" stays greedy.
    greedy = _ollama_chat(server, "cool", {"num_predict": 24})
    for seed in (1, 2):
        reply = client.chat.completions.create(model="cool", messages=story, max_tokens=24, seed=seed)
        assert reply.choices[0].message.content == greedy


# --- embeddings -------------------------------------------------------------


def test_embeddings_float_and_base64_agree(client: openai.OpenAI, server: Server) -> None:
    inputs = ["hello world", "good night"]
    floats = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    decoded = client.embeddings.create(model=MODEL, input=inputs)  # the SDK asks for base64 and decodes it
    assert [d.index for d in floats.data] == [0, 1]
    for a, b in zip(floats.data, decoded.data):
        assert len(a.embedding) == len(b.embedding) > 0
        assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(a.embedding, b.embedding))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    status, body = raw(server, "POST", "/v1/embeddings", {"model": MODEL, "input": "hello world",
                                                          "encoding_format": "base64", "dimensions": 8})
    assert status == 200
    vector = base64.b64decode(body["data"][0]["embedding"])
    assert len(vector) == 8 * 4
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])


# --- responses --------------------------------------------------------------


def test_responses_text_and_stream(client: openai.OpenAI, hello: Any) -> None:
    response = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=16, temperature=0,
                                       extra_body={"seed": 1})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == hello.choices[0].message.content
    assert response.usage.input_tokens == hello.usage.prompt_tokens
    assert response.status == ("completed" if hello.choices[0].finish_reason == "stop" else "incomplete")
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Say hi"}],
                                          max_output_tokens=16, stream=True, temperature=0,
                                          extra_body={"options": {"seed": 1}}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{response.status}"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].response.output_text == response.output_text


def test_responses_stream_error_event(client: openai.OpenAI, server: Server) -> None:
    server.app.stopping.set()
    try:
        events = list(client.responses.create(model=MODEL, input="Say hi", max_output_tokens=4, stream=True))
    finally:
        server.app.stopping.clear()
    assert events[-1].type == "error" and "shutting down" in events[-1].message


# --- parsers (no model) -----------------------------------------------------


def _result(message: Message, done_reason: str = "stop") -> service.ChatResult:
    return service.ChatResult(model=MODEL, message=message, done_reason=done_reason,
                           timings=Timings(eval_count=7), prompt_tokens=5)


def test_response_events_for_reasoning_text_and_calls() -> None:
    call = ToolCall(name="get_weather", arguments={"city": "Paris"}, id="call_x", index=0)
    machine = api._ResponseEvents({"id": "resp_1"}, parallel=True)
    deltas = [service.Delta(thinking="hm"), service.Delta(content="Hi"), service.Delta(content="!"), service.Delta(tool_calls=[call])]
    events = list(machine.start()) + [e for d in deltas for e in machine.feed(d)]
    events += machine.finish(_result(Message(role="assistant", content="Hi!", thinking="hm", tool_calls=[call])))
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "hm"}]
    assert final["output"][1]["content"][0]["text"] == "Hi!"
    assert final["output"][2] | {"id": ""} == {"id": "", "type": "function_call", "status": "completed",
                                                "call_id": "call_x", "name": "get_weather",
                                                "arguments": '{"city": "Paris"}'}
    assert final["usage"]["total_tokens"] == 12
    added = next(e for e in events if e["type"] == "response.output_item.added" and e["item"]["type"] == "message")
    assert added["item"]["content"] == [] and added["item"]["status"] == "in_progress"


def test_chat_messages_translate_roles_parts_and_tool_names() -> None:
    png = b"\x89PNG fake"
    messages = api._chat_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                     {"type": "image_url", "image_url": {
                                         "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "one"}]},
    ])
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[1].content == "a\nb" and messages[1].images == [png]
    assert [(c.name, c.arguments, c.id, c.index) for c in messages[2].tool_calls] == [
        ("f", {"x": 1}, "c1", 0), ("g", {}, "c2", 1)]
    assert [(m.tool_name, m.tool_call_id, m.content) for m in messages[3:]] == [("g", "c2", "two"),
                                                                              ("f", "c1", "one")]


def test_response_input_items() -> None:
    messages = api._response_input([
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"y": 2}'},
        {"type": "function_call_output", "call_id": "c2", "output": "done"},
    ])
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert [(c.name, c.index) for c in messages[1].tool_calls] == [("f", 0), ("g", 1)]
    assert (messages[2].tool_name, messages[2].content) == ("g", "done")


def test_formats_tool_choice_and_options() -> None:
    schema = {"type": "object"}
    assert api._format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, "p") == schema
    assert api._format({"type": "json_schema", "name": "x", "schema": schema}, "p") == schema
    assert api._format({"type": "json_object"}, "p") == "json"
    assert api._format({"type": "text"}, "p") is None
    tools = api._tools([WEATHER, {"type": "function", "name": "flat", "parameters": schema}])
    assert [t.name for t in tools] == ["get_weather", "flat"]
    assert api._tool_choice({"type": "function", "name": "flat"}, tools) == "flat"
    assert api._tool_choice("required", tools) == "required"
    options = api._options({"max_tokens": 5, "stop": "x", "num_ctx": 1024, "options": {"top_k": 3, "num_ctx": 64},
                            "temperature": 0, "seed": 2, "user": "ignored"}, ("max_tokens",))
    assert options == {"num_predict": 5, "stop": ["x"], "num_ctx": 1024, "top_k": 3, "temperature": 0.0, "seed": 2}


_words = st.sampled_from(["function", "auto", "required", "text", "json_schema", "json_object", "message",
                          "function_call", "function_call_output", "user", "assistant", "tool", "image_url",
                          "input_image", "data:image/png;base64,AAAA", "data:,x", "{}", "[]"])
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | _words,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["role", "content", "type", "text", "image_url", "url", "tool_calls",
                                          "function", "name", "arguments", "tool_call_id", "call_id", "output", "id",
                                          "schema", "json_schema"]), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_parsers_refuse_garbage_with_bad_request_only(value: Any) -> None:
    for parse in (api._chat_messages, api._response_input, api._tools,
                  lambda v: api._format(v, "response_format"), lambda v: api._tool_choice(v, []),
                  lambda v: api._content(v, "m")):
        try:
            parse(value)
        except BadRequestError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "developer", "user", "assistant"]), st.text(max_size=20)),
                min_size=1, max_size=5))
def test_chat_messages_keep_text_and_order(turns: list[tuple[str, str]]) -> None:
    messages = api._chat_messages([{"role": role, "content": text} for role, text in turns])
    assert [(m.role, m.content) for m in messages] == [
        ("system" if role == "developer" else role, text) for role, text in turns]


def test_openai_error_body() -> None:
    from mullama.errors import ModelNotFoundError, OverloadedError

    assert api.error_body(ModelNotFoundError("x"))["error"]["code"] == "model_not_found"
    assert api.error_body(OverloadedError("busy"))["error"] == {"message": "busy", "type": "server_error",
                                                                   "param": None, "code": "overloaded_error"}
    assert api.error_body(BadRequestError("bad", param="n"))["error"] == {
        "message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
