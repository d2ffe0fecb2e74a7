"""Go's ``text/template``, the language of Ollama's Modelfile ``TEMPLATE``.

Templates come from users, so parsing and execution are bounded: nesting,
template recursion, execution steps and output size all have caps, and every
failure is a :class:`TemplateError` whose message reads like Go's
(``template: NAME:LINE: ...``).

Data is plain Python: a ``dict`` is a Go map (``.Key`` looks the key up), a
dataclass is a Go struct (``.Field`` reads the attribute), lists and tuples
are slices, ``None`` is nil.  A value whose class defines ``__str__`` prints
through it, as a Go ``fmt.Stringer`` does, and one with ``__go_json__`` gives
its own JSON, as a Go ``json.Marshaler`` does.  A dataclass field's
``metadata["json"]`` is its Go struct tag (``"name,omitempty"``).
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import datetime
import math
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from mullama.errors import BadRequestError

#: Deepest nesting of control structures and parentheses a template may use.
MAX_NESTING = 100
#: Deepest chain of ``{{template}}`` calls during one execution.
MAX_TEMPLATE_DEPTH = 100
#: Most nodes one execution may evaluate.
MAX_STEPS = 1_000_000
#: Most characters one execution may produce (and any one string it builds).
MAX_OUTPUT = 16 * 1024 * 1024

_SPACE = " \t\r\n"


class TemplateError(BadRequestError):
    """A template that does not parse, or that fails while executing."""


# ---------------------------------------------------------------- nodes


@dataclass(eq=False)
class Node:
    """A node of a parsed template; ``pos`` is its offset in the source."""

    pos: int


@dataclass(eq=False)
class ListNode(Node):
    """A sequence of nodes."""

    nodes: list[Node]

    def __str__(self) -> str:
        return "".join(str(n) for n in self.nodes)


@dataclass(eq=False)
class TextNode(Node):
    """Literal text, copied to the output."""

    text: str

    def __str__(self) -> str:
        return go_quote(self.text)


@dataclass(eq=False)
class FieldNode(Node):
    """``.A.B``: a chain of field or key look-ups on dot."""

    ident: list[str]

    def __str__(self) -> str:
        return "".join("." + i for i in self.ident)


@dataclass(eq=False)
class VariableNode(Node):
    """``$x.A.B``: a variable, possibly followed by field look-ups."""

    ident: list[str]

    def __str__(self) -> str:
        return ".".join(self.ident)


@dataclass(eq=False)
class DotNode(Node):
    """``.``, the cursor."""

    def __str__(self) -> str:
        return "."


@dataclass(eq=False)
class NilNode(Node):
    """The untyped ``nil``."""

    def __str__(self) -> str:
        return "nil"


@dataclass(eq=False)
class BoolNode(Node):
    """``true`` or ``false``."""

    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(eq=False)
class NumberNode(Node):
    """A number or character constant; ``value`` is ``None`` when it overflows int."""

    text: str
    value: int | float | None

    def __str__(self) -> str:
        return self.text


@dataclass(eq=False)
class StringNode(Node):
    """A quoted or raw string constant."""

    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@dataclass(eq=False)
class IdentifierNode(Node):
    """The name of a function."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class CommandNode(Node):
    """One stage of a pipeline: an operand, or a function and its arguments."""

    args: list[Node]

    def __str__(self) -> str:
        return " ".join(f"({a})" if isinstance(a, PipeNode) else str(a) for a in self.args)


@dataclass(eq=False)
class PipeNode(Node):
    """Commands joined by ``|``, optionally declaring or assigning variables."""

    decl: list[str]
    is_assign: bool
    cmds: list[CommandNode]

    def __str__(self) -> str:
        head = ", ".join(self.decl) + (" = " if self.is_assign else " := ") if self.decl else ""
        return head + " | ".join(str(c) for c in self.cmds)


@dataclass(eq=False)
class ChainNode(Node):
    """``(pipeline).A.B``: field look-ups on a value that is not dot or a variable."""

    node: Node
    fields: list[str]

    def __str__(self) -> str:
        base = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return base + "".join("." + f for f in self.fields)


@dataclass(eq=False)
class ActionNode(Node):
    """``{{pipeline}}``: evaluate and print (unless it declares variables)."""

    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass(eq=False)
class BranchNode(Node):
    """The shape shared by ``if``, ``range`` and ``with``."""

    pipe: PipeNode
    body: ListNode
    else_body: ListNode | None

    keyword = ""

    def __str__(self) -> str:
        tail = "" if self.else_body is None else "{{else}}" + str(self.else_body)
        return f"{{{{{self.keyword} {self.pipe}}}}}{self.body}{tail}{{{{end}}}}"


@dataclass(eq=False)
class IfNode(BranchNode):
    """``{{if}}``."""

    keyword = "if"


@dataclass(eq=False)
class RangeNode(BranchNode):
    """``{{range}}``."""

    keyword = "range"


@dataclass(eq=False)
class WithNode(BranchNode):
    """``{{with}}``."""

    keyword = "with"


@dataclass(eq=False)
class TemplateNode(Node):
    """``{{template "name" pipeline}}``."""

    name: str
    pipe: PipeNode | None

    def __str__(self) -> str:
        arg = "" if self.pipe is None else f" {self.pipe}"
        return f"{{{{template {go_quote(self.name)}{arg}}}}}"


@dataclass(eq=False)
class BreakNode(Node):
    """``{{break}}``."""

    def __str__(self) -> str:
        return "{{break}}"


@dataclass(eq=False)
class ContinueNode(Node):
    """``{{continue}}``."""

    def __str__(self) -> str:
        return "{{continue}}"


@dataclass(eq=False)
class _End(Node):
    def __str__(self) -> str:
        return "{{end}}"


@dataclass(eq=False)
class _Else(Node):
    def __str__(self) -> str:
        return "{{else}}"


# ---------------------------------------------------------------- lexer


@dataclass
class _Token:
    kind: str
    val: str
    pos: int


_KEYWORDS = {"block", "break", "continue", "define", "else", "end", "if", "range", "nil", "template", "with"}
_OPERAND_START = {"bool", "charconst", "number", "dot", "field", "ident", "nil", "raw", "string", "var", "("}


class _LexError(Exception):
    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.pos = pos


def _is_alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or unicodedata.category(c) == "Nd"


def _unicode_name(c: str) -> str:
    return f"U+{ord(c):04X} {go_quote_rune(c)}"


class _Lexer:
    """Splits a template into tokens; a lexical error ends the stream with an error token."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[_Token] = []

    def run(self) -> list[_Token]:
        try:
            self._lex_text()
        except _LexError as e:
            self.tokens.append(_Token("error", str(e), e.pos))
        self.tokens.append(_Token("eof", "", len(self.text)))
        return self.tokens

    def _emit(self, kind: str, start: int, end: int) -> None:
        self.tokens.append(_Token(kind, self.text[start:end], start))

    def _right_delim(self, p: int) -> tuple[int, bool] | None:
        """Where a right delimiter at ``p`` ends and whether it trims, or None."""
        text = self.text
        if text.startswith("}}", p):
            return p + 2, False
        if p + 1 < len(text) and text[p] in _SPACE and text[p + 1] == "-" and text.startswith("}}", p + 2):
            return p + 4, True
        return None

    def _skip_space(self, p: int) -> int:
        while p < len(self.text) and self.text[p] in _SPACE:
            p += 1
        return p

    def _lex_text(self) -> None:
        text, pos = self.text, 0
        while True:
            start = text.find("{{", pos)
            if start < 0:
                if pos < len(text):
                    self._emit("text", pos, len(text))
                return
            after = start + 2
            trim = text.startswith("-", after) and after + 1 < len(text) and text[after + 1] in _SPACE
            segment = text[pos:start]
            if trim:
                segment = segment.rstrip(_SPACE)
                after += 2
            if segment:
                self.tokens.append(_Token("text", segment, pos))
            if text.startswith("/*", after):
                pos = self._lex_comment(start, after)
                continue
            self.tokens.append(_Token("left", "{{", start))
            pos = self._lex_action(after)

    def _lex_comment(self, start: int, p: int) -> int:
        end = self.text.find("*/", p + 2)
        if end < 0:
            raise _LexError("unclosed comment", start)
        delim = self._right_delim(end + 2)
        if delim is None:
            raise _LexError("comment ends before closing delimiter", start)
        after, trim = delim
        return self._skip_space(after) if trim else after

    def _lex_action(self, p: int) -> int:
        text, depth = self.text, 0
        while True:
            delim = self._right_delim(p)
            if delim is not None:
                if depth:
                    raise _LexError("unclosed left paren", p)
                after, trim = delim
                self.tokens.append(_Token("right", "}}", after - 2))
                return self._skip_space(after) if trim else after
            if p >= len(text):
                raise _LexError("unclosed action", p)
            c = text[p]
            if c in _SPACE:
                q = self._skip_space(p)
                if text.startswith("-}}", q):
                    q -= 1  # leave the space of a " -}}" trim marker
                if q > p:
                    self._emit("space", p, q)
                p = q
            elif c == "=":
                self._emit("=", p, p + 1)
                p += 1
            elif c == ":":
                if not text.startswith("=", p + 1):
                    raise _LexError("expected :=", p)
                self._emit(":=", p, p + 2)
                p += 2
            elif c == "|":
                self._emit("|", p, p + 1)
                p += 1
            elif c == '"':
                p = self._lex_quote(p, '"', "string", "unterminated quoted string")
            elif c == "'":
                p = self._lex_quote(p, "'", "charconst", "unterminated character constant")
            elif c == "`":
                end = text.find("`", p + 1)
                if end < 0:
                    raise _LexError("unterminated raw quoted string", p)
                self._emit("raw", p, end + 1)
                p = end + 1
            elif c == "$":
                p = self._lex_word(p, p + 1, "var")
            elif c == "." and not (p + 1 < len(text) and "0" <= text[p + 1] <= "9"):
                p = self._lex_word(p, p + 1, "field")
            elif c in "+-.0123456789":
                p = self._lex_number(p)
            elif _is_alnum(c):
                p = self._lex_word(p, p, "ident")
            elif c == "(":
                depth += 1
                self._emit("(", p, p + 1)
                p += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    raise _LexError("unexpected right paren", p)
                self._emit(")", p, p + 1)
                p += 1
            elif c.isascii() and c.isprintable():
                self._emit("char", p, p + 1)
                p += 1
            else:
                raise _LexError(f"unrecognized character in action: {_unicode_name(c)}", p)

    def _lex_quote(self, p: int, quote: str, kind: str, message: str) -> int:
        text, q = self.text, p + 1
        while True:
            if q >= len(text) or text[q] == "\n":
                raise _LexError(message, p)
            if text[q] == "\\":
                q += 1
                if q >= len(text) or text[q] == "\n":
                    raise _LexError(message, p)
            elif text[q] == quote:
                self._emit(kind, p, q + 1)
                return q + 1
            q += 1

    def _at_terminator(self, p: int) -> bool:
        if p >= len(self.text):
            return True
        return self.text[p] in _SPACE or self.text[p] in ".,|:()" or self.text.startswith("}}", p)

    def _lex_word(self, start: int, p: int, kind: str) -> int:
        """A variable (``$x``), a field (``.X``), or an identifier or keyword."""
        text = self.text
        if kind != "ident" and self._at_terminator(p):
            self._emit("var" if kind == "var" else "dot", start, p)
            return p
        while p < len(text) and _is_alnum(text[p]):
            p += 1
        if not self._at_terminator(p):
            raise _LexError(f"bad character {_unicode_name(text[p])}", p)
        word = text[start:p]
        if kind == "ident":
            kind = "bool" if word in ("true", "false") else word if word in _KEYWORDS else "ident"
        self._emit(kind, start, p)
        return p

    def _lex_number(self, start: int) -> int:
        text = self.text
        p = self._scan_number(start)
        if p is None or (p < len(text) and text[p] in "+-"):
            # Go reads ``1+2i`` as a complex constant; this engine has none.
            end = p if p is not None else start + 1
            while end < len(text) and (_is_alnum(text[end]) or text[end] in "+-."):
                end += 1
            raise _LexError(f"bad number syntax: {go_quote(text[start:end])}", start)
        self._emit("number", start, p)
        return p

    def _scan_number(self, p: int) -> int | None:
        text = self.text

        def accept(chars: str) -> bool:
            nonlocal p
            if p < len(text) and text[p] in chars:
                p += 1
                return True
            return False

        def accept_run(chars: str) -> None:
            while accept(chars):
                pass

        accept("+-")
        digits = "0123456789_"
        if accept("0"):
            if accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif accept("oO"):
                digits = "01234567_"
            elif accept("bB"):
                digits = "01_"
        accept_run(digits)
        if accept("."):
            accept_run(digits)
        if len(digits) == 11 and accept("eE"):
            accept("+-")
            accept_run("0123456789_")
        if len(digits) == 23 and accept("pP"):
            accept("+-")
            accept_run("0123456789_")
        accept("i")
        if p < len(text) and _is_alnum(text[p]):
            return None
        return p


# ---------------------------------------------------------------- Go literals

_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _unquote_body(body: str, quote: str) -> str:
    """The value of a Go string or character literal's body; ValueError when malformed."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError("invalid syntax")
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("invalid syntax")
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
        elif e == quote:
            out += e.encode()
        elif e in "xuU":
            size = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + size]
            if len(digits) != size or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("invalid syntax")
            value = int(digits, 16)
            i += size
            if e == "x":
                out.append(value)
            elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise ValueError("invalid syntax")
            else:
                out += chr(value).encode()
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) != 3 or not all(d in "01234567" for d in digits) or int(digits, 8) > 255:
                raise ValueError("invalid syntax")
            out.append(int(digits, 8))
            i += 2
        else:
            raise ValueError("invalid syntax")
    return out.decode("utf-8", "replace")


def go_unquote(literal: str) -> str:
    """The value of a Go string literal (``"..."`` or a raw ```...```)."""
    if len(literal) >= 2 and literal[0] == literal[-1] == "`":
        return literal[1:-1].replace("\r", "")
    if len(literal) >= 2 and literal[0] == literal[-1] == '"':
        return _unquote_body(literal[1:-1], '"')
    raise ValueError("invalid syntax")


def _go_is_print(c: str) -> bool:
    return c == " " or (c.isprintable() and not unicodedata.category(c).startswith("Z"))


def _quote_char(c: str, quote: str) -> str:
    if c == quote or c == "\\":
        return "\\" + c
    if _go_is_print(c):
        return c
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    if c in named:
        return named[c]
    code = ord(c)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return "\\ufffd"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def go_quote(s: str) -> str:
    """Go's ``strconv.Quote``."""
    return '"' + "".join(_quote_char(c, '"') for c in s) + '"'


def go_quote_rune(c: str) -> str:
    """Go's ``strconv.QuoteRune``."""
    return "'" + _quote_char(c, "'") + "'"


def _number_value(tok: _Token) -> int | float | None:
    """An ideal constant as Go's executor resolves it; None for a uint that overflows int."""
    text = tok.val
    if tok.kind == "charconst":
        value = _unquote_body(text[1:-1], "'")
        if len(value) != 1:
            raise ValueError(f"malformed character constant: {text}")
        return ord(value)
    if text.endswith("i"):
        raise ValueError(f"illegal number syntax: {go_quote(text)}")
    as_int = _parse_go_int(text)
    hex_int = len(text) > 2 and text[0] == "0" and text[1] in "xX" and not any(ch in text for ch in "pP")
    if not hex_int and any(ch in text for ch in ".eEpP"):
        try:
            value = _parse_go_float(text)
            if math.isinf(value):
                raise ValueError(text)
            return value
        except (ValueError, OverflowError):
            if as_int is None:
                raise ValueError(f"illegal number syntax: {go_quote(text)}") from None
    if as_int is None:
        raise ValueError(f"illegal number syntax: {go_quote(text)}")
    if as_int >= 1 << 64 or as_int < -(1 << 63):
        raise ValueError(f"integer overflow: {go_quote(text)}")
    return as_int if as_int < 1 << 63 else None


def _parse_go_int(text: str) -> int | None:
    body = text.lstrip("+-")
    if re.fullmatch(r"0[0-7_]+", body):
        text = text.replace("0", "0o", 1)
    try:
        return int(text, 0)
    except ValueError:
        return None


def _parse_go_float(text: str) -> float:
    body = text.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        value = float.fromhex(body.replace("_", ""))
        return -value if text.startswith("-") else value
    return float(text)


# ---------------------------------------------------------------- parser


class _Parser:
    """Go's recursive-descent template parser, with a cap on nesting."""

    def __init__(self, text: str, name: str, funcs: Collection[str]) -> None:
        self.text = text
        self.name = name
        self.funcs = funcs
        self.tokens = _Lexer(text).run()
        self.newlines = [i for i, c in enumerate(text) if c == "\n"]
        self.i = 0
        self.last = self.tokens[0]
        self.trees: dict[str, ListNode] = {}
        self.vars = ["$"]
        self.range_depth = 0
        self.depth = 0

    # token stream

    def next(self) -> _Token:
        tok = self.tokens[min(self.i, len(self.tokens) - 1)]
        self.i += 1
        self.last = tok
        if tok.kind == "error":
            self.fail(tok.val)
        return tok

    def backup(self) -> None:
        self.i -= 1

    def peek(self) -> _Token:
        tok = self.next()
        self.backup()
        return tok

    def next_non_space(self) -> _Token:
        tok = self.next()
        while tok.kind == "space":
            tok = self.next()
        return tok

    def peek_non_space(self) -> _Token:
        tok = self.next_non_space()
        self.backup()
        return tok

    # errors

    def fail(self, message: str) -> None:
        line = bisect.bisect_left(self.newlines, self.last.pos) + 1
        raise TemplateError(f"template: {self.name}:{line}: {message}")

    def unexpected(self, tok: _Token, context: str) -> None:
        if tok.kind == "eof":
            shown = "EOF"
        elif tok.kind in _KEYWORDS:
            shown = f"<{tok.val}>"
        elif len(tok.val) > 10:
            shown = go_quote(tok.val[:10]) + "..."
        else:
            shown = go_quote(tok.val)
        self.fail(f"unexpected {shown} in {context}")

    def expect(self, kind: str, context: str) -> _Token:
        tok = self.next_non_space()
        if tok.kind != kind:
            self.unexpected(tok, context)
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.fail(f"template nesting exceeds {MAX_NESTING} levels")

    # structure

    def parse(self) -> dict[str, ListNode]:
        root = ListNode(0, [])
        while self.peek().kind != "eof":
            if self.peek().kind == "left":
                mark = self.i
                self.next()
                if self.next_non_space().kind == "define":
                    self.parse_definition()
                    continue
                self.i = mark
            node = self.text_or_action()
            if isinstance(node, (_End, _Else)):
                self.fail(f"unexpected {node}")
            root.nodes.append(node)
        self.add(self.name, root)
        return self.trees

    def add(self, name: str, tree: ListNode) -> None:
        existing = self.trees.get(name)
        if existing is None or is_empty_tree(existing):
            self.trees[name] = tree
        elif not is_empty_tree(tree):
            self.fail(f"template: multiple definition of template {go_quote(name)}")

    def parse_definition(self) -> None:
        context = "define clause"
        name = self.template_name(self.next_non_space(), context)
        self.expect("right", context)
        body, end = self.isolated_list()
        if not isinstance(end, _End):
            self.fail(f"unexpected {end} in {context}")
        self.add(name, body)

    def isolated_list(self) -> tuple[ListNode, Node]:
        """A define or block body: a fresh variable scope, outside any range."""
        saved = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        self.enter()
        try:
            return self.item_list()
        finally:
            self.vars, self.range_depth = saved
            self.depth -= 1

    def item_list(self) -> tuple[ListNode, Node]:
        nodes = ListNode(self.peek_non_space().pos, [])
        while self.peek_non_space().kind != "eof":
            node = self.text_or_action()
            if isinstance(node, (_End, _Else)):
                return nodes, node
            nodes.nodes.append(node)
        self.next_non_space()
        self.fail("unexpected EOF")
        raise AssertionError

    def text_or_action(self) -> Node:
        tok = self.next_non_space()
        if tok.kind == "text":
            return TextNode(tok.pos, tok.val)
        if tok.kind == "left":
            return self.action()
        self.unexpected(tok, "input")
        raise AssertionError

    def action(self) -> Node:
        tok = self.next_non_space()
        kind = tok.kind
        if kind == "block":
            return self.block_control()
        if kind in ("break", "continue"):
            after = self.next_non_space()
            if after.kind != "right":
                self.unexpected(after, f"{{{{{kind}}}}}")
            if self.range_depth == 0:
                self.fail(f"{{{{{kind}}}}} outside {{{{range}}}}")
            return BreakNode(tok.pos) if kind == "break" else ContinueNode(tok.pos)
        if kind == "else":
            peek = self.peek_non_space()
            if peek.kind in ("if", "with"):
                return _Else(peek.pos)
            return _Else(self.expect("right", "else").pos)
        if kind == "end":
            return _End(self.expect("right", "end").pos)
        if kind == "if":
            return self.control("if", IfNode)
        if kind == "range":
            return self.control("range", RangeNode)
        if kind == "with":
            return self.control("with", WithNode)
        if kind == "template":
            return self.template_control()
        self.backup()
        return ActionNode(self.peek().pos, self.pipeline("command", "right"))

    def control(self, context: str, cls: type[BranchNode]) -> BranchNode:
        self.enter()
        mark = len(self.vars)
        try:
            pipe = self.pipeline(context, "right")
            if context == "range":
                self.range_depth += 1
            body, end = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_body = None
            if isinstance(end, _Else):
                # "{{else if x}}" is "{{else}}{{if x}}...{{end}}{{end}}" with the inner end shared.
                if context in ("if", "with") and self.peek().kind == context:
                    self.next()
                    else_body = ListNode(end.pos, [self.control(context, cls)])
                else:
                    else_body, end = self.item_list()
                    if not isinstance(end, _End):
                        self.fail(f"expected end; found {end}")
            return cls(pipe.pos, pipe, body, else_body)
        finally:
            del self.vars[mark:]
            self.depth -= 1

    def template_name(self, tok: _Token, context: str) -> str:
        if tok.kind not in ("string", "raw"):
            self.unexpected(tok, context)
        try:
            return go_unquote(tok.val)
        except ValueError as e:
            self.fail(str(e))
            raise AssertionError from e

    def template_control(self) -> TemplateNode:
        context = "template clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = None
        if self.next_non_space().kind != "right":
            self.backup()
            pipe = self.pipeline(context, "right")
        return TemplateNode(tok.pos, name, pipe)

    def block_control(self) -> TemplateNode:
        context = "block clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = self.pipeline(context, "right")
        body, end = self.isolated_list()
        if not isinstance(end, _End):
            self.fail(f"unexpected {end} in {context}")
        self.add(name, body)
        return TemplateNode(tok.pos, name, pipe)

    # pipelines

    def pipeline(self, context: str, end: str) -> PipeNode:
        pipe = PipeNode(self.peek_non_space().pos, [], False, [])
        while self.peek_non_space().kind == "var":
            var = self.next()
            after_var = self.i
            nxt = self.peek_non_space()
            if nxt.kind in ("=", ":="):
                self.next_non_space()
                pipe.is_assign = nxt.kind == "="
                pipe.decl.append(var.val)
                self.vars.append(var.val)
                break
            if nxt.kind == "char" and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(var.val)
                self.vars.append(var.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().kind in ("var", "right", ")"):
                        continue
                    self.fail("range can only initialize variables")
                self.fail(f"too many declarations in {context}")
            self.i = after_var - 1
            break
        while True:
            tok = self.next_non_space()
            if tok.kind == end:
                self.check_pipeline(pipe, context)
                return pipe
            if tok.kind not in _OPERAND_START:
                self.unexpected(tok, context)
            self.backup()
            pipe.cmds.append(self.command())

    def check_pipeline(self, pipe: PipeNode, context: str) -> None:
        if not pipe.cmds:
            self.fail(f"missing value for {context}")
        for i, cmd in enumerate(pipe.cmds[1:]):
            if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                self.fail(f"non executable command in pipeline stage {i + 2}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos, [])
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            tok = self.next()
            if tok.kind == "space":
                continue
            if tok.kind in ("right", ")"):
                self.backup()
            elif tok.kind != "|":
                self.unexpected(tok, "operand")
            break
        if not cmd.args:
            self.fail("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None or self.peek().kind != "field":
            return node
        fields = []
        while self.peek().kind == "field":
            fields.append(self.next().val[1:])
        if isinstance(node, FieldNode):
            return FieldNode(node.pos, node.ident + fields)
        if isinstance(node, VariableNode):
            return VariableNode(node.pos, node.ident + fields)
        if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
            self.fail(f"unexpected . after term {go_quote(str(node))}")
        return ChainNode(node.pos, node, fields)

    def term(self) -> Node | None:
        tok = self.next_non_space()
        kind = tok.kind
        if kind == "ident":
            if tok.val not in self.funcs and tok.val not in _BUILTINS:
                self.fail(f"function {go_quote(tok.val)} not defined")
            return IdentifierNode(tok.pos, tok.val)
        if kind == "dot":
            return DotNode(tok.pos)
        if kind == "nil":
            return NilNode(tok.pos)
        if kind == "var":
            if tok.val not in self.vars:
                self.fail(f"undefined variable {go_quote(tok.val)}")
            return VariableNode(tok.pos, [tok.val])
        if kind == "field":
            return FieldNode(tok.pos, [tok.val[1:]])
        if kind == "bool":
            return BoolNode(tok.pos, tok.val == "true")
        if kind in ("number", "charconst"):
            try:
                return NumberNode(tok.pos, tok.val, _number_value(tok))
            except ValueError as e:
                self.fail(str(e))
        if kind == "(":
            self.enter()
            try:
                return self.pipeline("parenthesized pipeline", ")")
            finally:
                self.depth -= 1
        if kind in ("string", "raw"):
            try:
                return StringNode(tok.pos, tok.val, go_unquote(tok.val))
            except ValueError as e:
                self.fail(str(e))
        self.backup()
        return None


def is_empty_tree(node: Node) -> bool:
    """Whether a tree holds nothing but white space (Go's ``parse.IsEmptyTree``)."""
    if isinstance(node, ListNode):
        return all(is_empty_tree(n) for n in node.nodes)
    return isinstance(node, TextNode) and not node.text.strip(" \t\r\n\v\f")


# ---------------------------------------------------------------- values

#: Go's invalid reflect.Value: a missing map key, or nil after a pipeline.
_MISSING = type("_Missing", (), {"__repr__": lambda self: "<no value>"})()
#: Marks a command that receives no value from an earlier pipeline stage.
_NO_FINAL = type("_NoFinal", (), {})()


def _is_nil(v: Any) -> bool:
    return v is None or v is _MISSING


def _is_primitive(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, bytes, bytearray))


def _is_stringer(v: Any) -> bool:
    return not _is_primitive(v) and v is not _MISSING and type(v).__str__ is not object.__str__


def _is_struct(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _struct_fields(v: Any) -> dict[str, Any] | None:
    """A struct's fields by name, or None when ``v`` is not struct-like."""
    if _is_struct(v):
        return {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple, Mapping, type)) or callable(v) or _is_primitive(v):
        return None
    attrs = getattr(v, "__dict__", None)
    if attrs is None:
        return None
    return {k: val for k, val in attrs.items() if not k.startswith("_")}


def type_name(v: Any) -> str:
    """The Go type name ``%T`` would show for a value."""
    if _is_nil(v):
        return "<nil>"
    explicit = getattr(type(v), "go_type", None)
    if isinstance(explicit, str):
        return explicit
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (bytes, bytearray)):
        return "[]uint8"
    if isinstance(v, (list, tuple)):
        return "[]interface {}"
    if isinstance(v, Mapping):
        return "map[string]interface {}"
    if callable(v):
        return "func"
    return type(v).__name__


def is_true(v: Any) -> bool:
    """Go's truth: not the zero value of its type."""
    if _is_nil(v):
        return False
    if isinstance(v, (bool, int, float)):
        return v != 0
    if isinstance(v, (str, bytes, bytearray, list, tuple, Mapping)):
        return len(v) > 0
    return True


def _sorted_items(m: Mapping) -> list[tuple[Any, Any]]:
    try:
        keys = sorted(m)
    except TypeError:
        keys = sorted(m, key=lambda k: (type(k).__name__, str(k)))
    return [(k, m[k]) for k in keys]


# ---------------------------------------------------------------- fmt


def _float_digits(x: float) -> tuple[str, int]:
    """Shortest round-tripping decimal digits of ``|x|`` and the decimal point position."""
    if x == 0:
        return "0", 1
    sign_digits = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, sign_digits.digits))
    return digits, len(digits) + int(sign_digits.exponent)


def _format_e(neg: bool, digits: str, dp: int, prec: int, e: str = "e") -> str:
    mantissa = digits[0] + ("." + digits[1:].ljust(prec, "0")[:prec] if prec > 0 else "")
    exp = dp - 1 if digits != "0" else 0
    return ("-" if neg else "") + mantissa + e + ("-" if exp < 0 else "+") + f"{abs(exp):02d}"


def _format_f(neg: bool, digits: str, dp: int) -> str:
    if dp <= 0:
        s = "0." + "0" * -dp + digits
    elif dp >= len(digits):
        s = digits + "0" * (dp - len(digits))
    else:
        s = digits[:dp] + "." + digits[dp:]
    return ("-" if neg else "") + s


def _special_float(x: float) -> str | None:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return None


def format_float(x: float, verb: str = "g", prec: int = -1) -> str:
    """Go's ``strconv.FormatFloat(x, verb, prec, 64)`` for the verbs e, E, f, F, g and G."""
    special = _special_float(x)
    if special is not None:
        return special
    neg = math.copysign(1.0, x) < 0
    lower = verb.lower()
    if lower == "f":
        if prec < 0:
            digits, dp = _float_digits(x)
            return _format_f(neg, digits, dp)
        return format(x, f".{prec}f")
    if lower == "e":
        if prec < 0:
            digits, dp = _float_digits(x)
            return _format_e(neg, digits, dp, len(digits) - 1, verb)
        return format(x, f".{prec}{verb}")
    if prec < 0:
        digits, dp = _float_digits(x)
        eprec = 6
    else:
        if prec == 0:
            prec = 1
        digits_text = format(abs(x), f".{prec - 1}e")
        mantissa, exponent = digits_text.split("e")
        digits = mantissa.replace(".", "").rstrip("0") or "0"
        dp = int(exponent) + 1 if x != 0 else 1
        eprec = prec
        if eprec > len(digits) >= dp:
            eprec = len(digits)
    exp = dp - 1
    if exp < -4 or exp >= eprec:
        return _format_e(neg, digits, dp, len(digits) - 1, "E" if verb == "G" else "e")
    return _format_f(neg, digits, dp)


@dataclass
class _Spec:
    """One ``%`` directive: its flags, width and precision."""

    verb: str = "v"
    minus: bool = False
    plus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    width: int | None = None
    prec: int | None = None


def _pad(s: str, spec: _Spec, numeric: bool = False) -> str:
    if spec.width is None or len(s) >= spec.width:
        return s
    if spec.minus:
        return s.ljust(spec.width)
    if spec.zero:
        if numeric and s[:1] in "+- ":
            return s[0] + s[1:].rjust(spec.width - 1, "0")
        return s.rjust(spec.width, "0")
    return s.rjust(spec.width)


def _bad_verb(v: Any, spec: _Spec) -> str:
    if _is_nil(v):
        return f"%!{spec.verb}(<nil>)"
    return f"%!{spec.verb}({type_name(v)}={_format(v, _Spec())})"


def _format_int(v: int, spec: _Spec) -> str:
    verb = spec.verb
    valid_rune = 0 <= v <= 0x10FFFF and not 0xD800 <= v <= 0xDFFF
    if verb == "c":
        return _pad(chr(v) if valid_rune else "\ufffd", spec)
    if verb == "q":
        return _pad(go_quote_rune(chr(v) if valid_rune else "\ufffd"), spec)
    if verb == "U":
        return _pad(f"U+{v:04X}", spec)
    bases = {"v": "d", "d": "d", "b": "b", "o": "o", "O": "o", "x": "x", "X": "X"}
    if verb not in bases:
        return _bad_verb(v, spec)
    digits = format(abs(v), bases[verb])
    if spec.prec is not None:
        digits = digits.rjust(spec.prec, "0") if spec.prec or v else ""
    elif spec.zero and not spec.minus and spec.width is not None:
        sign_room = 1 if v < 0 or spec.plus or spec.space else 0
        digits = digits.rjust(spec.width - sign_room, "0")
    if verb == "O":
        digits = "0o" + digits
    elif spec.sharp:
        digits = {"x": "0x", "X": "0X", "b": "0b", "o": "0"}.get(verb, "") + digits
    sign = "-" if v < 0 else "+" if spec.plus else " " if spec.space else ""
    return _pad(sign + digits, _Spec(minus=spec.minus, width=spec.width))


def _format_float_spec(v: float, spec: _Spec) -> str:
    verb = spec.verb
    if verb not in "vgGeEfF":
        return _bad_verb(v, spec)
    if verb == "v":
        text = format_float(v, "g", -1 if spec.prec is None else spec.prec)
    elif verb in "fFeE":
        text = format_float(v, verb.replace("F", "f"), 6 if spec.prec is None else spec.prec)
    else:
        text = format_float(v, verb, -1 if spec.prec is None else spec.prec)
    if spec.plus and not text.startswith(("-", "+")):
        text = "+" + text
    elif spec.space and not text.startswith(("-", "+")):
        text = " " + text
    numeric = _special_float(v) is None
    return _pad(text, spec if numeric else _Spec(minus=spec.minus, width=spec.width), numeric)


def _format_string(s: str, spec: _Spec) -> str:
    verb = spec.verb
    if spec.prec is not None:
        s = s[: spec.prec]
    if verb in "vs":
        return _pad(s, spec)
    if verb == "q":
        if spec.sharp and "`" not in s and all(_go_is_print(c) or c == "\t" for c in s):
            return _pad("`" + s + "`", spec)
        return _pad(go_quote(s), spec)
    if verb in "xX":
        text = s.encode().hex()
        return _pad(text.upper() if verb == "X" else text, spec)
    return _bad_verb(s, spec)


def _format(v: Any, spec: _Spec, depth: int = 0) -> str:
    """One operand as Go's fmt prints it under ``spec``."""
    verb = spec.verb
    if verb == "T":
        return _pad(type_name(v), spec)
    if _is_nil(v):
        if depth > 0 or verb == "v":
            return _pad("<nil>", spec)
        return _bad_verb(v, spec)
    if _is_stringer(v) and verb in "vsxXq":
        return _format_string(str(v), spec)
    if isinstance(v, bool):
        return _pad("true" if v else "false", spec) if verb in "vt" else _bad_verb(v, spec)
    if isinstance(v, int):
        return _format_int(v, spec)
    if isinstance(v, float):
        return _format_float_spec(v, spec)
    if isinstance(v, str):
        return _format_string(v, spec)
    if isinstance(v, (bytes, bytearray)):
        if verb in "sqxX":
            return _format_string(bytes(v).decode("utf-8", "replace"), spec)
        return "[" + " ".join(_format(b, spec, depth + 1) for b in v) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_format(x, spec, depth + 1) for x in v) + "]"
    if isinstance(v, Mapping):
        items = (f"{_format(k, spec, depth + 1)}:{_format(x, spec, depth + 1)}" for k, x in _sorted_items(v))
        return "map[" + " ".join(items) + "]"
    if callable(v):
        return _pad("<func>", spec) if verb == "v" else _bad_verb(v, spec)
    fields = _struct_fields(v) or {}
    if spec.plus and verb == "v":
        return "{" + " ".join(f"{k}:{_format(x, spec, depth + 1)}" for k, x in fields.items()) + "}"
    return "{" + " ".join(_format(x, spec, depth + 1) for x in fields.values()) + "}"


def sprint(*args: Any) -> str:
    """Go's ``fmt.Sprint``: operands formatted with %v, spaced when neither side is a string."""
    out = []
    previous_string = False
    for i, arg in enumerate(args):
        is_string = isinstance(arg, str)
        if i > 0 and not is_string and not previous_string:
            out.append(" ")
        out.append(_format(arg, _Spec()))
        previous_string = is_string
    return "".join(out)


def sprintln(*args: Any) -> str:
    """Go's ``fmt.Sprintln``: operands formatted with %v, always spaced, then a newline."""
    return " ".join(_format(a, _Spec()) for a in args) + "\n"


_DIRECTIVE = re.compile(r"([-+# 0]*)(\*|\d+)?(?:(\.)(\*|\d+)?)?")


def sprintf(fmt: str, *args: Any) -> str:
    """Go's ``fmt.Sprintf`` for the common verbs, with Go's ``%!`` error notation."""
    out: list[str] = []
    i, n, arg_num = 0, len(fmt), 0

    def star() -> int | None:
        nonlocal arg_num
        if arg_num < len(args) and isinstance(args[arg_num], int) and not isinstance(args[arg_num], bool):
            arg_num += 1
            return args[arg_num - 1]
        arg_num += 1
        return None

    while i < n:
        pct = fmt.find("%", i)
        if pct < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:pct])
        match = _DIRECTIVE.match(fmt, pct + 1)
        assert match is not None
        flags, width, dot, prec = match.groups()
        i = match.end()
        spec = _Spec(
            minus="-" in flags, plus="+" in flags, sharp="#" in flags, space=" " in flags,
            zero="0" in flags and "-" not in flags,
        )
        if width == "*":
            spec.width = star()
            if spec.width is None:
                out.append("%!(BADWIDTH)")
            elif spec.width < 0:
                spec.width, spec.minus, spec.zero = -spec.width, True, False
        elif width is not None:
            spec.width = int(width)
        if dot:
            if prec == "*":
                spec.prec = star()
                if spec.prec is None or spec.prec < 0:
                    spec.prec = None
                    out.append("%!(BADPREC)")
            else:
                spec.prec = int(prec or 0)
        if (spec.width or 0) > 1_000_000 or (spec.prec or 0) > 1_000_000:
            raise ValueError("format width or precision too large")
        if i >= n:
            out.append("%!(NOVERB)")
            break
        spec.verb = fmt[i]
        i += 1
        if spec.verb == "%":
            out.append("%")
        elif arg_num >= len(args):
            out.append(f"%!{spec.verb}(MISSING)")
        else:
            out.append(_format(args[arg_num], spec))
            arg_num += 1
    if arg_num < len(args):
        extra = ", ".join(
            "<nil>" if _is_nil(a) else f"{type_name(a)}={_format(a, _Spec())}" for a in args[arg_num:]
        )
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


# ---------------------------------------------------------------- json


class _JSONUnsupported(Exception):
    pass


def _json_string(s: str) -> str:
    out = ['"']
    for c in s:
        code = ord(c)
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif code < 0x20 or c in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _json_float(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise _JSONUnsupported(f"json: unsupported value: {format_float(x)}")
    if x != 0 and (abs(x) < 1e-6 or abs(x) >= 1e21):
        text = format_float(x, "e", -1)
        return re.sub(r"e-0(\d)$", r"e-\1", text)
    return format_float(x, "f", -1)


def _json_is_empty(v: Any) -> bool:
    if _is_nil(v):
        return True
    if isinstance(v, (bool, int, float)):
        return v == 0
    if isinstance(v, (str, bytes, bytearray, list, tuple, Mapping)):
        return len(v) == 0
    return False


def _json(v: Any) -> str:
    hook = getattr(v, "__go_json__", None)
    if hook is not None and not isinstance(v, type):
        return hook()
    if _is_nil(v):
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, str):
        return _json_string(v)
    if isinstance(v, (bytes, bytearray)):
        return '"' + base64.b64encode(bytes(v)).decode() + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_json(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = sorted((str(k), x) for k, x in v.items())
        return "{" + ",".join(f"{_json_string(k)}:{_json(x)}" for k, x in items) + "}"
    if _is_struct(v):
        parts = []
        for f in dataclasses.fields(v):
            name, _, options = str(f.metadata.get("json", f.name)).partition(",")
            if name == "-":
                continue
            value = getattr(v, f.name)
            if "omitempty" in options.split(",") and _json_is_empty(value):
                continue
            parts.append(f"{_json_string(name or f.name)}:{_json(value)}")
        return "{" + ",".join(parts) + "}"
    raise _JSONUnsupported(f"json: unsupported type: {type_name(v)}")


def marshal_json(value: Any) -> str:
    """Go's ``json.Marshal`` output: sorted map keys, HTML-safe escapes, Go float formatting."""
    try:
        return _json(value)
    except _JSONUnsupported as e:
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------- functions


def _ollama_json(value: Any) -> str:
    # Ollama ignores json.Marshal's error, so an unsupported value prints as "".
    try:
        return _json(value)
    except (_JSONUnsupported, ValueError):
        return ""


def _current_date(*_args: Any) -> str:
    return datetime.date.today().strftime("%Y-%m-%d")


def _yesterday_date(*_args: Any) -> str:
    return (datetime.date.today() - datetime.timedelta(days=1)).strftime("%Y-%m-%d")


def _to_typescript_type(value: Any) -> str:
    convert = getattr(value, "to_typescript_type", None)
    return convert() if callable(convert) and not isinstance(value, type) else "any"


#: The functions Ollama adds to every template (``template/template.go``).
OLLAMA_FUNCS: Mapping[str, Callable[..., Any]] = {
    "json": _ollama_json,
    "currentDate": _current_date,
    "yesterdayDate": _yesterday_date,
    "toTypeScriptType": _to_typescript_type,
}

_BUILTINS = frozenset({
    "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index", "slice",
    "print", "printf", "println", "html", "js", "urlquery", "call",
})


def _html_escape(s: str) -> str:
    table = {'"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;", "\0": "\ufffd"}
    return "".join(table.get(c, c) for c in s)


def _js_escape(s: str) -> str:
    table = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}
    out = []
    for c in s:
        if c in table:
            out.append(table[c])
        elif ord(c) < 0x20 or (ord(c) >= 0x80 and not _go_is_print(c)):
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def _eval_args(args: list[Any]) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return sprint(*("<no value>" if _is_nil(a) else a for a in args))


def _basic_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    return "invalid"


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise ValueError("missing argument for comparison")
    k1 = _basic_kind(a)
    for b in others:
        k2 = _basic_kind(b)
        if k1 != k2:
            if not _is_nil(a) and not _is_nil(b):
                raise ValueError("incompatible types for comparison")
            truth = False
        elif k1 != "invalid":
            truth = a == b
        elif _is_nil(a) or _is_nil(b):
            truth = _is_nil(a) and _is_nil(b)
        elif isinstance(b, (list, tuple, Mapping, bytes, bytearray)) or callable(b):
            raise ValueError(f"non-comparable type {sprint(b)}: {type_name(b)}")
        else:
            truth = type(a) is type(b) and a == b
        if truth:
            return True
    return False


def _lt(a: Any, b: Any) -> bool:
    k1, k2 = _basic_kind(a), _basic_kind(b)
    if k1 == "invalid" or k2 == "invalid":
        raise ValueError("invalid type for comparison")
    if k1 != k2:
        raise ValueError("incompatible types for comparison")
    if k1 == "bool":
        raise ValueError("invalid type for comparison")
    return a < b


def _index_arg(index: Any, cap: int) -> int:
    if _is_nil(index):
        raise ValueError("cannot index slice/array with nil")
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"cannot index slice/array with type {type_name(index)}")
    if index < 0 or index > cap:
        raise ValueError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    if _is_nil(item):
        raise ValueError("index of untyped nil")
    for index in indexes:
        if item is None:
            raise ValueError("index of nil pointer")
        if isinstance(item, (str, bytes, bytearray, list, tuple)):
            seq = item.encode() if isinstance(item, str) else item
            x = _index_arg(index, len(seq))
            if x == len(seq):
                raise ValueError(f"index out of range: {x}")
            item = seq[x]
        elif isinstance(item, Mapping):
            if _is_nil(index):
                raise ValueError("value is nil; should be of type string")
            if not isinstance(index, str):
                raise TypeError(f"value has type {type_name(index)}; should be string")
            item = item.get(index)
        else:
            raise TypeError(f"can't index item of type {type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if _is_nil(item):
        raise ValueError("slice of untyped nil")
    if len(indexes) > 3:
        raise ValueError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise ValueError("cannot 3-index slice a string")
        seq: Any = item.encode()
    elif isinstance(item, (bytes, bytearray, list, tuple)):
        seq = item
    else:
        raise TypeError(f"can't slice item of type {type_name(item)}")
    bounds = [0, len(seq)]
    for i, index in enumerate(indexes):
        x = _index_arg(index, len(seq))
        if i < 2:
            bounds[i] = x
        elif x < bounds[1]:
            raise ValueError(f"invalid slice index: {bounds[1]} > {x}")
    if bounds[0] > bounds[1]:
        raise ValueError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
    part = seq[bounds[0] : bounds[1]]
    return part.decode("utf-8", "replace") if isinstance(item, str) else part


def _len(item: Any) -> int:
    if _is_nil(item):
        raise ValueError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode())
    if isinstance(item, (bytes, bytearray, list, tuple, Mapping)):
        return len(item)
    raise ValueError(f"len of type {type_name(item)}")


def _call(fn: Any, *args: Any) -> Any:
    if _is_nil(fn):
        raise ValueError("call of nil")
    if not callable(fn) or isinstance(fn, type):
        raise TypeError(f"non-function of type {type_name(fn)}")
    return fn(*(None if a is _MISSING else a for a in args))


def _printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise TypeError(f"wrong type for value; expected string; got {type_name(fmt)}")
    return sprintf(fmt, *(None if a is _MISSING else a for a in args))


_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, bool]] = {
    # name: (implementation, fixed argument count, variadic)
    "not": (lambda v: not is_true(v), 1, False),
    "len": (_len, 1, False),
    "index": (_index, 1, True),
    "slice": (_slice, 1, True),
    "eq": (_eq, 1, True),
    "ne": (lambda a, b: not _eq(a, b), 2, False),
    "lt": (_lt, 2, False),
    "le": (lambda a, b: _lt(a, b) or _eq(a, b), 2, False),
    "gt": (lambda a, b: not (_lt(a, b) or _eq(a, b)), 2, False),
    "ge": (lambda a, b: not _lt(a, b), 2, False),
    "print": (lambda *a: sprint(*(None if x is _MISSING else x for x in a)), 0, True),
    "println": (lambda *a: sprintln(*(None if x is _MISSING else x for x in a)), 0, True),
    "printf": (_printf, 1, True),
    "html": (lambda *a: _html_escape(_eval_args(list(a))), 0, True),
    "js": (lambda *a: _js_escape(_eval_args(list(a))), 0, True),
    "urlquery": (lambda *a: urllib.parse.quote_plus(_eval_args(list(a)), safe=""), 0, True),
    "call": (_call, 1, True),
}


# ---------------------------------------------------------------- execution


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _State:
    """One execution: the variable stack, the output and the budgets."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.current = template.name
        self.vars: list[list[Any]] = []
        self.out: list[str] = []
        self.size = 0
        self.steps = 0
        self.depth = 0
        self.node: Node | None = None
        self.newlines = [i for i, c in enumerate(template.text) if c == "\n"]

    # errors and budgets

    def fail(self, message: str) -> None:
        name = self.template.name
        if self.node is None:
            raise TemplateError(f"template: {name}: {message}")
        pos = self.node.pos
        line = bisect.bisect_left(self.newlines, pos) + 1
        col = pos - (self.newlines[line - 2] + 1 if line > 1 else 0)
        context = str(self.node)
        if len(context) > 20:
            context = context[:20] + "..."
        raise TemplateError(
            f"template: {name}:{line}:{col}: executing {go_quote(self.current)} at <{context}>: {message}"
        )

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            self.fail(f"execution exceeds {MAX_STEPS} steps")

    def write(self, s: str) -> None:
        self.size += len(s)
        if self.size > MAX_OUTPUT:
            self.fail(f"output exceeds {MAX_OUTPUT} characters")
        self.out.append(s)

    # variables

    def set_var(self, name: str, value: Any) -> None:
        for var in reversed(self.vars):
            if var[0] == name:
                var[1] = value
                return
        self.fail(f"undefined variable: {name}")

    def var_value(self, name: str) -> Any:
        for var in reversed(self.vars):
            if var[0] == name:
                return var[1]
        self.fail(f"undefined variable: {name}")

    # walking

    def walk(self, dot: Any, node: Node) -> None:
        self.tick()
        self.node = node
        if isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.print_value(node, value)
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, BranchNode):
            self.walk_if_or_with(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        else:
            self.fail(f"unknown node: {node}")

    def print_value(self, node: Node, value: Any) -> None:
        self.node = node
        if _is_nil(value):
            self.write("<no value>")
        elif callable(value) and not _is_stringer(value) and _struct_fields(value) is None:
            self.fail(f"can't print {node} of type {type_name(value)}")
        else:
            self.write(_format(value, _Spec()))

    def walk_if_or_with(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            if is_true(value):
                self.walk(value if isinstance(node, WithNode) else dot, node.body)
            elif node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            self.node = node
            if isinstance(value, (list, tuple, bytes, bytearray)):
                items: Any = enumerate(value)
            elif isinstance(value, Mapping):
                items = _sorted_items(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                if len(node.pipe.decl) > 1:
                    self.fail(f"can't use {value} to iterate over more than one variable")
                items = ((i, i) for i in range(value))
            elif _is_nil(value):
                items = ()
            else:
                self.fail(f"range can't iterate over {_format(value, _Spec())}")
            ran = False
            inner = len(self.vars)
            try:
                for index, elem in items:
                    ran = True
                    self.range_iteration(node, inner, index, elem)
            except _Break:
                pass
            if not ran and node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark:]

    def range_iteration(self, node: RangeNode, mark: int, index: Any, elem: Any) -> None:
        decl = node.pipe.decl
        if node.pipe.is_assign:
            if len(decl) > 1:
                self.set_var(decl[0], index)
                self.set_var(decl[1], elem)
            elif decl:
                self.set_var(decl[0], elem)
        elif len(decl) > 1:
            self.vars[-1][1] = elem
            self.vars[-2][1] = index
        elif decl:
            self.vars[-1][1] = elem
        try:
            self.walk(elem, node.body)
        except _Continue:
            pass
        finally:
            del self.vars[mark:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        self.node = node
        tree = self.template.trees.get(node.name)
        if tree is None:
            self.fail(f"template {go_quote(node.name)} not defined")
        if self.depth >= MAX_TEMPLATE_DEPTH:
            self.fail(f"exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})")
        value = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else _MISSING
        saved = self.vars, self.current
        self.vars, self.current = [["$", value]], node.name
        self.depth += 1
        try:
            self.walk(value, tree)
        finally:
            self.vars, self.current = saved
            self.depth -= 1

    # evaluation

    def eval_pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        self.node = pipe
        value = _NO_FINAL
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:
                value = _MISSING
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(name, value)
            else:
                self.vars.append([name, value])
        return value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not _NO_FINAL:
            self.fail(f"can't give argument to non-function {args[0]}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        self.tick()
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            self.node = first
            return self.eval_field_chain(dot, dot, first.ident, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd, cmd.args[1:], final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, NilNode):
            self.fail("nil is not a command")
        return self.constant(dot, first)

    def constant(self, dot: Any, node: Node) -> Any:
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, DotNode):
            return dot
        if isinstance(node, StringNode):
            return node.text
        if isinstance(node, NumberNode):
            if node.value is None:
                self.node = node
                self.fail(f"{node.text} overflows int")
            return node.value
        self.fail(f"can't evaluate command {go_quote(str(node))}")

    def eval_arg(self, dot: Any, node: Node) -> Any:
        self.node = node
        if isinstance(node, NilNode):
            return None
        if isinstance(node, FieldNode):
            return self.eval_field_chain(dot, dot, node.ident, [node], _NO_FINAL)
        if isinstance(node, VariableNode):
            return self.eval_variable(dot, node, [node], _NO_FINAL)
        if isinstance(node, PipeNode):
            return self.eval_pipeline(dot, node)
        if isinstance(node, IdentifierNode):
            return self.eval_function(dot, node, node, [], _NO_FINAL)
        if isinstance(node, ChainNode):
            return self.eval_chain(dot, node, [node], _NO_FINAL)
        return self.constant(dot, node)

    def eval_chain(self, dot: Any, chain: ChainNode, args: list[Node], final: Any) -> Any:
        self.node = chain
        if isinstance(chain.node, NilNode):
            self.fail(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, chain.node)
        self.node = chain
        return self.eval_field_chain(dot, receiver, chain.fields, args, final)

    def eval_variable(self, dot: Any, node: VariableNode, args: list[Node], final: Any) -> Any:
        self.node = node
        value = self.var_value(node.ident[0])
        if len(node.ident) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, node.ident[1:], args, final)

    def eval_field_chain(self, dot: Any, receiver: Any, ident: list[str], args: list[Node], final: Any) -> Any:
        for name in ident[:-1]:
            receiver = self.eval_field(name, False, receiver)
        return self.eval_field(ident[-1], len(args) > 1 or final is not _NO_FINAL, receiver)

    def eval_field(self, name: str, has_args: bool, receiver: Any) -> Any:
        missingkey = self.template.missingkey
        if receiver is _MISSING:
            if missingkey == "error":
                self.fail(f"nil data; no entry for key {go_quote(name)}")
            return _MISSING
        if receiver is None:
            self.fail(f"nil pointer evaluating interface {{}}.{name}")
        if isinstance(receiver, Mapping):
            if has_args:
                self.fail(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            if missingkey == "error":
                self.fail(f"map has no entry for key {go_quote(name)}")
            return None if missingkey == "zero" else _MISSING
        fields = _struct_fields(receiver)
        if fields is not None and name in fields:
            if has_args:
                self.fail(f"{name} has arguments but cannot be invoked as function")
            return fields[name]
        self.fail(f"can't evaluate field {name} in type {type_name(receiver)}")

    def eval_function(self, dot: Any, node: IdentifierNode, cmd: Node, args: list[Node], final: Any) -> Any:
        self.node = node
        name = node.name
        user = self.template.funcs.get(name)
        if user is None and name not in _BUILTINS:
            self.fail(f"{go_quote(name)} is not a defined function")
        if user is None and name in ("and", "or"):
            return self.and_or(dot, name, args, final)
        count = len(args) + (final is not _NO_FINAL)
        if user is None:
            function, fixed, variadic = _FUNCTIONS[name]
            if variadic and count < fixed:
                self.fail(f"wrong number of args for {name}: want at least {fixed} got {count}")
            if not variadic and count != fixed:
                self.fail(f"wrong number of args for {name}: want {fixed} got {count}")
        else:
            function = user
        argv = [self.eval_arg(dot, a) for a in args]
        if final is not _NO_FINAL:
            argv.append(final)
        if user is not None:
            argv = [None if a is _MISSING else a for a in argv]
        self.node = cmd
        try:
            result = function(*argv)
        except TemplateError:
            raise
        except (ValueError, TypeError, ArithmeticError, LookupError) as e:
            self.fail(f"error calling {name}: {e}")
        if isinstance(result, str) and len(result) > MAX_OUTPUT:
            self.fail(f"error calling {name}: result exceeds {MAX_OUTPUT} characters")
        return result

    def and_or(self, dot: Any, name: str, args: list[Node], final: Any) -> Any:
        if not args and final is _NO_FINAL:
            self.fail(f"wrong number of args for {name}: want at least 1 got 0")
        value: Any = _MISSING
        for arg in args:
            value = self.eval_arg(dot, arg)
            if is_true(value) == (name == "or"):
                return value
        return final if final is not _NO_FINAL else value


# ---------------------------------------------------------------- API


@dataclass
class Template:
    """A parsed template and every template it defines.

    ``missingkey`` is Go's option of that name: ``"default"`` (a missing map
    key is ``<no value>``), ``"zero"`` (it is the zero value, which for
    Python's untyped maps is nil) or ``"error"``.
    """

    name: str
    text: str
    trees: dict[str, ListNode]
    funcs: Mapping[str, Callable[..., Any]] = field(default_factory=lambda: dict(OLLAMA_FUNCS))
    missingkey: str = "default"

    @property
    def root(self) -> ListNode:
        """The body of the main template."""
        return self.trees[self.name]

    @classmethod
    def parse(
        cls,
        text: str,
        name: str = "",
        *,
        funcs: Mapping[str, Callable[..., Any]] | None = None,
        missingkey: str = "default",
    ) -> Template:
        """Parse ``text``; ``funcs`` defaults to Ollama's template functions."""
        if missingkey not in ("default", "zero", "error"):
            raise ValueError(f"unknown missingkey option {missingkey!r}")
        funcs = dict(OLLAMA_FUNCS) if funcs is None else dict(funcs)
        try:
            trees = _Parser(text, name, funcs).parse()
        except RecursionError:
            raise TemplateError(f"template: {name}: template nesting is too deep") from None
        return cls(name, text, trees, funcs, missingkey)

    def execute(self, data: Any) -> str:
        """Apply the template to ``data`` and return the text it produces."""
        if data is None:
            data = _MISSING  # Go executes on an invalid value, whose fields are all missing
        state = _State(self)
        state.vars.append(["$", data])
        try:
            state.walk(data, self.root)
        except RecursionError:
            raise TemplateError(f"template: {self.name}: template or data nesting is too deep") from None
        except (_Break, _Continue):
            raise TemplateError(f"template: {self.name}: break or continue outside range") from None
        return "".join(state.out)
