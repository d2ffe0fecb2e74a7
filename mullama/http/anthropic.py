"""Anthropic's Messages API: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Requests become a :class:`mullama.types.ChatRequest`: content blocks turn into
:class:`~mullama.types.Message` fields (tool results into ``tool`` messages),
``max_tokens`` and ``stop_sequences`` into Ollama's ``num_predict`` and
``stop``. Replies go back as a message object or as the server-sent events
Anthropic streams, with Anthropic's error bodies, so the official SDKs work
unchanged. Ollama options may ride along as ``options`` or top-level fields,
and ``truncate: false`` refuses a prompt longer than the context (a 400)
instead of cutting it. ``thinking: {"type": "disabled"}`` turns a reasoning
model's thinking off; its reasoning otherwise comes back as ``thinking``
blocks (``thinking_delta`` events when streamed). How hard it thinks
(``output_config.effort``, else the ``budget_tokens`` of enabled thinking)
becomes a level of Ollama's ``think`` (see :func:`parse_thinking`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mullama import service
from mullama.errors import BadRequestError, MullamaError
from mullama.http.common import (
    ToolHistory,
    arguments_json,
    call_id,
    decode_base64,
    drain,
    generation_options,
    keep_alive,
    listed,
    model_name,
    new_id,
    send_result,
    sse,
    stream_reply,
    typed,
)
from mullama.http.server import Request, Router
from mullama.types import ChatRequest, Message, Think, Tool, ToolCall

SSE = "text/event-stream; charset=utf-8"
Event = tuple[str, dict[str, Any]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_EMPTY_BLOCKS = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
#: ``output_config.effort`` as Ollama's Anthropic layer maps it to a level (``xhigh`` is ``high``).
_EFFORTS: dict[str, Think] = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "max"}
#: Thinking budgets up to these many tokens are ``low``, then ``medium``; more is ``high``. Claude Code, the
#: most common client of this API, asks 4,000 tokens for "think", 10,000 for "think hard" and 31,999 for
#: "ultrathink"; Ollama turns every budget into ``true`` (``medium``).
_BUDGET_LEVELS = ((8_191, "low"), (24_575, "medium"))


def register(router: Router) -> None:
    """Add the Messages routes and Anthropic's error body for them."""
    router.add("POST", "/v1/messages", messages_route)
    router.add("POST", "/v1/messages/count_tokens", count_tokens_route)
    router.add_error_format("/v1/messages", error_body)


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(error: MullamaError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    return {"type": "error", "error": {"type": error_type(error.status), "message": error.message}}


def _error_event(error: MullamaError) -> bytes:
    """Anthropic's in-stream error: its error body as an ``error`` event."""
    return sse(error_body(error), "error")


# --- requests ----------------------------------------------------------------


def _text_of(blocks: list[Any], where: str) -> str:
    """The text of a list of text blocks (a system prompt or a tool result)."""
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequestError(f"{where}[{i}]: expected a text block")
        parts.append(block["text"])
    return "\n".join(parts)


def _image(block: dict[str, Any], where: str) -> bytes:
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequestError(f"{where}.source: expected an object")
    if source.get("type") != "base64":
        raise BadRequestError(f"{where}: image sources of type {source.get('type')!r} are not supported; "
                              "send the image inline with source.type \"base64\"")
    return decode_base64(source.get("data"), f"{where}.source.data")


def _tool_result(block: dict[str, Any], history: ToolHistory, where: str) -> Message:
    answered = block.get("tool_use_id")
    if not isinstance(answered, str) or not answered:
        raise BadRequestError(f"{where}.tool_use_id: expected a string")
    content = block.get("content", "")
    images = []
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        images = [_image(b, f"{where}.content[{i}]") for i, b in enumerate(content)
                  if isinstance(b, dict) and b.get("type") == "image"]
        text = _text_of([b for b in content if not (isinstance(b, dict) and b.get("type") == "image")],
                        f"{where}.content")
    else:
        raise BadRequestError(f"{where}.content: expected a string or a list of blocks")
    if block.get("is_error"):
        text = f"Error: {text}"
    return history.result(text, answered, images=images)


def _tool_use(block: dict[str, Any], where: str) -> ToolCall:
    given, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(given, str) or not given or not isinstance(name, str) or not name:
        raise BadRequestError(f"{where}: a tool_use block needs an id and a name")
    if not isinstance(arguments, dict):
        raise BadRequestError(f"{where}.input: expected an object")
    return ToolCall(name=name, arguments=arguments, id=given)


def _message(role: str, content: Any, history: ToolHistory, where: str) -> list[Message]:
    """One Anthropic message as Mullama messages: tool results first, then the turn itself."""
    if isinstance(content, str):
        return [Message(role=role, content=content)]
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content: expected a string or a list of content blocks")
    turn = Message(role=role)
    texts: list[str] = []
    results: list[Message] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image":
            turn.images.append(_image(block, at))
        elif kind == "tool_use" and role == "assistant":
            call = _tool_use(block, at)
            call.index = len(turn.tool_calls)
            history.called([call])
            turn.tool_calls.append(call)
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, history, at))
        elif kind == "thinking" and role == "assistant" and isinstance(block.get("thinking"), str):
            turn.thinking += block["thinking"]
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # opaque to anything but Anthropic's own models
        else:
            raise BadRequestError(f"{at}: invalid or unsupported content block {kind!r} in a {role} message")
    turn.content = "\n".join(texts)
    has_turn = bool(texts or turn.images or turn.tool_calls or turn.thinking)
    return results + ([turn] if has_turn or not results else [])


def parse_messages(value: Any, system: Any = None) -> list[Message]:
    """Anthropic's ``system`` and ``messages`` as Mullama messages."""
    messages = []
    if isinstance(system, list):
        system = _text_of(system, "system")
    elif system is not None and not isinstance(system, str):
        raise BadRequestError("system: expected a string or a list of text blocks", param="system")
    if system:
        messages.append(Message(role="system", content=system))
    if not isinstance(value, list) or not value:
        raise BadRequestError("messages: expected a non-empty list", param="messages")
    history = ToolHistory()
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise BadRequestError(f"messages[{i}]: expected an object with role \"user\" or \"assistant\"",
                                  param="messages")
        messages.extend(_message(item["role"], item.get("content"), history, f"messages[{i}]"))
    return messages


def parse_tools(value: Any) -> list[Tool]:
    """Anthropic tool definitions (``name``, ``description``, ``input_schema``)."""
    tools = []
    for i, item in enumerate(listed(value, "tools", "tools")):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise BadRequestError(f"tools[{i}]: expected an object with a name", param="tools")
        if item.get("type") not in (None, "custom"):
            raise BadRequestError(f"tools[{i}]: server tools ({item['type']!r}) are not supported", param="tools")
        schema = item.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise BadRequestError(f"tools[{i}].input_schema: expected a JSON schema object", param="tools")
        tools.append(Tool(name=item["name"], description=str(item.get("description") or ""), parameters=schema))
    return tools


def parse_tool_choice(value: Any, tools: list[Tool]) -> str:
    """``tool_choice`` as ChatRequest's "auto", "required", "none" or a tool name."""
    if value is None:
        return "auto"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "tool":
        name = value.get("name")
        if not any(tool.name == name for tool in tools):
            raise BadRequestError(f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
        return name
    if kind not in _TOOL_CHOICES:
        raise BadRequestError("tool_choice: expected {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}",
                              param="tool_choice")
    if kind == "any" and not tools:
        raise BadRequestError("tool_choice: \"any\" needs at least one tool", param="tool_choice")
    return _TOOL_CHOICES[kind]


def parse_thinking(value: Any, output_config: Any = None) -> Think:
    """``thinking`` and ``output_config.effort`` as Ollama's ``think``.

    Disabled thinking is off. Otherwise an effort is its level, as in Ollama;
    without one, enabled thinking is the level of its ``budget_tokens`` (see
    :data:`_BUDGET_LEVELS`), where Ollama gives every budget ``medium``.
    Adaptive thinking, other modes or nothing leave the model's default.
    """
    kind = None
    if value is not None:
        kind = value.get("type") if isinstance(value, dict) else None
        if not isinstance(kind, str):
            raise BadRequestError("thinking: expected {\"type\": \"enabled\" | \"disabled\" | \"adaptive\"}",
                                  param="thinking")
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    if isinstance(effort, str):
        effort = effort.strip().lower() or None  # as Ollama reads it; empty is no effort
    if effort is not None and (not isinstance(effort, str) or effort not in _EFFORTS):
        raise BadRequestError(f"output_config.effort: expected one of {', '.join(_EFFORTS)}", param="output_config")
    if kind == "disabled":
        return False
    if effort is not None:
        return _EFFORTS[effort]
    if kind != "enabled":
        return None
    budget = typed(value, "budget_tokens", int)
    if budget is None:
        return True
    return next((level for most, level in _BUDGET_LEVELS if budget <= most), "high")


def parse_output_format(value: Any) -> dict[str, Any] | None:
    """``output_config.format`` (structured outputs): the JSON schema the reply must follow."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequestError("output_config: expected an object", param="output_config")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequestError("output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}",
                              param="output_config")
    return fmt["schema"]


def parse_request(body: dict[str, Any], *, counting: bool = False) -> ChatRequest:
    """A Messages (or count_tokens, where ``max_tokens`` is not needed) body as a ChatRequest."""
    model = model_name(body)
    if body.get("max_tokens") is None and not counting:
        raise BadRequestError("max_tokens: field required", param="max_tokens")
    options = generation_options(body, limits=("max_tokens",), stop="stop_sequences")
    tools = parse_tools(body.get("tools"))
    return ChatRequest(model=model, messages=parse_messages(body.get("messages"), body.get("system")),
                       tools=tools, options=options, format=parse_output_format(body.get("output_config")),
                       think=parse_thinking(body.get("thinking"), body.get("output_config")),
                       keep_alive=keep_alive(body),
                       tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
                       truncate=typed(body, "truncate", bool, True))


# --- replies -----------------------------------------------------------------


def tool_use_id(call: ToolCall) -> str:
    """The call's id in Anthropic's ``toolu_`` style."""
    return "toolu_" + call_id(call).removeprefix("call_")


def stop_reason(result: service.ChatResult) -> str:
    """end_turn, max_tokens, stop_sequence or tool_use."""
    if result.message.tool_calls:
        return "tool_use"
    if result.done_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence else "end_turn"


def _usage(result: service.ChatResult) -> dict[str, int]:
    return {"input_tokens": result.prompt_tokens, "output_tokens": result.timings.eval_count}


def message_json(message_id: str, model: str, result: service.ChatResult) -> dict[str, Any]:
    """The whole reply as Anthropic's message object."""
    m = result.message
    content: list[dict[str, Any]] = []
    if m.thinking:
        content.append({"type": "thinking", "thinking": m.thinking, "signature": ""})
    if m.content:
        content.append({"type": "text", "text": m.content})
    content.extend({"type": "tool_use", "id": tool_use_id(c), "name": c.name, "input": c.arguments}
                   for c in m.tool_calls)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence or None,
            "usage": _usage(result)}


@dataclass
class _Blocks:
    """The content block being streamed: opens, fills and closes blocks in order."""

    index: int = -1
    #: Type of the open block; "" when none is open.
    open_kind: str = ""
    pinged: bool = False

    def start(self, block: dict[str, Any]) -> list[Event]:
        events = self.stop()
        self.index += 1
        self.open_kind = block["type"]
        events.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block}))
        if not self.pinged:
            self.pinged = True
            events.append(("ping", {"type": "ping"}))
        return events

    def stop(self) -> list[Event]:
        if not self.open_kind:
            return []
        self.open_kind = ""
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def delta(self, delta: dict[str, Any]) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def text(self, kind: str, text: str) -> list[Event]:
        events = self.start(dict(_EMPTY_BLOCKS[kind])) if self.open_kind != kind else []
        key = "text" if kind == "text" else "thinking"
        events.append(self.delta({"type": f"{key}_delta", key: text}))
        return events

    def tool_use(self, call: ToolCall) -> list[Event]:
        events = self.start({"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": {}})
        events.append(self.delta({"type": "input_json_delta", "partial_json": arguments_json(call)}))
        return events + self.stop()


def stream_events(reply: service.Reply, message_id: str, model: str) -> Iterator[Event]:
    """The server-sent events of a streamed reply, as (event name, data) pairs."""
    yield "message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 0}}}
    blocks = _Blocks()
    for delta in reply:
        if delta.thinking:
            yield from blocks.text("thinking", delta.thinking)
        if delta.content:
            yield from blocks.text("text", delta.content)
        for call in delta.tool_calls:
            yield from blocks.tool_use(call)
    yield from blocks.stop()
    result = reply.result
    assert result is not None, "the reply was not iterated to its end"
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(result),
                                      "stop_sequence": result.stop_sequence or None},
                            "usage": _usage(result)}
    yield "message_stop", {"type": "message_stop"}


# --- routes ------------------------------------------------------------------


def messages_route(request: Request) -> None:
    """``POST /v1/messages``: a message object, or its server-sent events."""
    body = request.json()
    req = parse_request(body)
    stream = typed(body, "stream", bool, False)
    reply = service.chat(request.handler.app.manager, req, context=request.context)
    message_id = new_id("msg_")
    if not stream:
        send_result(request, reply, message_json(message_id, req.model, drain(request, reply)))
        return

    events = (sse(data, name) for name, data in stream_events(reply, message_id, req.model))
    stream_reply(request, reply, SSE, events, _error_event)


def count_tokens_route(request: Request) -> None:
    """``POST /v1/messages/count_tokens``: the prompt's length in tokens."""
    req = parse_request(request.json(), counting=True)
    tokens = service.count_tokens(request.handler.app.manager, req, context=request.context)
    request.handler.send_json(200, {"input_tokens": tokens})
