"""JSON Schema to GBNF: grammar syntax, accepted and rejected instances, errors."""

from __future__ import annotations

import calendar
import ctypes
import json
from typing import Any

import pytest
from gbnf_matcher import GrammarError, matches, parse
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.prompt.grammar import (
    JSON_GRAMMAR,
    UnsupportedSchemaError,
    json_grammar,
    schema_to_gbnf,
    tool_call_grammar,
    validate,
)
from mullama.types import Tool

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


try:
    from jsonschema import Draft202012Validator
except ImportError:  # the cross-check is optional
    Draft202012Validator = None


def valid(instance: Any, schema: Any) -> bool:
    """Our validator's verdict, checked against the jsonschema package where installed."""
    ours = validate(instance, schema) == []
    if Draft202012Validator is not None and ours:
        assert Draft202012Validator(schema).is_valid(instance), (schema, instance)
    return ours


def dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def accepts(schema: Any, value: Any, indent: int | None = None) -> bool:
    return matches(schema_to_gbnf(schema), dumps(value, indent))


# --- strategies: a schema together with instances valid for it ---------------

NAMES = st.sampled_from(["a", "b", "id", "name", "x_y", "with space", 'q"uote', "é", "a/b", ""])
JSON_LEAVES = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
PATTERNS = ["^[a-z]+$", "^\\d{3}-\\d{2}$", "^(ab|cd)*x?$", "[0-9]", "^a.c$", "^[^\"\\\\]{2,4}$", '^"\\\\$', "^\\w+@\\w+\\.com$"]


def times() -> st.SearchStrategy[str]:
    offsets = st.sampled_from(["Z", "+01:00", "-05:30"])
    fraction = st.sampled_from(["", ".5", ".123456"])
    return st.builds(lambda t, f, o: t.strftime("%H:%M:%S") + f + o, st.times(), fraction, offsets)


@st.composite
def leaf(draw: st.DrawFn) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
    kind = draw(st.sampled_from(["string", "format", "pattern", "integer", "number", "boolean", "null", "enum", "const", "any", "nullable"]))
    if kind == "string":
        lo = draw(st.integers(0, 3))
        hi = draw(st.none() | st.integers(lo, 6))
        schema: dict[str, Any] = {"type": "string", "minLength": lo}
        if hi is not None:
            schema["maxLength"] = hi
        return schema, st.text(min_size=lo, max_size=hi if hi is not None else 8)
    if kind == "format":
        fmt = draw(st.sampled_from(["date", "time", "date-time", "uuid"]))
        values = {
            "date": st.dates().map(lambda d: d.isoformat()),
            "time": times(),
            "date-time": st.builds(lambda d, t: f"{d.isoformat()}T{t}", st.dates(), times()),
            "uuid": st.uuids().map(str),
        }[fmt]
        return {"type": "string", "format": fmt}, values
    if kind == "pattern":
        pattern = draw(st.sampled_from(PATTERNS))
        alphabet = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        # Python's $ also matches before a final newline, ECMA-262's does not.
        return {"type": "string", "pattern": pattern}, st.from_regex(pattern, alphabet=alphabet).filter(lambda v: "\n" not in v)
    if kind in ("integer", "number"):
        lo = draw(st.none() | st.integers(-10**6, 10**6))
        hi = draw(st.none() | st.integers(lo if lo is not None else -10**6, 10**6))
        schema = {"type": kind}
        if lo is not None:
            schema["minimum"] = lo
        if hi is not None:
            schema["maximum"] = hi
        ints = st.integers(lo if lo is not None else -10**15, hi if hi is not None else 10**15)
        if kind == "integer":
            return schema, ints
        quarters = ints.flatmap(lambda i: st.sampled_from([0, 0.25, 0.5]).map(lambda f: i + f))
        in_range = quarters.filter(lambda v: (lo is None or v >= lo) and (hi is None or v <= hi))
        if lo is None and hi is None:
            return schema, st.floats(allow_nan=False, allow_infinity=False) | ints
        return schema, in_range
    if kind == "enum":
        values = draw(st.lists(JSON_VALUES, min_size=1, max_size=4))
        return {"enum": values}, st.sampled_from(values)
    if kind == "const":
        value = draw(JSON_VALUES)
        return {"const": value}, st.just(value)
    if kind == "any":
        return {}, JSON_VALUES
    if kind == "nullable":
        return {"type": ["string", "null"]}, st.none() | st.text(max_size=4)
    return {"type": kind}, st.booleans() if kind == "boolean" else st.none()


def objects(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
        names = draw(st.lists(NAMES, unique=True, max_size=4))
        props = [(name, draw(children)) for name in names]
        required = [n for n in names if draw(st.booleans())]
        extra_choice = draw(st.sampled_from(["absent", "false", "true", "schema"]))
        schema: dict[str, Any] = {"type": "object", "properties": {n: s for n, (s, _) in props}, "required": required}
        extra_values: st.SearchStrategy[Any] | None = None
        if extra_choice == "false":
            schema["additionalProperties"] = False
        elif extra_choice == "true":
            schema["additionalProperties"] = True
            extra_values = JSON_VALUES
        elif extra_choice == "schema":
            schema["additionalProperties"] = {"type": "integer"}
            extra_values = st.integers(-5, 5)

        @st.composite
        def instance(draw2: st.DrawFn) -> dict[str, Any]:
            out = {}
            for name, (_, values) in props:
                if name in required or draw2(st.booleans()):
                    out[name] = draw2(values)
            if extra_values is not None:
                for key in draw2(st.lists(st.text(max_size=4), max_size=2, unique=True)):
                    if key not in out and key not in names:
                        out[key] = draw2(extra_values)
            return out

        return schema, instance()

    return build()


def arrays(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
        prefix = draw(st.lists(children, max_size=2))
        item_schema, item_values = draw(children)
        closed = draw(st.booleans()) and bool(prefix)
        lo = draw(st.integers(0, len(prefix) if closed else 3))
        hi = draw(st.none() | st.integers(lo, len(prefix) if closed else 4))
        schema: dict[str, Any] = {"type": "array", "minItems": lo}
        if prefix:
            schema["prefixItems"] = [s for s, _ in prefix]
        schema["items"] = False if closed else item_schema
        if hi is not None:
            schema["maxItems"] = hi
        top = min(hi if hi is not None else 4, len(prefix) if closed else 4)

        @st.composite
        def instance(draw2: st.DrawFn) -> list[Any]:
            n = draw2(st.integers(lo, top))
            return [draw2(prefix[i][1] if i < len(prefix) else item_values) for i in range(n)]

        return schema, instance()

    return build()


def unions(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
        branches = draw(st.lists(children, min_size=1, max_size=3))
        return {"anyOf": [s for s, _ in branches]}, st.one_of([v for _, v in branches])

    return build()


SCHEMAS = st.recursive(leaf(), lambda c: objects(c) | arrays(c) | unions(c), max_leaves=6)


@st.composite
def with_refs(draw: st.DrawFn) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
    """A schema reached through ``$defs`` (or ``definitions``) from an array."""
    schema, values = draw(SCHEMAS)
    where = draw(st.sampled_from(["$defs", "definitions"]))
    root = {where: {"Thing": schema}, "type": "array", "items": {"$ref": f"#/{where}/Thing"}, "maxItems": 2}
    return root, st.lists(values, max_size=2)


# --- valid instances are accepted ------------------------------------------


@FAST
@given(st.data(), SCHEMAS | with_refs())
def test_valid_instances_are_accepted(data: st.DataObject, pair: tuple[dict[str, Any], Any]) -> None:
    schema, values = pair
    grammar = parse(schema_to_gbnf(schema))
    instance = data.draw(values)
    assert valid(instance, schema), (schema, instance)
    for indent in (None, 2):
        assert matches(grammar, dumps(instance, indent)), (schema, instance)


@FAST
@given(st.data(), SCHEMAS)
def test_other_values_are_accepted_only_if_valid(data: st.DataObject, pair: tuple[dict[str, Any], Any]) -> None:
    schema, values = pair
    grammar = schema_to_gbnf(schema)
    for other in (data.draw(JSON_VALUES), _mutate(data.draw(values))):
        if matches(grammar, dumps(other)):
            assert valid(other, schema), (schema, other)


def _mutate(value: Any) -> Any:
    """A nearby value, often invalid: a changed type, a dropped key, a shifted number."""
    if isinstance(value, dict) and value:
        return dict(list(value.items())[1:])
    if isinstance(value, list):
        return value + value[:1] if value else [None]
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, (int, float)):
        return value + 1
    return value + "x" if value else 1


# --- exact keywords: the grammar accepts exactly the valid instances --------


@settings(max_examples=300, deadline=None)
@given(st.integers(-3000, 3000), st.integers(0, 3000), st.integers(-4000, 4000), st.booleans(), st.booleans())
def test_integer_ranges_are_exact(lo: int, width: int, value: int, has_lo: bool, has_hi: bool) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    if has_lo:
        schema["minimum"] = lo
    if has_hi:
        schema["maximum"] = lo + width
    assert accepts(schema, value) == valid(value, schema)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(-10, 10**12 + 10))
def test_large_integer_ranges_are_exact(a: int, b: int, value: int) -> None:
    schema = {"type": "integer", "exclusiveMinimum": min(a, b) - 1, "exclusiveMaximum": max(a, b) + 1}
    assert accepts(schema, value) == (min(a, b) <= value <= max(a, b))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.floats(-100, 100)),
    st.one_of(st.none(), st.floats(-100, 100)),
    st.booleans(),
    st.floats(-150, 150) | st.integers(-150, 150),
)
def test_bounded_numbers_are_sound(lo: float | None, hi: float | None, exclusive: bool, value: float) -> None:
    schema: dict[str, Any] = {"type": "number"}
    if lo is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = lo
    if hi is not None:
        schema["exclusiveMaximum" if exclusive else "maximum"] = hi
    try:
        grammar = schema_to_gbnf(schema)
    except UnsupportedSchemaError:
        assume(False)
    if matches(grammar, dumps(value)):
        assert validate(value, schema) == [], (schema, value)


def test_number_sign_constraints() -> None:
    positive = {"type": "number", "minimum": 0}
    assert accepts(positive, 0) and accepts(positive, 0.5) and accepts(positive, 12345.25)
    assert not accepts(positive, -0.5) and not accepts(positive, -1)
    negative = {"type": "number", "exclusiveMaximum": 0}
    assert accepts(negative, -0.5) and accepts(negative, -3)
    assert not accepts(negative, 0) and not accepts(negative, 0.25)
    unit = {"type": "number", "minimum": 0, "maximum": 1}
    assert accepts(unit, 0.999) and accepts(unit, 1) and not accepts(unit, 1.5)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 5), st.integers(0, 5), st.text(max_size=8))
def test_string_lengths_are_exact(lo: int, extra: int, value: str) -> None:
    schema = {"type": "string", "minLength": lo, "maxLength": lo + extra}
    assert accepts(schema, value) == (lo <= len(value) <= lo + extra)


def test_long_strings_are_chunked_for_llama_cpp() -> None:
    schema = {"type": "string", "minLength": 1500, "maxLength": 3100}
    grammar = parse(schema_to_gbnf(schema))
    for n, ok in ((1499, False), (1500, True), (2000, True), (2999, True), (3100, True), (3101, False)):
        assert matches(grammar, dumps("x" * n)) is ok, n
    with pytest.raises(UnsupportedSchemaError, match="maxLength"):
        schema_to_gbnf({"type": "string", "maxLength": 10**9})


@settings(max_examples=150, deadline=None)
@given(st.lists(JSON_VALUES, min_size=1, max_size=5), JSON_VALUES)
def test_enums_are_exact(values: list[Any], candidate: Any) -> None:
    schema = {"enum": values}
    assert accepts(schema, candidate) == valid(candidate, schema)
    assert all(accepts(schema, v) for v in values)


def test_enum_values_are_filtered_by_type() -> None:
    schema = {"type": "string", "enum": ["a", 1, None, "b"]}
    assert accepts(schema, "a") and accepts(schema, "b")
    assert not accepts(schema, 1) and not accepts(schema, None)
    with pytest.raises(UnsupportedSchemaError, match='"enum"'):
        schema_to_gbnf({"type": "string", "enum": [1, 2]})


KEYS = st.sampled_from(["a", "b", "c", "d", 'e"', "zz"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(KEYS, unique=True, max_size=4),
    st.lists(KEYS, unique=True, max_size=4),
    st.dictionaries(KEYS, st.integers(0, 3), max_size=5),
    st.sampled_from([False, True, {"type": "integer", "maximum": 1}]),
)
def test_object_keywords_are_exact(names: list[str], required: list[str], given_value: dict[str, int], extra: Any) -> None:
    required = [r for r in required if r in names]
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": required, "additionalProperties": extra}
    # The grammar wants declared properties first, in order, and extra ones after.
    instance = {n: given_value[n] for n in names if n in given_value}
    instance.update((k, v) for k, v in given_value.items() if k not in names)
    assert accepts(schema, instance) == valid(instance, schema), (schema, instance)


def test_object_rejections() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name"],
        "additionalProperties": False,
    }
    assert accepts(schema, {"name": "Ann", "age": 30})
    assert accepts(schema, {"name": "Ann"})
    assert not accepts(schema, {"age": 30})  # missing required
    assert not accepts(schema, {"name": "Ann", "age": 151})  # out of range
    assert not accepts(schema, {"name": 5})  # wrong type
    assert not accepts(schema, {"name": "Ann", "nick": "A"})  # extra property
    assert not accepts(schema, ["Ann"])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3), st.lists(st.integers(0, 9), max_size=7))
def test_array_counts_are_exact(lo: int, extra: int, value: list[int]) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": lo, "maxItems": lo + extra}
    assert accepts(schema, value) == (lo <= len(value) <= lo + extra)


def test_prefix_items() -> None:
    schema = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 1}
    assert accepts(schema, ["a", 1]) and accepts(schema, ["a"])
    assert not accepts(schema, []) and not accepts(schema, ["a", 1, 2]) and not accepts(schema, [1])
    tuple_form = {"type": "array", "items": [{"type": "boolean"}], "additionalItems": {"type": "null"}}
    assert accepts(tuple_form, [True, None, None]) and not accepts(tuple_form, [True, 1])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 9999) | st.sampled_from([0, 1900, 2000, 2100, 2400]), st.integers(0, 13), st.integers(0, 32))
@example(1900, 2, 29)
@example(2000, 2, 29)
@example(1996, 2, 29)
def test_dates_are_exact(year: int, month: int, day: int) -> None:
    text = f"{year:04d}-{month:02d}-{day:02d}"
    expected = 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 2000, month)[1] if 1 <= month <= 12 else False
    assert accepts({"type": "string", "format": "date"}, text) == (validate(text, {"format": "date"}) == []) == expected


def test_formats() -> None:
    assert accepts({"format": "date", "type": "string"}, "2024-02-29")
    assert not accepts({"format": "date", "type": "string"}, "2023-02-29")
    assert not accepts({"format": "date", "type": "string"}, "1900-02-29")
    assert accepts({"format": "date", "type": "string"}, "2000-02-29")
    assert accepts({"type": "string", "format": "date-time"}, "2024-05-01T13:45:00.25+02:00")
    assert not accepts({"type": "string", "format": "date-time"}, "2024-05-01 13:45:00")
    assert accepts({"type": "string", "format": "time"}, "23:59:59Z")
    assert not accepts({"type": "string", "format": "time"}, "24:00:00Z")
    assert accepts({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000")
    assert not accepts({"type": "string", "format": "uuid"}, "123e4567e89b12d3a456426614174000")


REGEXES = [
    "^[a-c]{1,3}$", "^(ab|c)+d?$", "^x\\.y$", "^[^a-z]*$", "^a.b$", "^\\d+(\\.\\d{1,2})?$", "ab", "^(?:a|b)c*$",
    '^["\\\\]+$', "^\\s\\S\\w\\W$", "^[\\x41-\\x43]\\u0044$", "a{2,}$", "^$", "^a|b$", "^[-+]?\\d*$",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REGEXES), st.text(alphabet='abcdxy.+-1 "\\\n\u00e9ABCD_', max_size=6))
def test_patterns_are_exact(pattern: str, value: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    assert accepts(schema, value) == valid(value, schema), (pattern, value)


@FAST
@given(st.sampled_from(REGEXES).flatmap(lambda p: st.tuples(st.just(p), st.from_regex(p, alphabet="abcdxy.+-19 \"\\\tABCD_").filter(lambda v: "\n" not in v))))
def test_pattern_matches_are_accepted(pair: tuple[str, str]) -> None:
    pattern, value = pair
    assert accepts({"type": "string", "pattern": pattern}, value)


def test_nullable_and_type_lists() -> None:
    for schema in ({"type": ["string", "null"]}, {"type": "string", "nullable": True}):
        assert accepts(schema, None) and accepts(schema, "x") and not accepts(schema, 1)
    both = {"type": ["integer", "boolean"], "minimum": 3}
    assert accepts(both, 3) and accepts(both, True) and not accepts(both, 2)


def test_all_of_merges_objects() -> None:
    schema = {
        "$defs": {"Named": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "allOf": [{"$ref": "#/$defs/Named"}, {"properties": {"age": {"type": "integer"}}, "required": ["age"]}],
    }
    assert accepts(schema, {"name": "a", "age": 1})
    assert not accepts(schema, {"name": "a"}) and not accepts(schema, {"age": 1})
    closed = {"allOf": [{"properties": {"a": {}}, "additionalProperties": False}, {"properties": {"b": {}}}]}
    assert accepts(closed, {"a": 1}) and not accepts(closed, {"a": 1, "b": 2})
    with pytest.raises(UnsupportedSchemaError, match='"type"'):
        schema_to_gbnf({"allOf": [{"type": "string"}, {"type": "integer"}]})


def test_any_of_with_shared_properties() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    assert accepts(schema, {"a": 1}) and accepts(schema, {"b": 1}) and accepts(schema, {"a": 1, "b": 2})
    assert not accepts(schema, {})


def test_recursive_refs() -> None:
    tree = {
        "$ref": "#/definitions/node",
        "definitions": {
            "node": {
                "type": "object",
                "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/definitions/node"}}},
                "required": ["value"],
                "additionalProperties": False,
            }
        },
    }
    value = {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}, {"value": 4}]}
    assert accepts(tree, value) and accepts(tree, value, indent=2)
    assert not accepts(tree, {"value": 1, "children": [{"children": []}]})
    linked = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]}
    assert accepts(linked, {"next": {"next": None}})


def test_left_recursive_refs() -> None:
    # X = X | null has the least solution null; X = X has none.
    assert accepts({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, None)
    loop = {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "string"}]}, "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "boolean"}]}}, "$ref": "#/$defs/a"}
    grammar = parse(schema_to_gbnf(loop))
    assert matches(grammar, '"s"') and matches(grammar, "true") and not matches(grammar, "1")
    for hostile in ({"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, {"allOf": [{"$ref": "#"}]}):
        with pytest.raises(UnsupportedSchemaError, match='"\\$ref"'):
            schema_to_gbnf(hostile)


def test_any_value_and_json_grammar() -> None:
    for schema in ({}, True, {"description": "anything"}):
        grammar = parse(schema_to_gbnf(schema))
        for value in (None, 1, -2.5e-7, "s", [1, {"a": []}], {"k": [True]}):
            assert matches(grammar, dumps(value)) and matches(grammar, dumps(value, 2))
    assert JSON_GRAMMAR == json_grammar()
    grammar = parse(JSON_GRAMMAR)
    assert matches(grammar, '{"a": [1, 2, {"b": null}], "c": "\\u00e9\\n"}')
    assert matches(grammar, '{\n  "a": 1\n}')
    assert not matches(grammar, "[1]") and not matches(grammar, '{"a": 1,}') and not matches(grammar, "{'a': 1}")


def test_whitespace_is_bounded() -> None:
    grammar = parse(schema_to_gbnf({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert matches(grammar, '{ "a": 1 }') and matches(grammar, '{\n\t\t"a":1\n}')
    assert not matches(grammar, '{  "a": 1}')
    assert not matches(grammar, '{"a":' + "\n" + " " * 21 + "1}")
    assert not matches(grammar, '{"a": 1}\n\n')


# --- grammar text ----------------------------------------------------------


@FAST
@given(SCHEMAS | with_refs())
def test_grammars_define_every_rule_and_a_root(pair: tuple[dict[str, Any], Any]) -> None:
    text = schema_to_gbnf(pair[0])
    grammar = parse(text)  # raises on undefined rules or a missing root
    assert "root" in grammar.rules
    assert grammar.references() <= set(grammar.rules)
    names = [line.split(" ::= ")[0] for line in text.splitlines()]
    assert len(names) == len(set(names))


def test_matcher_catches_broken_grammars() -> None:
    with pytest.raises(GrammarError):
        parse('root ::= missing\n')
    with pytest.raises(GrammarError):
        parse('item ::= "a"\n')
    with pytest.raises(GrammarError):
        matches('root ::= root "a" | "b"\n', "ba")
    assert matches('root ::= "a"{2,3} [^x]? # comment\n', "aab")


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "keyword", "path"),
    [
        ({"type": "object", "properties": {"x": {"type": "object", "patternProperties": {"a": {}}}}}, "patternProperties", "#/properties/x"),
        ({"type": "array", "items": {"not": {}}}, "not", "#/items"),
        ({"type": "string", "format": "email"}, "format", "#"),
        ({"type": "string", "pattern": "^(?=a)"}, "pattern", "#"),
        ({"type": "string", "pattern": "(a"}, "pattern", "#"),
        ({"type": "string", "pattern": "\\1"}, "pattern", "#"),
        ({"type": "string", "pattern": "^(a*)*$"}, "pattern", "#"),
        ({"type": "string", "pattern": "a^b"}, "pattern", "#"),
        ({"$ref": "#/$defs/missing"}, "$ref", "#"),
        ({"$ref": "https://example.com/schema"}, "$ref", "#"),
        ({"type": "integer", "minimum": "3"}, "minimum", "#"),
        ({"type": "widget"}, "type", "#"),
        ({"properties": {"a/b": {"uniqueItems": True}}}, "uniqueItems", "#/properties/a~1b"),
        ({"$defs": {"x": {"if": {}}}, "$ref": "#/$defs/x"}, "if", "#/$defs/x"),
        ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "required", "#"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems", "#"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum", "#"),
        ({"enum": "abc"}, "enum", "#"),
        ({"anyOf": []}, "anyOf", "#"),
        (False, "false", "#"),
        ([1, 2], "type", "#"),
    ],
)
def test_unsupported_keywords_are_named(schema: Any, keyword: str, path: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as info:
        schema_to_gbnf(schema)
    assert info.value.keyword == keyword and info.value.path == path
    assert f'"{keyword}" at {path}' in str(info.value)
    assert isinstance(info.value, BadRequestError) and info.value.status == 400


def test_hostile_schemas() -> None:
    deep: Any = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(UnsupportedSchemaError):
        schema_to_gbnf(deep)
    chain = {"$defs": {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(3000)}, "$ref": "#/$defs/d0"}
    chain["$defs"]["d3000"] = {"type": "null"}
    with pytest.raises(UnsupportedSchemaError):
        schema_to_gbnf(chain)
    big_enum = {"enum": list(range(20000))}
    grammar = schema_to_gbnf(big_enum)
    assert matches(grammar, "19999") and not matches(grammar, "20000")
    with pytest.raises(UnsupportedSchemaError, match="enum"):
        schema_to_gbnf({"enum": [float("nan")]})


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.sampled_from(["object", "array", "string", "#", "#/$defs/a", "^a+$", "date"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "prefixItems", "required", "enum", "const", "anyOf", "oneOf", "allOf",
                         "$ref", "$defs", "a", "minimum", "maximum", "minLength", "maxItems", "pattern", "format",
                         "additionalProperties", "nullable", "exclusiveMinimum"]),
        inner,
        max_size=4,
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(JUNK)
def test_junk_schemas_give_a_grammar_or_the_schema_error(schema: Any) -> None:
    try:
        text = schema_to_gbnf(schema)
    except UnsupportedSchemaError:
        return
    parse(text)


# --- tool calls -------------------------------------------------------------

WEATHER = Tool(
    name="get_weather",
    description="Weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
)
CLOCK = Tool(name="time.now", parameters={"type": "object", "properties": {}})
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_text(name: str, arguments: Any) -> str:
    return f'{OPEN}\n{json.dumps({"name": name, "arguments": arguments})}\n{CLOSE}'


def test_tool_call_grammar() -> None:
    grammar = parse(tool_call_grammar([WEATHER, CLOCK], forced=None, open_tag=OPEN, close_tag=CLOSE))
    weather = call_text("get_weather", {"city": "Paris", "unit": "c"})
    clock = call_text("time.now", {})
    assert matches(grammar, weather) and matches(grammar, clock)
    assert matches(grammar, weather + "\n" + clock)
    assert not matches(grammar, call_text("get_weather", {"unit": "c"}))
    assert not matches(grammar, call_text("get_weather", {"city": "Paris", "unit": "k"}))
    assert not matches(grammar, call_text("nope", {}))
    assert not matches(grammar, "")
    assert not matches(grammar, "Sure! " + weather)
    forced = parse(tool_call_grammar([WEATHER, CLOCK], forced="time.now", open_tag=OPEN, close_tag=CLOSE))
    assert matches(forced, clock) and not matches(forced, weather)


def test_tool_call_grammar_errors_and_refs() -> None:
    with pytest.raises(BadRequestError, match="nope"):
        tool_call_grammar([WEATHER], forced="nope", open_tag=OPEN, close_tag=CLOSE)
    with pytest.raises(BadRequestError):
        tool_call_grammar([], forced=None, open_tag=OPEN, close_tag=CLOSE)
    with pytest.raises(UnsupportedSchemaError, match='"type"'):
        tool_call_grammar([Tool(name="t", parameters={"type": "string"})], forced=None, open_tag=OPEN, close_tag=CLOSE)
    # Each tool's $refs resolve against its own parameters.
    a = Tool(name="a", parameters={"$defs": {"X": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "required": ["x"]})
    b = Tool(name="b", parameters={"$defs": {"X": {"type": "string"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "required": ["x"]})
    grammar = parse(tool_call_grammar([a, b], forced=None, open_tag="[CALL]", close_tag="[/CALL]"))
    assert matches(grammar, '[CALL]{"name": "a", "arguments": {"x": 1}}[/CALL]')
    assert matches(grammar, '[CALL]{"name": "b", "arguments": {"x": "1"}}[/CALL]')
    assert not matches(grammar, '[CALL]{"name": "a", "arguments": {"x": "1"}}[/CALL]')


# --- llama.cpp's own parser -------------------------------------------------


def _libllama() -> ctypes.CDLL:
    from mullama.ffi import load

    return load().llama


@FAST
@given(SCHEMAS | with_refs())
def test_llama_cpp_parses_the_grammars(pair: tuple[dict[str, Any], Any]) -> None:
    lib = _libllama()
    extra = [
        JSON_GRAMMAR,
        schema_to_gbnf({"type": "string", "minLength": 1500, "maxLength": 3100}),
        schema_to_gbnf({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}}),
        tool_call_grammar([WEATHER, CLOCK], forced=None, open_tag=OPEN, close_tag=CLOSE),
    ]
    for text in [schema_to_gbnf(pair[0]), *extra]:
        sampler = lib.llama_sampler_init_grammar(None, text.encode(), b"root")
        assert sampler, text
        lib.llama_sampler_free(sampler)


def test_tool_call_grammar_without_parallel_ends_after_one_call() -> None:
    single = parse(tool_call_grammar([WEATHER, CLOCK], forced=None, open_tag=OPEN, close_tag=CLOSE, parallel=False))
    several = parse(tool_call_grammar([WEATHER, CLOCK], forced=None, open_tag=OPEN, close_tag=CLOSE))
    call = OPEN + '{"name": "time.now", "arguments": {}}' + CLOSE
    assert matches(single, call) and matches(several, call)
    assert matches(several, call + "\n" + call)
    assert not matches(single, call + "\n" + call)
