"""Below the APIs: from a chat or generate request to a stream of deltas.

Ollama's ``/api/chat``, OpenAI's chat completions and Anthropic's messages
all build a :class:`ChatRequest`; this module renders the prompt with the
model's template, turns ``format`` and forced tool calls into a grammar,
submits the tokens to the model's batcher, and splits the output into
thinking, content and tool calls. The rerank routes build a
:class:`RerankRequest`, which :func:`rerank` scores with a reranking model.
OpenAI's audio routes build a
:class:`TranscriptionRequest`, which :func:`transcribe` runs on a speech
model. The API modules only translate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mullama.engine.model import Completion, Model, Timings, check_top_n, rank
from mullama.errors import BadRequestError
from mullama.ffi import llama as L
from mullama.engine.residency import LoadedModel, ModelManager, Resolution
from mullama.ops.operations import RequestContext
from mullama.store.records import ModelRecord
from mullama.engine.sampling import TokenLogprob
from mullama.engine.vision import ImageChunk, place_images
from mullama.prompt.thinking import ThinkingSplitter, prompt_opens_thinking
from mullama.prompt.toolcalls import HARMONY, TextDelta, ToolCallEvent, ToolCallParser, ToolFormat, detect_format
from mullama.speech.audio import decode_audio
from mullama.speech.transcribe import Segment, SpeechModel, Transcript
from mullama.types import (ChatRequest, GenerateRequest, Message, RankedDocument, RerankRequest, Think, Tool, ToolCall,
                           TranscriptionRequest, split_think)

if TYPE_CHECKING:
    from mullama.prompt.harmony import HarmonyParser

log = logging.getLogger("mullama.service")

#: Used when a model's own template says nothing about tools.
DEFAULT_TOOL_FORMAT = ToolFormat("hermes")
#: Characters a prompt may hold per token of context, generously (a token averages about four): past that, no
#: truncation of it can make sense, and tokenizing it would cost memory in proportion.
PROMPT_CHARS_PER_TOKEN = 32
#: The least that limit is, whatever the context.
MIN_PROMPT_CHARS = 1 << 20


@dataclass
class Delta:
    """A piece of a reply: content text, thinking text, or finished tool calls.

    ``logprobs`` (when requested) holds the tokens generated since the
    previous delta. Template markup such as ``<think>`` or a tool-call tag
    yields no text of its own, so its tokens arrive with the next delta, and
    a last delta may carry only logprobs.
    """

    content: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChatResult:
    """The end of a reply: the whole message and how generation went."""

    model: str
    message: Message
    done_reason: str
    timings: Timings
    truncated: int = 0
    context: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    #: The stop string that ended generation ("" when it ended otherwise).
    stop_sequence: str = ""
    #: Every generated token's logprob, when requested (the deltas' lists, joined).
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Reply:
    """A streaming reply: iterate for :class:`Delta`, then read :attr:`result`.

    It holds the model loaded until it is exhausted or closed; ``cancel()``
    (a disconnecting client) stops generation within one decode step.
    """

    def __init__(self, model_name: str, stack: ExitStack, request: Any, splitter: ThinkingSplitter | None,
                 parser: ToolCallParser | HarmonyParser | None, started: int, load_duration: int,
                 prompt_tokens: int, context: RequestContext | None = None) -> None:
        self.model_name = model_name
        self._context = context
        self._stack = stack
        self._request = request
        self._splitter = splitter
        self._parser = parser
        self._started = started
        self._load_duration = load_duration
        self._prompt_tokens = prompt_tokens
        self.result: ChatResult | None = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the rendered prompt, known before the first delta."""
        return self._prompt_tokens

    @property
    def truncated(self) -> int:
        """Prompt tokens dropped to fit the context (0 when none), known before the first delta."""
        return self._request.truncated if self._request is not None else 0

    def cancel(self) -> None:
        if self._request is not None:
            self._request.cancel()

    def close(self) -> None:
        """Release the model (cancelling generation if it still runs)."""
        if self.result is None:
            self.cancel()
        self._stack.close()

    def __iter__(self) -> Iterator[Delta]:
        message = Message(role="assistant")
        try:
            if self._request is None:
                completion = Completion(done_reason="load")
            else:
                held: list[TokenLogprob] = []
                unmarked = self._context  # operations: the first piece is the request's first token
                for piece, logprobs in self._request.pieces():
                    if unmarked is not None:
                        unmarked.first_token()
                        unmarked = None
                    held += logprobs
                    held = yield from self._with_logprobs(self._deltas(piece, message, final=False), held)
                held = yield from self._with_logprobs(self._deltas("", message, final=True), held)
                if held:
                    yield Delta(logprobs=held)
                completion = self._request.result
            timings = dataclasses.replace(completion.timings, load_duration=self._load_duration,
                                          total_duration=time.perf_counter_ns() - self._started)
            if self._context is not None and self._request is not None:
                self._context.generated(timings, self._prompt_tokens)
            self.result = ChatResult(model=self.model_name, message=message, done_reason=completion.done_reason,
                                     timings=timings, truncated=completion.truncated, context=completion.context,
                                     prompt_tokens=self._prompt_tokens, stop_sequence=completion.stop_sequence,
                                     logprobs=completion.logprobs)
        finally:
            self.close()

    @staticmethod
    def _with_logprobs(deltas: Iterator[Delta], held: list[TokenLogprob],
                       ) -> Generator[Delta, None, list[TokenLogprob]]:
        """Give the held logprobs to the first of ``deltas``; return those still held."""
        for delta in deltas:
            if held:
                delta.logprobs, held = held, []
            yield delta
        return held

    def _deltas(self, piece: str, message: Message, final: bool) -> Iterator[Delta]:
        parts: list[tuple[str, str]] = [("content", piece)] if piece else []
        if self._splitter is not None:
            parts = self._splitter.feed(piece) if not final else self._splitter.flush()
        for kind, text in parts:
            if kind == "thinking":
                message.thinking += text
                yield Delta(thinking=text)
            else:
                yield from self._content(text, message, final=False)
        if final:
            yield from self._content("", message, final=True)

    def _content(self, text: str, message: Message, final: bool) -> Iterator[Delta]:
        if self._parser is None:
            if text:
                message.content += text
                yield Delta(content=text)
            return
        events = self._parser.feed(text) if not final else self._parser.finish()
        for event in events:
            if isinstance(event, ToolCallEvent):
                event.call.index = len(message.tool_calls)
                message.tool_calls.append(event.call)
                yield Delta(tool_calls=[event.call])
            elif isinstance(event, TextDelta):
                if event.text:
                    message.content += event.text
                    yield Delta(content=event.text)
            elif event.text:  # harmony's ThinkingDelta, the one other event
                message.thinking += event.text
                yield Delta(thinking=event.text)


def _resolve_think(resolution: Resolution, think: Think) -> Think:
    """The request's ``think``; when it says nothing, a ``think`` option or Modelfile ``PARAMETER think``."""
    return think if think is not None else resolution.think


def _thinking_enabled(record: ModelRecord, model: Model, think: Think) -> bool:
    """Whether to split ``<think>`` out of the output: unless thinking is off, for templates that know the tag.

    With thinking off, a model that thinks anyway keeps it in the content, as
    Ollama does. Callers also skip splitting under a grammar (``format`` or a
    forced tool call): it constrains the whole output, so there is no free
    thinking to split; Ollama instead lets the model think first and applies
    ``format`` to the answer, which Mullama does not do yet.
    """
    template = (record.template or "") + (model.chat_template or "")
    return think is not False and "<think>" in template


def _with_defaults(record: ModelRecord, messages: list[Message]) -> list[Message]:
    """The Modelfile's SYSTEM and MESSAGE lines go before the request's own messages."""
    prefix = list(record.messages)
    if record.system and not any(m.role == "system" for m in messages):
        prefix.insert(0, Message(role="system", content=record.system))
    return prefix + list(messages)


def _hermes_history(messages: list[Message]) -> list[Message]:
    """Earlier calls and results as Hermes text, for templates that know no tool roles."""
    rewritten = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}) + "\n</tool_call>"
                              for c in message.tool_calls)
            text = (message.content + "\n" if message.content else "") + calls
            rewritten.append(dataclasses.replace(message, content=text, tool_calls=[]))
        elif message.role == "tool":
            rewritten.append(Message(role="user", content=f"<tool_response>\n{message.content}\n</tool_response>"))
        else:
            rewritten.append(message)
    return rewritten


def _tools_as_system(tools: list[Tool], messages: list[Message]) -> list[Message]:
    """Describe tools in a system message for templates that have no place for them (Hermes style)."""
    messages = _hermes_history(messages)
    listing = "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters}}) for t in tools)
    text = ("You may call one or more functions to assist with the user query. Function signatures are "
            f"within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\nFor each function call, return a "
            "json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if messages and messages[0].role == "system":
        return [dataclasses.replace(messages[0], content=messages[0].content + "\n\n" + text)] + messages[1:]
    return [Message(role="system", content=text)] + messages


def render_prompt(record: ModelRecord, model: Model, messages: list[Message], tools: list[Tool],
                  think: Think) -> str:
    """The exact prompt text: the Modelfile TEMPLATE, else the GGUF's own Jinja template.

    A ``think`` level reaches each kind of template the way it reads one: a Go
    template as ``.ThinkLevel``, harmony as its ``Reasoning:`` line, a Jinja
    template as ``reasoning_effort`` (see :func:`_jinja_thinking`).
    """
    # The template engines load with the first prompt: an idle daemon need not hold them.
    from mullama.prompt.harmony import render_harmony, renamed_tools
    from mullama.prompt.jinja import render_jinja
    from mullama.prompt.templates import render_chat

    messages = _with_defaults(record, messages)
    harmony = tool_format(record, model).name == HARMONY
    enabled, level = split_think(think)
    if record.template is not None:
        # Ollama gives a harmony template its tools under TypeScript-safe names.
        return render_chat(record.template, messages, (renamed_tools(tools) if harmony else tools) or None,
                           think=enabled, think_level=level)
    if harmony:
        return render_harmony(messages, tools, think=enabled, think_level=level)
    template = model.chat_template
    if template is None or "tools" not in template and (tools or any(m.tool_calls or m.role == "tool"
                                                                     for m in messages)):
        messages = _tools_as_system(tools, messages) if tools else _hermes_history(messages)
    if template is None:
        # No template anywhere: libllama's built-in ChatML is the last resort.
        return model.apply_builtin_template([(m.role, m.content) for m in messages])
    return render_jinja(template, messages, tools or None, bos_token=model.special_token("bos"),
                        eos_token=model.special_token("eos"), extra=_jinja_thinking(think))


def _jinja_thinking(think: Think) -> dict[str, Any] | None:
    """The variables that carry ``think`` into a Hugging Face template, none when the request leaves it unset.

    ``enable_thinking`` is Qwen3's switch; ``reasoning_effort`` is the level
    as gpt-oss's template reads it (llama-server passes the same name), only
    when thinking is on: ``true`` is ``"medium"`` as in Ollama, and ``"max"``
    is ``"high"``, the most such templates know.
    """
    enabled, level = split_think(think)
    if enabled is None:
        return None
    if not enabled:
        return {"enable_thinking": False}
    return {"enable_thinking": True, "reasoning_effort": "high" if level == "max" else level or "medium"}


def check_prompt_length(text: str, num_ctx: int) -> None:
    """Refuse, before tokenizing it, a text far longer than a context of ``num_ctx`` tokens could hold."""
    limit = max(MIN_PROMPT_CHARS, num_ctx * PROMPT_CHARS_PER_TOKEN)
    if len(text) > limit:
        raise BadRequestError(f"the prompt is {len(text)} characters long, more than the {limit} a context of "
                              f"{num_ctx} tokens can be given; shorten it", param="prompt")


def tokenize_prompt(model: Model, prompt: str) -> list[int]:
    """Tokens of a rendered prompt; BOS is added unless the template wrote it already."""
    bos = model.special_token("bos")
    add_special = model.add_bos and not (bos and prompt.startswith(bos))
    return model.tokenize(prompt, add_special=add_special, parse_special=True)


def tool_format(record: ModelRecord, model: Model) -> ToolFormat:
    """The model's tool-call syntax; Hermes when its template has none (tools are then described Hermes-style)."""
    found = detect_format((record.template or "") + (model.chat_template or ""), record.name,
                          model.info.architecture or "")
    return DEFAULT_TOOL_FORMAT if found.name == "json" else found


def grammar_for(fmt: Any, tools: list[Tool], tool_choice: str, calls: ToolFormat, parallel: bool = False) -> str | None:
    """A GBNF grammar for ``format`` (JSON or a schema) or for forced tool calls."""
    from mullama.prompt import grammar as grammars  # loaded with the first grammar, as the templates are

    if tools and tool_choice not in ("auto", "none", ""):
        if calls.name != "hermes":
            open_tag, close_tag = {"mistral": ("[TOOL_CALLS]", ""), "granite": ("<|tool_call|>", "")}.get(
                calls.name, ("<tool_call>", "</tool_call>"))
        else:
            open_tag, close_tag = "<tool_call>", "</tool_call>"
        forced = None if tool_choice == "required" else tool_choice
        return grammars.tool_call_grammar(tools, forced=forced, open_tag=open_tag + "\n", close_tag="\n" + close_tag,
                                          parallel=parallel)
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return grammars.JSON_GRAMMAR
    if isinstance(fmt, dict):
        return grammars.schema_to_gbnf(fmt)
    raise BadRequestError(f"invalid format {fmt!r}: use \"json\" or a JSON schema object", param="format")


def _start(manager: ModelManager, model_name: str, options: dict[str, Any], keep_alive: Any,
           context: RequestContext | None = None, defaults: dict[str, Any] | None = None, *, text: bool = True,
           require: Callable[[ModelRecord], None] | None = None) -> tuple[ExitStack, Resolution, LoadedModel, int]:
    """Resolve the request's model once and hold it loaded; also the nanoseconds that took.

    ``text`` False is a request that only loads the model (any model may be loaded so); otherwise ``require``
    refuses a model unfit for the request's work, before anything loads.
    """
    started = time.perf_counter_ns()
    resolution = manager.resolve(model_name, options, defaults)
    if context is not None:  # operations: may this request use the model? (before anything loads)
        context.admit(resolution.record.name)
    if text:
        require_text_model(resolution.record)
        if require is not None:
            require(resolution.record)
    stack = ExitStack()
    try:
        loaded = stack.enter_context(manager.hold(resolution, keep_alive))
    except BaseException:
        stack.close()
        raise
    return stack, resolution, loaded, time.perf_counter_ns() - started


def require_text_model(record: ModelRecord) -> None:
    """Refuse text work (chat, generate, embed) on a speech model, saying what it is for."""
    if record.speech:
        raise BadRequestError(f'"{record.name}" is a speech model: it transcribes audio (POST '
                              '/v1/audio/transcriptions, `mullama transcribe`) and does not generate text',
                              param="model")


def is_reranker(record: ModelRecord) -> bool:
    """Whether the model's GGUF has pooling type rank: it scores documents against a query, and only that."""
    return not record.speech and record.info.pooling_type == L.LLAMA_POOLING_TYPE_RANK


def require_generative_model(record: ModelRecord) -> None:
    """Refuse generation (chat, generate) with a reranking model, saying what it is for."""
    if is_reranker(record):
        raise BadRequestError(f'"{record.name}" is a reranking model: it scores documents against a query (POST '
                              '/api/rerank or /v1/rerank) and does not generate text', param="model")


def require_embedding_model(record: ModelRecord) -> None:
    """Refuse embeddings from a reranking model, saying what it is for."""
    if is_reranker(record):
        raise BadRequestError(f'"{record.name}" is a reranking model: it scores documents against a query (POST '
                              '/api/rerank or /v1/rerank) and does not embed', param="model")


def require_reranker(record: ModelRecord) -> None:
    """Refuse reranking with a model whose pooling type is not rank."""
    if not is_reranker(record):
        raise BadRequestError(f'"{record.name}" is not a reranking model: reranking needs a model whose pooling '
                              "type is rank, such as Qwen3-Reranker or bge-reranker", param="model")


def require_speech_model(record: ModelRecord) -> None:
    """Refuse transcription with a model that is not a speech model."""
    if not record.speech:
        raise BadRequestError(f'"{record.name}" is not a speech model: transcription needs a Whisper model such '
                              "as whisper:base (`mullama pull whisper:base`)", param="model")


def _mark_images(model: Model, messages: list[Message]) -> list[Message]:
    """Messages with the model's image marker in their text where each of their images goes.

    As in Ollama, a message's images replace its ``[img]`` tags in order,
    and go before its text otherwise. A model without a working projector
    refuses images with Ollama's error.
    """
    if not any(m.images for m in messages):
        return messages
    marker = model.image_marker
    return [dataclasses.replace(m, content=place_images(m.content, len(m.images), marker)) if m.images else m
            for m in messages]


def _tokens_of(model: Model, prompt: str, images: list[bytes], context: list[int] | None = None,
                   add_special: bool | None = None) -> tuple[list[int], list[ImageChunk]]:
    """The tokens of a rendered prompt, with its images where their markers are; ``context`` (Ollama's) goes first.

    BOS is added (``add_special`` None) unless the template wrote it already.
    """
    context = list(context or [])
    if add_special is None:
        bos = model.special_token("bos")
        add_special = model.add_bos and not (bos and prompt.startswith(bos))
    if not images:
        return context + model.tokenize(prompt, add_special=add_special, parse_special=True), []
    vision = model.tokenize_with_images(prompt, images, add_special=add_special)
    for image in vision.images:
        image.start += len(context)
    return context + vision.tokens, vision.images


def chat(manager: ModelManager, req: ChatRequest, *, context: RequestContext | None = None) -> Reply:
    """Start a chat reply (an empty ``messages`` just loads the model); ``context`` is the request's operations."""
    started = time.perf_counter_ns()
    stack, resolution, loaded, load_duration = _start(manager, req.model, req.options, req.keep_alive, context,
                                                      req.defaults, text=bool(req.messages),
                                                      require=require_generative_model)
    try:
        record, model = resolution.record, loaded.model
        if not req.messages:
            return Reply(record.name, stack, None, None, None, started, load_duration, 0)
        messages = _mark_images(model, req.messages)
        tools = req.tools if req.tool_choice != "none" else []
        think = _resolve_think(resolution, req.think)
        prompt = render_prompt(record, model, messages, tools, think)
        calls = tool_format(record, model)
        grammar = grammar_for(req.format, tools, req.tool_choice, calls, req.parallel_tool_calls)
        check_prompt_length(prompt, loaded.context_length)
        images = [image for m in messages for image in m.images]
        tokens, chunks = _tokens_of(model, prompt, images)
        if context is not None:  # operations: the model's max_queue
            context.check_queue(loaded)
        request = loaded.batcher.submit(tokens, resolution.options, grammar=grammar,
                                          truncate=req.truncate, logprobs=req.logprobs,
                                          top_logprobs=req.top_logprobs, images=chunks)
        splitter = None
        parser: ToolCallParser | HarmonyParser | None = None
        if calls.name == HARMONY:
            from mullama.prompt.harmony import HarmonyParser

            # Channels carry the thinking, the answer and the calls alike.
            parser = HarmonyParser(tools, prompt)
        else:
            if _thinking_enabled(record, model, think) and not grammar:
                splitter = ThinkingSplitter(starts_inside=prompt_opens_thinking(prompt))
            parser = ToolCallParser(calls, tools) if tools else None
        return Reply(record.name, stack, request, splitter, parser, started, load_duration, len(tokens), context)
    except BaseException:
        stack.close()
        raise


def generate(manager: ModelManager, req: GenerateRequest, *, context: RequestContext | None = None) -> Reply:
    """Start a generate reply (an empty prompt just loads the model); ``context`` is the request's operations."""
    started = time.perf_counter_ns()
    stack, resolution, loaded, load_duration = _start(manager, req.model, req.options, req.keep_alive, context,
                                                      req.defaults, text=bool(req.prompt or req.context),
                                                      require=require_generative_model)
    try:
        record, model = resolution.record, loaded.model
        if not req.prompt and not req.context:
            return Reply(record.name, stack, None, None, None, started, load_duration, 0)
        user = place_images(req.prompt, len(req.images), model.image_marker) if req.images else req.prompt
        think = _resolve_think(resolution, req.think)
        if req.raw:
            prompt = user
        elif req.template is not None or record.template is not None:
            from mullama.prompt.templates import render_generate

            system = req.system if req.system is not None else record.system
            enabled, level = split_think(think)
            prompt = render_generate(req.template if req.template is not None else record.template, user,
                                     system=system, suffix=req.suffix, think=enabled, think_level=level)
        else:
            messages = [Message(role="system", content=req.system)] if req.system else []
            prompt = render_prompt(record, model, messages + [Message(role="user", content=user)], [], think)
        check_prompt_length(prompt, loaded.context_length)
        grammar = grammar_for(req.format, [], "auto", DEFAULT_TOOL_FORMAT)
        add_special = not req.context and model.add_bos if req.raw else None
        tokens, chunks = _tokens_of(model, prompt, req.images, req.context, add_special)
        if context is not None:  # operations: the model's max_queue
            context.check_queue(loaded)
        request = loaded.batcher.submit(tokens, resolution.options, grammar=grammar,
                                          truncate=req.truncate, logprobs=req.logprobs,
                                          top_logprobs=req.top_logprobs, images=chunks)
        splitter, parser = None, None
        if not req.raw and tool_format(record, model).name == HARMONY:
            from mullama.prompt.harmony import HarmonyParser

            parser = HarmonyParser([], prompt)
        elif not req.raw and _thinking_enabled(record, model, think) and not grammar:
            splitter = ThinkingSplitter(starts_inside=prompt_opens_thinking(prompt))
        return Reply(record.name, stack, request, splitter, parser, started, load_duration, len(tokens), context)
    except BaseException:
        stack.close()
        raise


def apply_template(manager: ModelManager, req: ChatRequest, *, context: RequestContext | None = None) -> str:
    """The prompt a chat request would give the model, without generating."""
    resolution = manager.resolve(req.model, req.options)
    if context is not None:  # operations: may this request use the model?
        context.admit(resolution.record.name)
    require_text_model(resolution.record)
    with manager.hold(resolution, req.keep_alive) as loaded:
        think = _resolve_think(resolution, req.think)
        return render_prompt(resolution.record, loaded.model, req.messages, req.tools, think)


def count_tokens(manager: ModelManager, req: ChatRequest, *, context: RequestContext | None = None) -> int:
    """How many tokens the prompt of a chat request takes, as :func:`chat` would submit it."""
    resolution = manager.resolve(req.model, req.options)
    if context is not None:  # operations: may this request use the model?
        context.admit(resolution.record.name)
    require_text_model(resolution.record)
    with manager.hold(resolution, req.keep_alive) as loaded:
        tools = req.tools if req.tool_choice != "none" else []
        think = _resolve_think(resolution, req.think)
        messages = _mark_images(loaded.model, req.messages)
        prompt = render_prompt(resolution.record, loaded.model, messages, tools, think)
        check_prompt_length(prompt, loaded.context_length)
        images = [image for m in messages for image in m.images]
        tokens, chunks = _tokens_of(loaded.model, prompt, images)
        for chunk in chunks:
            chunk.release()
        return len(tokens)


@dataclass
class Embeddings:
    """Vectors for several inputs, with what Ollama reports about them."""

    model: str
    vectors: list[list[float]]
    prompt_tokens: int
    load_duration: int
    total_duration: int


def embed(manager: ModelManager, model_name: str, inputs: list[str], *, truncate: bool = True,
          dimensions: int | None = None, options: dict[str, Any] | None = None, keep_alive: Any = None,
          context: RequestContext | None = None) -> Embeddings:
    """Embed ``inputs`` (several per decode); ``dimensions`` keeps the first N, re-normalised."""
    started = time.perf_counter_ns()
    stack, resolution, loaded, load_duration = _start(manager, model_name, options or {}, keep_alive, context,
                                                      require=require_embedding_model)
    with stack:
        model = loaded.model
        for text in inputs:
            check_prompt_length(text, loaded.context_length)
        vectors = loaded.batcher.embed(inputs, truncate=truncate)
        if dimensions is not None:
            if dimensions < 1 or dimensions > model.n_embd:
                raise BadRequestError(f"dimensions must be between 1 and {model.n_embd}", param="dimensions")
            vectors = [_renormalise(v[:dimensions]) for v in vectors]
        tokens = sum(len(model.tokenize(text)) for text in inputs)
        if context is not None:
            context.embedded(tokens)
        return Embeddings(resolution.record.name, vectors, tokens, load_duration, time.perf_counter_ns() - started)


@dataclass
class Reranking:
    """The documents of a :class:`RerankRequest`, the most relevant first, with what the APIs report about them."""

    model: str
    results: list[RankedDocument]
    #: Tokens of every (query, document) pair scored: llama-server's ``usage.prompt_tokens``.
    prompt_tokens: int
    load_duration: int
    total_duration: int


def rerank(manager: ModelManager, req: RerankRequest, *, context: RequestContext | None = None) -> Reranking:
    """Score ``req.documents`` against ``req.query`` with a reranking model, loading it if needed.

    Each pair is put together as llama-server does (:meth:`Model.rerank_tokens`) and the pairs of concurrent
    requests share decodes (:meth:`Batcher.score`). A model that is not a reranker, no documents or a negative
    ``top_n`` is a :class:`BadRequestError`, before anything loads.
    """
    started = time.perf_counter_ns()
    if not req.documents:
        raise BadRequestError("documents must be a non-empty list of strings", param="documents")
    check_top_n(req.top_n)
    stack, resolution, loaded, load_duration = _start(manager, req.model, req.options, req.keep_alive, context,
                                                      require=require_reranker)
    with stack:
        model = loaded.model
        for text in (req.query, *req.documents):
            check_prompt_length(text, loaded.context_length)
        token_lists = [model.rerank_tokens(req.query, document) for document in req.documents]
        scores = loaded.batcher.score(token_lists)
        tokens = sum(map(len, token_lists))
        if context is not None:
            context.embedded(tokens)
        return Reranking(resolution.record.name, rank(scores, req.top_n), tokens, load_duration,
                         time.perf_counter_ns() - started)


def _renormalise(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm else vector


def transcribe(manager: ModelManager, req: TranscriptionRequest, *, context: RequestContext | None = None,
               on_segment: Callable[[Segment], None] | None = None,
               cancel: threading.Event | None = None) -> Transcript:
    """Transcribe (or translate into English) ``req.audio`` with a speech model, loading it if needed.

    The audio is decoded (and checked against the size and duration limits)
    before the model is loaded, so a corrupt upload costs no load.
    ``on_segment`` sees each segment as Whisper finishes it; ``cancel`` stops
    the work (:class:`~mullama.errors.CancelledError`).
    """
    if req.task not in ("transcribe", "translate"):
        raise BadRequestError(f"unknown task {req.task!r}: transcribe or translate")
    resolution = manager.resolve(req.model)
    if context is not None:  # operations: may this request use the model?
        context.admit(resolution.record.name)
    require_speech_model(resolution.record)
    audio = decode_audio(req.audio, req.filename)
    with manager.hold(resolution, req.keep_alive) as loaded:
        model = loaded.model
        assert isinstance(model, SpeechModel)
        options = {"prompt": req.prompt, "temperature": req.temperature, "word_timestamps": req.word_timestamps,
                   "vad": req.vad, "cancel": cancel, "on_segment": on_segment}
        if req.task == "translate":
            return model.translate(audio, **options)
        return model.transcribe(audio, language=req.language, **options)
