"""The internal types every API translates to and from.

Ollama's ``/api/chat``, OpenAI's ``/v1/chat/completions`` and Anthropic's
``/v1/messages`` all become a :class:`ChatRequest` (a list of :class:`Message`
plus a list of :class:`Tool`); Ollama's ``/api/generate`` and OpenAI's legacy
completions become a :class:`GenerateRequest`. Templates, tool-call parsing
and batching only ever see these. Every rerank route (llama-server's
``/v1/rerank`` and ``/rerank``, Mullama's ``/api/rerank``) becomes a
:class:`RerankRequest`, answered with :class:`RankedDocument` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The levels a request's ``think`` may name besides true and false (Ollama's ``ThinkValue``).
THINK_LEVELS = ("low", "medium", "high", "max")
#: A request's ``think``: on or off, a level from :data:`THINK_LEVELS` (on, at that level), or
#: None for the model's default.
Think = bool | str | None


def split_think(think: Think) -> tuple[bool | None, str]:
    """``think`` as (on, off or the model's default; the level a request named, else ``""``)."""
    if isinstance(think, str):
        return True, think
    return think, ""


@dataclass
class ToolCall:
    """A call of one tool, as the model produced it."""

    name: str
    arguments: dict[str, Any]
    #: An id for the APIs that pair calls with results (OpenAI, Anthropic).
    id: str = ""
    #: Position of the call among the calls of one message (Ollama's ``index``).
    index: int = 0


@dataclass
class Tool:
    """A function the model may call, described by a JSON Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass
class Message:
    """One turn of a conversation."""

    role: str
    content: str = ""
    #: Reasoning text that a thinking model produced before its answer.
    thinking: str = ""
    #: Raw image bytes attached to the message.
    images: list[bytes] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: For a ``tool`` message: the name of the tool whose result this is.
    tool_name: str = ""
    #: For a ``tool`` message: the id of the call it answers.
    tool_call_id: str = ""


@dataclass
class GenerationRequest:
    """What every request that generates text shares, whichever API it came through."""

    model: str
    #: Ollama's ``options`` (already parsed), including ``num_predict``, ``stop``...
    options: dict[str, Any] = field(default_factory=dict)
    #: The API's own defaults (OpenAI's ``temperature``...): under the Modelfile's parameters and ``options``.
    defaults: dict[str, Any] = field(default_factory=dict)
    #: ``"json"``, a JSON Schema dict, or None.
    format: Any = None
    think: Think = None
    keep_alive: Any = None
    #: False: a prompt longer than the context is an error instead of being cut.
    truncate: bool = True
    #: Report each generated token's log probability, with ``top_logprobs`` (0 to 20) alternatives.
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class ChatRequest(GenerationRequest):
    """A conversation to continue, as every API describes it."""

    messages: list[Message] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    #: "auto", "none", "required", or the name of one tool that must be called.
    tool_choice: str = "auto"
    #: With a forced tool choice, whether the grammar allows more than one call.
    parallel_tool_calls: bool = False


@dataclass
class GenerateRequest(GenerationRequest):
    """Ollama's ``/api/generate`` (and OpenAI's legacy completions)."""

    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[bytes] = field(default_factory=list)
    context: list[int] = field(default_factory=list)


@dataclass
class TranscriptionRequest:
    """Speech to text, as OpenAI's audio routes describe it (and the CLI and the voice loop through them)."""

    model: str
    #: The recording's bytes: WAV, or any format ffmpeg reads when it is installed.
    audio: bytes
    #: The uploaded file's name, for error messages.
    filename: str = "audio"
    #: ``transcribe`` (in the spoken language) or ``translate`` (into English).
    task: str = "transcribe"
    #: A language code or name; None detects it.
    language: str | None = None
    #: Text that conditions the decoding (spellings, style, the previous sentence).
    prompt: str | None = None
    temperature: float = 0.0
    #: Word timestamps (OpenAI's ``timestamp_granularities[]`` with ``word``).
    word_timestamps: bool = False
    #: Find the speech with the VAD first, so silence gives no invented words.
    vad: bool = True
    keep_alive: Any = None


@dataclass
class VoiceRequest:
    """A spoken conversation: each utterance is transcribed and answered by a chat model, as it ends."""

    #: The chat model that answers.
    model: str
    #: The speech model that transcribes.
    speech_model: str
    #: The conversation so far (a system message first, if any).
    messages: list[Message] = field(default_factory=list)
    #: The spoken language (a code or name); None detects it.
    language: str | None = None
    #: The chat model's options (Ollama's).
    options: dict[str, Any] = field(default_factory=dict)
    think: bool | None = None
    keep_alive: Any = None
    #: Seconds of speech between two partial transcripts of an utterance going on; None for none.
    partial_every: float | None = None


@dataclass
class RerankRequest:
    """Documents to score against a query with a reranking model (pooling type rank)."""

    model: str
    query: str
    documents: list[str]
    #: How many of the best documents to return; None returns them all.
    top_n: int | None = None
    #: Ollama's ``options`` (already parsed): only the load-time ones (``num_ctx``...) matter to a reranker.
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: Any = None


@dataclass(frozen=True)
class RankedDocument:
    """One document's relevance to a query: its place in the request and the model's score."""

    #: The document's index in the request's ``documents``.
    index: int
    #: llama-server's ``relevance_score``: the first of the model's classes (for Qwen3-Reranker, P("yes")).
    relevance_score: float
