"""Ollama's ``/api/*``: the same fields, defaults, status codes and error bodies.

Each route reads Ollama's JSON, builds a :mod:`mullama.service` request or
calls the store, and writes Ollama's JSON back; streaming responses are
NDJSON with one flushed line per token.

Server paths (a ``model`` that is a GGUF file, ``/api/create``'s ``from``
and ``in_place``) are taken only from loopback clients and only under
``MULLAMA_ALLOWED_DIRS``; a remote client uploads the file as a blob,
which is streamed to disk as it arrives, hashed on the way and renamed
into the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mullama import __version__, service
from mullama.engine.model import quantize
from mullama.engine.residency import parse_keep_alive
from mullama.engine.sampling import TokenLogprob, check_top_logprobs
from mullama.errors import BadRequestError, ForbiddenError, MullamaError, NotFoundError, UnauthorizedError
from mullama.http.common import (
    Write,
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
    looks_like_path,
    model_name,
    model_or_path,
    ndjson,
    rerank_request,
    rerank_results,
    returns_documents,
    send_result,
    send_stream,
    server_path,
    stream_reply,
    typed,
)
from mullama.http.server import Request, Router
from mullama.options import parse_options
from mullama.store import gguf
from mullama.store.create import CreateSpec
from mullama.store.create import create as create_model
from mullama.store.modelfile import Modelfile
from mullama.store.modelfile import render as render_modelfile
from mullama.store.capabilities import capabilities
from mullama.store.records import ModelRecord, find_model
from mullama.store.names import ModelName, canonical_digest
from mullama.store.pull import pull
from mullama.types import THINK_LEVELS, ChatRequest, GenerateRequest, Message, Think, ToolCall

#: The Ollama version Mullama answers to; clients gate features on it.
OLLAMA_COMPATIBLE_VERSION = "0.13.0"
NDJSON = "application/x-ndjson"


def register(router: Router) -> None:
    """Add every Ollama route (Ollama's error body is the router's default, see :mod:`mullama.http.app`)."""
    router.add("GET", "/", root)
    router.add("HEAD", "/", root)
    router.add("GET", "/api/version", version)
    router.add("HEAD", "/api/version", version)
    router.add("POST", "/api/generate", generate)
    router.add("POST", "/api/chat", chat_route)
    router.add("POST", "/api/embed", embed)
    router.add("POST", "/api/embeddings", embeddings_legacy)
    router.add("POST", "/api/rerank", rerank_route)
    router.add("GET", "/api/tags", tags)
    router.add("HEAD", "/api/tags", tags)
    router.add("GET", "/api/ps", ps)
    router.add("POST", "/api/show", show)
    router.add("POST", "/api/create", create)
    router.add("POST", "/api/copy", copy)
    router.add("DELETE", "/api/delete", delete)
    router.add("POST", "/api/pull", pull_route)
    router.add("POST", "/api/push", push)
    router.add("HEAD", "/api/blobs/{digest}", blob_exists)
    router.add("POST", "/api/blobs/{digest}", blob_upload)
    router.add("POST", "/api/apply-template", apply_template)
    # ollama.com's account and cloud routes: answered as an Ollama that is signed out, with its cloud off.
    router.add("POST", "/api/me", whoami)
    router.add("POST", "/api/signout", signout)
    router.add("DELETE", "/api/user/keys/{key}", signout)
    router.add("POST", "/api/experimental/web_search", lambda request: _cloud_off(request, "web search"))
    router.add("POST", "/api/experimental/web_fetch", lambda request: _cloud_off(request, "web fetch"))
    router.add("GET", "/api/experimental/model-recommendations", model_recommendations)


def error_body(error: MullamaError) -> dict[str, Any]:
    """Ollama's error body: ``{"error": "..."}``."""
    return {"error": error.message}


def _error_line(error: MullamaError) -> bytes:
    """Ollama's in-stream error: its error body as the last NDJSON line."""
    return ndjson(error_body(error))


# --- small helpers ----------------------------------------------------------


def now() -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals."""
    t = time.time_ns()
    return datetime.fromtimestamp(t // 1_000_000_000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{t % 1_000_000_000:09d}Z"


#: 2318-01-01, the expiry Ollama reports for a model kept loaded forever.
_FOREVER = 10981785600.0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).astimezone().isoformat()


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``options`` object (Ollama reads no option names beside it)."""
    return generation_options(body, top_level=False)


def _format(body: dict[str, Any]) -> Any:
    value = body.get("format")
    if value in (None, ""):
        return None
    if value == "json" or isinstance(value, dict):
        return value
    raise BadRequestError(f"invalid format {value!r}: use \"json\" or a JSON schema", param="format")


def _think(body: dict[str, Any]) -> Think:
    """``think``: a boolean, or a level that turns thinking on and reaches the template (Ollama's ``ThinkValue``)."""
    value = body.get("think")
    if value is None or isinstance(value, bool) or value in THINK_LEVELS:
        return value
    raise BadRequestError("think must be true, false, \"low\", \"medium\", \"high\" or \"max\"", param="think")


def _images(value: Any, where: str = "images") -> list[bytes]:
    return [decode_base64(v, f"{where}[{i}]", "images") for i, v in enumerate(listed(value, where, "images"))]


def _logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """``logprobs`` and ``top_logprobs``; as in Ollama, the range is checked even with ``logprobs`` off."""
    top = body.get("top_logprobs")
    return typed(body, "logprobs", bool, False), check_top_logprobs(0 if top is None else top)


def _add_logprobs(out: dict[str, Any], entries: list[TokenLogprob]) -> dict[str, Any]:
    """Put ``entries`` in a response as Ollama does: only when there are some, alternatives only when asked."""
    if entries:
        out["logprobs"] = [logprob_json(entry, bool(entry.top_logprobs)) for entry in entries]
    return out


def _stream(body: dict[str, Any]) -> bool:
    return typed(body, "stream", bool, True)


def _truncate(body: dict[str, Any]) -> bool:
    return typed(body, "truncate", bool, True)


def _timings(result: service.ChatResult) -> dict[str, Any]:
    t = result.timings
    out = {"done_reason": result.done_reason, "total_duration": t.total_duration,
           "load_duration": t.load_duration, "prompt_eval_count": t.prompt_eval_count,
           "prompt_eval_duration": t.prompt_eval_duration, "eval_count": t.eval_count,
           "eval_duration": t.eval_duration}
    if result.truncated:
        out["truncated"] = result.truncated
    return out


def _send_reply(request: Request, reply: service.Reply, stream: bool, shape: Any, final: Any) -> None:
    """Write a reply as NDJSON (one flushed line per delta) or as one JSON object.

    ``final(result, whole)`` is the last line; ``whole`` when it is the only
    one and carries the whole message.
    """
    if not stream:
        send_result(request, reply, final(drain(request, reply), True))
        return

    def lines() -> Iterator[bytes]:
        for delta in reply:
            yield ndjson(shape(delta))
        yield ndjson(final(finished(request, reply), False))

    stream_reply(request, reply, NDJSON, lines(), _error_line)


# --- routes -----------------------------------------------------------------


def root(request: Request) -> None:
    request.handler.send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")


def version(request: Request) -> None:
    request.handler.send_json(200, {"version": OLLAMA_COMPATIBLE_VERSION, "mullama_version": __version__})


def _unload_reply(request: Request, name: str, duration: Any, key: str) -> bool:
    """An empty prompt with keep_alive 0 unloads the model instead of loading it."""
    if duration is None or parse_keep_alive(duration) != 0:
        return False
    if request.context is not None:  # operations: unloading is an administrator's act
        request.context.require("admin")
    find_model(request.handler.app.manager.store, name)
    request.handler.app.manager.unload(name)
    body = {"model": name, "created_at": now(), "done": True, "done_reason": "unload"}
    body[key] = "" if key == "response" else {"role": "assistant", "content": ""}
    request.handler.send_json(200, body)
    return True


def generate(request: Request) -> None:
    body = request.json()
    name = model_or_path(request, body, "name")
    prompt = typed(body, "prompt", str, "")
    context = typed(body, "context", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise BadRequestError("context must be a list of token ids", param="context")
    logprobs, top_logprobs = _logprobs(body)
    if not prompt and not context and _unload_reply(request, name, keep_alive(body), "response"):
        return
    raw = typed(body, "raw", bool, False)
    if raw and (body.get("template") or body.get("system") or context):
        raise BadRequestError("raw mode does not support template, system, or context", param="raw")
    req = GenerateRequest(
        model=name, prompt=prompt, suffix=typed(body, "suffix", str, ""), system=typed(body, "system", str),
        template=typed(body, "template", str), raw=raw,
        images=_images(body.get("images")), context=context, options=_options(body), format=_format(body),
        think=_think(body), keep_alive=keep_alive(body), truncate=_truncate(body),
        logprobs=logprobs, top_logprobs=top_logprobs)
    stream = _stream(body)  # checked before the generation starts: a bad one must not leave it running
    reply = service.generate(request.handler.app.manager, req, context=request.context)
    model = reply.model_name

    def shape(delta: service.Delta) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": now(), "response": delta.content, "done": False}
        if delta.thinking:
            out["thinking"] = delta.thinking
        return _add_logprobs(out, delta.logprobs)

    def final(result: service.ChatResult, whole: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": now(),
                               "response": result.message.content if whole else "", "done": True}
        if whole and result.message.thinking:
            out["thinking"] = result.message.thinking
        out.update(_timings(result))
        if result.context and not raw:
            out["context"] = result.context
        return _add_logprobs(out, result.logprobs if whole else [])

    _send_reply(request, reply, stream, shape, final)


def chat_messages(value: Any) -> list[Message]:
    """A chat history in Ollama's shape (``messages``): a 400 naming the first bad message."""
    messages = []
    for i, item in enumerate(listed(value, "messages", "messages")):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRequestError(f"{where} must be an object with a role", param="messages")
        content = item.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequestError(f"{where}.content must be a string", param="messages")
        messages.append(Message(role=item["role"], content=content, thinking=str(item.get("thinking") or ""),
                                images=_images(item.get("images"), f"{where}.images"),
                                tool_calls=function_calls(item.get("tool_calls"), where, "messages"),
                                tool_name=str(item.get("tool_name") or item.get("name") or ""),
                                tool_call_id=str(item.get("tool_call_id") or "")))
    return messages


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """A tool call in Ollama's message shape."""
    return {"id": call_id(call), "function": {"index": call.index, "name": call.name, "arguments": call.arguments}}


def chat_route(request: Request) -> None:
    body = request.json()
    name = model_or_path(request, body, "name")
    messages = chat_messages(body.get("messages"))
    logprobs, top_logprobs = _logprobs(body)
    if not messages and _unload_reply(request, name, keep_alive(body), "message"):
        return
    req = ChatRequest(model=name, messages=messages, tools=function_tools(body.get("tools")),
                           options=_options(body), format=_format(body), think=_think(body),
                           keep_alive=keep_alive(body), truncate=_truncate(body),
                           logprobs=logprobs, top_logprobs=top_logprobs)
    stream = _stream(body)
    reply = service.chat(request.handler.app.manager, req, context=request.context)
    model = reply.model_name

    def message_json(content: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        return message

    def shape(delta: service.Delta) -> dict[str, Any]:
        out = {"model": model, "created_at": now(),
               "message": message_json(delta.content, delta.thinking, delta.tool_calls), "done": False}
        return _add_logprobs(out, delta.logprobs)

    def final(result: service.ChatResult, whole: bool) -> dict[str, Any]:
        m = result.message
        message = message_json(m.content, m.thinking, m.tool_calls) if whole else message_json("", "", [])
        out = {"model": model, "created_at": now(), "message": message, "done": True}
        out.update(_timings(result))
        return _add_logprobs(out, result.logprobs if whole else [])

    _send_reply(request, reply, stream, shape, final)


def embed(request: Request) -> None:
    body = request.json()
    name = model_or_path(request, body, "name")
    value = body.get("input")
    inputs = ([value] if value else []) if isinstance(value, str) else [] if value is None else value
    if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
        raise BadRequestError("input must be a string or a list of strings", param="input")
    if not all(inputs):
        raise BadRequestError("input must not contain empty strings", param="input")
    dimensions = typed(body, "dimensions", int)
    if not inputs:
        # Ollama loads the model and answers with no vectors.
        if request.context is not None:  # operations: may this request use the model?
            request.context.admit(find_model(request.handler.app.manager.store, name).name)
        with request.handler.app.manager.use(name, _options(body), keep_alive(body)) as loaded:
            request.handler.send_json(200, {"model": loaded.record.name, "embeddings": []})
        return
    result = service.embed(request.handler.app.manager, name, inputs, truncate=_truncate(body),
                        dimensions=dimensions, options=_options(body), keep_alive=keep_alive(body),
                        context=request.context)
    request.handler.send_json(200, {"model": result.model, "embeddings": result.vectors,
                                    "total_duration": result.total_duration, "load_duration": result.load_duration,
                                    "prompt_eval_count": result.prompt_tokens})


def rerank_route(request: Request) -> None:
    """``POST /api/rerank``: Ollama has none; llama-server's body (:mod:`mullama.http.rerank`) plus Ollama's
    ``options`` and ``keep_alive``, answered with Ollama's durations beside the results.
    """
    body = request.json()
    req = rerank_request(body, model_or_path(request, body, "name"), _options(body))
    with_text = returns_documents(body)
    result = service.rerank(request.handler.app.manager, req, context=request.context)
    results = rerank_results(result, req.documents, with_text)
    request.handler.send_json(200, {"model": result.model, "results": results,
                                    "total_duration": result.total_duration, "load_duration": result.load_duration,
                                    "prompt_eval_count": result.prompt_tokens})


def embeddings_legacy(request: Request) -> None:
    body = request.json()
    name = model_or_path(request, body, "name")
    prompt = typed(body, "prompt", str, "")
    if not prompt:
        request.handler.send_json(200, {"embedding": []})
        return
    result = service.embed(request.handler.app.manager, name, [prompt], options=_options(body),
                        keep_alive=keep_alive(body), context=request.context)
    request.handler.send_json(200, {"embedding": result.vectors[0]})


def _details(record: ModelRecord, *, lengths: bool = False) -> dict[str, Any]:
    """Ollama's ``details``; with ``lengths``, also the context and embedding lengths ``/api/tags`` gives."""
    out: dict[str, Any] = {"parent_model": record.parent_model, "format": "gguf", "family": "", "families": None,
                           "parameter_size": "", "quantization_level": ""}
    if record.speech:
        return _speech_details(record)
    try:
        info = record.info
    except (MullamaError, OSError):
        return out
    family = info.architecture or ""
    out.update(family=family, families=[family] if family else None,
               parameter_size=_parameter_size(info.parameter_count), quantization_level=info.quantization)
    if lengths:
        out.update({key: value for key, value in (("context_length", info.context_length),
                                                  ("embedding_length", info.embedding_length)) if value})
    return out


def _speech_details(record: ModelRecord) -> dict[str, Any]:
    """A whisper.cpp model's details: its format (``ggml``), family, size and weight type."""
    try:
        info = record.whisper
    except (MullamaError, OSError):
        return {"parent_model": record.parent_model, "format": "ggml", "family": "whisper", "families": ["whisper"],
                "parameter_size": "", "quantization_level": ""}
    return {"parent_model": record.parent_model, "format": "ggml", "family": "whisper", "families": ["whisper"],
            "parameter_size": _parameter_size(info.parameters), "quantization_level": info.quantization}


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def tags(request: Request) -> None:
    manager = request.handler.app.manager
    models = []
    for entry in manager.store.list_models():
        try:
            record = find_model(manager.store, entry.name.display)
        except MullamaError:
            continue
        item = {"name": entry.name.display, "model": entry.name.display, "modified_at": _iso(entry.modified),
                "size": entry.size, "digest": entry.digest, "details": _details(record, lengths=True)}
        if record.speech:
            item["capabilities"] = ["speech"]
        else:
            with contextlib.suppress(MullamaError, OSError):
                item["capabilities"] = capabilities(record, record.info, vision=manager.sees_images(record))
        models.append(item)
    request.handler.send_json(200, {"models": models})


def ps(request: Request) -> None:
    manager = request.handler.app.manager
    models = []
    for loaded in manager.running():
        record = loaded.record
        expires = loaded.expires_at if loaded.in_use == 0 else time.time() + loaded.keep_alive
        # Ollama shows "forever" (and any keep_alive past what a date can hold) as its far-future date.
        if loaded.pinned or not expires < _FOREVER:
            expires_text = "2318-01-01T00:00:00Z"
        else:
            expires_text = _iso(expires)
        models.append({"name": record.name, "model": record.name, "size": loaded.size, "digest": record.digest,
                       "details": _details(record), "expires_at": expires_text, "size_vram": loaded.size_vram,
                       "context_length": loaded.context_length, "num_parallel": loaded.num_parallel,
                       "memory": {"weights": loaded.estimate.weights, "kv_cache": loaded.estimate.kv_cache,
                                  "compute": loaded.estimate.compute},
                       "active": loaded.active_count, "queued": loaded.queued_count,
                       "limits": manager.limits(record.name).as_dict()})
    request.handler.send_json(200, {"models": models})


def _parameters_text(parameters: dict[str, Any]) -> str:
    lines = []
    for name, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item) if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else str(item)
            lines.append(f"{name:<30} {text}")
    return "\n".join(lines)


def show(request: Request) -> None:
    body = request.json()
    name = model_or_path(request, body, "name")
    verbose = typed(body, "verbose", bool, False)
    manager = request.handler.app.manager
    record = find_model(manager.store, name)
    if record.speech:
        request.handler.send_json(200, _show_speech(record))
        return
    # Verbose shows every array whole, so it reads the header again with them; the record's copy skips long ones.
    info = gguf.read_gguf(record.model_path, load_arrays=True) if verbose else record.info
    template = record.template if record.template is not None else (info.chat_template or "")
    modelfile = Modelfile(from_=str(record.model_path), parameters=dict(record.parameters), template=template,
                          system=record.system, adapters=[str(a) for a in record.adapters],
                          licenses=list(record.license), messages=list(record.messages),
                          draft=str(record.draft_path or ""), renderer=record.renderer, parser=record.parser,
                          more_from=[str(record.projector_path)] if record.projector_path is not None else [])
    out: dict[str, Any] = {
        "modelfile": render_modelfile(modelfile, name=record.name),
        "parameters": _parameters_text(record.parameters),
        "template": template,
        "details": _details(record),
        "model_info": info.model_info(verbose=verbose),
        "tensors": [{"name": t.name, "type": t.type_name, "shape": list(t.shape)} for t in info.tensors],
        "capabilities": capabilities(record, info, vision=manager.sees_images(record)),
        "modified_at": _iso(record.modified or time.time()),
    }
    if record.projector_path is not None:
        projector = gguf.read_gguf(record.projector_path, load_arrays=verbose)
        out["projector_info"] = projector.model_info(verbose=verbose)
    if record.system:
        out["system"] = record.system
    if record.license or info.license:
        out["license"] = "\n".join(record.license) if record.license else info.license
    if record.messages:
        out["messages"] = [{"role": m.role, "content": m.content} for m in record.messages]
    if record.requires:
        out["requires"] = record.requires
    request.handler.send_json(200, out)


def _show_speech(record: ModelRecord) -> dict[str, Any]:
    """``/api/show`` of a speech model: no template or parameters, the whisper.cpp header as its model_info."""
    modelfile = Modelfile(from_=str(record.model_path), parameters=dict(record.parameters),
                          licenses=list(record.license))
    out: dict[str, Any] = {
        "modelfile": render_modelfile(modelfile, name=record.name),
        "parameters": _parameters_text(record.parameters),
        "template": "",
        "details": _speech_details(record),
        "model_info": record.whisper.model_info(),
        "capabilities": ["speech"],
        "modified_at": _iso(record.modified or time.time()),
    }
    if record.license:
        out["license"] = "\n".join(record.license)
    return out


def _status_stream(request: Request, stream: bool, work: Any) -> None:
    """Run ``work(emit)`` and send its progress as NDJSON, or only the outcome."""
    if not stream:
        work(lambda event: None)
        request.handler.send_json(200, {"status": "success"})
        return

    def produce(write: Write) -> None:
        work(lambda event: write(ndjson(event)))

    send_stream(request, NDJSON, produce, _error_line)


def create(request: Request) -> None:
    body = request.json()
    manager = request.handler.app.manager
    metrics = request.handler.app.ops.metrics
    licenses = body.get("license")
    licenses = [licenses] if isinstance(licenses, str) else licenses or []
    if not isinstance(licenses, list) or not all(isinstance(text, str) for text in licenses):
        raise BadRequestError("license must be a string or a list of strings", param="license")
    if body.get("draft_quantize"):
        raise BadRequestError("draft_quantize is not supported: quantize the DRAFT model's GGUF before creating",
                              param="draft_quantize")
    spec = CreateSpec(
        name=ModelName.parse(model_name(body, "name")), quantize=typed(body, "quantize", str, ""),
        in_place=typed(body, "in_place", bool, False), files=typed(body, "files", dict, {}),
        adapters=typed(body, "adapters", dict, {}), draft_files=typed(body, "draft_files", dict, {}),
        template=typed(body, "template", str), system=typed(body, "system", str),
        parameters=parse_options(typed(body, "parameters", dict, {})),
        messages=[{"role": m.role, "content": m.content} for m in chat_messages(body.get("messages"))],
        licenses=licenses, renderer=typed(body, "renderer", str, ""), parser=typed(body, "parser", str, ""),
        requires=typed(body, "requires", str, ""))
    source = body.get("from")
    if spec.in_place:
        # Mullama's extension: reference the GGUF where it lies (``mullama create --in-place``).
        if not isinstance(source, str) or not os.path.isabs(source) or not _server_file(request, source).is_file():
            raise BadRequestError(f"in_place needs 'from' to be the absolute path of a GGUF file on the "
                                  f"server: {source!r}", param="from")
        spec.source_file = _server_file(request, source)
    elif isinstance(source, str) and source and looks_like_path(source):
        spec.source_file = _server_file(request, source)
        if not spec.source_file.is_file():
            raise NotFoundError(f"{source}: no such file", param="from")
    elif isinstance(source, str):
        spec.base = source

    def pull_base(name: str, emit: Any) -> ModelName:
        return metrics.counted_pull(lambda counted: pull(name, manager.store, counted), emit)

    def work(emit: Any) -> None:
        create_model(manager.store, spec, emit, pull=pull_base, quantize=quantize,
                     ollama_version=OLLAMA_COMPATIBLE_VERSION)

    _status_stream(request, typed(body, "stream", bool, True), work)


def _server_file(request: Request, source: str) -> Path:
    """The server file ``from`` names, when :func:`server_path` allows it; refused alike whether it exists or not."""
    path = server_path(request, source)
    if path is None:
        raise ForbiddenError(f"from: {source!r} is a path on the server, which only clients on the server's own "
                             "machine may give, for files under MULLAMA_ALLOWED_DIRS; upload the file as a blob "
                             "instead (mullama create does)", param="from")
    return path


def copy(request: Request) -> None:
    body = request.json()
    source, destination = body.get("source"), body.get("destination")
    if not isinstance(source, str) or not isinstance(destination, str) or not source or not destination:
        raise BadRequestError("source and destination are required")
    store = request.handler.app.manager.store
    src = ModelName.parse(source)
    if not store.has_model(src):
        raise NotFoundError(f'model "{source}" not found')
    store.copy(src, ModelName.parse(destination))
    request.handler.send_bytes(200, b"", "application/json")


def delete(request: Request) -> None:
    body = request.json()
    name = ModelName.parse(model_name(body, "name"))
    manager = request.handler.app.manager
    if not manager.store.has_model(name):
        raise NotFoundError(f'model "{body.get("model") or body.get("name")}" not found')
    manager.unload(name.display)
    manager.store.delete(name)
    request.handler.send_bytes(200, b"", "application/json")


def pull_route(request: Request) -> None:
    body = request.json()
    name = model_name(body, "name")
    store = request.handler.app.manager.store
    metrics = request.handler.app.ops.metrics
    _status_stream(request, typed(body, "stream", bool, True),
                   lambda emit: metrics.counted_pull(lambda counted: pull(name, store, counted), emit))


def push(request: Request) -> None:
    body = request.json()
    model_name(body, "name")
    raise BadRequestError("push is not supported: Mullama models come from Hugging Face; upload the GGUF with "
                          "`huggingface-cli upload` instead")


def blob_exists(request: Request) -> None:
    digest = canonical_digest(request.params["digest"])
    if not request.handler.app.manager.store.has_blob(digest):
        raise NotFoundError(f'blob "{digest}" not found')
    request.handler.send_bytes(200, b"", "text/plain")


def blob_upload(request: Request) -> None:
    """Stream the body to a temporary file beside the blobs, hashing it on the way; rename it in if it matches."""
    digest = canonical_digest(request.params["digest"])
    handler = request.handler
    handler.check_upload_type()
    store = handler.app.manager.store
    if store.has_blob(digest):
        # Read what the client is sending anyway: answering mid-upload and closing would break its write.
        for _ in handler.body_chunks():
            pass
        handler.send_bytes(200, b"", "text/plain")
        return
    blobs = store.blob_path(digest).parent
    blobs.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=blobs, prefix=".upload-")
    tmp = Path(name)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in handler.body_chunks():
                hasher.update(piece)
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        if "sha256:" + hasher.hexdigest() != digest:
            raise BadRequestError(f"digest mismatch: the upload has sha256:{hasher.hexdigest()}, expected {digest}")
        store.admit_verified(tmp, digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    handler.send_bytes(201, b"", "text/plain")


def whoami(request: Request) -> None:
    """Ollama's answer when no one is signed in to ollama.com, which Mullama never is."""
    raise UnauthorizedError("unauthorized: Mullama does not sign in to ollama.com; it pulls models from Hugging "
                            "Face (HF_TOKEN for private repositories)")


def signout(request: Request) -> None:
    raise UnauthorizedError("you are not currently signed in: Mullama does not sign in to ollama.com")


def _cloud_off(request: Request, operation: str) -> None:
    """Ollama's answer to a cloud route with its cloud disabled: Mullama has no cloud."""
    raise ForbiddenError(f"ollama cloud is disabled: {operation} is unavailable (Mullama runs models locally "
                         "and has no cloud service)")


def model_recommendations(request: Request) -> None:
    """Ollama's list of suggested models; Mullama suggests none (Ollama's are mostly its cloud models)."""
    request.handler.send_json(200, {"recommendations": []})


def apply_template(request: Request) -> None:
    body = request.json()
    req = ChatRequest(model=model_or_path(request, body, "name"), messages=chat_messages(body.get("messages")),
                           tools=function_tools(body.get("tools")), think=_think(body), options=_options(body))
    request.handler.send_json(200, {"prompt": service.apply_template(request.handler.app.manager, req,
                                                                     context=request.context)})
