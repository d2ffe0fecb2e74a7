"""Anthropic's Messages API, driven by the official ``anthropic`` SDK against a real daemon."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from daemon import anthropic_client, create_model, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mullama import service
from mullama.engine.model import Timings
from mullama.errors import (
    BadRequestError,
    MullamaError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)
from mullama.http import anthropic as api
from mullama.http.common import sse
from mullama.http.server import Server
from mullama.types import Message, ToolCall

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Server]:
    """A daemon on a free port, with the test model created as ``smol``."""
    with running(tmp_path_factory.mktemp("anthropic-api")) as server:
        assert create_model(server.server_address[1], model_path, "smol") == {"status": "success"}
        yield server


@pytest.fixture(scope="module")
def client(daemon: Server) -> anthropic.Anthropic:
    return anthropic_client(daemon, timeout=300)


@pytest.fixture(scope="module")
def baseline(client: anthropic.Anthropic) -> anthropic.types.Message:
    """A greedy non-streamed answer that runs into max_tokens."""
    return client.messages.create(model="smol", max_tokens=12, messages=PROMPT, extra_body=GREEDY)


# --- against the daemon --------------------------------------------------------


def test_message_shape_usage_and_max_tokens(baseline: anthropic.types.Message) -> None:
    assert baseline.id.startswith("msg_") and baseline.type == "message" and baseline.role == "assistant"
    assert baseline.model == "smol"
    assert [block.type for block in baseline.content] == ["text"]
    assert baseline.content[0].text.strip()
    assert baseline.stop_reason == "max_tokens" and baseline.stop_sequence is None
    assert baseline.usage.output_tokens == 12
    assert baseline.usage.input_tokens > 5


def test_raw_stream_event_order_and_text(client: anthropic.Anthropic, baseline: anthropic.types.Message) -> None:
    names, data = [], []
    with client.messages.with_streaming_response.create(model="smol", max_tokens=12, messages=PROMPT, stream=True,
                                                        extra_body=GREEDY) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
            elif line.startswith("data: "):
                data.append(json.loads(line[6:]))
    assert [d["type"] for d in data] == names
    body = names[3:-4]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert body and set(body) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert data[0]["message"]["usage"]["input_tokens"] == baseline.usage.input_tokens
    assert data[1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for d in data[3:-3]) == baseline.content[0].text
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert data[-2]["usage"]["output_tokens"] == 12


def test_stream_helper_gives_the_same_message(client: anthropic.Anthropic, baseline: anthropic.types.Message) -> None:
    with client.messages.stream(model="smol", max_tokens=12, messages=PROMPT, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == baseline.content[0].text
    assert [(block.type, block.text) for block in final.content] == [("text", baseline.content[0].text)]
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 12)


def test_stop_sequences(client: anthropic.Anthropic, baseline: anthropic.types.Message) -> None:
    full = baseline.content[0].text
    stop = next(w for w in full.split()[1:] if full.find(w) > 0)
    message = client.messages.create(model="smol", max_tokens=12, messages=PROMPT, stop_sequences=["\x00never", stop],
                                     extra_body=GREEDY)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == stop
    assert message.content[0].text == full[:full.find(stop)]


def test_count_tokens_matches_usage(client: anthropic.Anthropic, baseline: anthropic.types.Message) -> None:
    assert client.messages.count_tokens(model="smol", messages=PROMPT).input_tokens == baseline.usage.input_tokens
    short = client.messages.count_tokens(model="smol", messages=PROMPT, system="Answer in one word.")
    long = client.messages.count_tokens(model="smol", messages=PROMPT,
                                        system=[{"type": "text", "text": "Answer in one word."}] * 3)
    assert 0 < short.input_tokens < long.input_tokens


def test_forced_tool_use_streams_and_round_trips(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    with client.messages.stream(model="smol", max_tokens=40, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in events
    calls = [block for block in final.content if block.type == "tool_use"]
    assert calls and final.stop_reason == "tool_use"
    call = calls[0]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input.get("city"), str)

    history = ask + [{"role": "assistant", "content": [call.model_dump(include={"type", "id", "name", "input"})]}]
    result = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                            "content": "Sunny and 24 degrees Celsius."}]}]
    answer = client.messages.create(model="smol", max_tokens=8, messages=history + result, tools=[WEATHER],
                                    extra_body=GREEDY)
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model="smol", messages=history + result, tools=[WEATHER])
    assert counted.input_tokens == answer.usage.input_tokens
    shorter = client.messages.count_tokens(model="smol", tools=[WEATHER], messages=history + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny."}]}])
    assert shorter.input_tokens < counted.input_tokens


def test_errors_use_the_sdk_classes(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=PROMPT)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="smol", max_tokens=anthropic.NOT_GIVEN, messages=PROMPT, timeout=60)
    assert bad.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "max_tokens: field required"}}
    url_image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    with pytest.raises(anthropic.BadRequestError, match="base64"):
        client.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": [url_image]}])
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model="smol", max_tokens=4, messages=PROMPT, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "other"})
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=PROMPT)


def test_stream_of_a_missing_model_fails_before_streaming(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError), \
            client.messages.stream(model="no-such-model", max_tokens=4, messages=PROMPT) as stream:
        stream.until_done()


def test_error_after_the_stream_started_is_an_error_event(daemon: Server, client: anthropic.Anthropic) -> None:
    daemon.app.stopping.set()
    try:
        with pytest.raises(anthropic.APIStatusError) as stopped:
            for _ in client.messages.create(model="smol", max_tokens=4, messages=PROMPT, stream=True):
                pass
    finally:
        daemon.app.stopping.clear()
    assert stopped.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                             "message": "the server is shutting down"}}


def test_api_key_and_body_limit(tmp_path: Path) -> None:
    with running(tmp_path, MULLAMA_API_KEY="secret", MULLAMA_MAX_BODY="4096") as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(anthropic.AuthenticationError) as denied:
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.count_tokens(
                model="smol", messages=PROMPT)
        assert denied.value.body["error"]["type"] == "authentication_error"
        good = anthropic.Anthropic(base_url=base, api_key="secret", max_retries=0)
        with pytest.raises(anthropic.NotFoundError):  # past the key check: x-api-key is accepted
            good.messages.count_tokens(model="smol", messages=PROMPT)
        with pytest.raises(anthropic.RequestTooLargeError) as large:
            good.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "x" * 10_000}])
        assert large.value.body["error"]["type"] == "request_too_large"


# --- translation, without a model ----------------------------------------------


def test_messages_with_blocks() -> None:
    png = b"\x89PNG fake"
    messages = api.parse_messages([
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": base64.b64encode(png).decode()}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call both.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "12:00"}]},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no network", "is_error": True},
            {"type": "text", "text": "Thanks", "cache_control": {"type": "ephemeral"}}]},
    ], system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}])
    assert messages == [
        Message(role="system", content="Be brief.\nBe kind."),
        Message(role="user", content="Look:", images=[png]),
        Message(role="assistant", content="Checking.", thinking="I should call both.", tool_calls=[
            ToolCall(name="get_weather", arguments={"city": "Paris"}, id="toolu_1", index=0),
            ToolCall(name="get_time", arguments={}, id="toolu_2", index=1)]),
        Message(role="tool", content="12:00", tool_name="get_time", tool_call_id="toolu_2"),
        Message(role="tool", content="Error: no network", tool_name="get_weather", tool_call_id="toolu_1"),
        Message(role="user", content="Thanks"),
    ]


def test_request_fields() -> None:
    req = api.parse_request({
        "model": "m", "max_tokens": 7, "messages": PROMPT, "stop_sequences": ["\n\n"], "temperature": 0.5,
        "top_k": 3, "top_p": 0.5, "num_ctx": 2048, "options": {"seed": 1, "num_ctx": 1024}, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 2048}, "tools": [WEATHER], "tool_choice": {"type": "any"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert req.options == {"seed": 1, "num_ctx": 2048, "num_predict": 7, "stop": ["\n\n"], "temperature": 0.5,
                           "top_k": 3, "top_p": 0.5}
    assert (req.think, req.tool_choice, req.format) == ("low", "required", {"type": "object"})
    assert req.tools[0].parameters == WEATHER["input_schema"]
    choices = {"auto": "auto", "none": "none"}
    for kind, expected in choices.items():
        assert api.parse_request({"model": "m", "max_tokens": 1, "messages": PROMPT, "tools": [WEATHER],
                                  "tool_choice": {"type": kind}}).tool_choice == expected
    assert api.parse_thinking({"type": "disabled"}) is False
    assert api.parse_thinking({"type": "adaptive"}) is None
    assert api.parse_request({"model": "m", "messages": PROMPT}, counting=True).options == {}


@pytest.mark.parametrize("body", [
    {"max_tokens": 1, "messages": PROMPT},
    {"model": "m", "max_tokens": 0, "messages": PROMPT},
    {"model": "m", "max_tokens": True, "messages": PROMPT},
    {"model": "m", "max_tokens": 1, "messages": []},
    {"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "max_tokens": 1, "messages": PROMPT, "stop_sequences": "x"},
    {"model": "m", "max_tokens": 1, "messages": PROMPT, "tool_choice": {"type": "any"}},
    {"model": "m", "max_tokens": 1, "messages": PROMPT, "tools": [{"type": "web_search_20250305", "name": "w"}]},
    {"model": "m", "max_tokens": 1, "messages": PROMPT, "system": 3},
    {"model": "m", "max_tokens": 1, "messages": PROMPT, "options": {"num_ctx": "big"}},
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
    {"model": "m", "max_tokens": 1, "messages": [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t"}]}]},
    {"model": "m", "max_tokens": 1, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]},
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "not base64!"}}]}]},
])
def test_invalid_requests(body: dict) -> None:
    with pytest.raises(BadRequestError):
        api.parse_request(body)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=12)
_block_types = st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "x"])
_blocks = st.fixed_dictionaries({"type": _block_types}, optional={
    "text": _json, "id": _json, "name": _json, "input": _json, "tool_use_id": _json, "content": _json,
    "thinking": _json, "source": _json, "is_error": _json})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]),
                                       "content": st.text(max_size=5) | st.lists(_blocks | _json, max_size=4) | _json}),
                max_size=4),
       _json)
def test_parse_messages_never_crashes(value: list, system: object) -> None:
    try:
        messages = api.parse_messages(value, system)
    except BadRequestError:
        return
    assert all(isinstance(m, Message) and m.role in ("system", "user", "assistant", "tool") for m in messages)


_request_keys = st.sampled_from(["model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking",
                                  "stop_sequences", "temperature", "top_k", "options", "num_ctx", "output_config",
                                  "metadata", "stream", "keep_alive"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_request_keys, _json | st.just(PROMPT) | st.just([WEATHER]) | st.just("m")))
def test_parse_request_never_crashes(body: dict) -> None:
    try:
        req = api.parse_request(body)
    except BadRequestError:
        return
    assert req.options["num_predict"] == body["max_tokens"] >= 1 and req.messages


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=20)), min_size=1, max_size=5))
def test_string_content_is_kept_as_is(turns: list[tuple[str, str]]) -> None:
    as_strings = api.parse_messages([{"role": r, "content": t} for r, t in turns])
    as_blocks = api.parse_messages([{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns])
    assert [(m.role, m.content) for m in as_strings] == turns
    assert [(m.role, m.content) for m in as_blocks] == turns


# --- streaming events, from a scripted reply -------------------------------------


class ScriptedReply:
    """Stands in for service.Reply: yields given deltas, then has a result."""

    def __init__(self, deltas: list[service.Delta], done_reason: str = "stop", stop_sequence: str = "") -> None:
        self.deltas, self.done_reason, self.stop_sequence = deltas, done_reason, stop_sequence
        self.prompt_tokens = 11
        self.result: service.ChatResult | None = None

    def __iter__(self) -> Iterator[service.Delta]:
        message = Message(role="assistant")
        for delta in self.deltas:
            message.content += delta.content
            message.thinking += delta.thinking
            message.tool_calls += delta.tool_calls
            yield delta
        self.result = service.ChatResult(model="m", message=message, done_reason=self.done_reason,
                                      timings=Timings(eval_count=len(self.deltas)), prompt_tokens=11,
                                      stop_sequence=self.stop_sequence)


_deltas = st.lists(st.one_of(
    st.builds(service.Delta, content=st.text(min_size=1, max_size=4)),
    st.builds(service.Delta, thinking=st.text(min_size=1, max_size=4)),
    st.builds(lambda name, args: service.Delta(tool_calls=[ToolCall(name=name, arguments=args, id="call_ab12")]),
              st.sampled_from(["f", "g"]), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))),
    max_size=8)


@settings(max_examples=200, deadline=None)
@given(_deltas)
def test_stream_events_are_well_formed(deltas: list[service.Delta]) -> None:
    reply = ScriptedReply(deltas)
    events = list(api.stream_events(reply, "msg_1", "m"))
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("ping") == (1 if deltas else 0)
    blocks: list[dict] = []
    open_index = None
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            open_index = data["index"]
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            block, delta = blocks[open_index], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                assert delta["type"] == "input_json_delta"
                block["input"] = json.loads(delta["partial_json"])
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert name == "ping" and len(blocks) == 1
    assert open_index is None
    for earlier, later in itertools.pairwise(blocks):
        assert not (earlier["type"] == later["type"] != "tool_use")
    assert reply.result is not None
    final = api.message_json("msg_1", "m", reply.result)
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    thinking = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    assert text == "".join(d.content for d in deltas) and thinking == "".join(d.thinking for d in deltas)
    assert [b for b in blocks if b["type"] == "tool_use"] == [b for b in final["content"] if b["type"] == "tool_use"]
    expected_reason = "tool_use" if any(d.tool_calls for d in deltas) else "end_turn"
    assert events[-2][1]["delta"] == {"stop_reason": expected_reason, "stop_sequence": None}


def test_stop_reasons() -> None:
    def reason(done: str, stop: str = "", calls: bool = False) -> tuple[str, str | None]:
        deltas = [service.Delta(tool_calls=[ToolCall(name="f", arguments={})])] if calls else []
        reply = ScriptedReply(deltas, done, stop)
        list(reply)
        assert reply.result is not None
        out = api.message_json("msg_1", "m", reply.result)
        return out["stop_reason"], out["stop_sequence"]

    assert reason("stop") == ("end_turn", None)
    assert reason("length") == ("max_tokens", None)
    assert reason("stop", "###") == ("stop_sequence", "###")
    assert reason("stop", calls=True) == ("tool_use", None)


def test_error_bodies() -> None:
    cases = [(BadRequestError("x"), 400, "invalid_request_error"), (NotFoundError("x"), 404, "not_found_error"),
             (PayloadTooLargeError("x"), 413, "request_too_large"), (OverloadedError("x"), 503, "overloaded_error"),
             (MullamaError("x"), 500, "api_error")]
    for error, status, kind in cases:
        assert error.status == status
        assert api.error_body(error) == {"type": "error", "error": {"type": kind, "message": "x"}}
    assert api.error_type(429) == "rate_limit_error" and api.error_type(405) == "invalid_request_error"
    assert sse({"type": "ping"}, "ping") == b'event: ping\ndata: {"type": "ping"}\n\n'
