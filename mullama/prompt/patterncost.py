"""How much work a ``pattern``'s grammar gives llama.cpp's grammar sampler for each token.

The sampler keeps one stack per way of reading the text so far, and checks
every candidate token against every stack: its cost per token grows with
the number of stacks alive at once. A pattern decides that number. Reading
``aaaa`` with ``^((a|b){1,9}){1,9}$`` leaves dozens of splits open at once;
with ``^(a?){9}$`` the sampler even explores, before it collapses them, every
way of skipping the empty parts, exponentially many.

This module bounds that number before any grammar exists. The pattern is
unrolled into its position automaton (Glushkov's: one state per character
class the pattern holds, each bounded repetition written out as llama.cpp
writes it out), and the sets of positions the sampler can be at together
are explored, as a subset construction does. The largest one is the most
stacks the sampler can hold for this pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PatternTooCostly", "live_stacks"]


class PatternTooCostly(Exception):
    """The pattern exceeds a limit; the message says which one."""


@dataclass
class _Automaton:
    """Positions (character classes), what may follow each, and which may be first."""

    max_positions: int
    sets: list[list[tuple[int, int]]] = field(default_factory=list)
    follow: list[int] = field(default_factory=list)  # bitmask of positions, per position

    def position(self, ranges: list[tuple[int, int]]) -> int:
        if len(self.sets) >= self.max_positions:
            raise PatternTooCostly(f"it unrolls to more than {self.max_positions} character positions")
        self.sets.append(ranges)
        self.follow.append(0)
        return len(self.sets) - 1

    def link(self, lasts: int, firsts: int) -> None:
        """Every position of ``lasts`` may be followed by every position of ``firsts``."""
        for p in _bits(lasts):
            self.follow[p] |= firsts


@dataclass(frozen=True)
class _Part:
    """A piece of the automaton: its first and last positions (bitmasks) and whether it can be empty."""

    first: int
    last: int
    nullable: bool


_EMPTY = _Part(0, 0, True)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _then(a: _Part, b: _Part, automaton: _Automaton) -> _Part:
    automaton.link(a.last, b.first)
    return _Part(a.first | (b.first if a.nullable else 0), b.last | (a.last if b.nullable else 0),
                 a.nullable and b.nullable)


def _build(node: Any, automaton: _Automaton) -> _Part:
    if node.kind == "set":
        p = 1 << automaton.position(node.ranges)
        return _Part(p, p, False)
    if node.kind == "seq":
        part = _EMPTY
        for child in node.children:
            part = _then(part, _build(child, automaton), automaton)
        return part
    if node.kind == "alt":
        parts = [_build(child, automaton) for child in node.children]
        first = last = 0
        for part in parts:
            first, last = first | part.first, last | part.last
        return _Part(first, last, any(p.nullable for p in parts))
    if node.kind == "rep":
        return _repeat(node, automaton)
    raise PatternTooCostly(f"cannot measure a {node.kind!r} node")


def _repeat(node: Any, automaton: _Automaton) -> _Part:
    """``child{lo,hi}`` as llama.cpp expands it: lo copies, then nested optional copies (or a loop)."""
    child = node.children[0]
    part = _EMPTY
    for _ in range(node.lo):
        part = _then(part, _build(child, automaton), automaton)
    if node.hi is None:
        loop = _build(child, automaton)
        automaton.link(loop.last, loop.first)
        return _then(part, _Part(loop.first, loop.last, True), automaton)
    # S'(k) ::= S S'(k-1) | (empty): built from the innermost copy out.
    tail = _EMPTY
    for _ in range(node.hi - node.lo):
        copy = _build(child, automaton)
        inner = _then(copy, tail, automaton)
        tail = _Part(inner.first, inner.last, True)
    return _then(part, tail, automaton)


def _classes(sets: list[list[tuple[int, int]]]) -> list[int]:
    """For each class of code points no set tells apart, the bitmask of the positions it matches."""
    by_set: dict[tuple[tuple[int, int], ...], int] = {}
    for p, ranges in enumerate(sets):
        key = tuple(ranges)
        by_set[key] = by_set.get(key, 0) | 1 << p
    bounds = sorted({lo for key in by_set for lo, _ in key} | {hi + 1 for key in by_set for _, hi in key})
    masks = []
    for start in bounds:
        mask = 0
        for key, positions in by_set.items():
            if any(lo <= start <= hi for lo, hi in key):
                mask |= positions
        if mask:
            masks.append(mask)
    return list(dict.fromkeys(masks))


def live_stacks(tree: Any, *, weight: Any, max_positions: int, max_stacks: int, max_states: int) -> int:
    """The most stacks the sampler can hold at once for the pattern ``tree``.

    ``tree`` is a pattern AST (nodes with ``kind`` ``set``/``seq``/``alt``/
    ``rep``, ``ranges``, ``children``, ``lo``, ``hi``); ``weight(ranges)`` is
    how many stacks one position expecting those characters takes (a class
    and the escapes JSON needs for some of its characters). Raises
    :class:`PatternTooCostly` past ``max_positions`` positions, past
    ``max_stacks`` stacks, or when more than ``max_states`` sets of positions
    would have to be explored to know.
    """
    automaton = _Automaton(max_positions)
    whole = _build(tree, automaton)
    weights = [weight(ranges) for ranges in automaton.sets]
    classes = _classes(automaton.sets)
    seen = {whole.first}
    frontier = [whole.first]  # sets of positions expected next
    most = 0
    while frontier:
        expected = frontier.pop()
        stacks = sum(weights[p] for p in _bits(expected))
        if stacks > max_stacks:
            raise PatternTooCostly(f"{stacks} partial matches can be alive at once, more than {max_stacks}")
        most = max(most, stacks)
        for mask in classes:
            matched = expected & mask
            if not matched:
                continue
            following = 0
            for p in _bits(matched):
                following |= automaton.follow[p]
            if following and following not in seen:
                if len(seen) >= max_states:
                    raise PatternTooCostly(f"more than {max_states} states would have to be explored to bound its cost")
                seen.add(following)
                frontier.append(following)
    return most
