"""A small pure-Python GBNF parser and matcher, for testing generated grammars.

It follows llama.cpp's grammar parser (``src/llama-grammar.cpp``): the same
literal and class escapes, ``.``, groups, ``* + ? {m} {m,} {m,n}``, comments,
and the same checks that every referenced rule is defined.  Matching is a
memoised search over end positions, fine for inputs of a few hundred
characters; it raises on left recursion, which llama.cpp rejects too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache


class GrammarError(Exception):
    """The text is not a grammar llama.cpp would accept."""


@dataclass(frozen=True)
class Node:
    """``lit`` (text), ``cls`` (negated, ranges), ``any``, ``ref`` (name), ``seq``, ``alt`` or ``rep``."""

    kind: str
    text: str = ""
    negated: bool = False
    ranges: tuple[tuple[int, int], ...] = ()
    children: tuple[Node, ...] = ()
    lo: int = 0
    hi: int | None = None


@dataclass
class Grammar:
    """Rules by name."""

    rules: dict[str, Node] = field(default_factory=dict)

    def references(self) -> set[str]:
        """Every rule name referenced anywhere."""
        found: set[str] = set()
        stack = list(self.rules.values())
        while stack:
            node = stack.pop()
            if node.kind == "ref":
                found.add(node.text)
            stack.extend(node.children)
        return found


_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}


class _Parser:
    def __init__(self, src: str) -> None:
        self.src, self.pos = src, 0

    def error(self, what: str) -> GrammarError:
        return GrammarError(f"{what} at offset {self.pos}: {self.src[self.pos:self.pos + 30]!r}")

    def peek(self, n: int = 0) -> str:
        i = self.pos + n
        return self.src[i] if i < len(self.src) else ""

    def space(self, newline_ok: bool) -> None:
        while self.peek() in (" ", "\t", "#") or (newline_ok and self.peek() in ("\r", "\n")):
            if self.peek() == "#":
                while self.peek() not in ("", "\r", "\n"):
                    self.pos += 1
            else:
                self.pos += 1

    def name(self) -> str:
        start = self.pos
        while self.peek() and (self.peek().isascii() and (self.peek().isalnum() or self.peek() == "-")):
            self.pos += 1
        if start == self.pos:
            raise self.error("expecting name")
        return self.src[start:self.pos]

    def char(self) -> int:
        ch = self.peek()
        if not ch:
            raise self.error("unexpected end of input")
        if ch != "\\":
            self.pos += 1
            return ord(ch)
        esc = self.peek(1)
        sizes = {"x": 2, "u": 4, "U": 8}
        if esc in sizes:
            digits = self.src[self.pos + 2:self.pos + 2 + sizes[esc]]
            if len(digits) != sizes[esc] or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.error("bad hex escape")
            self.pos += 2 + sizes[esc]
            return int(digits, 16)
        if esc in _ESCAPES:
            self.pos += 2
            return ord(_ESCAPES[esc])
        raise self.error("unknown escape")

    def grammar(self) -> Grammar:
        g = Grammar()
        self.space(True)
        while self.pos < len(self.src):
            name = self.name()
            self.space(False)
            if not self.src.startswith("::=", self.pos):
                raise self.error("expecting ::=")
            self.pos += 3
            self.space(True)
            g.rules[name] = self.alternates(nested=False)
            if self.peek() == "\r":
                self.pos += 2 if self.peek(1) == "\n" else 1
            elif self.peek() == "\n":
                self.pos += 1
            elif self.peek():
                raise self.error("expecting newline or end")
            self.space(True)
        missing = g.references() - set(g.rules)
        if missing:
            raise GrammarError(f"undefined rules: {sorted(missing)}")
        return g

    def alternates(self, nested: bool) -> Node:
        options = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            options.append(self.sequence(nested))
        return options[0] if len(options) == 1 else Node("alt", children=tuple(options))

    def sequence(self, nested: bool) -> Node:
        items: list[Node] = []
        while self.peek():
            ch = self.peek()
            if ch == '"':
                self.pos += 1
                text = []
                while self.peek() != '"':
                    text.append(chr(self.char()))
                self.pos += 1
                items.append(Node("lit", text="".join(text)))
            elif ch == "[":
                self.pos += 1
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                ranges = []
                while self.peek() != "]":
                    lo = self.char()
                    hi = lo
                    if self.peek() == "-" and self.peek(1) != "]":
                        self.pos += 1
                        hi = self.char()
                    ranges.append((lo, hi))
                self.pos += 1
                items.append(Node("cls", negated=negated, ranges=tuple(ranges)))
            elif ch.isascii() and (ch.isalnum() or ch == "-"):
                items.append(Node("ref", text=self.name()))
            elif ch == "(":
                self.pos += 1
                self.space(True)
                inner = self.alternates(nested=True)
                if self.peek() != ")":
                    raise self.error("expecting )")
                self.pos += 1
                items.append(inner)
            elif ch == ".":
                self.pos += 1
                items.append(Node("any"))
            elif ch in "*+?{":
                if not items:
                    raise self.error("expecting preceding item")
                lo, hi = self.quantifier()
                items[-1] = Node("rep", children=(items[-1],), lo=lo, hi=hi)
            else:
                break
            self.space(nested)
        return items[0] if len(items) == 1 else Node("seq", children=tuple(items))

    def quantifier(self) -> tuple[int, int | None]:
        ch = self.peek()
        self.pos += 1
        if ch != "{":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        self.space(False)
        lo = self.int()
        self.space(False)
        hi: int | None = lo
        if self.peek() == ",":
            self.pos += 1
            self.space(False)
            hi = self.int() if self.peek().isdigit() else None
            self.space(False)
        if self.peek() != "}":
            raise self.error("expecting }")
        self.pos += 1
        if lo > 2000 or (hi is not None and hi > 2000):
            raise self.error("repetition above llama.cpp's limit of 2000")
        return lo, hi

    def int(self) -> int:
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.error("expecting an int")
        return int(self.src[start:self.pos])


def parse(text: str) -> Grammar:
    """Parse GBNF text, raising :class:`GrammarError` where llama.cpp would refuse it."""
    grammar = _Parser(text).grammar()
    if "root" not in grammar.rules:
        raise GrammarError("no root rule")
    return grammar


def matches(grammar: Grammar | str, text: str, start: str = "root") -> bool:
    """Whether ``text`` is, as a whole, in the language of rule ``start``."""
    g = parse(grammar) if isinstance(grammar, str) else grammar
    in_progress: set[tuple[str, int]] = set()

    @cache
    def rule_ends(name: str, i: int) -> frozenset[int]:
        if (name, i) in in_progress:
            raise GrammarError(f"left recursion through rule {name!r}")
        in_progress.add((name, i))
        try:
            return ends(g.rules[name], i)
        finally:
            in_progress.discard((name, i))

    def ends(node: Node, i: int) -> frozenset[int]:
        kind = node.kind
        if kind == "lit":
            return frozenset({i + len(node.text)}) if text.startswith(node.text, i) else frozenset()
        if kind in ("cls", "any"):
            if i >= len(text):
                return frozenset()
            cp = ord(text[i])
            hit = kind == "any" or any(lo <= cp <= hi for lo, hi in node.ranges) != node.negated
            return frozenset({i + 1}) if hit else frozenset()
        if kind == "ref":
            return rule_ends(node.text, i)
        if kind == "alt":
            return frozenset().union(*(ends(c, i) for c in node.children))
        if kind == "seq":
            current = frozenset({i})
            for child in node.children:
                current = frozenset().union(*(ends(child, j) for j in current))
                if not current:
                    break
            return current
        # rep: walk the frontier; positions are bounded, so unbounded repetition ends.
        result = frozenset({i}) if node.lo == 0 else frozenset()
        frontier, seen, count = frozenset({i}), frozenset({i}), 0
        while frontier and (node.hi is None or count < node.hi):
            count += 1
            frontier = frozenset().union(*(ends(node.children[0], j) for j in frontier))
            if node.hi is None and count >= node.lo:
                frontier = frontier - seen
                seen = seen | frontier
            if count >= node.lo:
                result |= frontier
        return result

    return len(text) in rule_ends(start, 0)
