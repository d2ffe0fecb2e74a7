"""What the three API modules share: reading a request, and writing a reply.

The Ollama, OpenAI and Anthropic modules keep only their wire shapes; the
rules below hold on every API, so they live once:

- a field of the wrong type is a 400 naming it (a boolean is never a number);
  the model name is required, and a name that is a server path answers as a
  missing model whether or not the file exists (no file-existence oracle);
  only Ollama's routes take paths, from loopback clients, under
  ``MULLAMA_ALLOWED_DIRS`` (:func:`server_path`);
- generation options come from Ollama's ``options`` object, then Ollama option
  names at the top level, then the API's own fields: a token limit
  (``max_tokens``...) must be at least 1, a stop field is a list of at most
  :data:`MAX_STOPS` strings of at most :data:`MAX_STOP_CHARS` characters;
- a history's tool calls, and tools in the function shape OpenAI and Ollama
  share, are read one way; call and response ids come from one generator;
- a non-streamed reply is drained, a streamed one written event by event;
  an error after the headers went out ends the stream with the API's own
  error event, and a server shutting down is one error on every API.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mullama import service
from mullama.engine.residency import parse_keep_alive
from mullama.engine.sampling import TokenLogprob
from mullama.errors import BadRequestError, ModelNotFoundError, MullamaError, OverloadedError
from mullama.http.server import Request
from mullama.options import PARAMETER_TYPES, parse_options
from mullama.prompt.toolcalls import new_call_id
from mullama.types import Message, RerankRequest, Tool, ToolCall

log = logging.getLogger("mullama.http")

#: How many prompt tokens were dropped to fit the context; sent by every API, only when some were.
TRUNCATED_HEADER = "X-Mullama-Prompt-Truncated"
#: What a client is told of an error that is a bug: the log has the traceback.
INTERNAL_ERROR = "internal server error"
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object"}

#: A request's stop sequences: at most this many, each at most this long (each is looked for after every token).
MAX_STOPS = 64
MAX_STOP_CHARS = 1024
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")

#: Writes one chunk of a stream.
Write = Callable[[bytes], None]
#: An API's in-stream error event for an error.
ErrorChunk = Callable[[MullamaError], bytes]


# --- request fields -----------------------------------------------------------


def typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` checked against ``kind``; ``default`` when it is absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequestError(f"{name}: expected {' or '.join(_TYPE_NAMES[k] for k in kinds)}", param=name)
    return value


def model_name(body: dict[str, Any], *aliases: str) -> str:
    """The request's ``model`` (when it has none, the first of ``aliases`` it has); 400 when missing.

    A name that is a path answers as a missing model: over HTTP, a model
    field never reads the server's files.
    """
    name = _named_model(body, aliases)
    if looks_like_path(name):
        raise ModelNotFoundError(name)
    return name


def model_or_path(request: Request, body: dict[str, Any], *aliases: str) -> str:
    """As :func:`model_name`, but a path :func:`server_path` allows is kept (``mullama run ./model.gguf``)."""
    name = _named_model(body, aliases)
    if looks_like_path(name) and server_path(request, name) is None:
        raise ModelNotFoundError(name)
    return name


def _named_model(body: dict[str, Any], aliases: tuple[str, ...]) -> str:
    name = body.get("model") or next((body[alias] for alias in aliases if body.get(alias)), None)
    if not isinstance(name, str) or not name.strip():
        raise BadRequestError("model is required", param="model")
    return name


def looks_like_path(text: str) -> bool:
    """Whether a model reference names a file, judged on the text alone, never by looking at the disk.

    Absolute, relative (``./``, ``../``), home (``~``) and drive paths, and
    names ending in ``.gguf`` that are not Hub references (those hold ``:``).
    """
    text = text.strip()
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\", "\\")) or _WINDOWS_DRIVE.match(text):
        return True
    return text.lower().endswith(".gguf") and ":" not in text


def server_path(request: Request, text: str) -> Path | None:
    """The file a loopback client names under ``MULLAMA_ALLOWED_DIRS`` (symbolic links followed), else None.

    Whether the file exists plays no part, so a refusal tells nothing about it.
    """
    directories = request.handler.app.allowed_dirs
    if not directories or not request.handler.client_is_loopback():
        return None
    try:
        path = Path(text.strip()).expanduser().resolve()
    except (RuntimeError, OSError, ValueError):
        return None
    return path if any(path.is_relative_to(directory) for directory in directories) else None


def keep_alive(body: dict[str, Any]) -> Any:
    """The request's ``keep_alive``, checked here so a bad one is a 400 before anything loads."""
    value = body.get("keep_alive")
    if value is not None and math.isnan(parse_keep_alive(value)):
        raise BadRequestError(f"invalid keep_alive duration {value!r}", param="keep_alive")
    return value


def generation_options(body: dict[str, Any], *, top_level: bool = True, limits: tuple[str, ...] = (),
                       stop: str = "", stop_may_be_text: bool = False) -> dict[str, Any]:
    """A request's Ollama options, checked and typed.

    Ollama's ``options`` object comes first; with ``top_level``, Ollama option
    names given beside the API's fields override it; then the API's token
    ``limits`` (the last given wins) become ``num_predict`` and its ``stop``
    field becomes ``stop`` (``stop_may_be_text``: one string is one stop).
    """
    values = dict(typed(body, "options", dict, {}))
    if top_level:
        values.update((name, value) for name, value in body.items() if name in PARAMETER_TYPES and name != stop)
    for name in limits:
        limit = typed(body, name, int)
        if limit is not None:
            if limit < 1:
                raise BadRequestError(f"{name}: must be at least 1", param=name)
            values["num_predict"] = limit
    if stop:
        stops = typed(body, stop, (str, list) if stop_may_be_text else list)
        if stops is not None:
            stops = [stops] if isinstance(stops, str) else stops
            if not all(isinstance(text, str) for text in stops):
                raise BadRequestError(f"{stop}: expected a list of strings", param=stop)
            values["stop"] = stops
    options = parse_options(values)
    check_stops(options.get("stop"), stop or "stop")
    return options


def check_stops(stops: Any, param: str) -> None:
    """Refuse more than :data:`MAX_STOPS` stop sequences, or one longer than :data:`MAX_STOP_CHARS`."""
    if not isinstance(stops, list):
        return
    if len(stops) > MAX_STOPS:
        raise BadRequestError(f"{param}: at most {MAX_STOPS} stop sequences are allowed, not {len(stops)}",
                              param=param)
    if any(isinstance(text, str) and len(text) > MAX_STOP_CHARS for text in stops):
        raise BadRequestError(f"{param}: a stop sequence may be at most {MAX_STOP_CHARS} characters long",
                              param=param)


def listed(value: Any, where: str, param: str | None = None) -> list[Any]:
    """A list field: absent (or null) is empty, anything but a list a 400 naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequestError(f"{where}: expected a list", param=param)
    return value


def decode_base64(data: Any, where: str, param: str | None = None) -> bytes:
    """The bytes of base64 text (an image); 400 naming ``where`` when it is not base64."""
    if not isinstance(data, str):
        raise BadRequestError(f"{where}: expected a base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{where}: invalid base64", param=param) from None


# --- tools and tool calls -------------------------------------------------------


def function_tools(value: Any) -> list[Tool]:
    """Tool definitions in the function shape OpenAI's chat and Ollama share (``{"function": {...}}``)."""
    tools = []
    for i, item in enumerate(listed(value, "tools", "tools")):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequestError(f"tools[{i}] must have a function with a name", param="tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        tools.append(Tool(name=function["name"], description=str(function.get("description") or ""),
                          parameters=parameters))
    return tools


def call_arguments(value: Any, where: str, param: str) -> dict[str, Any]:
    """A past call's arguments, a JSON object or its text; absent or empty is no arguments."""
    if value is None or value == "":
        return {}
    try:
        arguments = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError):
        raise BadRequestError(f"{where}.arguments is not valid JSON", param=param) from None
    if not isinstance(arguments, dict):
        raise BadRequestError(f"{where}.arguments must be a JSON object", param=param)
    return arguments


def function_calls(value: Any, where: str, param: str) -> list[ToolCall]:
    """A past message's ``tool_calls`` in the function shape (``{"id", "function": {"name", "arguments"}}``)."""
    calls = []
    for j, item in enumerate(listed(value, f"{where}.tool_calls", param)):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequestError(f"{where}.tool_calls[{j}] needs function.name", param=param)
        calls.append(ToolCall(name=function["name"], id=str(item.get("id") or ""), index=j,
                              arguments=call_arguments(function.get("arguments"), f"{where}.tool_calls[{j}].function",
                                                       param)))
    return calls


@dataclass
class ToolHistory:
    """The calls of a conversation so far, so that a tool result names the tool it answers."""

    names: dict[str, str] = field(default_factory=dict)

    def called(self, calls: Iterable[ToolCall]) -> None:
        """Remember the names of ``calls``."""
        self.names.update((call.id, call.name) for call in calls)

    def result(self, content: str, call_id: str, *, name: str = "", images: list[bytes] | None = None) -> Message:
        """The ``tool`` message answering call ``call_id`` (``name`` when that call is not in the history)."""
        return Message(role="tool", content=content, images=images or [], tool_call_id=call_id,
                       tool_name=self.names.get(call_id) or name)


def new_id(prefix: str) -> str:
    """A fresh random id for a response, a message or an output item: ``prefix`` and 24 hex digits."""
    return prefix + secrets.token_hex(12)


def call_id(call: ToolCall) -> str:
    """The call's id; one is given (in the tool-call parser's style) to a call without, so every mention agrees."""
    if not call.id:
        call.id = new_call_id()
    return call.id


def arguments_json(call: ToolCall) -> str:
    """A call's arguments as JSON text."""
    return json.dumps(call.arguments, ensure_ascii=False)


def logprob_json(entry: TokenLogprob, with_top: bool) -> dict[str, Any]:
    """A token as Ollama's ``Logprob`` (OpenAI's chat uses the same shape); ``with_top`` adds its alternatives."""
    out: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.raw)}
    if with_top:
        out["top_logprobs"] = [{"token": alt.token, "logprob": alt.logprob, "bytes": list(alt.raw)}
                               for alt in entry.top_logprobs]
    return out


# --- replies ----------------------------------------------------------------------


def truncation_headers(reply: service.Reply) -> dict[str, str]:
    """The :data:`TRUNCATED_HEADER` of a reply whose prompt was cut, else nothing."""
    return {TRUNCATED_HEADER: str(reply.truncated)} if reply.truncated else {}


def shutting_down() -> OverloadedError:
    """The error of a reply the server's shutdown cut short, the same on every API."""
    return OverloadedError("the server is shutting down")


def finished(request: Request, reply: service.Reply) -> service.ChatResult:
    """The result of a reply iterated to its end; one that shutdown cancelled is :func:`shutting_down`."""
    result = reply.result
    assert result is not None, "the reply was not iterated to its end"
    if result.done_reason == "cancel" and request.handler.app.stopping.is_set():
        raise shutting_down()
    return result


def drain(request: Request, reply: service.Reply) -> service.ChatResult:
    """Run a reply to its end (a non-streamed answer) and return its result."""
    for _ in reply:
        pass
    return finished(request, reply)


def send_result(request: Request, reply: service.Reply, body: dict[str, Any]) -> None:
    """A non-streamed answer to a generation: ``body`` with the reply's truncation header."""
    request.handler.send_json(200, body, truncation_headers(reply))


def ndjson(data: dict[str, Any]) -> bytes:
    """One line of a newline-delimited JSON stream (Ollama's)."""
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def sse(data: dict[str, Any], event: str = "") -> bytes:
    """One server-sent event (OpenAI's and Anthropic's streams), named when ``event`` is given."""
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def send_stream(request: Request, content_type: str, produce: Callable[[Write], None], error_chunk: ErrorChunk,
                *, headers: dict[str, str] | None = None, reply: service.Reply | None = None) -> None:
    """Stream what ``produce`` writes, as a chunked response of ``content_type``.

    Once the headers are out no status can tell a failure, so any error ends
    the stream with ``error_chunk`` of it, the API's own error event: a
    :class:`MullamaError` as itself, anything else (logged with its
    traceback) as :data:`INTERNAL_ERROR`. When the server starts shutting
    down, the next write is :func:`shutting_down` instead. A client gone
    cancels ``reply``; ``reply`` is closed before the stream ends.
    """
    handler = request.handler
    handler.start_stream(content_type, headers)

    def write(chunk: bytes) -> None:
        if handler.app.stopping.is_set():
            raise shutting_down()
        handler.write_chunk(chunk)

    try:
        produce(write)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        if reply is not None:
            reply.cancel()
        raise
    except MullamaError as error:
        handler.stream_failed(error.status)
        handler.write_chunk(error_chunk(error))
    except Exception:  # noqa: BLE001 - the client gets its API's error event, the log gets the traceback
        log.exception("unexpected error in the stream of %s %s", request.method, request.path)
        handler.stream_failed(500)
        handler.write_chunk(error_chunk(MullamaError(INTERNAL_ERROR)))
    finally:
        if reply is not None:
            reply.close()
    handler.end_stream()


def stream_reply(request: Request, reply: service.Reply, content_type: str, chunks: Iterable[bytes],
                 error_chunk: ErrorChunk) -> None:
    """Stream a generation's ``chunks`` (made from ``reply``) by :func:`send_stream`'s rules."""

    def produce(write: Write) -> None:
        for chunk in chunks:
            write(chunk)

    send_stream(request, content_type, produce, error_chunk, headers=truncation_headers(reply), reply=reply)


# --- rerank bodies (llama-server's, read by /v1/rerank and Ollama-style /api/rerank) ---


def rerank_request(body: dict[str, Any], name: str, options: dict[str, Any] | None = None, *,
          field: str = "documents") -> RerankRequest:
    """A rerank body's query and documents (under ``field``), for the model ``name``; a 400 for anything else.

    The body is Jina's and Cohere's, as llama-server reads it (see :mod:`mullama.http.rerank`).
    """
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequestError('"query" must be a string', param="query")
    documents = body.get(field)
    if not isinstance(documents, list) or not documents:
        raise BadRequestError(f'"{field}" must be a non-empty list of strings', param=field)
    texts = []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise BadRequestError(f'"{field}" must hold strings, or objects with a "text" string', param=field)
        texts.append(text)
    return RerankRequest(model=name, query=query, documents=texts, top_n=typed(body, "top_n", int),
                         options=options or {}, keep_alive=keep_alive(body))


def returns_documents(body: dict[str, Any]) -> bool:
    """The request's ``return_documents`` (false when absent)."""
    return typed(body, "return_documents", bool, False)


def rerank_results(reranking: service.Reranking, documents: list[str], with_text: bool) -> list[dict[str, Any]]:
    """The ``results`` list, with each document's text when ``with_text``."""
    results = []
    for ranked in reranking.results:
        result: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.relevance_score}
        if with_text:
            result["document"] = {"text": documents[ranked.index]}
        results.append(result)
    return results
