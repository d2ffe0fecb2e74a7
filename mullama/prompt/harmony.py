"""gpt-oss's harmony format: prompts rendered and output parsed as Ollama does.

gpt-oss writes messages, each ``<|start|>{header}<|message|>{body}`` ended by
``<|end|>`` (``<|call|>`` after a tool call, ``<|return|>`` after the answer).
The header names a channel: ``analysis`` is the reasoning (thinking),
``final`` the answer, and a header with a recipient (``to=functions.NAME``,
usually on ``commentary``) is a tool call whose body is its JSON arguments::

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

:func:`render_harmony` writes the prompt Ollama's gpt-oss template writes;
:class:`HarmonyParser` turns streamed output into :class:`ThinkingDelta`,
:class:`~mullama.prompt.toolcalls.TextDelta` and
:class:`~mullama.prompt.toolcalls.ToolCallEvent` events, the same whatever
the chunking.  :func:`mullama.prompt.toolcalls.detect_format` says which
models speak harmony (format ``"harmony"``).  Function names are made valid
TypeScript identifiers in the prompt (``get-weather`` becomes
``get_weather``) and mapped back in calls, as Ollama's ``FunctionNameMap``
does.

llama.cpp renders ``<|start|>``, ``<|channel|>``, ``<|message|>`` and
``<|constrain|>`` into the generated text but not ``<|end|>``, and stops at
``<|call|>`` and ``<|return|>``; so a ``<|start|>`` also ends the message
before it, and a call still open when the output ends is complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from mullama.prompt.templates import collate, template_message, template_tool
from mullama.prompt.toolcalls import TextDelta, ToolCallEvent, new_call_id
from mullama.types import THINK_LEVELS, Message, Tool, ToolCall

log = logging.getLogger("mullama.prompt.harmony")

START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL, RETURN = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>", "<|return|>")
#: gpt-oss's built-in tools: described in the system message and called on the analysis channel.
BUILTIN_TOOLS = ("browser.search", "browser.open", "browser.find", "python")
#: Where Ollama's implicit start leaves the output: inside an assistant message's header.
IMPLICIT_START = START + "assistant"


# ---------------------------------------------------------------- function names


class FunctionNames:
    """Tool names as the prompt shows them (TypeScript identifiers) and back (Ollama's ``FunctionNameMap``).

    Built from the request's tools in order, so the renderer and the parser
    of one request derive the same names independently.
    """

    def __init__(self, names: Sequence[str] = ()) -> None:
        self._to_harmony: dict[str, str] = {}
        self._to_user: dict[str, str] = {}
        #: The prompt's name of each given name, in order (duplicates get ``_2``, ``_3``...).
        self.converted = [self._add(name) for name in names]

    def _add(self, name: str) -> str:
        candidate = name if name in BUILTIN_TOOLS else self._unique(_identifier(name))
        self._to_harmony[name] = candidate
        self._to_user[candidate] = name
        return candidate

    def _unique(self, base: str) -> str:
        candidate, count = base, 2
        while candidate in self._to_user:
            candidate = f"{base}_{count}"
            count += 1
        return candidate

    def original(self, harmony_name: str) -> str:
        """The caller's name for a name the model used; unknown names pass through unchanged."""
        if self._to_user and harmony_name not in self._to_user:
            log.warning("harmony: the model called %r, which is not one of the request's tools", harmony_name)
        return self._to_user.get(harmony_name, harmony_name)


def renamed_tools(tools: Sequence[Tool] | None) -> list[Tool]:
    """``tools`` with the names the prompt shows them by, for a Modelfile TEMPLATE to render (as Ollama passes them)."""
    names = FunctionNames([tool.name for tool in tools or ()])
    return [dataclasses.replace(tool, name=name) for tool, name in zip(tools or (), names.converted)]


def _identifier(name: str) -> str:
    """``name`` as a TypeScript identifier: spaces, ``-`` and ``.`` become ``_``, other non-word characters go."""
    kept = []
    for char in name:
        if char in " -.":
            kept.append("_")
        elif char in "_$" or unicodedata.category(char)[0] == "L" or unicodedata.category(char) == "Nd":
            kept.append(char)
    candidate = "".join(kept) or "unnamed"
    return "_" + candidate if "0" <= candidate[0] <= "9" else candidate


# ---------------------------------------------------------------- rendering

_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: "
_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
_FUNCTIONS_CHANNEL = "\nCalls to these tools must go to the commentary channel: 'functions'."
_BROWSER_HEAD = """

## browser

// Tool for browsing.
// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
// Cite information from the tool using the following format:
// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
// Do not quote more than 10 words directly from the tool output.
// sources=web (default: web)
namespace browser {"""
_BROWSER_FUNCTIONS = {
    "browser.search": """

// Searches for information related to `query` and displays `topn` results.
type search = (_: {
query: string,
topn?: number, // default: 10
source?: string,
}) => any;""",
    "browser.open": """

// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.
// Valid link ids are displayed with the formatting: `【{id}†.*】`.
// If `cursor` is not provided, the most recent page is implied.
// If `id` is a string, it is treated as a fully qualified URL associated with `source`.
// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.
// Use this function without `id` to scroll to a new location of an opened page.
type open = (_: {
id?: number | string, // default: -1
cursor?: number, // default: -1
loc?: number, // default: -1
num_lines?: number, // default: -1
view_source?: boolean, // default: false
source?: string,
}) => any;""",
    "browser.find": """

// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.
type find = (_: {
pattern: string,
cursor?: number, // default: -1
}) => any;""",
}
_PYTHON = """

## python

Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. \
This tool should be used for internal reasoning, but not for code that is intended to be visible to the user \
(e.g. when creating plots, tables, or files).

When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook \
environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at \
'/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the \
cluster."""


def reasoning_level(think: bool | None = None, think_level: str = "") -> str:
    """The ``Reasoning:`` level of the system message, ``""`` for none (thinking turned off).

    A request that says nothing reasons at ``medium``; ``max`` is ``high``,
    the most harmony knows.
    """
    if think_level:
        level = "high" if think_level == "max" else think_level
        return level if level in THINK_LEVELS else ""
    return "" if think is False else "medium"


def render_harmony(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    *,
    think: bool | None = None,
    think_level: str = "",
    today: datetime.date | None = None,
) -> str:
    """The prompt for a conversation, byte for byte as Ollama's gpt-oss template renders it.

    ``think`` and ``think_level`` are the request's ``think`` as in
    :func:`~mullama.prompt.templates.render_chat`.  A trailing assistant
    message with content (or only thinking) is left open, to be continued.
    """
    system, turns = collate(messages)
    renamed = renamed_tools(tools)
    functions = [tool for tool in renamed if tool.name not in BUILTIN_TOOLS]
    out = [START, "system", MESSAGE, _IDENTITY, (today or datetime.date.today()).isoformat()]
    level = reasoning_level(think, think_level)
    if level:
        out.append(f"\n\nReasoning: {level}")
    out.append(_builtin_tools({tool.name for tool in renamed}))
    out += ["\n\n", _CHANNELS, _FUNCTIONS_CHANNEL if functions else "", END]
    if functions or system:
        out += [START, "developer", MESSAGE]
        if functions:
            out += ["# Tools\n\n## functions\n\nnamespace functions {", *map(_function, functions),
                    "\n\n} // namespace functions"]
        if system:
            out.append(f"\n\n# Instructions\n\n{system}")
        out.append(END)
    out.append(_conversation(turns))
    return "".join(out)


def _builtin_tools(names: set[str]) -> str:
    """The system message's ``# Tools`` section for the built-in tools requested."""
    browser = [text for name, text in _BROWSER_FUNCTIONS.items() if name in names]
    if not browser and "python" not in names:
        return ""
    section = "\n\n# Tools"
    if browser:
        section += _BROWSER_HEAD + "".join(browser) + "\n\n} // namespace browser"
    return section + (_PYTHON if "python" in names else "")


def _function(tool: Tool) -> str:
    """One function of the developer message's ``namespace functions``."""
    function = template_tool(tool).Function
    text = "\n" + (f"\n// {function.Description}" if function.Description else "")
    properties = function.Parameters.Properties
    if not properties:
        return text + f"\ntype {function.Name} = () => any;"
    text += f"\ntype {function.Name} = (_: {{"
    for name in sorted(properties):
        prop = properties[name]
        if prop.Description:
            text += f"\n  // {prop.Description}"
        text += f"\n  {name}: {prop.to_typescript_type()},"
    return text + "\n}) => any;"


def _conversation(turns: list[Message]) -> str:
    """Every message but the system ones, then the open assistant message."""
    last = turns[-1] if turns else Message(role="")
    prefill_content = last.role == "assistant" and bool(last.content)
    prefill_thinking = last.role == "assistant" and not last.content and bool(last.thinking)
    last_user = max((i for i, turn in enumerate(turns) if turn.role == "user"), default=-1)
    out = []
    for i, turn in enumerate(turns):
        if turn.role == "user":
            out += [START, "user", MESSAGE, turn.content, END]
        elif turn.role == "tool":
            author = turn.tool_name if turn.tool_name in BUILTIN_TOOLS else f"functions.{turn.tool_name}"
            out += [START, author, " to=assistant", MESSAGE, turn.content, END]
        elif turn.role == "assistant":
            # Reasoning is shown again only after the last user message (the current tool loop).
            if turn.thinking and i > last_user:
                out += [START, "assistant", CHANNEL, "analysis", MESSAGE, turn.thinking, "" if prefill_thinking else END]
            if turn.content:
                out += [START, "assistant", CHANNEL, "final", MESSAGE, turn.content, "" if prefill_content else END]
            for call in template_message(turn).ToolCalls:
                name = call.Function.Name
                target = ("analysis to=" + name) if name in BUILTIN_TOOLS else ("commentary to=functions." + name)
                out += [START, "assistant", CHANNEL, target, " ", CONSTRAIN, "json", MESSAGE, str(call.Function.Arguments),
                        CALL]
    if not (prefill_content or prefill_thinking):
        out.append(IMPLICIT_START)
    return "".join(out)


# ---------------------------------------------------------------- parsing


@dataclass
class ThinkingDelta:
    """Reasoning text (the analysis channel)."""

    text: str


Event = TextDelta | ThinkingDelta | ToolCallEvent


@dataclass(frozen=True)
class Header:
    """What a message header says: its author's role, its channel and its recipient."""

    role: str = ""
    channel: str = ""
    recipient: str = ""


_SPACE = re.compile(r"\s")


def parse_header(raw: str) -> Header:
    """Read a header as Ollama does: ``role [to=R]<|channel|>name [to=R] [<|constrain|>type]``.

    A recipient may come before or after the channel; a header that starts
    with ``to=`` is a tool's.
    """
    if CONSTRAIN in raw:
        raw = raw.replace(CONSTRAIN, " " + CONSTRAIN, 1).strip()
    channel = ""
    at = raw.find(CHANNEL)
    if at >= 0:
        before, after = raw[:at], raw[at + len(CHANNEL):]
        space = _SPACE.search(after)
        cut = space.start() if space else len(after)
        channel, raw = after[:cut], (before + after[cut:]).strip()
    words = raw.split()
    if not words:
        return Header(channel=channel)
    role, rest = words[0], words[1:]
    if role.startswith("to="):
        return Header("tool", channel, role[3:])
    return Header(role, channel, rest[0][3:] if rest and rest[0].startswith("to=") else "")


def resume_point(prompt: str) -> str:
    """The harmony text at the end of ``prompt`` that the output continues.

    Ollama's prompts end with ``<|start|>assistant`` (the model writes the
    header), or inside a message body when an assistant message is
    continued; a prompt with no harmony at all gets Ollama's implicit start.
    """
    at = prompt.rfind(START)
    if at < 0:
        return IMPLICIT_START
    tail = prompt[at:]
    if any(end in tail for end in (END, CALL, RETURN)):
        return ""
    body = tail.find(MESSAGE)
    return tail if body < 0 else tail[: body + len(MESSAGE)]


_OUTSIDE, _HEADER, _BODY = range(3)
#: What ends a message body.
_BODY_ENDS = (END, CALL, RETURN, START)
#: What ends a header that never reached ``<|message|>``.
_HEADER_ENDS = (MESSAGE, START, END, CALL, RETURN)
_LONGEST_TAG = max(map(len, _HEADER_ENDS))


def _overlap(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``tags``."""
    for size in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        end = text[-size:]
        if any(tag.startswith(end) for tag in tags):
            return size
    return 0


def _first(text: str, tags: Sequence[str], start: int = 0) -> tuple[int, str]:
    """The earliest of ``tags`` in ``text`` from ``start``: ``(index, tag)``, or ``(-1, "")``."""
    found = [(at, tag) for tag in tags if (at := text.find(tag, start)) >= 0]
    return min(found) if found else (-1, "")


class HarmonyParser:
    """Turn gpt-oss's streamed output into thinking, content and tool calls.

    ``prompt`` is the rendered prompt the output continues (see
    :func:`resume_point`); ``tools`` the request's tools, whose names the
    model saw converted.  Text streams out as soon as it cannot be part of a
    marker; a tool call is emitted when its message ends.  Nothing the model
    writes outside the markup is dropped: output that is not harmony at all
    is content, and a call whose arguments are not a JSON object comes back
    as content, with a warning logged.
    """

    def __init__(self, tools: Sequence[Tool] | None = None, prompt: str = "") -> None:
        self._names = FunctionNames([tool.name for tool in tools or ()])
        self._state = _OUTSIDE
        self._buffer = ""
        #: How far the buffer was searched for the end of the current part.
        self._searched = 0
        #: Text between messages: dropped when only whitespace, else content.
        self._stray_is_text = False
        self._header = ""
        #: The header was the prompt's ``<|start|>assistant`` and the output has yet to show it is harmony.
        self._may_be_plain = False
        self._kind = ""
        self._recipient = ""
        self._count = 0
        self._drain(resume_point(prompt), [], final=False)
        if self._state == _HEADER:
            # The prompt's part of the header is not output: keep it apart from what the model writes.
            self._header, self._buffer = self._buffer, ""
            self._may_be_plain = self._header == "assistant"

    def feed(self, text: str) -> list[Event]:
        """Take the next chunk of output; return the events it decides, in order."""
        events: list[Event] = []
        self._drain(text, events, final=False)
        return events

    def finish(self) -> list[Event]:
        """End of output: return what was held back, and a call left open by a stop."""
        events: list[Event] = []
        self._drain("", events, final=True)
        return events

    # The three states: between messages, in a header, in a body.

    def _drain(self, text: str, events: list[Event], final: bool) -> None:
        self._buffer += text
        step = {_OUTSIDE: self._outside, _HEADER: self._in_header, _BODY: self._in_body}
        while step[self._state](events, final):
            pass

    def _enter(self, state: int, rest: str) -> bool:
        self._state, self._buffer, self._searched = state, rest, 0
        return True

    def _outside(self, events: list[Event], final: bool) -> bool:
        """Between messages: wait for ``<|start|>``; text found here is content unless it is only whitespace."""
        buffer = self._buffer
        at = buffer.find(START)
        if at >= 0:
            if self._stray_is_text or buffer[:at].strip():
                _emit(events, TextDelta, buffer[:at])
            self._stray_is_text = False
            self._header, self._may_be_plain = "", False
            return self._enter(_HEADER, buffer[at + len(START):])
        keep = 0 if final else _overlap(buffer, (START,))
        decided = buffer[: len(buffer) - keep]
        if self._stray_is_text or decided.strip():
            # Hold nothing back but a possible <|start|>: this run of text is not layout.
            self._stray_is_text = not final
            _emit(events, TextDelta, decided)
            self._buffer = buffer[len(buffer) - keep:]
        elif final:
            self._buffer = ""
        return False

    def _in_header(self, events: list[Event], final: bool) -> bool:
        buffer = self._buffer
        if self._may_be_plain and self._plain(buffer, final):
            self._kind, self._recipient = "content", ""
            return self._enter(_BODY, buffer)
        at, tag = _first(buffer, _HEADER_ENDS, max(0, self._searched - _LONGEST_TAG + 1))
        if at < 0:
            self._searched = len(buffer)
            if final and buffer:
                log.warning("harmony: the output ended inside a message header: %.200r", self._header + buffer)
                self._buffer = ""
            return False
        header = self._header + buffer[:at]
        rest = buffer[at + len(tag):]
        if tag != MESSAGE:
            if buffer[:at].strip():
                log.warning("harmony: a message header ended without %s: %.200r", MESSAGE, header)
            self._header = ""
            return self._enter(_HEADER if tag == START else _OUTSIDE, rest)
        parsed = parse_header(header)
        self._header = header
        self._recipient = parsed.recipient if parsed.recipient not in ("", "assistant") else ""
        self._kind = "call" if self._recipient else ("thinking" if parsed.channel == "analysis" else "content")
        return self._enter(_BODY, rest)

    def _plain(self, buffer: str, final: bool) -> bool:
        """Whether output that opens the implicit assistant message is plain text rather than a header.

        A header goes on with a marker (``<|channel|>``, ``<|message|>``...)
        or with a space and ``to=``; anything else means the model is not
        writing harmony.
        """
        head = buffer.lstrip()
        openers = ("<|", "to=") if head != buffer else ("<|",)
        if head.startswith(openers):
            self._may_be_plain = False
            return False
        if not buffer or not final and (not head or any(opener.startswith(head) for opener in openers)):
            return False
        self._may_be_plain = False
        return True

    def _in_body(self, events: list[Event], final: bool) -> bool:
        buffer = self._buffer
        at, tag = _first(buffer, _BODY_ENDS, max(0, self._searched - _LONGEST_TAG + 1))
        if self._kind == "call":
            if at < 0 and not final:
                self._searched = len(buffer)
                return False
            body = buffer if at < 0 else buffer[:at]
            self._call(events, body)
        elif at < 0:
            keep = 0 if final else _overlap(buffer, _BODY_ENDS)
            self._text(events, buffer[: len(buffer) - keep])
            self._buffer, self._searched = buffer[len(buffer) - keep:], 0
            return False
        else:
            self._text(events, buffer[:at])
        if at < 0:
            self._buffer, self._state = "", _OUTSIDE
            return False
        self._header = ""
        return self._enter(_HEADER if tag == START else _OUTSIDE, buffer[at + len(tag):])

    def _text(self, events: list[Event], text: str) -> None:
        _emit(events, ThinkingDelta if self._kind == "thinking" else TextDelta, text)

    def _call(self, events: list[Event], body: str) -> None:
        """Emit the call a message made, or its text when its arguments are not a JSON object."""
        name = self._names.original(self._recipient.removeprefix("functions."))
        try:
            arguments = json.loads(body) if body.strip() else {}
            if not isinstance(arguments, dict):
                raise TypeError("the arguments are not a JSON object")
        except (ValueError, TypeError, RecursionError) as error:
            raw = START + self._header + MESSAGE + body
            log.warning("harmony: returning an unparsable call of %s as text (%s): %.200r", name, error, raw)
            _emit(events, TextDelta, raw)
            return
        call = ToolCall(name=name, arguments=arguments, id=new_call_id(), index=self._count)
        self._count += 1
        events.append(ToolCallEvent(call, START + self._header + MESSAGE + body))


def _emit(events: list[Event], kind: type[TextDelta] | type[ThinkingDelta], text: str) -> None:
    """Append a text event, merging it with the previous one of the same kind."""
    if not text:
        return
    if events and type(events[-1]) is kind:
        events[-1].text += text  # type: ignore[union-attr]
    else:
        events.append(kind(text))


@dataclass
class HarmonyOutput:
    """A whole output, parsed: what :class:`HarmonyParser`'s events add up to."""

    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


def parse_harmony(text: str, tools: Sequence[Tool] | None = None, prompt: str = "") -> HarmonyOutput:
    """Parse a whole output at once."""
    parser = HarmonyParser(tools, prompt)
    return collect(parser.feed(text) + parser.finish())


def collect(events: Sequence[Event]) -> HarmonyOutput:
    """Gather events into the thinking, content and calls they carry."""
    out = HarmonyOutput()
    for event in events:
        if isinstance(event, ThinkingDelta):
            out.thinking += event.text
        elif isinstance(event, TextDelta):
            out.content += event.text
        else:
            out.tool_calls.append(event.call)
    return out

