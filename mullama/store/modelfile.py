"""The Modelfile: Ollama's recipe for a model, parsed and printed.

The grammar is the one Ollama's ``parser/parser.go`` accepts: one
instruction per line (``FROM``, ``PARAMETER``, ``TEMPLATE``, ``SYSTEM``,
``ADAPTER``, ``LICENSE``, ``MESSAGE``, ``DRAFT``, ``RENDERER``, ``PARSER``,
``REQUIRES``; any case), ``#`` comment lines, and values that are either the
rest of the line or quoted.  A quoted value starts with ``"`` or ``\"\"\"``
and ends at the first line end where the text so far ends with the same
quote, so it may span lines.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from mullama.errors import BadRequestError
from mullama.options import IGNORED_OPTIONS, PARAMETER_TYPES, parse_parameter
from mullama.types import Message

_log = logging.getLogger(__name__)

_INSTRUCTIONS = (
    "from", "parameter", "template", "system", "adapter", "license",
    "message", "draft", "renderer", "parser", "requires",
)  # fmt: skip
_ROLES = ("system", "user", "assistant")

_WORD = re.compile(r"[A-Za-z]+")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")
_BLANK = re.compile(r"[ \t]+")
_NEWLINE = re.compile(r"[\r\n]")
# A closing quote counts only when nothing but spaces follows it on its line.
_CLOSE_TRIPLE = re.compile(r'"""(?=[^\S\r\n]*(?:[\r\n]|\Z))')
_CLOSE_SINGLE = re.compile(r'"(?=[^\S\r\n]*(?:[\r\n]|\Z))')
_SEMVER = re.compile(r"v?[0-9]+(?:\.[0-9]+(?:\.[0-9]+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)?)?")


class ModelfileError(BadRequestError):
    """A Modelfile that does not follow the grammar; ``line`` is 1-based (0: the whole file)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Modelfile line {line}: {message}" if line else f"Modelfile: {message}", param="modelfile")
        self.line = line


@dataclass
class Modelfile:
    """The content of a Modelfile; empty strings mean "not given"."""

    from_: str = ""
    #: The FROM lines after the first: files joined to it, as Ollama joins them (a model and its projector).
    more_from: list[str] = field(default_factory=list)
    #: Typed values by option name; ``stop`` is a list accumulated over its lines.
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str = ""
    system: str = ""
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    draft: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""


def parse(text: str) -> Modelfile:
    """Parse a Modelfile; raise :class:`ModelfileError` naming the faulty line."""
    text = text.removeprefix("\ufeff")
    result = Modelfile()
    has_from = False
    pos = counted = 0
    line = 1
    while True:
        pos = _skip_blank_lines(text, pos)
        if pos >= len(text):
            break
        if text[pos] == "#":
            newline = _NEWLINE.search(text, pos)
            pos = newline.start() if newline else len(text)
            continue
        line += _count_lines(text, counted, pos)
        counted = pos
        word = _WORD.match(text, pos)
        if word is None:
            raise ModelfileError(line, f'expected an instruction, got "{text[pos]}"')
        instruction = word.group().lower()
        if instruction not in _INSTRUCTIONS:
            expected = ", ".join(name.upper() for name in _INSTRUCTIONS)
            raise ModelfileError(line, f'unknown instruction "{word.group()}", expected one of {expected}')
        pos = _expect_blank(text, word.end(), line, f"expected a space and a value after {instruction.upper()}")
        if instruction == "parameter":
            name, pos = _argument(text, pos, _PARAMETER_NAME, line, "PARAMETER needs a name and a value")
            value, pos = _scan_value(text, pos, line)
            _add_parameter(result, name, value, line)
        elif instruction == "message":
            role, pos = _argument(text, pos, _WORD, line, "MESSAGE needs a role and a content")
            if role not in _ROLES:
                raise ModelfileError(line, f'message role must be one of "system", "user" or "assistant", not "{role}"')
            value, pos = _scan_value(text, pos, line)
            result.messages.append(Message(role=role, content=value))
        else:
            value, pos = _scan_value(text, pos, line)
            _set(result, instruction, value, line, first_from=not has_from)
            has_from = has_from or instruction == "from"
    if not has_from:
        raise ModelfileError(0, "no FROM line")
    return result


def render(modelfile: Modelfile, *, name: str = "") -> str:
    """Print a Modelfile the way ``ollama show --modelfile`` does.

    ``name`` is the model's name for the header comment.  Raises
    :class:`ModelfileError` for the rare value no quoting can represent
    (a ``\"\"\"`` ending a line inside a value that also needs quotes).
    """
    lines = ['# Modelfile generated by "ollama show"']
    if name:
        lines += ["# To build a new Modelfile based on this, replace FROM with:", f"# FROM {name}", ""]
    lines.append(f"FROM {_quote(modelfile.from_)}")
    lines += [f"ADAPTER {_quote(adapter)}" for adapter in modelfile.adapters]
    if modelfile.draft:
        lines.append(f"DRAFT {_quote(modelfile.draft)}")
    lines += [f"FROM {_quote(source)}" for source in modelfile.more_from]
    for instruction in ("template", "system", "renderer", "parser", "requires"):
        value = getattr(modelfile, instruction)
        if value:
            lines.append(f"{instruction.upper()} {_quote(value)}")
    for option, value in modelfile.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {option} {_quote(_parameter_text(item))}")
    lines += [f"LICENSE {_quote(license)}" for license in modelfile.licenses]
    lines += [f"MESSAGE {message.role} {_quote(message.content)}" for message in modelfile.messages]
    return "\n".join(lines) + "\n"


def version_key(version: str) -> tuple[Any, ...]:
    """A sort key for a semantic version (``0.14``, ``v1.2.3-rc.1+build``) that orders as Go's ``semver.Compare``.

    Missing minor and patch numbers are 0; a pre-release sorts before its
    release, its dot-separated parts numerically when numeric, numbers before
    words; build metadata is ignored.  Raises ``ValueError`` for a non-version.
    """
    if not _SEMVER.fullmatch(version):
        raise ValueError(f"not a version: {version!r}")
    core, _, pre = version.removeprefix("v").split("+", 1)[0].partition("-")
    numbers = [int(part) for part in core.split(".")]
    numbers += [0] * (3 - len(numbers))
    if not pre:
        return (*numbers, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*numbers, 0, parts)


def check_requires(requires: str, version: str) -> None:
    """Refuse a model whose REQUIRES asks for a newer Ollama than ``version``, the one Mullama answers as.

    REQUIRES names the oldest Ollama that can run the model; Ollama's registry
    refuses such a model to an older Ollama, and Mullama refuses to create it.
    """
    if not requires:
        return
    try:
        wanted = version_key(requires)
    except ValueError:
        raise BadRequestError(f'requires must be a valid semver (e.g. 0.14.0), not "{requires}"',
                              param="requires") from None
    if wanted > version_key(version):
        raise BadRequestError(f"this model requires Ollama {requires.removeprefix('v')} or later; Mullama answers "
                              f"as Ollama {version}, so it may lack what the model needs", param="requires")


def _set(result: Modelfile, instruction: str, value: str, line: int, *, first_from: bool) -> None:
    if instruction == "from":
        if not value.strip():
            raise ModelfileError(line, "FROM needs a model name or a path")
        if first_from:
            result.from_ = value
        else:
            result.more_from.append(value)
    elif instruction == "adapter":
        result.adapters.append(value)
    elif instruction == "license":
        result.licenses.append(value)
    elif instruction == "requires":
        if not _SEMVER.fullmatch(value):
            raise ModelfileError(line, f'REQUIRES must be a version such as 0.14.0, not "{value}"')
        result.requires = value.removeprefix("v")
    else:
        setattr(result, instruction, value)


def _add_parameter(result: Modelfile, name: str, text: str, line: int) -> None:
    if name in IGNORED_OPTIONS:
        _log.warning("Modelfile line %d: parameter %s is deprecated and ignored", line, name)
        return
    if name not in PARAMETER_TYPES:
        raise ModelfileError(line, f'unknown parameter "{name}"')
    try:
        value = parse_parameter(name, text)
    except BadRequestError as error:
        raise ModelfileError(line, error.message) from None
    if isinstance(value, list):
        result.parameters.setdefault(name, []).extend(value)
    else:
        result.parameters[name] = value


def _skip_blank_lines(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _expect_blank(text: str, pos: int, line: int, message: str) -> int:
    blank = _BLANK.match(text, pos)
    if blank is None:
        raise ModelfileError(line, message)
    return blank.end()


def _argument(text: str, pos: int, pattern: re.Pattern[str], line: int, message: str) -> tuple[str, int]:
    """Read the word after ``PARAMETER`` or ``MESSAGE`` and the blank that ends it."""
    word = pattern.match(text, pos)
    if word is None:
        raise ModelfileError(line, message)
    return word.group(), _expect_blank(text, word.end(), line, message)


def _scan_value(text: str, pos: int, line: int) -> tuple[str, int]:
    """Read the value starting at ``pos``; return it and where its last line ends."""
    newline = _NEWLINE.search(text, pos)
    line_end = newline.start() if newline else len(text)
    head = text[pos:line_end].lstrip()
    if not head.startswith('"'):
        return head.rstrip(), line_end
    start = line_end - len(head)
    triple = text.startswith('"""', start)
    quote_len = 3 if triple else 1
    close = (_CLOSE_TRIPLE if triple else _CLOSE_SINGLE).search(text, start + quote_len)
    if close is None:
        raise ModelfileError(line, f"unterminated {'triple-' if triple else ''}quoted value")
    newline = _NEWLINE.search(text, close.end())
    return text[start + quote_len : close.start()], newline.start() if newline else len(text)


def _quote(value: str) -> str:
    """Write ``value`` so that :func:`_scan_value` reads it back unchanged.

    Ollama's choices come first (bare, then ``"..."`` when the value has no
    quote, then ``\"\"\"...\"\"\"``); each is checked by reading it back.
    """
    if not value:
        return '""'
    candidates = [f'"{value}"'] if '"' not in value else [f'"""{value}"""', f'"{value}"']
    if value == value.strip() and not _NEWLINE.search(value):
        candidates.insert(0, value)
    for candidate in candidates:
        try:
            if _scan_value(candidate, 0, 0) == (value, len(candidate)):
                return candidate
        except ModelfileError:
            continue
    raise ModelfileError(0, f"value {value[:40]!r} cannot be written in a Modelfile")


def _parameter_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def _count_lines(text: str, start: int, end: int) -> int:
    """Count the line ends in ``text[start:end]``: LF, CRLF or a lone CR."""
    return text.count("\n", start, end) + text.count("\r", start, end) - text.count("\r\n", start, end)
