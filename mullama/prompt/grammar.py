"""JSON Schema to GBNF, for llama.cpp's grammar sampler.

Structured output in all three APIs goes through here: Ollama's ``format``,
OpenAI's ``response_format`` and forced tool calls.  The grammar accepts a
subset of what the schema allows, never more: where a keyword cannot be
honoured, :class:`UnsupportedSchemaError` says so instead of producing a
grammar that would let the model stray.

Deliberate narrowings, each of which keeps every output valid:

* objects that declare ``properties`` get no others unless
  ``additionalProperties`` allows them, and properties come in declared order;
* strings are written the way ``json.dumps(..., ensure_ascii=False)`` writes
  them wherever a pattern, format, enum or key pins their content;
* numbers have at most 20 integer and 20 fraction digits, and bounded
  numbers take a fraction only where the whole unit interval is in range;
* whitespace between tokens is at most one space, or a newline and up to 20
  indentation characters, so the model cannot loop on blanks;
* a ``pattern`` whose grammar would cost the sampler too much per token is
  refused (:mod:`mullama.prompt.patterncost`), and so is any quantifier over
  a part that can match nothing, which would make the cost exponential.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mullama.errors import BadRequestError
from mullama.prompt.patterncost import PatternTooCostly, live_stacks
from mullama.types import Tool

__all__ = [
    "JSON_GRAMMAR",
    "UnsupportedSchemaError",
    "json_grammar",
    "schema_to_gbnf",
    "tool_call_grammar",
    "validate",
]


class UnsupportedSchemaError(BadRequestError):
    """A JSON schema keyword the grammar converter cannot honour (or an invalid schema)."""

    def __init__(self, keyword: str, path: str, detail: str = "") -> None:
        message = f'unsupported JSON schema keyword "{keyword}" at {path}'
        super().__init__(f"{message}: {detail}" if detail else message, param="format")
        self.keyword = keyword
        self.path = path


# Shared rules, emitted only when used.  Every value rule ends in ``ws``.
_PRIMITIVES = {
    "ws": r'| " " | "\n" [ \t]{0,20}',
    "char": r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" ws (string ":" ws value ("," ws string ":" ws value)*)? "}" ws',
    "array": r'"[" ws (value ("," ws value)*)? "]" ws',
    "string": r'"\"" char* "\"" ws',
    "number": r'"-"? ("0" | [1-9] [0-9]{0,19}) ("." [0-9]{1,20})? ([eE] [-+]? [0-9]{1,3})? ws',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,19}) ws',
    "boolean": r'("true" | "false") ws',
    "null": '"null" ws',
    # Formats write the ``json.dumps`` form; leap days are exact.
    "date": r'"\"" date-body "\"" ws',
    "date-body": (
        r'[0-9]{4} "-" ("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
        r' | [0-9]{4} "-" ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30")'
        r' | [0-9]{4} "-02-" ("0" [1-9] | "1" [0-9] | "2" [0-8])'
        r' | leap-year "-02-29"'
    ),
    "leap-year": r'[0-9] [0-9] ([02468] [48] | [2468] "0" | [13579] [26]) | ([02468] [048] | [13579] [26]) "00"',
    "time": r'"\"" time-body "\"" ws',
    "time-body": (
        r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,9})?'
        r' ("Z" | [-+] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'
    ),
    "date-time": r'"\"" date-body "T" time-body "\"" ws',
    "uuid": (
        r'"\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4}'
        r' "-" [0-9a-fA-F]{12} "\"" ws'
    ),
}
_FORMATS = ("date", "time", "date-time", "uuid")

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "$anchor",
})
_UNSUPPORTED = frozenset({
    "patternProperties", "propertyNames", "minProperties", "maxProperties",
    "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
    "unevaluatedItems", "contains", "minContains", "maxContains", "uniqueItems", "not",
    "if", "then", "else", "multipleOf", "$dynamicRef", "$recursiveRef", "contentSchema",
})
_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}
_NESTING = ("properties", "additionalProperties", "items", "prefixItems", "anyOf", "oneOf", "allOf")
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")

_MAX_DEPTH = 100         # schema nesting the converter follows (Python's stack is the limit)
_MAX_RULES = 20_000      # beyond this the grammar is too slow for the sampler anyway
_MAX_REPEAT = 100_000    # longest minLength/maxLength/minItems/maxItems honoured
_CHUNK = 1000            # llama.cpp refuses {m,n} above 2000, so longer runs are chunked
_MAX_DIGITS = 20
# A pattern's cost to the grammar sampler (mullama.prompt.patterncost). The sampler checks every
# candidate token against every stack alive; on this project's 2-core test machine a stack costs
# up to about 1.5 ms per token over SmolLM2's 49k-token vocabulary (measured: nested ranges like
# ((x{1,10}){1,10}) with ~90 stacks took up to 140 ms, three levels with ~970 stacks a second).
# At most 24 stacks keep a token under about 40 ms; real-world patterns (dates, e-mail, phone
# numbers, hostnames, IPs, semver, UUIDs) need 1 to 14.
_PATTERN_STACKS = 24
# Bounded repetitions are written out, copy by copy, by llama.cpp as here: 4096 positions (a class
# or character each) cover ``.{0,4000}``; the product of nested bounds is capped by the same count.
_PATTERN_POSITIONS = 4096
# Sets of positions explored to find the largest: a pattern this many steps from settling is refused.
_PATTERN_STATES = 8192
_SPECIAL = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # must be escaped inside JSON strings
_ALL = ((0, 0x10FFFF),)
_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')


# --- GBNF text helpers -------------------------------------------------------


def _lit(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly; the grammar text stays ASCII."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        else:
            out.append(_hex(cp))
    return '"' + "".join(out) + '"'


def _hex(cp: int) -> str:
    return f"\\x{cp:02X}" if cp <= 0xFF else f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def _class_char(cp: int) -> str:
    ch = chr(cp)
    if ch in '\\]["-':
        return "\\" + ch
    if 0x20 <= cp < 0x7F and ch != "^":
        return ch
    return _hex(cp)


def _class(ranges: Iterable[tuple[int, int]]) -> str:
    parts = []
    for lo, hi in ranges:
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + "".join(parts) + "]"


def _alt(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _json_lit(value: Any) -> str:
    """GBNF for one JSON value: scalars as ``json.dumps`` writes them, ``ws`` between tokens."""
    if isinstance(value, list):
        items = ' "," ws '.join(f"{_json_lit(v)} ws" for v in value)
        return f'"[" ws {items} "]"' if items else '"[" ws "]"'
    if isinstance(value, dict):
        items = ' "," ws '.join(f'{_json_lit(str(k))} ws ":" ws {_json_lit(v)} ws' for k, v in value.items())
        return f'"{{" ws {items} "}}"' if items else '"{" ws "}"'
    return _lit(json.dumps(value, ensure_ascii=False, allow_nan=False))


def _escape_of(cp: int) -> str:
    """How ``json.dumps`` writes a code point that must be escaped in a string."""
    return json.dumps(chr(cp))[1:-1]


# --- code point sets (sorted, disjoint, inclusive ranges) --------------------


def _normalize(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for lo, hi in _normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= 0x10FFFF:
        out.append((start, 0x10FFFF))
    return out


def _intersect(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    return _complement(_complement(a) + _complement(b))


# --- integer ranges ----------------------------------------------------------


def _same_length_range(lo: str, hi: str) -> str:
    """GBNF for the decimal strings of one length between ``lo`` and ``hi``."""
    i = next((k for k in range(len(lo)) if lo[k] != hi[k]), len(lo))
    prefix = [_lit(lo[:i])] if i else []
    if i == len(lo):
        return " ".join(prefix)
    rest = len(lo) - i - 1
    d1, d2 = int(lo[i]), int(hi[i])
    if rest == 0:
        return " ".join(prefix + [f"[{d1}-{d2}]"])
    # Digit d1 with a bounded rest, the digits between with any rest, then d2.
    parts = []
    first = d1 if lo[i + 1:] == "0" * rest else d1 + 1
    last = d2 if hi[i + 1:] == "9" * rest else d2 - 1
    if first > d1:
        parts.append(f'"{d1}" ' + _group(_same_length_range(lo[i + 1:], "9" * rest)))
    if first <= last:
        parts.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    if last < d2:
        parts.append(f'"{d2}" ' + _group(_same_length_range("0" * rest, hi[i + 1:])))
    return " ".join(prefix + [_alt(parts)])


def _group(expr: str) -> str:
    return expr if " " not in expr or (expr.startswith("(") and expr.endswith(")")) else f"({expr})"


def _uint_range(lo: int, hi: int | None) -> str:
    """GBNF for non-negative integers (no leading zeros) in [lo, hi]; ``None`` is unbounded."""
    parts = []
    top = len(str(hi)) if hi is not None else _MAX_DIGITS
    for n in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(hi, 10**n - 1) if hi is not None else 10**n - 1
        if hi is None and a == 10 ** (n - 1) and n > 1:
            parts.append(f"[1-9] [0-9]{{{n - 1},{top - 1}}}")
            break
        if a <= b:
            parts.append(_group(_same_length_range(str(a), str(b))))
    return _alt(parts)


def _int_range(lo: int | None, hi: int | None) -> list[str]:
    """Alternatives for the integers in [lo, hi] (``None`` unbounded), without ``ws``."""
    parts = []
    if lo is None or lo < 0:
        neg_lo = 1 if hi is None else max(1, -hi)
        neg_hi = None if lo is None else -lo
        if neg_hi is None or neg_lo <= neg_hi:
            parts.append('"-" ' + _uint_range(neg_lo, neg_hi))
    if hi is None or hi >= 0:
        pos_lo = 0 if lo is None else max(0, lo)
        if hi is None or pos_lo <= hi:
            parts.append(_uint_range(pos_lo, hi))
    return parts


# --- the converter -----------------------------------------------------------


@dataclass
class _Grammar:
    """Rules collected while converting one or more schemas into one grammar."""

    rules: dict[str, str] = field(default_factory=dict)
    by_body: dict[str, str] = field(default_factory=dict)

    def use(self, name: str) -> str:
        """Reference a shared primitive rule, pulling in the rules it needs."""
        if name not in self.rules:
            body = _PRIMITIVES[name]
            self.rules[name] = body
            for ref in re.findall(r"[A-Za-z][\w-]*", _LITERALS.sub(" ", body)):
                if ref in _PRIMITIVES:
                    self.use(ref)
        return name

    def reserve(self, hint: str) -> str:
        """A fresh rule name derived from ``hint``."""
        base = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-") or "r"
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        if len(self.rules) >= _MAX_RULES:
            raise UnsupportedSchemaError("$defs", "#", "schema too large")
        self.rules[name] = ""
        return name

    def define(self, hint: str, body: str) -> str:
        """A rule with ``body``, reusing an identical one when it exists."""
        if body in self.by_body:
            return self.by_body[body]
        name = self.reserve(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def text(self, root: str) -> str:
        """The GBNF text, with ``root`` first."""
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"


class _Converter:
    """Converts the schemas of one document, resolving ``$ref`` against its root."""

    def __init__(self, grammar: _Grammar, root: Any) -> None:
        self.g = grammar
        self.root = root
        self.ref_rules: dict[tuple[str, frozenset[str]], str | None] = {}
        self.depth = 0

    def visit(self, schema: Any, path: str, hint: str, bare: frozenset[str] = frozenset()) -> str | None:
        """The rule for a schema, or None when every alternative is a left-recursive $ref.

        ``bare`` holds the $refs entered since the last token was consumed: a
        $ref back into one of them adds nothing to the least fixed point, and
        llama.cpp rejects left recursion, so that alternative is dropped.
        """
        if self.depth >= _MAX_DEPTH:
            keyword = next((s for s in reversed(path.split("/")) if s in _NESTING), "$ref")
            raise UnsupportedSchemaError(keyword, path, "schema nested too deeply")
        self.depth += 1
        try:
            return self._visit(schema, path, hint, bare)
        finally:
            self.depth -= 1

    def _visit(self, schema: Any, path: str, hint: str, bare: frozenset[str]) -> str | None:
        if schema is True:
            return self.g.use("value")
        if not isinstance(schema, dict):
            raise _not_a_schema(schema, path)
        for key in schema:
            if key in _UNSUPPORTED and not (key == "uniqueItems" and schema[key] is False):
                raise UnsupportedSchemaError(key, path)
        meaningful = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
        if "$ref" in meaningful:
            if len(meaningful) == 1:
                return self._ref(meaningful["$ref"], path, bare)
            return self.visit(self._merge([meaningful], path), path, hint, bare)
        if "allOf" in meaningful:
            return self.visit(self._merge([meaningful], path), path, hint, bare)
        if "anyOf" in meaningful or "oneOf" in meaningful:
            return self._union(meaningful, path, hint, bare)
        if "enum" in meaningful or "const" in meaningful:
            return self._enum(meaningful, path, hint)
        return self._typed(meaningful, path, hint)

    def _ref(self, ref: Any, path: str, bare: frozenset[str]) -> str | None:
        pointer, target = self._resolve(ref, path)
        if pointer in bare:
            return None
        key = (pointer, bare)
        if key in self.ref_rules:
            return self.ref_rules[key]
        name = self.g.reserve(pointer.rsplit("/", 1)[-1] or "root-ref")
        self.ref_rules[key] = name
        body = self.visit(target, "#" + pointer, name, bare | {pointer})
        if body is None:
            del self.g.rules[name]
            self.ref_rules[key] = None
            return None
        self.g.rules[name] = body
        return name

    def _resolve(self, ref: Any, path: str) -> tuple[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchemaError("$ref", path, f"only local references are supported, not {ref!r}")
        pointer = urllib.parse.unquote(ref[1:])
        if pointer and not pointer.startswith("/"):
            raise UnsupportedSchemaError("$ref", path, f"unresolved reference {ref!r}")
        node = self.root
        for token in pointer.split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise UnsupportedSchemaError("$ref", path, f"unresolved reference {ref!r}")
        return pointer, node

    def _merge(self, schemas: list[Any], path: str, seen: frozenset[str] = frozenset()) -> dict[str, Any]:
        """One schema equivalent to ``allOf: schemas``, refs and nested allOf flattened."""
        flat: list[dict[str, Any]] = []
        for schema in schemas:
            if schema is True:
                continue
            if not isinstance(schema, dict):
                raise _not_a_schema(schema, path)
            schema = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
            nested = []
            if "$ref" in schema:
                pointer, target = self._resolve(schema.pop("$ref"), path)
                if pointer in seen or len(seen) > _MAX_DEPTH:
                    raise UnsupportedSchemaError("$ref", path, "circular reference inside allOf")
                nested.append(self._merge([target], "#" + pointer, seen | {pointer}))
            if "allOf" in schema:
                branches = schema.pop("allOf")
                if not isinstance(branches, list) or not branches:
                    raise UnsupportedSchemaError("allOf", path, "must be a non-empty array")
                nested.append(self._merge(branches, path + "/allOf", seen))
            flat.extend(nested)
            flat.append(schema)
        merged: dict[str, Any] = {}
        closed: set[str] | None = None
        for schema in flat:
            if schema.get("additionalProperties") is False:
                names = set(_get(schema, "properties", dict, path, {}))
                closed = names if closed is None else closed & names
            for key, value in schema.items():
                if key not in merged or merged[key] == value:
                    merged[key] = value
                else:
                    merged[key] = _combine(key, merged[key], value, path)
        if closed is not None and "properties" in merged:
            dropped = set(merged["properties"]) - closed
            merged["properties"] = {k: v for k, v in merged["properties"].items() if k in closed}
            if dropped & set(_get(merged, "required", list, path, [])):
                raise UnsupportedSchemaError("allOf", path, "required property excluded by additionalProperties")
        if isinstance(merged.get("additionalProperties"), dict) and len(flat) > 1:
            raise UnsupportedSchemaError("additionalProperties", path, "schema-valued inside allOf")
        return merged

    def _union(self, schema: dict[str, Any], path: str, hint: str, bare: frozenset[str]) -> str | None:
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedSchemaError("oneOf", path, "together with anyOf")
        keyword = "anyOf" if "anyOf" in schema else "oneOf"
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchemaError(keyword, path, "must be a non-empty array")
        base = {k: v for k, v in schema.items() if k != keyword}
        alternatives = []
        for i, branch in enumerate(branches):
            if base:
                branch = self._merge([base, branch], path)
            rule = self.visit(branch, f"{path}/{keyword}/{i}", f"{hint}-{i}", bare)
            if rule is not None and rule not in alternatives:
                alternatives.append(rule)
        if not alternatives:
            return None
        return alternatives[0] if len(alternatives) == 1 else self.g.define(hint, " | ".join(alternatives))

    def _enum(self, schema: dict[str, Any], path: str, hint: str) -> str:
        if "const" in schema:
            values, keyword = [schema["const"]], "const"
        else:
            values, keyword = schema["enum"], "enum"
            if not isinstance(values, list):
                raise UnsupportedSchemaError("enum", path, "must be an array")
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        if "enum" in schema and "const" in schema:
            rest["enum"] = schema["enum"]
        checker = _Validator(self.root)
        literals = []
        try:
            for value in values:
                if rest and checker.errors(value, rest, ""):
                    continue
                literal = _json_lit(value)
                if literal not in literals:
                    literals.append(literal)
        except (ValueError, TypeError, RecursionError) as exc:
            raise UnsupportedSchemaError(keyword, path, "values must be finite JSON") from exc
        except (KeyError, IndexError, AttributeError) as exc:
            # The sibling keywords the values are checked against are malformed.
            raise UnsupportedSchemaError(keyword, path, f"cannot be checked against its sibling keywords ({exc!r})") from exc
        if not literals:
            raise UnsupportedSchemaError(keyword, path, "no value satisfies the schema")
        return self.g.define(hint, " ".join([_alt(literals), self.g.use("ws")]))

    def _typed(self, schema: dict[str, Any], path: str, hint: str) -> str:
        declared = schema.get("type")
        if declared is None:
            types = [t for t, keys in _TYPE_KEYWORDS.items() if any(k in schema for k in keys)]
            if not types:
                return self.g.use("value")
        else:
            types = [declared] if isinstance(declared, str) else declared
            if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
                raise UnsupportedSchemaError("type", path, f"invalid type {declared!r}")
        types = list(dict.fromkeys(types))
        if schema.get("nullable") is True and "null" not in types:
            types.append("null")
        if "number" in types and "integer" in types:
            types.remove("integer")
        rules = []
        for t in types:
            sub_hint = hint if len(types) == 1 else f"{hint}-{t}"
            if t == "object":
                rules.append(self._object(schema, path, sub_hint))
            elif t == "array":
                rules.append(self._array(schema, path, sub_hint))
            elif t == "string":
                rules.append(self._string(schema, path, sub_hint))
            elif t in ("integer", "number"):
                rules.append(self._number(schema, path, sub_hint, t == "integer"))
            else:
                rules.append(self.g.use(t))
        return rules[0] if len(rules) == 1 else self.g.define(hint, " | ".join(rules))

    def _object(self, schema: dict[str, Any], path: str, hint: str) -> str:
        ws = self.g.use("ws")
        props = _get(schema, "properties", dict, path, {})
        required = _get(schema, "required", list, path, [])
        if not all(isinstance(r, str) for r in required):
            raise UnsupportedSchemaError("required", path, "must list property names")
        extra = schema.get("additionalProperties", "properties" not in schema)
        if not isinstance(extra, (bool, dict)):
            raise UnsupportedSchemaError("additionalProperties", path, "must be a schema")
        if not props and extra is True and not required:
            return self.g.use("object")
        props = dict(props)
        for name in required:
            if name not in props:
                if extra is False:
                    raise UnsupportedSchemaError("required", path, f'"{name}" is not an allowed property')
                props[name] = extra
        kvs: list[tuple[str, bool]] = []
        for name, sub in props.items():
            if sub is False:
                if name in required:
                    raise UnsupportedSchemaError("required", path, f'"{name}" accepts no value')
                continue
            sub_path = f"{path}/properties/{_pointer_token(name)}"
            value = self.visit(sub, sub_path, f"{hint}-{name}")
            if value is None:
                raise UnsupportedSchemaError("$ref", sub_path, "circular reference without a base case")
            kv = self.g.define(f"{hint}-{name}-kv", f'{_lit(json.dumps(name, ensure_ascii=False))} {ws} ":" {ws} {value}')
            kvs.append((kv, name in required))
        extra_kv = None
        if extra is not False:
            value = self.visit(extra, f"{path}/additionalProperties", f"{hint}-extra")
            if value is None:
                raise UnsupportedSchemaError("$ref", path, "circular reference without a base case")
            key = self._key_not_in(list(props), hint) if props else self.g.use("string")
            extra_kv = self.g.define(f"{hint}-extra-kv", f'{key} ":" {ws} {value}')
        # tails[i]: the properties from i on, once an earlier one was written.
        # Keys differ, so the first one written picks its alternative at once.
        tails = {len(kvs): f'("," {ws} {extra_kv})*' if extra_kv else ""}
        for i in range(len(kvs) - 1, 0, -1):
            kv, req = kvs[i]
            item = f'"," {ws} {kv}' if req else f'("," {ws} {kv})?'
            tails[i] = self.g.define(f"{hint}-tail", f"{item} {tails[i + 1]}".strip())
        firsts = []
        for i, (kv, req) in enumerate(kvs):
            firsts.append(f"{kv} {tails[i + 1]}".strip())
            if req:
                break
        else:
            if extra_kv:
                firsts.append(f'{extra_kv} ("," {ws} {extra_kv})*')
        if not firsts:
            return self.g.define(hint, f'"{{" {ws} "}}" {ws}')
        inner = _alt(firsts) if len(firsts) > 1 else f"({firsts[0]})"
        optional = "" if any(req for _, req in kvs) else "?"
        return self.g.define(hint, f'"{{" {ws} {inner}{optional} "}}" {ws}')

    def _key_not_in(self, names: list[str], hint: str) -> str:
        """A key rule for any string except ``names``, each written in one way only."""
        control = self.g.define("key-control", r'"\\u00" ("0" [0-7bef] | "1" [0-9a-f])')
        key_char = self.g.define("key-char", rf'[^"\\\x00-\x1F] | "\\" ["\\bfnrt] | {control}')
        words = [_units(name) for name in names]
        trie: dict[tuple[str, ...], set[str]] = {}
        for word in words:
            for i in range(len(word)):
                trie.setdefault(tuple(word[:i]), set()).add(word[i])
        terminal = {tuple(w) for w in words}
        names_by_prefix: dict[tuple[str, ...], str] = {}
        for prefix in sorted(trie, key=len, reverse=True):
            children = sorted(trie[prefix])
            parts = []
            for unit in children:
                child = prefix + (unit,)
                rest = names_by_prefix.get(child)
                # A leaf is a whole name, so the key must go on past it.
                parts.append(f"{_lit(unit)} {rest or key_char + '+'}")
            raw = [ord(u) for u in children if len(u) == 1]
            escaped = "".join(u[1] for u in children if len(u) == 2)
            others = [_class(_intersect(_complement([(c, c) for c in raw]), _complement(_SPECIAL)))]
            rest_escapes = "".join(c for c in '"\\bfnrt' if c not in escaped)
            if rest_escapes:
                others.append('"\\\\" ' + _class((ord(c), ord(c)) for c in rest_escapes))
            long_escapes = [u for u in map(_escape_of, range(0x20)) if len(u) == 6]
            rest_long = [_lit(u) for u in long_escapes if u not in children]
            others += [control] if len(rest_long) == len(long_escapes) else rest_long
            parts.append(f"{_alt(others)} {key_char}*")
            body = " | ".join(parts)
            names_by_prefix[prefix] = self.g.define(f"{hint}-key", body if prefix in terminal else f"({body})?")
        root = names_by_prefix.get((), f"{key_char}+")  # only the empty name is excluded
        return self.g.define(f"{hint}-extra-key", f'"\\"" {root} "\\"" {self.g.use("ws")}')

    def _array(self, schema: dict[str, Any], path: str, hint: str) -> str:
        ws = self.g.use("ws")
        prefix = _get(schema, "prefixItems", list, path, [])
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        lo = _count(schema, "minItems", path, 0)
        hi = _count(schema, "maxItems", path, None)
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and lo > hi:
            raise UnsupportedSchemaError("minItems", path, "no array length satisfies the schema")
        prefix = prefix[: hi if hi is not None else len(prefix)]
        rules = []
        for i, sub in enumerate(prefix):
            rule = self.visit(sub, f"{path}/prefixItems/{i}", f"{hint}-{i}")
            if rule is None:
                raise UnsupportedSchemaError("$ref", path, "circular reference without a base case")
            rules.append(rule)
        rest_lo, rest_hi = max(0, lo - len(prefix)), None if hi is None else hi - len(prefix)
        tail = ""
        if rest_hi != 0:
            item = self.visit(items, f"{path}/items", f"{hint}-item")
            if item is None:
                raise UnsupportedSchemaError("$ref", path, "circular reference without a base case")
            if not rules:
                rules.append(item)
                rest_lo, rest_hi = max(0, rest_lo - 1), None if rest_hi is None else rest_hi - 1
            next_item = self.g.define(f"{hint}-next", f'"," {ws} {item}')
            tail = self._repeat(next_item, rest_lo, rest_hi, f"{hint}-rest", "maxItems", path)
        # Built from the end, a rule per position, so nothing nests deeply.
        for i in range(len(rules) - 1, 0, -1):
            body = f'"," {ws} {rules[i]} {tail}'.strip()
            tail = self.g.define(f"{hint}-from-{i}", body if i < lo else f"({body})?")
        if not rules:
            return self.g.define(hint, f'"[" {ws} "]" {ws}')
        body = f"{rules[0]} {tail}".strip()
        inner = f"({body})" + ("?" if lo == 0 else "")
        return self.g.define(hint, f'"[" {ws} {inner} "]" {ws}')

    def _repeat(self, atom: str, lo: int, hi: int | None, hint: str, keyword: str, path: str) -> str:
        """``atom`` repeated lo..hi times, in forms llama.cpp's parser accepts."""
        if lo > _MAX_REPEAT or (hi is not None and hi > _MAX_REPEAT):
            raise UnsupportedSchemaError(keyword, path, f"bounds above {_MAX_REPEAT} are not supported")
        if hi is not None and hi <= _CHUNK:
            return "" if hi == 0 else _quantified(atom, lo, hi)
        parts = []
        if lo >= _CHUNK:
            parts.append(f"{self._chunk(atom, hint)}{{{lo // _CHUNK}}}")
        if lo % _CHUNK:
            parts.append(f"{atom}{{{lo % _CHUNK}}}")
        parts.append(_quantified(atom, 0, None) if hi is None else self._upto(atom, hi - lo, hint))
        return " ".join(p for p in parts if p)

    def _chunk(self, atom: str, hint: str) -> str:
        return self.g.define(f"{hint}-chunk", f"{atom}{{{_CHUNK}}}")

    def _upto(self, atom: str, d: int, hint: str) -> str:
        """``atom`` repeated 0..d times for any d: a chunk and fewer, or less than a chunk."""
        if d < _CHUNK:
            return f"{atom}{{0,{d}}}" if d else ""
        chunk = self._chunk(atom, hint)
        few = self.g.define(f"{hint}-few", f"{atom}{{0,{_CHUNK - 1}}}")
        rule = f"{atom}{{0,{d % _CHUNK}}}" if d % _CHUNK else ""
        for _ in range(d // _CHUNK):
            rule = self.g.define(f"{hint}-upto", f"{chunk} {rule} | {few}".replace("  ", " "))
        return rule

    def _string(self, schema: dict[str, Any], path: str, hint: str) -> str:
        lo = _count(schema, "minLength", path, 0)
        hi = _count(schema, "maxLength", path, None)
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt is not None or pattern is not None:
            if "minLength" in schema or "maxLength" in schema:
                raise UnsupportedSchemaError("minLength" if "minLength" in schema else "maxLength", path, "together with format or pattern")
            if fmt is not None and pattern is not None:
                raise UnsupportedSchemaError("pattern", path, "together with format")
            if pattern is not None:
                return _Pattern(self, path, hint).rule(pattern)
            if fmt not in _FORMATS:
                raise UnsupportedSchemaError("format", path, f"unknown format {fmt!r}")
            return self.g.use(fmt)
        if hi is not None and lo > hi:
            raise UnsupportedSchemaError("minLength", path, "greater than maxLength")
        if lo == 0 and hi is None:
            return self.g.use("string")
        char = self.g.use("char")
        return self.g.define(hint, f'"\\"" {self._repeat(char, lo, hi, hint, "maxLength", path)} "\\"" {self.g.use("ws")}'.replace("  ", " "))

    def _number(self, schema: dict[str, Any], path: str, hint: str, integer: bool) -> str:
        lo, lo_excl = _bound(schema, "minimum", "exclusiveMinimum", path)
        hi, hi_excl = _bound(schema, "maximum", "exclusiveMaximum", path)
        if lo is None and hi is None:
            return self.g.use("integer" if integer else "number")
        limit = 10**_MAX_DIGITS - 1
        int_lo = None if lo is None else (math.floor(lo) + 1 if lo_excl else math.ceil(lo))
        int_hi = None if hi is None else (math.ceil(hi) - 1 if hi_excl else math.floor(hi))
        if int_lo is not None and int_lo < -limit:
            int_lo = None
        if int_hi is not None and int_hi > limit:
            int_hi = None
        if (int_lo is not None and int_lo > limit) or (int_hi is not None and int_hi < -limit):
            raise UnsupportedSchemaError("minimum" if lo is not None and lo > 0 else "maximum", path, "bound too large")
        parts = []
        if int_lo is None or int_hi is None or int_lo <= int_hi:
            parts = _int_range(int_lo, int_hi)
        if not integer:
            # A fraction is allowed where the whole unit interval after (or before) I fits.
            frac = f'"." [0-9]{{1,{_MAX_DIGITS}}}'
            pos_lo = 0 if int_lo is None else max(0, int_lo)
            pos_hi = None if hi is None or math.floor(hi) - 1 > limit else math.floor(hi) - 1
            if pos_hi is None or pos_lo <= pos_hi:
                parts.append(f"{_uint_range(pos_lo, pos_hi)} {frac}")
            neg_lo = 0 if int_hi is None else max(0, -int_hi)
            neg_hi = None if lo is None or math.floor(-lo) - 1 > limit else math.floor(-lo) - 1
            if neg_hi is None or neg_lo <= neg_hi:
                parts.append(f'"-" {_uint_range(neg_lo, neg_hi)} {frac}')
            # Just past an exclusive integer bound: a fraction that is not all zeros.
            nonzero = f'"." "0"{{0,{_MAX_DIGITS - 1}}} [1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}'
            if lo is not None and lo_excl and lo.denominator == 1 and lo >= 0 and (hi is None or lo + 1 <= hi):
                parts.append(f'"{lo}" {nonzero}')
            if hi is not None and hi_excl and hi.denominator == 1 and hi <= 0 and (lo is None or hi - 1 >= lo):
                parts.append(f'"-{-hi}" {nonzero}')
        if not parts:
            raise UnsupportedSchemaError("minimum" if lo is not None else "maximum", path, "no number satisfies the bounds")
        return self.g.define(hint, f"{_alt(parts)} {self.g.use('ws')}")


def _quantified(atom: str, lo: int, hi: int | None) -> str:
    """``atom`` with the shortest GBNF quantifier for lo..hi (``None``: unbounded)."""
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?", (1, 1): ""}.get((lo, hi))
    if suffix is None:
        suffix = f"{{{lo},}}" if hi is None else f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"
    return atom + suffix


def _units(name: str) -> list[str]:
    """The characters of a key as ``json.dumps`` writes them, one string per character."""
    return [_escape_of(ord(c)) if _intersect([(ord(c), ord(c))], _SPECIAL) else c for c in name]


def _not_a_schema(schema: Any, path: str) -> UnsupportedSchemaError:
    if schema is False:
        return UnsupportedSchemaError("false", path, "the schema accepts nothing")
    return UnsupportedSchemaError("type", path, "a schema must be an object or a boolean")


def _pointer_token(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _get(schema: dict[str, Any], key: str, kind: type, path: str, default: Any) -> Any:
    value = schema.get(key, default)
    if not isinstance(value, kind):
        raise UnsupportedSchemaError(key, path, f"must be {'an object' if kind is dict else 'an array'}")
    return value


def _count(schema: dict[str, Any], key: str, path: str, default: int | None) -> int | None:
    if key not in schema:
        return default
    value = schema[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedSchemaError(key, path, "must be a non-negative integer")
    return value


def _bound(schema: dict[str, Any], key: str, exclusive_key: str, path: str) -> tuple[Fraction | None, bool]:
    """A numeric bound and whether it is exclusive (draft 4 booleans or draft 6 numbers)."""
    inclusive, exclusive = schema.get(key), schema.get(exclusive_key)
    candidates = []
    for k, value, excl in ((key, inclusive, exclusive is True), (exclusive_key, exclusive, True)):
        if value is None or isinstance(value, bool) and k == exclusive_key:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UnsupportedSchemaError(k, path, "must be a finite number")
        candidates.append((Fraction(value), excl))
    if not candidates:
        return None, False
    pick = max if key == "minimum" else min
    best = pick(v for v, _ in candidates)
    return best, any(e for v, e in candidates if v == best)


def _combine(key: str, a: Any, b: Any, path: str) -> Any:
    """Two values of one keyword from different allOf branches, as one."""
    if key == "required" and isinstance(a, list) and isinstance(b, list):
        return list(dict.fromkeys(a + b))
    if key == "properties" and isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for name, sub in b.items():
            out[name] = sub if name not in out or out[name] == sub else {"allOf": [out[name], sub]}
        return out
    if key == "type":
        norm = [[t] if isinstance(t, str) else t for t in (a, b)]
        if all(isinstance(t, list) for t in norm):
            both = [t for t in norm[0] if t in norm[1] or (t == "integer" and "number" in norm[1])]
            both += [t for t in norm[1] if t == "integer" and "number" in norm[0] and t not in both]
            if both:
                return both
        raise UnsupportedSchemaError("type", path, "allOf branches share no type")
    if key in ("minLength", "minItems", "minimum") and _numbers(a, b):
        return max(a, b)
    if key in ("maxLength", "maxItems", "maximum") and _numbers(a, b):
        return min(a, b)
    if key in ("items", "additionalProperties") and isinstance(a, (dict, bool)) and isinstance(b, (dict, bool)):
        if a is False or b is False:
            return False
        return b if a is True else a if b is True else {"allOf": [a, b]}
    if key == "nullable":
        return bool(a) and bool(b)
    raise UnsupportedSchemaError(key, path, "conflicting values in allOf")


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


# --- patterns ----------------------------------------------------------------


@dataclass
class _Node:
    """A regex AST node: ``set`` (one code point from ``ranges``), ``seq``, ``alt``, ``rep``, ``bol`` or ``eol``."""

    kind: str
    ranges: list[tuple[int, int]] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)
    lo: int = 0
    hi: int | None = None


_CLASS_ESCAPES = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
          (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)],
}
_CHAR_ESCAPES = {"t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "0": 0}
_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]


class _Pattern:
    """Parses an ECMA-262 regex subset and writes the JSON string it matches as GBNF."""

    def __init__(self, conv: _Converter, path: str, hint: str) -> None:
        self.conv, self.path, self.hint = conv, path, hint
        self.src, self.pos, self.depth = "", 0, 0

    def fail(self, detail: str) -> UnsupportedSchemaError:
        return UnsupportedSchemaError("pattern", self.path, f"{detail} (in {self.src!r})")

    def rule(self, pattern: Any) -> str:
        """The rule for a JSON string matching ``pattern`` (searched, as JSON Schema says)."""
        if not isinstance(pattern, str):
            raise self.fail("must be a string")
        self.src, self.pos = pattern, 0
        tree = self.alternation()
        if self.pos != len(self.src):
            raise self.fail(f"unexpected {self.src[self.pos]!r} at offset {self.pos}")
        anything = _Node("rep", children=[_Node("set", ranges=list(_ALL))], lo=0, hi=None)
        branches = []
        for branch in tree.children if tree.kind == "alt" else [tree]:
            items = list(branch.children) if branch.kind == "seq" else [branch]
            start = bool(items) and items[0].kind == "bol"
            items = items[1:] if start else items
            end = bool(items) and items[-1].kind == "eol"
            items = items[:-1] if end else items
            items = [self.simplify(item) for item in items]
            # Where the match may be followed (or preceded) by anything, a repetition at that end
            # need only reach its minimum: the same strings, without a partial match per count.
            if not end and items and items[-1].kind == "rep":
                items[-1] = _exactly(items[-1])
            if not start and items and items[0].kind == "rep":
                items[0] = _exactly(items[0])
            branches.append(_Node("seq", children=([] if start else [anything]) + items + ([] if end else [anything])))
        whole = _Node("alt", children=branches) if len(branches) > 1 else branches[0]
        try:
            live_stacks(whole, weight=_stacks_per_class, max_positions=_PATTERN_POSITIONS,
                        max_stacks=_PATTERN_STACKS, max_states=_PATTERN_STATES)
        except PatternTooCostly as exc:
            raise self.fail(f"too costly for the grammar sampler: {exc}") from None
        g = self.conv.g
        body = self.emit(whole)
        return g.define(self.hint, f'"\\"" {body} "\\"" {g.use("ws")}'.replace("  ", " "))

    def simplify(self, node: _Node) -> _Node:
        """``node`` with repetitions of at most one copy unwrapped; refuses repeating what can match nothing.

        A repetition of a part that can match nothing can match the empty
        string in ways that multiply with every copy: ``((a?){40}){40}``
        makes the sampler explore more of them than it could finish.
        """
        if node.kind in ("bol", "eol"):
            raise self.fail("anchors are only supported at the start and end")
        if node.kind == "set":
            return node
        children = [self.simplify(c) for c in node.children]
        if node.kind != "rep":
            return _Node(node.kind, children=children)
        child = children[0]
        if node.hi == 0:
            return _Node("seq")
        if node.hi == 1 and (node.lo == 1 or _nullable(child)):
            return child
        if _nullable(child):
            raise self.fail(f"a quantifier {_quantifier_text(node)} repeats a part that can match nothing")
        return _Node("rep", children=[child], lo=node.lo, hi=node.hi)

    # Parsing: alternation > sequence > quantified atom.

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def alternation(self) -> _Node:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail("groups nested too deeply")
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        self.depth -= 1
        return branches[0] if len(branches) == 1 else _Node("alt", children=branches)

    def sequence(self) -> _Node:
        items = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            quantified = self.quantifier(atom)
            items.append(quantified)
        return _Node("seq", children=items)

    def quantifier(self, atom: _Node) -> _Node:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.pos += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        elif ch == "{" and (m := re.match(r"\{(\d+)(,(\d*))?\}", self.src[self.pos:])):
            self.pos += m.end()
            lo = int(m.group(1))
            hi = lo if not m.group(2) else int(m.group(3)) if m.group(3) else None
            if hi is not None and hi < lo:
                raise self.fail("quantifier range out of order")
        else:
            return atom
        if atom.kind in ("bol", "eol"):
            raise self.fail("quantified anchor")
        if self.peek() == "?":  # lazy: the same language
            self.pos += 1
        return _Node("rep", children=[atom], lo=lo, hi=hi)

    def atom(self) -> _Node:
        ch = self.peek()
        self.pos += 1
        if ch == "(":
            if self.src.startswith("?:", self.pos):
                self.pos += 2
            elif self.src.startswith("?<", self.pos) and self.src[self.pos + 2:self.pos + 3] not in ("=", "!"):
                end = self.src.find(">", self.pos)
                if end < 0:
                    raise self.fail("unterminated group name")
                self.pos = end + 1
            elif self.peek() == "?":
                raise self.fail("lookaround groups are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.fail("missing )")
            self.pos += 1
            return node
        if ch == "[":
            return _Node("set", ranges=self.char_class())
        if ch == ".":
            return _Node("set", ranges=_complement(_LINE_ENDS))
        if ch == "^":
            return _Node("bol")
        if ch == "$":
            return _Node("eol")
        if ch == "\\":
            return _Node("set", ranges=self.escape(in_class=False))
        if ch in ("*", "+", "?") or ch == "{" and re.match(r"\{\d+(,\d*)?\}", self.src[self.pos - 1:]):
            raise self.fail(f"nothing to repeat at offset {self.pos - 1}")
        return _Node("set", ranges=[(ord(ch), ord(ch))])

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        ch = self.peek()
        if not ch:
            raise self.fail("trailing backslash")
        self.pos += 1
        if ch.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[ch.lower()]
            return _complement(ranges) if ch.isupper() else list(ranges)
        if ch in _CHAR_ESCAPES:
            return [(_CHAR_ESCAPES[ch],) * 2]
        if ch == "b" and in_class:
            return [(8, 8)]
        if ch in "xu":
            size = 2 if ch == "x" else 4
            digits = self.src[self.pos:self.pos + size]
            if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"bad \\{ch} escape")
            self.pos += size
            return [(int(digits, 16),) * 2]
        if ch.isalnum():
            raise self.fail(f"escape \\{ch} is not supported")
        return [(ord(ch),) * 2]

    def char_class(self) -> list[tuple[int, int]]:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        if self.peek() == "]":  # [] and [^] mean different things in Python and ECMA-262
            raise self.fail("empty character class")
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("missing ]")
            lo = self.class_atom()
            if self.peek() == "-" and self.src[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi = self.class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.fail("class escape in a range")
                if hi[0][0] < lo[0][0]:
                    raise self.fail("character range out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        self.pos += 1
        ranges = _normalize(ranges)
        return _complement(ranges) if negated else ranges

    def class_atom(self) -> list[tuple[int, int]]:
        ch = self.peek()
        self.pos += 1
        if ch == "\\":
            return self.escape(in_class=True)
        return [(ord(ch), ord(ch))]

    # Emission: each code point set becomes raw characters plus JSON escapes.

    def emit(self, node: _Node) -> str:
        if node.kind == "set":
            return self.char_set(node.ranges)
        if node.kind == "seq":
            return " ".join(p for p in (self.emit(c) for c in node.children) if p)
        if node.kind == "alt":
            return "(" + " | ".join(self.emit(c) for c in node.children) + ")"
        if node.kind == "rep":
            child = node.children[0]
            inner = self.emit(child)
            if not inner:
                return ""
            atom = inner if child.kind == "set" else self.conv.g.define(f"{self.hint}-part", inner)
            return self.conv._repeat(atom, node.lo, node.hi, self.hint, "pattern", self.path)
        raise self.fail("anchors are only supported at the start and end")

    def char_set(self, ranges: list[tuple[int, int]]) -> str:
        if not ranges:
            raise self.fail("empty character class")
        parts = []
        raw = _intersect(ranges, _complement(_SPECIAL))
        if raw:
            parts.append(_class(raw))
        escapes = [_escape_of(cp) for lo, hi in _intersect(ranges, _SPECIAL) for cp in range(lo, hi + 1)]
        if escapes:
            parts.append(_escapes(escapes))
        if len(parts) == 1 and raw:
            return parts[0]
        return self.conv.g.define(f"{self.hint}-char", " | ".join(parts))


def _escapes(escapes: list[str]) -> str:
    """GBNF for JSON escapes (``\\n``, ``\\u001f``...), behind one backslash.

    One alternative per escape would cost the sampler one stack each
    wherever the class is expected (34 for ``.``); behind a shared first
    character they cost one.
    """
    short = [e[1] for e in escapes if len(e) == 2]
    by_digit: dict[str, list[str]] = {}
    for e in escapes:
        if len(e) == 6:  # \u00XY
            by_digit.setdefault(e[4], []).append(e[5])
    alts = [_class((ord(c), ord(c)) for c in short)] if short else []
    if by_digit:
        alts.append('"u00" ' + _alt([f"{_lit(d)} {_class((ord(c), ord(c)) for c in ys)}" for d, ys in by_digit.items()]))
    return f"{_lit(chr(92))} {_alt(alts)}"


def _exactly(node: _Node) -> _Node:
    """A repetition cut to its minimum count."""
    return _Node("rep", children=node.children, lo=node.lo, hi=node.lo) if node.lo else _Node("seq")


def _quantifier_text(node: _Node) -> str:
    if node.hi is None:
        return {0: "*", 1: "+"}.get(node.lo, f"{{{node.lo},}}")
    return f"{{{node.lo}}}" if node.lo == node.hi else f"{{{node.lo},{node.hi}}}"


def _stacks_per_class(ranges: list[tuple[int, int]]) -> int:
    """Stacks the sampler holds where ``ranges`` is expected: one for the class, one for its JSON escapes."""
    return bool(_intersect(ranges, _complement(_SPECIAL))) + bool(_intersect(ranges, _SPECIAL))


def _nullable(node: _Node) -> bool:
    if node.kind == "set":
        return False
    if node.kind == "seq":
        return all(_nullable(c) for c in node.children)
    if node.kind == "alt":
        return any(_nullable(c) for c in node.children)
    if node.kind == "rep":
        return node.lo == 0 or _nullable(node.children[0])
    return True


# --- public API --------------------------------------------------------------


def schema_to_gbnf(schema: Any) -> str:
    """The GBNF grammar (rule ``root``) of JSON texts valid for ``schema``.

    Raises :class:`UnsupportedSchemaError` for anything it cannot honour.
    """
    g = _Grammar()
    try:
        rule = _Converter(g, schema).visit(schema, "#", "root-value")
    except RecursionError as exc:
        raise UnsupportedSchemaError("$ref", "#", "schema nested too deeply") from exc
    if rule is None:
        raise UnsupportedSchemaError("$ref", "#", "circular reference without a base case")
    return g.text(rule)


def json_grammar() -> str:
    """A grammar for any JSON object: Ollama's ``format: "json"`` and OpenAI's ``json_object``."""
    g = _Grammar()
    return g.text(g.use("object"))


JSON_GRAMMAR = json_grammar()


def tool_call_grammar(tools: list[Tool], *, forced: str | None, open_tag: str, close_tag: str,
                      parallel: bool = True) -> str:
    """A grammar forcing tool calls, each ``open_tag {"name": ..., "arguments": ...} close_tag``.

    ``forced`` names the one tool the model must call, or ``None`` for any of
    ``tools``.  Arguments follow each tool's parameters schema. With
    ``parallel`` the model may add more calls after the first; without it the
    grammar ends after one call, so a small model cannot keep adding calls
    until it runs out of tokens.
    """
    chosen = [t for t in tools if forced is None or t.name == forced]
    if not chosen:
        raise BadRequestError(f'tool "{forced}" is not among the tools given' if forced else "no tools given", param="tool_choice")
    g = _Grammar()
    ws = g.use("ws")
    calls = []
    for tool in {t.name: t for t in chosen}.values():  # the last definition of a name wins
        conv = _Converter(g, tool.parameters)
        try:
            args = conv.visit(conv._merge([tool.parameters, {"type": "object"}], "#"), "#", f"{tool.name}-arguments")
        except RecursionError as exc:
            raise UnsupportedSchemaError("$ref", "#", "schema nested too deeply") from exc
        if args is None:
            raise UnsupportedSchemaError("$ref", "#", "circular reference without a base case")
        name = _lit(json.dumps(tool.name, ensure_ascii=False))
        calls.append(g.define(f"{tool.name}-call", f'"\\"name\\"" {ws} ":" {ws} {name} {ws} "," {ws} "\\"arguments\\"" {ws} ":" {ws} {args}'))
    call = g.define("tool-call", f'{_lit(open_tag)} {ws} "{{" {ws} {_alt(calls)} "}}" {ws} {_lit(close_tag)}')
    return g.text(f"{call} ({ws} {call})*" if parallel else call)


# --- validation --------------------------------------------------------------


def validate(instance: Any, schema: Any) -> list[str]:
    """Errors of ``instance`` against ``schema``, for the subset the converter supports."""
    try:
        return _Validator(schema).errors(instance, schema, "")
    except RecursionError:
        return ["instance or schema nested too deeply"]
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        return [f"schema cannot be checked: {exc!r}"]


_FORMAT_CHECKS = {
    "date": re.compile(r"\d{4}-\d{2}-\d{2}"),
    "time": re.compile(r"\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"),
    "date-time": re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"),
    "uuid": re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "unknown"


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON means it: booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _search(pattern: str, value: str) -> bool:
    """``re.search`` with ECMA-262's ``$``, which matches only at the very end."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        in_class = (in_class and ch != "]") or ch == "["
        out.append("\\Z" if ch == "$" and not in_class else ch)
        i += 1
    try:
        # ECMA-262's \w and \d are ASCII-only, as in the grammar.
        return re.search("".join(out), value, re.ASCII) is not None
    except re.error:
        return False


def _valid_format(fmt: Any, value: str) -> bool:
    if not isinstance(fmt, str):
        return False
    check = _FORMAT_CHECKS.get(fmt)
    if check is None:
        return True
    if not check.fullmatch(value):
        return False
    if fmt in ("date", "date-time"):
        year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        if not (1 <= month <= 12 and 1 <= day <= days[month - 1]):
            return False
    if fmt in ("time", "date-time"):
        clock = value[11:] if fmt == "date-time" else value
        hh, mm, ss = int(clock[0:2]), int(clock[3:5]), int(clock[6:8])
        return hh < 24 and mm < 60 and ss <= 60
    return True


class _Validator:
    """Checks instances against schemas whose $refs resolve in ``root``."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def errors(self, value: Any, schema: Any, where: str) -> list[str]:
        """Every way ``value`` (at instance pointer ``where``) fails ``schema``."""
        at = where or "/"
        if schema is True or schema == {}:
            return []
        if schema is False or not isinstance(schema, dict):
            return [f"{at}: no value is allowed"]
        out: list[str] = []
        if "$ref" in schema:
            out += self.errors(value, self.resolve(schema["$ref"]), where)
        for sub in schema.get("allOf", []):
            out += self.errors(value, sub, where)
        if "anyOf" in schema and not any(not self.errors(value, s, where) for s in schema["anyOf"]):
            out.append(f"{at}: matches no anyOf branch")
        if "oneOf" in schema and sum(not self.errors(value, s, where) for s in schema["oneOf"]) != 1:
            out.append(f"{at}: does not match exactly one oneOf branch")
        if "enum" in schema and not any(_json_equal(value, v) for v in schema["enum"]):
            out.append(f"{at}: not one of the enum values")
        if "const" in schema and not _json_equal(value, schema["const"]):
            out.append(f"{at}: not the const value")
        kind = _json_type(value)
        if "type" in schema:
            allowed = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
            if schema.get("nullable") is True:
                allowed.append("null")
            if kind not in allowed and not (kind == "integer" and "number" in allowed):
                return out + [f"{at}: expected {' or '.join(allowed)}, got {kind}"]
        if kind == "object":
            out += self.object_errors(value, schema, where)
        elif kind == "array":
            out += self.array_errors(value, schema, where)
        elif kind == "string":
            length = len(value)
            low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)
            if not _numbers(low, high):
                out.append(f"{at}: minLength/maxLength are not numbers")
            elif length < low or length > high:
                out.append(f"{at}: length {length} out of range")
            pattern = schema.get("pattern")
            if pattern is not None and (not isinstance(pattern, str) or not _search(pattern, value)):
                out.append(f"{at}: does not match pattern {pattern!r}")
            if "format" in schema and not _valid_format(schema["format"], value):
                out.append(f"{at}: not a valid {schema['format']}")
        elif kind in ("integer", "number"):
            out += self.number_errors(value, schema, at)
        return out

    def resolve(self, ref: str) -> Any:
        node = self.root
        for token in urllib.parse.unquote(ref[1:]).split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            node = node[int(token)] if isinstance(node, list) else node[token]
        return node

    def object_errors(self, value: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
        out = [f"{where or '/'}: missing property {name!r}" for name in schema.get("required", []) if name not in value]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = props.get(name, extra)
            out += self.errors(item, sub, f"{where}/{_pointer_token(name)}")
        return out

    def array_errors(self, value: list[Any], schema: dict[str, Any], where: str) -> list[str]:
        out = []
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            out.append(f"{where or '/'}: {len(value)} items out of range")
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if isinstance(items, list):
            prefix, items = items, schema.get("additionalItems", True)
        for i, item in enumerate(value):
            out += self.errors(item, prefix[i] if i < len(prefix) else items, f"{where}/{i}")
        return out

    def number_errors(self, value: float, schema: dict[str, Any], at: str) -> list[str]:
        out = []
        for key, exclusive_key, below in (("minimum", "exclusiveMinimum", True), ("maximum", "exclusiveMaximum", False)):
            bound, excl = schema.get(key), schema.get(exclusive_key)
            checks = []
            if isinstance(bound, (int, float)) and not isinstance(bound, bool):
                checks.append((bound, excl is True))
            if isinstance(excl, (int, float)) and not isinstance(excl, bool):
                checks.append((excl, True))
            for b, strict in checks:
                bad = (value < b or (strict and value == b)) if below else (value > b or (strict and value == b))
                if bad:
                    out.append(f"{at}: {value} violates {exclusive_key if strict else key} {b}")
        return out
