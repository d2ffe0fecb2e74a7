"""Finding tool calls in model output, as it streams.

Each model family writes its calls in its own syntax; a :class:`ToolFormat`
names one, :func:`detect_format` picks it from the markers in a model's chat
template, and :class:`ToolCallParser` turns streamed text into
:class:`TextDelta` and :class:`ToolCallEvent` events.  Output is never lost:
a call that cannot be parsed comes back as text, with a warning logged.

The syntaxes handled::

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Qwen, Hermes, SmolLM3;
                 also Qwen3-Coder's <function=..><parameter=..> and GLM's <arg_key> bodies)
    llama3       {"name": ..., "parameters": {...}} as the whole output, or <|python_tag|>...
    mistral      [TOOL_CALLS][{...}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
    granite      <|tool_call|>[{...}, ...]
    command_r    Action: ```json [{"tool_name": ..., "parameters": {...}}] ```
    command_r7b  <|START_ACTION|>[...]<|END_ACTION|>
    deepseek     <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name ```json {...}``` ...
    functionary  <function=name>{...}</function>
    firefunction functools[{...}, ...]
    json         a bare JSON object or array as the whole output (the fallback)
    harmony      gpt-oss's channels (analysis, commentary to=functions.NAME, final): not parsed here but by
                 mullama.prompt.harmony.HarmonyParser, which also splits out the thinking
    generic      JSON or <function=...> tags between an open and a close marker from the template
                 (Seed-OSS <seed:tool_call>, Apriel <tool_calls>, SmolLM2, ...)
"""

from __future__ import annotations

import ast
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mullama.types import Tool, ToolCall

log = logging.getLogger("mullama.prompt.toolcalls")

#: Exceptions a malformed call may raise while its body is decoded.
_PARSE_ERRORS = (ValueError, TypeError, SyntaxError, RecursionError)

_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"


@dataclass(frozen=True)
class ToolFormat:
    """A tool-call syntax: one of the names listed in this module's docstring.

    ``open`` and ``close`` are the markers of the ``generic`` format; an
    empty ``close`` means the call ends with its JSON value.
    """

    name: str
    open: str = ""
    close: str = ""


@dataclass
class TextDelta:
    """Output text that is not a tool call."""

    text: str


@dataclass
class ToolCallEvent:
    """One parsed tool call.

    ``raw`` is the model text the call was parsed from; when one block of
    text holds several calls, the first event carries it and the rest have
    ``""``, so the texts of all events together are the whole output.
    """

    call: ToolCall
    raw: str = ""


Event = TextDelta | ToolCallEvent
Tools = dict[str, Tool]
#: Finds where a call that starts at 0 ends, its body at the given index:
#: an index, or None while it may go on.
Scanner = Callable[[str, int, "_JsonEnd"], "int | None"]
#: Decodes the text of a call (markers excluded) into ``(name, arguments)`` pairs.
BodyParser = Callable[[str, Tools], "list[tuple[str, dict[str, Any]]]"]


@dataclass(frozen=True)
class _Marker:
    """How one kind of call starts, ends and reads."""

    start: str
    body: BodyParser
    #: The closing marker; without one, ``scan`` finds the end.
    end: str = ""
    scan: Scanner | None = None
    #: The marker counts only where nothing but whitespace precedes it.
    at_start: bool = False
    #: The start marker is the first character of the body (a bare ``{``).
    keep_start: bool = False


# Scanning: where a call ends.


_STRING_STOP = re.compile(r'[\\"]')


class _JsonEnd:
    """Where a JSON object or array ends, found as its text grows.

    Each call resumes where the previous one stopped, so a long call that
    streams in many chunks is read once rather than once per chunk.
    """

    def __init__(self) -> None:
        self._reset(-1)

    def _reset(self, start: int) -> None:
        """Begin a scan of the value that opens at ``start``."""
        self._start = self._pos = start
        self._depth = 0
        self._in_string = self._escaped = False
        self._end: int | None = None

    def __call__(self, text: str, start: int) -> int | None:
        """Index just past the value opening at ``start``, or None while it is unclosed."""
        if start != self._start:
            self._reset(start)
        pos = self._pos
        while self._end is None and pos < len(text):
            if self._escaped:
                self._escaped = False
                pos += 1
            elif self._in_string:
                stop = _STRING_STOP.search(text, pos)
                if stop is None:
                    pos = len(text)
                else:
                    pos = stop.end()
                    if stop.group() == '"':
                        self._in_string = False
                    else:
                        self._escaped = True
            else:
                char = text[pos]
                pos += 1
                if char == '"':
                    self._in_string = True
                elif char in "{[":
                    self._depth += 1
                elif char in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._end = pos
        self._pos = pos
        return self._end


_SPACE = re.compile(r"\s*")


def _skip_space(text: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos``."""
    return _SPACE.match(text, pos).end()


def _scan_json(text: str, pos: int, json_end: _JsonEnd) -> int | None:
    """End of a call that is a JSON value (after optional whitespace)."""
    pos = _skip_space(text, pos)
    if pos == len(text):
        return None
    if text[pos] not in "{[":
        return pos
    return json_end(text, pos)


def _scan_mistral(text: str, pos: int, json_end: _JsonEnd) -> int | None:
    """End of ``[{...}]`` or of ``name[ARGS]{...}``."""
    start = _skip_space(text, pos)
    if start < len(text) and text[start] in "{[":
        return json_end(text, start)
    args = text.find("[ARGS]", pos)
    return None if args < 0 else _scan_json(text, args + len("[ARGS]"), json_end)


def _scan_fenced(text: str, pos: int, json_end: _JsonEnd) -> int | None:
    """End of Command-R's fenced block: ```` ```json [...] ``` ````."""
    pos = _skip_space(text, pos)
    head = text[pos : pos + 7]
    if len(head) < 7 and "```json".startswith(head):
        return None
    for fence in ("```json", "```"):
        if head.startswith(fence):
            pos += len(fence)
            break
    end = _scan_json(text, pos, json_end)
    if end is None or end == _skip_space(text, pos):
        return end
    after = _skip_space(text, end)
    tail = text[after : after + 3]
    if len(tail) < 3 and "```".startswith(tail):
        return None
    return after + 3 if tail == "```" else end


# Decoding: what a call says.


def _decode_arguments(value: Any) -> dict[str, Any]:
    """Arguments as a dict, decoding a JSON string as some models write them."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, dict):
        raise TypeError("tool arguments are not an object")
    return value


def _unfence(text: str) -> str:
    """Text without a surrounding Markdown code fence."""
    text = text.strip()
    if text.startswith("```"):
        text = text[3:].removeprefix("json")
        text = text.removesuffix("```")
    return text.strip()


def _call_from_object(item: Any) -> tuple[str, dict[str, Any]]:
    """``(name, arguments)`` from one JSON call object, in any of the usual shapes."""
    if not isinstance(item, dict):
        raise TypeError("a tool call is not an object")
    if isinstance(item.get("function"), dict):
        item = item["function"]
    name = item.get("name", item.get("tool_name"))
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call has no name")
    for key in ("arguments", "parameters", "args"):
        if key in item:
            return name, _decode_arguments(item[key])
    return name, {}


def _json_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """Calls from a JSON object or array of objects."""
    value = json.loads(_unfence(body))
    items = value if isinstance(value, list) else [value]
    return [_call_from_object(item) for item in items]


def _typed_value(tools: Tools, name: str, param: str, text: str) -> Any:
    """A parameter written as plain text, typed by the tool's schema."""
    properties = tools[name].parameters.get("properties") if name in tools else None
    schema = properties.get(param) if isinstance(properties, dict) else None
    if isinstance(schema, dict) and schema.get("type") == "string":
        return text
    try:
        return json.loads(text)
    except _PARSE_ERRORS:
        return text


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_NAME = re.compile(r"[\w.\-]+")
_GLM_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _tagged_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """Calls from a ``<tool_call>`` body: JSON, Qwen3-Coder XML, or GLM's key/value tags."""
    text = body.strip()
    if text.startswith("<function="):
        if _XML_FUNCTION.sub("", text).strip():
            raise ValueError("text around <function=...> calls")
        calls = []
        for name, params in _XML_FUNCTION.findall(text):
            if _XML_PARAMETER.sub("", params).strip():
                raise ValueError("text around <parameter=...> values")
            name = name.strip()
            calls.append(
                (name, {p.strip(): _typed_value(tools, name, p.strip(), v) for p, v in _XML_PARAMETER.findall(params)})
            )
        return calls
    if text.startswith(("{", "[", "```")):
        return _json_calls(text, tools)
    name, sep, rest = text.partition("<arg_key>")
    name, arguments = name.strip(), sep + rest
    if not _NAME.fullmatch(name) or _GLM_ARGUMENT.sub("", arguments).strip():
        raise ValueError("not a tool call")
    return [(name, {k.strip(): _typed_value(tools, name, k.strip(), v) for k, v in _GLM_ARGUMENT.findall(arguments)})]


def _mistral_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """Calls from ``[{...}]`` or ``name[ARGS]{...}`` (with an optional ``[CALL_ID]``)."""
    text = body.strip()
    if text.startswith(("{", "[")):
        return _json_calls(text, tools)
    name, sep, args = text.partition("[ARGS]")
    if not sep:
        raise ValueError("no [ARGS]")
    return [(name.partition("[CALL_ID]")[0].strip(), _decode_arguments(args))]


def _deepseek_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """Calls from DeepSeek's ``<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>`` items.

    R1 writes ``function<｜tool▁sep｜>name`` and fenced JSON; V3.1 writes
    ``name<｜tool▁sep｜>`` and bare JSON.
    """
    head, *items = body.split(_DS_CALL_BEGIN)
    if head.strip() or not items:
        raise ValueError("no tool call items")
    calls = []
    for item in items:
        item, _, after = item.partition(_DS_CALL_END)
        if after.strip():
            raise ValueError("text between tool calls")
        kind, sep, rest = item.partition(_DS_SEP)
        if not sep:
            raise ValueError("no tool separator")
        if kind.strip() == "function" and "\n" in rest.strip():
            name, _, rest = rest.strip().partition("\n")
        else:
            name = kind
        calls.append((name.strip(), _decode_arguments(_unfence(rest))))
    return calls


def _function_tag_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """A call from ``name>{...}``, the inside of ``<function=name>{...}</function>``.

    Arguments that are not JSON are read as ``<parameter=...>`` tags.
    """
    name, sep, args = body.partition(">")
    if not sep:
        raise ValueError("no > after the function name")
    if not args.strip().startswith("{"):
        return _tagged_calls(f"<function={body}</function>", tools)
    return [(name.strip(), _decode_arguments(args))]


def _python_tag_calls(body: str, tools: Tools) -> list[tuple[str, dict[str, Any]]]:
    """Calls after Llama 3.1's ``<|python_tag|>``: JSON objects, or ``tool.call(key=value)``."""
    text = body.strip()
    if text.startswith("{"):
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(text):
            item, pos = decoder.raw_decode(text, pos)
            calls.append(_call_from_object(item))
            pos = _skip_space(text, pos)
            if text.startswith(";", pos):
                pos = _skip_space(text, pos + 1)
        return calls
    call = ast.parse(text, mode="eval").body
    if not isinstance(call, ast.Call) or call.args:
        raise ValueError("not a tool call")
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name):
        name = func.value.id
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        raise ValueError("not a tool call")
    if any(keyword.arg is None for keyword in call.keywords):
        raise ValueError("** arguments")
    return [(name, {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords})]


_BARE_OBJECT = _Marker("{", _json_calls, scan=_scan_json, at_start=True, keep_start=True)
_BARE_ARRAY = _Marker("[", _json_calls, scan=_scan_json, at_start=True, keep_start=True)
_PYTHON_TAG = _Marker("<|python_tag|>", _python_tag_calls)

_FORMAT_MARKERS: dict[str, tuple[_Marker, ...]] = {
    "hermes": (_Marker("<tool_call>", _tagged_calls, end="</tool_call>"),),
    "llama3": (_PYTHON_TAG, _BARE_OBJECT),
    "mistral": (_Marker("[TOOL_CALLS]", _mistral_calls, scan=_scan_mistral),),
    "granite": (_Marker("<|tool_call|>", _json_calls, scan=_scan_json),),
    "command_r": (_Marker("Action:", _json_calls, scan=_scan_fenced),),
    "command_r7b": (_Marker("<|START_ACTION|>", _json_calls, end="<|END_ACTION|>"),),
    "deepseek": (_Marker(_DS_CALLS_BEGIN, _deepseek_calls, end=_DS_CALLS_END),),
    "functionary": (_Marker("<function=", _function_tag_calls, end="</function>"), _PYTHON_TAG),
    "firefunction": (_Marker("functools", _json_calls, scan=_scan_json),),
    "json": (_BARE_OBJECT, _BARE_ARRAY),
}

#: The names of every format :class:`ToolCallParser` knows.
FORMATS = (*_FORMAT_MARKERS, "generic")
#: The format of gpt-oss, whose output :class:`mullama.prompt.harmony.HarmonyParser` parses.
HARMONY = "harmony"


def _markers(fmt: ToolFormat) -> tuple[_Marker, ...]:
    """The markers that start a call in ``fmt``."""
    if fmt.name == HARMONY:
        raise ValueError("harmony output carries thinking and calls in channels: parse it with "
                         "mullama.prompt.harmony.HarmonyParser")
    if fmt.name == "generic":
        if not fmt.open:
            raise ValueError("the generic tool-call format needs an open marker")
        return (_Marker(fmt.open, _tagged_calls, end=fmt.close, scan=None if fmt.close else _scan_json),)
    if fmt.name not in _FORMAT_MARKERS:
        raise ValueError(f"unknown tool-call format {fmt.name!r}")
    return _FORMAT_MARKERS[fmt.name]


def new_call_id() -> str:
    """A fresh id for a tool call, in OpenAI's ``call_...`` style."""
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Split streamed output into text and tool calls.

    Text streams out as soon as it cannot be the start of a call; a call is
    emitted whole when its end is seen, or at :meth:`finish`.  With a
    non-empty ``tools`` list, a call of an unknown tool is returned as text.
    """

    def __init__(self, fmt: ToolFormat, tools: list[Tool] | None = None) -> None:
        self.format = fmt
        self._markers = _markers(fmt)
        self._tools = {tool.name: tool for tool in tools or []}
        self._buffer = ""
        self._marker: _Marker | None = None
        self._json_end = _JsonEnd()
        #: How much of the current call was searched for its closing marker.
        self._searched = 0
        #: Nothing but whitespace was output since the start or the last call.
        self._at_start = True
        self._count = 0

    def feed(self, text: str) -> list[Event]:
        """Take the next chunk of output; return the events it completes."""
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        """End of output: return the events still held back."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Event]:
        """Turn as much of the buffer into events as is decided."""
        events: list[Event] = []
        while self._buffer:
            if self._marker is None:
                if not self._find_call(events, final):
                    break
            elif not self._take_call(events, final):
                break
        return events

    def _eligible(self, marker: _Marker, prefix: str) -> bool:
        """Whether ``marker`` may start a call after the text ``prefix``."""
        return not marker.at_start or (self._at_start and not prefix.strip())

    def _find_call(self, events: list[Event], final: bool) -> bool:
        """Emit text up to the next call start; return whether one was found."""
        buffer = self._buffer
        found = [
            (pos, marker)
            for marker in self._markers
            if (pos := buffer.find(marker.start)) >= 0 and self._eligible(marker, buffer[:pos])
        ]
        if found:
            pos, marker = min(found, key=lambda item: item[0])
            self._text(events, buffer[:pos])
            self._buffer, self._marker = buffer[pos:], marker
            self._json_end, self._searched = _JsonEnd(), 0
            return True
        keep = 0 if final else self._hold(buffer)
        self._text(events, buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep :]
        return False

    def _hold(self, buffer: str) -> int:
        """How much of the end of ``buffer`` might still become a call start."""
        keep = 0
        for marker in self._markers:
            if marker.at_start:
                if self._at_start and not buffer.strip():
                    return len(buffer)
                continue
            for size in range(min(len(buffer), len(marker.start) - 1), keep, -1):
                if buffer.endswith(marker.start[:size]):
                    keep = size
                    break
        return keep

    def _take_call(self, events: list[Event], final: bool) -> bool:
        """Emit the call at the start of the buffer once it is complete."""
        marker, buffer = self._marker, self._buffer
        assert marker is not None
        end = self._call_end(marker, buffer)
        if end is None:
            if not final:
                return False
            end = len(buffer)
        raw, self._buffer, self._marker = buffer[:end], buffer[end:], None
        body = raw if marker.keep_start else raw[len(marker.start) :]
        if marker.end:
            body = body.removesuffix(marker.end)
        try:
            calls = marker.body(body, self._tools)
            if not calls:
                raise ValueError("no calls")
            for name, _ in calls:
                if self._tools and name not in self._tools:
                    raise ValueError(f"unknown tool {name!r}")
        except _PARSE_ERRORS as exc:
            log.warning("returning an unparsable %s tool call as text (%s): %.200r", self.format.name, exc, raw)
            self._text(events, raw)
            return True
        for i, (name, arguments) in enumerate(calls):
            call = ToolCall(name=name, arguments=arguments, id=new_call_id(), index=self._count)
            self._count += 1
            events.append(ToolCallEvent(call, raw if i == 0 else ""))
        self._at_start = True
        return True

    def _call_end(self, marker: _Marker, buffer: str) -> int | None:
        """Where the call at the start of ``buffer`` ends, or None while it may go on."""
        if marker.end:
            # Resume the search where a closing marker could first be cut.
            end = buffer.find(marker.end, max(len(marker.start), self._searched - len(marker.end) + 1))
            self._searched = len(buffer)
            return None if end < 0 else end + len(marker.end)
        if marker.scan is None:
            return None
        return marker.scan(buffer, 0 if marker.keep_start else len(marker.start), self._json_end)

    def _text(self, events: list[Event], text: str) -> None:
        """Emit text, merged into a preceding text event."""
        if not text:
            return
        if text.strip():
            self._at_start = False
        if events and isinstance(events[-1], TextDelta):
            events[-1].text += text
        else:
            events.append(TextDelta(text))


def detect_format(chat_template: str, model_name: str = "", architecture: str = "") -> ToolFormat:
    """Choose the tool-call format from markers in a chat template (Jinja or Go).

    ``architecture`` (the GGUF's ``general.architecture``) names gpt-oss,
    whose harmony format is chosen as Ollama chooses it; ``model_name`` is a
    hint used only when the template has no known marker.
    """
    template = chat_template or ""
    if architecture.lower() in ("gpt-oss", "gptoss") or ("<|channel|>" in template and "<|message|>" in template):
        return ToolFormat(HARMONY)
    # Wrappers around a JSON or <function=...> body, read by the generic format.
    for open_tag, close_tag in (("<seed:tool_call>", "</seed:tool_call>"), ("<tool_calls>[", "</tool_calls>")):
        if open_tag in template and close_tag in template:
            return ToolFormat("generic", open_tag.rstrip("["), close_tag)
    checks: list[tuple[bool, str]] = [
        ("tool▁calls▁begin" in template or "tool_calls_begin" in template, "deepseek"),
        ("[TOOL_CALLS]" in template, "mistral"),
        ("<|tool_call|>" in template, "granite"),
        ("<|START_ACTION|>" in template, "command_r7b"),
        ("Action:" in template and "```json" in template, "command_r"),
        ("functools[" in template, "firefunction"),
        ("<tool_call>" in template, "hermes"),
        ("<function=" in template, "functionary"),
        ("<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template), "llama3"),
    ]
    for matched, name in checks:
        if matched:
            return ToolFormat(name)
    hints = [
        ("gpt-oss", HARMONY),
        ("deepseek", "deepseek"),
        ("mistral", "mistral"),
        ("granite", "granite"),
        ("command-r7b", "command_r7b"),
        ("command-r", "command_r"),
        ("qwen", "hermes"),
        ("hermes", "hermes"),
        ("llama3", "llama3"),
        ("llama-3", "llama3"),
    ]
    lowered = model_name.lower()
    for hint, name in hints:
        if hint in lowered:
            return ToolFormat(name)
    return ToolFormat("json")
