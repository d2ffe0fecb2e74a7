"""The internal types every API translates to and from.

Ollama's ``/api/chat``, OpenAI's ``/v1/chat/completions`` and Anthropic's
``/v1/messages`` all become a list of :class:`Message` plus a list of
:class:`Tool`; templates, tool-call parsing and scheduling only ever see
these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
