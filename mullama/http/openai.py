"""OpenAI's ``/v1``: chat completions, completions, embeddings, models and responses.

Each route reads OpenAI's JSON into a :mod:`mullama.service` request and writes
back the shapes the official ``openai`` SDK parses; streams are server-sent
events. Chat completions report token log probabilities in the chat shape
(``logprobs.content``), completions in the legacy one (``tokens``,
``token_logprobs``...); both come from the model's raw distribution, before
sampling, as llama-server and Ollama report them.

As Ollama's OpenAI layer: a request without ``temperature`` samples at 1.0
and chat and completions without ``top_p`` at 1.0 (OpenAI's defaults), but
under a Modelfile's ``PARAMETER``, which Ollama lets these defaults override
(ollama/ollama#17744); ``/v1/completions`` renders its prompt with the
model's template, as Ollama's ``/api/generate`` does.

Thinking: ``reasoning_effort`` (or ``reasoning.effort``, which Ollama reads
first) becomes Ollama's ``think`` as Ollama maps it: ``"none"`` turns a
reasoning model's thinking off, ``"minimal"`` is ``low``, ``low``/``medium``/
``high``/``max`` are themselves and ``xhigh``/``ultra`` are ``max``; the
level reaches the template. Absent, the model's default holds (on for a
template that knows ``<think>``, unless its Modelfile says ``PARAMETER think
false``). The reasoning comes back as ``reasoning``, Ollama's name, beside
``content`` (see :data:`REASONING_FIELDS`). Beyond OpenAI's fields,
``truncate: false`` refuses a prompt longer than the context with a 400
instead of cutting it.
"""

from __future__ import annotations

import base64
import copy
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from mullama import service
from mullama.engine.sampling import TokenLogprob, check_top_logprobs
from mullama.errors import BadRequestError, ModelNotFoundError, MullamaError
from mullama.http.common import (
    ToolHistory,
    arguments_json,
    call_arguments,
    call_id,
    decode_base64,
    drain,
    finished,
    function_calls,
    function_tools,
    generation_options,
    keep_alive,
    listed,
    logprob_json,
    model_name,
    new_id,
    send_result,
    sse,
    stream_reply,
    typed,
)
from mullama.http.server import Request, Router
from mullama.store.names import ModelName
from mullama.types import ChatRequest, GenerateRequest, Message, Think, Tool, ToolCall

SSE = "text/event-stream"
FINGERPRINT = "fp_mullama"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: OpenAI's efforts (and the tiers clients add) as Ollama's ``thinkFromReasoningEffort`` maps them to ``think``.
_REASONING_EFFORTS: dict[str, Think] = {"none": False, "minimal": "low", "low": "low", "medium": "medium",
                                         "high": "high", "max": "max", "xhigh": "max", "ultra": "max"}
#: Where a reply's reasoning goes: ``reasoning`` as Ollama names it, and ``reasoning_content`` too, because
#: popular clients read only that name (DeepSeek's and llama-server's): OpenCode's OpenAI-compatible
#: provider (anomalyco/opencode#46061) and langchain-deepseek would drop Ollama's ``reasoning``.
REASONING_FIELDS = ("reasoning", "reasoning_content")
#: OpenAI's sampling defaults, which Ollama's OpenAI layer sets when a request leaves them out.
_CHAT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
#: Ollama's Responses layer sets only the temperature, leaving ``top_p`` to the model.
_RESPONSES_DEFAULTS = {"temperature": 1.0}
_TEXT_PARTS = ("text", "input_text", "output_text")
_IMAGE_PARTS = ("image_url", "input_image")
#: OpenAI error types by status; the SDK picks its exception class from the status alone.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def register(router: Router) -> None:
    """Add every OpenAI route and OpenAI's error body for ``/v1/``."""
    router.add("POST", "/v1/chat/completions", chat_completions)
    router.add("POST", "/v1/completions", completions)
    router.add("POST", "/v1/embeddings", embeddings)
    router.add("GET", "/v1/models", list_models)
    router.add("GET", "/v1/models/{model...}", retrieve_model)
    router.add("POST", "/v1/responses", responses)
    router.add_error_format("/v1/", error_body)


def error_body(error: MullamaError) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "server_error" if error.status >= 500 else _ERROR_TYPES.get(error.status, "invalid_request_error")
    code = "model_not_found" if isinstance(error, ModelNotFoundError) else None if error.kind == kind else error.kind
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}


def _error_data(error: MullamaError) -> bytes:
    """The in-stream error of chat completions and completions: the error body as one event's data."""
    return sse(error_body(error))


# --- request fields ---------------------------------------------------------


def _only_one(body: dict[str, Any], name: str) -> None:
    if typed(body, name, int, 1) != 1:
        raise BadRequestError(f"{name} must be 1: Mullama returns one choice per request", param=name)


def _chat_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """``logprobs`` and ``top_logprobs``; as OpenAI, alternatives without ``logprobs: true`` are refused."""
    logprobs = typed(body, "logprobs", bool, False)
    top = body.get("top_logprobs")
    top = 0 if top is None else check_top_logprobs(top)
    if top and not logprobs:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    return logprobs, top


def _options(body: dict[str, Any], limits: tuple[str, ...]) -> dict[str, Any]:
    """Ollama's options, the token limit named by one of ``limits``, and ``stop`` (a string or a list).

    temperature, top_p, seed and the penalties have the same names in both APIs.
    """
    return generation_options(body, limits=limits, stop="stop", stop_may_be_text=True)


def _think(effort: Any, param: str) -> Think:
    """An effort as Ollama's ``think``; absent or empty leaves the model's default, as in Ollama."""
    if effort is None or effort == "":
        return None
    if isinstance(effort, str) and effort in _REASONING_EFFORTS:
        return _REASONING_EFFORTS[effort]
    raise BadRequestError(f"invalid {param} {effort!r}: use {', '.join(_REASONING_EFFORTS)}", param=param)


def _reasoning(thinking: str) -> dict[str, str]:
    """A reply's reasoning under each of :data:`REASONING_FIELDS`."""
    return dict.fromkeys(REASONING_FIELDS, thinking)


def _chat_effort(body: dict[str, Any]) -> Any:
    """Chat's ``reasoning_effort``, or the Responses-style ``reasoning.effort`` that Ollama also accepts."""
    reasoning = typed(body, "reasoning", dict)
    if reasoning is not None:
        return reasoning.get("effort")
    return body.get("reasoning_effort")


def _truncate(body: dict[str, Any]) -> bool:
    """Mullama's extra ``truncate`` field: False refuses an over-long prompt instead of cutting it."""
    return typed(body, "truncate", bool, True)


def _format(spec: Any, param: str) -> Any:
    """``response_format`` (chat) or ``text.format`` (responses) as a chat ``format``."""
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        # Chat nests the schema under "json_schema"; the Responses API puts it beside "type".
        holder = spec.get("json_schema", spec)
        schema = holder.get("schema") if isinstance(holder, dict) else None
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise BadRequestError(f"{param}: the JSON schema must be an object", param=param)
        return schema
    raise BadRequestError(f"{param} type must be text, json_object or json_schema", param=param)


def _image(url: Any, where: str) -> bytes:
    if not isinstance(url, str):
        raise BadRequestError(f"{where}: the image URL must be a string", param="messages")
    if url.startswith(("http://", "https://")):
        raise BadRequestError(f"{where}: Mullama does not fetch remote images; send the image inline as a "
                              "data: URL (data:image/png;base64,...)", param="messages")
    header, comma, data = url.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64") and comma):
        raise BadRequestError(f"{where}: the image must be a base64 data: URL", param="messages")
    return decode_base64(data, f"{where}: the image data", "messages")


def _content(value: Any, where: str) -> tuple[str, list[bytes]]:
    """A message's text (text parts joined by newlines) and images."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise BadRequestError(f"{where}.content must be a string or a list of content parts", param="messages")
    texts, images = [], []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}.content[{j}]"
        if kind in _TEXT_PARTS or kind == "refusal":
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise BadRequestError(f"{here}.{kind if kind == 'refusal' else 'text'} must be a string",
                                      param="messages")
            texts.append(text)
        elif kind in _IMAGE_PARTS:
            url = part.get("image_url")
            images.append(_image(url.get("url") if isinstance(url, dict) else url, here))
        else:
            raise BadRequestError(f"{here}: unsupported content part type {kind!r}", param="messages")
    return "\n".join(texts), images


def _chat_messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise BadRequestError("messages must be a non-empty list", param="messages")
    history = ToolHistory()
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        role = item.get("role") if isinstance(item, dict) else None
        if not isinstance(role, str) or (role not in _ROLES and role not in ("tool", "function")):
            raise BadRequestError(f"{where}.role must be system, developer, user, assistant or tool",
                                  param="messages")
        text, images = _content(item.get("content"), where)
        if role in ("tool", "function"):
            messages.append(history.result(text, str(item.get("tool_call_id") or ""), name=str(item.get("name") or "")))
            continue
        calls = function_calls(item.get("tool_calls"), where, "messages") if role == "assistant" else []
        history.called(calls)
        thinking = item.get("reasoning") or item.get("reasoning_content") or ""
        messages.append(Message(role=_ROLES[role], content=text, images=images, tool_calls=calls,
                                thinking=thinking if isinstance(thinking, str) else ""))
    return messages


def _tools(value: Any) -> list[Tool]:
    """OpenAI tool definitions: the chat shape (nested ``function``) or the Responses shape (flat)."""
    nested = []
    for i, item in enumerate(listed(value, "tools", "tools")):
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise BadRequestError(f"tools[{i}]: only function tools are supported", param="tools")
        nested.append(item if "function" in item else {"type": "function", "function": item})
    return function_tools(nested)


def _tool_choice(value: Any, tools: list[Tool]) -> str:
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise BadRequestError("tool_choice \"required\" needs tools", param="tool_choice")
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function", value)
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name in {tool.name for tool in tools}:
            return name
        raise BadRequestError(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
    raise BadRequestError("tool_choice must be auto, none, required or {\"type\": \"function\", ...}",
                          param="tool_choice")


# --- reply helpers ----------------------------------------------------------


def _calls(calls: list[ToolCall], parallel: bool) -> list[ToolCall]:
    """The calls to report: only the first when the client asked for no parallel calls."""
    return calls if parallel else [call for call in calls if call.index == 0]


def _finish_reason(result: service.ChatResult, parallel: bool) -> str:
    if _calls(result.message.tool_calls, parallel):
        return "tool_calls"
    return "length" if result.done_reason == "length" else "stop"


def _usage(result: service.ChatResult) -> dict[str, int]:
    prompt = result.prompt_tokens or result.timings.prompt_eval_count
    completion = result.timings.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(body: dict[str, Any]) -> bool:
    return bool(typed(body, "stream_options", dict, {}).get("include_usage"))


def _send_events(request: Request, reply: service.Reply, events: Iterator[dict[str, Any]]) -> None:
    """Stream chat completion (or completion) chunks as server-sent events, ending with ``data: [DONE]``."""

    def data() -> Iterator[bytes]:
        for event in events:
            yield sse(event)
        yield b"data: [DONE]\n\n"

    stream_reply(request, reply, SSE, data(), _error_data)


# --- /v1/chat/completions ---------------------------------------------------


def _chat_logprobs_json(entries: list[TokenLogprob]) -> dict[str, Any]:
    """A choice's ``logprobs`` in the chat shape: one entry per token, each with its alternatives."""
    return {"content": [logprob_json(entry, with_top=True) for entry in entries], "refusal": None}


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call_id(call), "type": "function",
            "function": {"name": call.name, "arguments": arguments_json(call)}}


def chat_completions(request: Request) -> None:
    """``POST /v1/chat/completions``."""
    body = request.json()
    model = model_name(body)
    _only_one(body, "n")
    logprobs, top_logprobs = _chat_logprobs(body)
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise BadRequestError("functions and function_call are deprecated and not supported: use tools and "
                              "tool_choice", param="functions")
    tools = _tools(body.get("tools"))
    req = ChatRequest(
        model=model, messages=_chat_messages(body.get("messages")), tools=tools,
        options=_options(body, ("max_tokens", "max_completion_tokens")),
        format=_format(body.get("response_format"), "response_format"),
        think=_think(_chat_effort(body), "reasoning_effort"), keep_alive=keep_alive(body),
        tool_choice=_tool_choice(body.get("tool_choice"), tools), truncate=_truncate(body),
        logprobs=logprobs, top_logprobs=top_logprobs, defaults=_CHAT_DEFAULTS)
    parallel = typed(body, "parallel_tool_calls", bool, True)
    stream = typed(body, "stream", bool, False)
    include_usage = _include_usage(body)
    reply = service.chat(request.handler.app.manager, req, context=request.context)
    head = {"id": new_id("chatcmpl-"), "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}

    if not stream:
        result = drain(request, reply)
        calls = _calls(result.message.tool_calls, parallel)
        message: dict[str, Any] = {"role": "assistant", "content": result.message.content or (None if calls else ""),
                                   "refusal": None}
        if result.message.thinking:
            message.update(_reasoning(result.message.thinking))
        if calls:
            message["tool_calls"] = [_call_json(call) for call in calls]
        choice = {"index": 0, "message": message,
                  "logprobs": _chat_logprobs_json(result.logprobs) if logprobs else None,
                  "finish_reason": _finish_reason(result, parallel)}
        send_result(request, reply, {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result)})
        return

    def chunk(delta: dict[str, Any], finish_reason: str | None = None,
              entries: list[TokenLogprob] | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": _chat_logprobs_json(entries) if entries else None,
                  "finish_reason": finish_reason}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    def chunks() -> Iterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""})
        for delta in reply:
            parts: list[dict[str, Any]] = []
            if delta.thinking:
                parts.append(_reasoning(delta.thinking))
            if delta.content:
                parts.append({"content": delta.content})
            calls = _calls(delta.tool_calls, parallel)
            if calls:
                parts.append({"tool_calls": [{"index": call.index, **_call_json(call)} for call in calls]})
            if delta.logprobs and not parts:
                parts.append({"content": ""})
            # A delta's tokens may spell several parts (or markup of none); its first chunk carries them all.
            for i, part in enumerate(parts):
                yield chunk(part, entries=delta.logprobs if i == 0 else None)
        result = finished(request, reply)
        yield chunk({}, _finish_reason(result, parallel))
        if include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)}

    _send_events(request, reply, chunks())


# --- /v1/completions --------------------------------------------------------


def _legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """A choice's ``logprobs`` in the completions shape; ``offset`` is where the first token starts in the text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{alt.token: alt.logprob for alt in entry.top_logprobs} for entry in entries],
            "text_offset": offsets}


def completions(request: Request) -> None:
    """``POST /v1/completions``: the prompt is rendered with the model's template, as Ollama renders it."""
    body = request.json()
    model = model_name(body)
    _only_one(body, "n")
    _only_one(body, "best_of")
    logprobs = typed(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise BadRequestError("logprobs must be between 0 and 5", param="logprobs")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestError("prompt must be a non-empty string (one prompt per request)", param="prompt")
    suffix = typed(body, "suffix", str, "")
    echo = typed(body, "echo", bool, False)
    req = GenerateRequest(model=model, prompt=prompt, suffix=suffix, options=_options(body, ("max_tokens",)),
                          defaults=_CHAT_DEFAULTS, keep_alive=keep_alive(body), truncate=_truncate(body),
                          logprobs=logprobs is not None, top_logprobs=logprobs or 0)
    stream = typed(body, "stream", bool, False)
    include_usage = _include_usage(body)
    reply = service.generate(request.handler.app.manager, req, context=request.context)
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}
    # Offsets count characters of the choice's text, which starts with the prompt when it is echoed.
    start = len(prompt) if echo else 0

    def choice(text: str, finish_reason: str | None, legacy: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": legacy, "finish_reason": finish_reason}

    if not stream:
        result = drain(request, reply)
        text = (prompt if echo else "") + result.message.content
        legacy = _legacy_logprobs(result.logprobs, start) if logprobs is not None else None
        send_result(request, reply, {**head, "choices": [choice(text, _finish_reason(result, True), legacy)],
                                     "usage": _usage(result)})
        return

    def chunks() -> Iterator[dict[str, Any]]:
        offset = start
        if echo:
            yield {**head, "choices": [choice(prompt, None)]}
        for delta in reply:
            if not delta.content and not delta.logprobs:
                continue
            legacy = _legacy_logprobs(delta.logprobs, offset) if delta.logprobs else None
            offset += sum(len(entry.token) for entry in delta.logprobs)
            yield {**head, "choices": [choice(delta.content, None, legacy)]}
        result = finished(request, reply)
        yield {**head, "choices": [choice("", _finish_reason(result, True))]}
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(result)}

    _send_events(request, reply, chunks())


# --- /v1/embeddings ---------------------------------------------------------


def embeddings(request: Request) -> None:
    """``POST /v1/embeddings``; base64 vectors are little-endian float32, as OpenAI sends them."""
    body = request.json()
    model = model_name(body)
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(v, str) and v for v in inputs):
        raise BadRequestError("input must be a non-empty string or a non-empty list of non-empty strings "
                              "(token-id input is not supported)", param="input")
    encoding = typed(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise BadRequestError("encoding_format must be float or base64", param="encoding_format")
    result = service.embed(request.handler.app.manager, model, inputs, dimensions=typed(body, "dimensions", int),
                        options=_options(body, ()), keep_alive=keep_alive(body), context=request.context)

    def encode(vector: list[float]) -> Any:
        return vector if encoding == "float" else base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    data = [{"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(result.vectors)]
    request.handler.send_json(200, {"object": "list", "data": data, "model": model,
                                    "usage": {"prompt_tokens": result.prompt_tokens,
                                              "total_tokens": result.prompt_tokens}})


# --- /v1/models -------------------------------------------------------------


def _model_json(name: ModelName, modified: float) -> dict[str, Any]:
    return {"id": name.display, "object": "model", "created": int(modified), "owned_by": name.namespace}


def list_models(request: Request) -> None:
    """``GET /v1/models``: every model in the store."""
    entries = request.handler.app.manager.store.list_models()
    request.handler.send_json(200, {"object": "list", "data": [_model_json(e.name, e.modified) for e in entries]})


def retrieve_model(request: Request) -> None:
    """``GET /v1/models/{model}``; the name may hold ``/`` (raw or percent-encoded, as the SDK sends it)."""
    text = unquote(request.params["model"])
    try:
        name = ModelName.parse(text)
    except BadRequestError:
        raise ModelNotFoundError(text) from None
    entry = next((e for e in request.handler.app.manager.store.list_models() if e.name.key == name.key), None)
    if entry is None:
        raise ModelNotFoundError(text)
    request.handler.send_json(200, _model_json(entry.name, entry.modified))


# --- /v1/responses ----------------------------------------------------------


def _response_input(value: Any) -> list[Message]:
    """The Responses API's ``input``: a string, or messages and function call items."""
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if not isinstance(value, list) or not value:
        raise BadRequestError("input must be a string or a non-empty list of input items", param="input")
    history = ToolHistory()
    messages: list[Message] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _ROLES:
                raise BadRequestError(f"{where}.role must be system, developer, user or assistant", param="input")
            text, images = _content(item.get("content"), where)
            messages.append(Message(role=_ROLES[role], content=text, images=images))
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequestError(f"{where}.name is required", param="input")
            if not messages or messages[-1].role != "assistant":
                messages.append(Message(role="assistant"))
            calls = messages[-1].tool_calls
            call = ToolCall(name=name, arguments=call_arguments(item.get("arguments"), where, "input"),
                            id=str(item.get("call_id") or ""), index=len(calls))
            calls.append(call)
            history.called([call])
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, where)[0]
            messages.append(history.result(text, str(item.get("call_id") or "")))
        elif kind != "reasoning":  # past reasoning is dropped, as chat templates drop it
            raise BadRequestError(f"{where}: unsupported input item type {kind!r}", param="input")
    return messages


class _ResponseEvents:
    """Builds a Responses API ``response`` from deltas, yielding its streaming events on the way.

    The non-streaming route runs the same machine and discards the events, so
    both return the same output items.
    """

    def __init__(self, base: dict[str, Any], parallel: bool) -> None:
        self.base = base
        self.output: list[dict[str, Any]] = []
        self._parallel = parallel
        self._sequence = 0
        self._open: dict[str, Any] | None = None

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        """The response object as it stands, with ``status``."""
        return {**self.base, "status": status, "output": copy.deepcopy(self.output), **extra}

    def start(self) -> Iterator[dict[str, Any]]:
        """The events that open the stream."""
        yield self.event("response.created", response=self.snapshot("in_progress"))
        yield self.event("response.in_progress", response=self.snapshot("in_progress"))

    def feed(self, delta: service.Delta) -> Iterator[dict[str, Any]]:
        """Add one delta; opens and closes output items as the kind of output changes."""
        if delta.thinking:
            yield from self._text("reasoning", delta.thinking)
        if delta.content:
            yield from self._text("message", delta.content)
        for call in _calls(delta.tool_calls, self._parallel):
            yield from self._call(call)

    def finish(self, result: service.ChatResult) -> Iterator[dict[str, Any]]:
        """Close the last item and end with ``response.completed`` (or ``response.incomplete``)."""
        if not self.output:
            yield from self._text("message", "")
        yield from self._close()
        usage = _usage(result)
        details = {"usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                             "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}}}
        if result.done_reason == "length" and not result.message.tool_calls:
            response = self.snapshot("incomplete", incomplete_details={"reason": "max_output_tokens"}, **details)
            yield self.event("response.incomplete", response=response)
        else:
            yield self.event("response.completed", response=self.snapshot("completed", **details))

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next event of the stream, numbered."""
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1}

    def _text(self, kind: str, text: str) -> Iterator[dict[str, Any]]:
        if self._open is None or self._open["type"] != kind:
            yield from self._close()
            item: dict[str, Any]
            part: dict[str, Any]
            if kind == "message":
                item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress",
                        "content": []}
                part = {"type": "reasoning_text", "text": ""}
            self.output.append(item)
            self._open = item
            yield self.event("response.output_item.added", output_index=len(self.output) - 1,
                              item=copy.deepcopy(item))
            item["content"].append(part)
            yield self.event("response.content_part.added", **self._where(), content_index=0,
                              part=copy.deepcopy(part))
        self._open["content"][0]["text"] += text
        if text and kind == "message":
            yield self.event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                              logprobs=[])
        elif text:
            yield self.event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)

    def _close(self) -> Iterator[dict[str, Any]]:
        item = self._open
        if item is None:
            return
        part = item["content"][0]
        if item["type"] == "message":
            yield self.event("response.output_text.done", **self._where(), content_index=0, text=part["text"],
                              logprobs=[])
        else:
            yield self.event("response.reasoning_text.done", **self._where(), content_index=0, text=part["text"])
        yield self.event("response.content_part.done", **self._where(), content_index=0, part=copy.deepcopy(part))
        item["status"] = "completed"
        yield self.event("response.output_item.done", output_index=len(self.output) - 1, item=copy.deepcopy(item))
        self._open = None

    def _call(self, call: ToolCall) -> Iterator[dict[str, Any]]:
        yield from self._close()
        arguments = arguments_json(call)
        item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                "call_id": call_id(call), "name": call.name, "arguments": ""}
        self.output.append(item)
        index = len(self.output) - 1
        yield self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item))
        yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=arguments)
        item.update(arguments=arguments, status="completed")
        yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=call.name, arguments=arguments)
        yield self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))


def responses(request: Request) -> None:
    """``POST /v1/responses`` (stateless: ``previous_response_id`` is refused)."""
    body = request.json()
    model = model_name(body)
    if body.get("previous_response_id") is not None:
        raise BadRequestError("previous_response_id is not supported: Mullama keeps no responses; send the whole "
                              "conversation as input", param="previous_response_id")
    messages = _response_input(body.get("input"))
    instructions = typed(body, "instructions", str)
    if instructions:
        messages.insert(0, Message(role="system", content=instructions))
    tools = _tools(body.get("tools"))
    text = typed(body, "text", dict, {})
    reasoning = typed(body, "reasoning", dict, {})
    req = ChatRequest(
        model=model, messages=messages, tools=tools, options=_options(body, ("max_output_tokens",)),
        format=_format(text.get("format"), "text.format"), think=_think(reasoning.get("effort"), "reasoning.effort"),
        keep_alive=keep_alive(body), tool_choice=_tool_choice(body.get("tool_choice"), tools),
        truncate=_truncate(body), defaults=_RESPONSES_DEFAULTS)
    parallel = typed(body, "parallel_tool_calls", bool, True)
    stream = typed(body, "stream", bool, False)
    base = {"id": new_id("resp_"), "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "metadata": typed(body, "metadata", dict, {}), "parallel_tool_calls": parallel,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": {"format": text.get("format") or {"type": "text"}}, "error": None, "incomplete_details": None,
            "previous_response_id": None, "reasoning": reasoning or None, "store": False, "truncation": "disabled",
            "usage": None}
    reply = service.chat(request.handler.app.manager, req, context=request.context)
    machine = _ResponseEvents(base, parallel)

    def events() -> Iterator[dict[str, Any]]:
        yield from machine.start()
        for delta in reply:
            yield from machine.feed(delta)
        yield from machine.finish(finished(request, reply))

    if not stream:
        try:
            final = deque(events(), maxlen=1)[0]
        finally:
            reply.close()
        send_result(request, reply, final["response"])
        return

    def error_event(error: MullamaError) -> bytes:
        detail = error_body(error)["error"]
        return sse(machine.event("error", code=detail["code"] or detail["type"], message=error.message,
                                 param=error.param), "error")

    stream_reply(request, reply, SSE, (sse(event, event["type"]) for event in events()), error_event)
