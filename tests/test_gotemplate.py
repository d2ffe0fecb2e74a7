"""Go text/template semantics of mullama.prompt.gotemplate."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.prompt.gotemplate import (
    MAX_NESTING,
    Template,
    TemplateError,
    format_float,
    go_quote,
    go_unquote,
    marshal_json,
    sprint,
    sprintf,
)


def render(text: str, data: object = None, **options: object) -> str:
    return Template.parse(text, "t", **options).execute(data)


def error_of(text: str, data: object = None, **options: object) -> str:
    with pytest.raises(TemplateError) as info:
        render(text, data, **options)
    return str(info.value)


@dataclass
class Point:
    X: int
    Y: int


@dataclass
class Named:
    Name: str
    Tags: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"<{self.Name}>"


# ---------------------------------------------------------------- text, actions, trimming


def test_text_and_fields():
    assert render("Hi {{ .Name }}, {{ .User.Age }}!", {"Name": "Ann", "User": {"Age": 7}}) == "Hi Ann, 7!"


def test_trim_markers_remove_all_adjacent_white_space():
    assert render("{{23 -}} < {{- 45}}") == "23<45"
    assert render("a \n\t {{- .X -}} \r\n b", {"X": "x"}) == "axb"


def test_minus_without_space_is_a_negative_number():
    assert render("a {{-3}} b") == "a -3 b"


def test_comments_print_nothing_and_can_trim():
    assert render("a {{/* note */}} b") == "a  b"
    assert render("a {{- /* note */ -}} b") == "ab"
    assert "comment ends before closing delimiter" in error_of("{{/* x */ .X}}")
    assert "unclosed comment" in error_of("{{/* x")


def test_missing_map_key_prints_no_value():
    assert render("{{ .Nope }}", {}) == "<no value>"
    assert render("{{ .Nope }}", {}, missingkey="zero") == "<no value>"
    assert "map has no entry for key" in error_of("{{ .Nope }}", {}, missingkey="error")


def test_field_of_nil_is_an_error_but_field_of_missing_is_not():
    assert render("{{ .A.B }}", {}) == "<no value>"
    assert "nil pointer evaluating interface {}.B" in error_of("{{ .A.B }}", {"A": None})
    assert "nil pointer evaluating" in error_of("{{ .A.B }}", {}, missingkey="zero")


def test_nil_data_has_only_missing_fields():
    assert render("{{ .A.B }}|{{ . }}") == "<no value>|<no value>"


def test_struct_fields_and_unknown_field():
    assert render("{{ .X }},{{ .Y }}", Point(1, 2)) == "1,2"
    assert "can't evaluate field Z in type Point" in error_of("{{ .Z }}", Point(1, 2))


def test_dollar_is_the_data_everywhere():
    data = {"L": [1, 2], "K": "k"}
    assert render("{{ range .L }}{{ $.K }}{{ . }}{{ end }}", data) == "k1k2"


# ---------------------------------------------------------------- printing values


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (True, "true"),
        (42, "42"),
        (1.0, "1"),
        (0.1, "0.1"),
        (1e6, "1e+06"),
        (123456.0, "123456"),
        (1234567.0, "1.234567e+06"),
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (float("inf"), "+Inf"),
        ([1, "a", None], "[1 a <nil>]"),
        ({"b": 2, "a": [1]}, "map[a:[1] b:2]"),
        (Point(3, 4), "{3 4}"),
        (Named("n"), "<n>"),
        ([Named("n")], "[<n>]"),
        (b"hi", "[104 105]"),
    ],
)
def test_values_print_like_fmt_sprint(value, printed):
    assert render("{{ .V }}", {"V": value}) == printed


def test_print_and_println_spacing():
    assert render('{{ print 1 2 "a" "b" 3 nil }}') == "1 2ab3 <nil>"
    assert render('{{ println 1 "a" }}') == "1 a\n"
    assert sprint("a", 1, 2, "b") == "a1 2b"


# ---------------------------------------------------------------- printf


@pytest.mark.parametrize(
    ("fmt", "args", "out"),
    [
        ("%d|%5d|%-5d|%05d|%+d", [42, 42, 42, -42, 42], "42|   42|42   |-0042|+42"),
        ("%x %X %#x %o %b %c %q %U", [255, 255, 255, 8, 5, 65, 65, 65], "ff FF 0xff 10 101 A 'A' U+0041"),
        ("%s|%10s|%-4s|%.2s|%q", ["go", "go", "go", "gopher", 'a"b\n'], 'go|        go|go  |go|"a\\"b\\n"'),
        ("%f %.2f %e %g %.3g %8.3f", [3.14159, 3.14159, 1234.5678, 1e21, 3.14159, 2.5], "3.141590 3.14 1.234568e+03 1e+21 3.14    2.500"),
        ("%t %v %v", [True, [1, 2], {"k": "v"}], "true [1 2] map[k:v]"),
        ("%%|%d %s", [1], "%|1 %!s(MISSING)"),
        ("%d", [1, "x"], "1%!(EXTRA string=x)"),
        ("%d %s %f", ["s", 5, 1], "%!d(string=s) %!s(int=5) %!f(int=1)"),
        ("%v %s %d", [None, None, [1, 2]], "<nil> %!s(<nil>) [1 2]"),
        ("%*d|%-*d", [4, 7, 3, 7], "   7|7  "),
        ("%T %T %T %T", [1, "s", 1.5, [1]], "int string float64 []interface {}"),
        ("end%", [], "end%!(NOVERB)"),
    ],
)
def test_printf_verbs(fmt, args, out):
    assert sprintf(fmt, *args) == out


def test_printf_in_a_template_and_from_a_pipeline():
    assert render('{{ printf "%s=%d" "a" 1 }}') == "a=1"
    assert render('{{ .N | printf "%03d" }}', {"N": 7}) == "007"
    assert "wrong type for value; expected string" in error_of("{{ printf 3 }}")


# ---------------------------------------------------------------- control structures


def test_if_else_if_chain():
    t = '{{ if eq .R "a" }}A{{ else if eq .R "b" }}B{{ else }}C{{ end }}'
    assert [render(t, {"R": r}) for r in "abz"] == ["A", "B", "C"]


@pytest.mark.parametrize(
    ("value", "truth"),
    [(0, False), (1, True), (0.0, False), ("", False), ("x", True), ([], False), ([0], True),
     ({}, False), ({"a": 1}, True), (None, False), (Point(0, 0), True), (False, False)],
)
def test_truthiness(value, truth):
    assert render("{{ if .V }}T{{ else }}F{{ end }}", {"V": value}) == ("T" if truth else "F")


def test_with_sets_dot_and_else_with():
    t = "{{ with .A }}a={{ . }}{{ else with .B }}b={{ . }}{{ else }}none{{ end }}"
    assert render(t, {"A": 1}) == "a=1"
    assert render(t, {"B": 2}) == "b=2"
    assert render(t, {}) == "none"


def test_range_over_slices_maps_and_ints():
    assert render("{{ range .L }}<{{ . }}>{{ end }}", {"L": [3, 4]}) == "<3><4>"
    assert render("{{ range $i, $v := .L }}{{ $i }}:{{ $v }} {{ end }}", {"L": ["a", "b"]}) == "0:a 1:b "
    assert render("{{ range $k, $v := . }}{{ $k }}={{ $v }};{{ end }}", {"b": 1, "a": 2}) == "a=2;b=1;"
    assert render("{{ range 3 }}{{ . }}{{ end }}") == "012"
    assert render("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}) == "empty"
    assert render("{{ range .Nope }}x{{ else }}empty{{ end }}", {}) == "empty"
    assert "range can't iterate over" in error_of("{{ range .S }}{{ end }}", {"S": "abc"})


def test_break_and_continue():
    t = "{{ range . }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ end }}"
    assert render(t, [1, 2, 3, 4, 5]) == "13"
    assert "{{break}} outside {{range}}" in error_of("{{ break }}")


def test_variables_scope_and_assignment():
    assert render("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ end }}{{ $x }}") == "2"
    assert 'undefined variable "$y"' in error_of("{{ if true }}{{ $y := 3 }}{{ end }}{{ $y }}")
    assert render("{{ range $i, $e := . }}{{ end }}{{ $x := 5 }}{{ $x }}", [1]) == "5"


def test_define_template_and_block():
    t = '{{ define "T" }}[{{ . }}]{{ end }}{{ template "T" .A }}{{ block "B" .A }}<{{ . }}>{{ end }}'
    assert render(t, {"A": 1}) == "[1]<1>"
    assert render('{{ define "T" }}{{ . }}{{ end }}{{ template "T" }}') == "<no value>"
    assert 'template "U" not defined' in error_of('{{ template "U" }}')
    assert "multiple definition" in error_of('{{ define "T" }}a{{ end }}{{ define "T" }}b{{ end }}')


def test_template_calls_see_no_caller_variables():
    assert 'undefined variable "$x"' in error_of('{{ define "T" }}{{ $x }}{{ end }}{{ $x := 1 }}{{ template "T" }}')


def test_parenthesised_pipelines_and_chains():
    data = {"A": {"B": 1}, "L": [{"B": 2}]}
    assert render("{{ (.A).B }} {{ (index .L 0).B }} {{ (len .L) }}", data) == "1 2 1"
    assert render('{{ "x" | printf "%s%s" "y" }}') == "yx"


def test_literals():
    assert render("{{ 'a' }} {{ 1.5 }} {{ 0x1F }} {{ 0o17 }} {{ 017 }} {{ 1_000 }} {{ 1e3 }}") == "97 1.5 31 15 15 1000 1000"
    assert render(r'{{ "tab\tq\"\u00e9\x41\101" }}') == 'tab\tq"éAA'
    assert render("{{ `raw\\n` }}") == "raw\\n"
    assert render("{{ true }} {{ false }}") == "true false"
    assert "nil is not a command" in error_of("{{ nil }}")


# ---------------------------------------------------------------- builtins


def test_comparisons():
    assert render("{{ eq 1 1 }} {{ eq 1 2 3 1 }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge 2 2 }}") == (
        "true true true true true false true"
    )
    assert render('{{ lt "a" "b" }} {{ eq .Missing "x" }} {{ eq .Missing .Other }}', {}) == "true false true"
    assert "incompatible types for comparison" in error_of("{{ eq 1 1.0 }}")
    assert "invalid type for comparison" in error_of("{{ lt true false }}")
    assert "non-comparable type" in error_of("{{ eq .A .A }}", {"A": [1]})


def test_and_or_not_short_circuit():
    assert render("{{ and 1 0 .X.Y }} {{ or 0 \"\" 5 }} {{ not 0 }} {{ and 1 2 }}", {"X": None}) == "0 5 true 2"


def test_len_index_slice():
    data = {"L": [1, 2, 3], "M": {"k": "v"}, "S": "héllo"}
    assert render("{{ len .L }} {{ len .M }} {{ len .S }}", data) == "3 1 6"
    assert render('{{ index .L 2 }} {{ index .M "k" }} {{ index .M "z" }} {{ index .S 0 }}', data) == "3 v <no value> 104"
    assert render("{{ slice .L 1 }} {{ slice .L 0 2 }} {{ slice .S 1 3 }}", data) == "[2 3] [1 2] é"
    assert "index out of range: 3" in error_of("{{ index .L 3 }}", data)
    assert "invalid slice index" in error_of("{{ slice .L 2 1 }}", data)
    assert "can't index item of type int" in error_of("{{ index 1 0 }}")


def test_escaping_functions():
    assert render("{{ html \"<a href='x'>&\" }}") == "&lt;a href=&#39;x&#39;&gt;&amp;"
    assert render("{{ js \"a'b\\\"<c>&=\" }}") == "a\\'b\\\"\\u003Cc\\u003E\\u0026\\u003D"
    assert render('{{ urlquery "http://x.org/?a b" }}') == "http%3A%2F%2Fx.org%2F%3Fa+b"
    assert render("{{ .X | html }}", {"X": 1}) == "1"


def test_call():
    assert render("{{ call .F 2 3 }}", {"F": lambda a, b: a * b}) == "6"
    assert "error calling call" in error_of("{{ call .F }}", {"F": 1})


def test_wrong_argument_counts():
    assert "wrong number of args for not: want 1 got 2" in error_of("{{ not 1 2 }}")
    assert "wrong number of args for len: want 1 got 0" in error_of("{{ len }}")
    assert "want at least 1 got 0" in error_of("{{ and }}")


def test_ollama_functions():
    today = datetime.date.today()
    assert render("{{ currentDate }}") == today.isoformat()
    assert render("{{ yesterdayDate }}") == (today - datetime.timedelta(days=1)).isoformat()
    assert render("{{ toTypeScriptType . }}", 3) == "any"
    assert render("{{ json . }}", {"b": "<&>", "a": [1, 2.5, None, True]}) == (
        '{"a":[1,2.5,null,true],"b":"\\u003c\\u0026\\u003e"}'
    )
    assert render("{{ json . }}", float("nan")) == ""


def test_custom_functions_and_unknown_function():
    assert render("{{ up .S }}", {"S": "a"}, funcs={"up": str.upper}) == "A"
    assert 'function "up" not defined' in error_of("{{ up 1 }}")


# ---------------------------------------------------------------- json


def test_marshal_json_follows_go():
    assert marshal_json("a\u2028<\n\x01") == '"a\\u2028\\u003c\\n\\u0001"'
    assert marshal_json([1e21, 1e-7, 1e20, 0.5, -0.0, 12.0]) == "[1e+21,1e-7,100000000000000000000,0.5,-0,12]"
    assert marshal_json(b"hi") == '"aGk="'
    assert marshal_json(Named("n", [])) == '{"Name":"n","Tags":[]}'
    with pytest.raises(ValueError):
        marshal_json(float("inf"))


@dataclass
class Tagged:
    Name: str = field(metadata={"json": "name"})
    Note: str = field(metadata={"json": "note,omitempty"})
    Hidden: int = field(metadata={"json": "-"})


def test_marshal_json_struct_tags():
    assert marshal_json(Tagged("a", "", 1)) == '{"name":"a"}'
    assert marshal_json(Tagged("a", "b", 1)) == '{"name":"a","note":"b"}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_marshal_json_round_trips(value):
    # Go prints integral floats without a point, so read every number back as a float.
    assert json.loads(marshal_json(value), parse_int=float) == value


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_shortest_float_formats_round_trip(x):
    assert float(format_float(x)) == x
    assert float(format_float(x, "f")) == x
    assert float(format_float(x, "e")) == x


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_go_quote_round_trips(s):
    assert go_unquote(go_quote(s)) == s.encode("utf-8", "replace").decode("utf-8", "replace")


# ---------------------------------------------------------------- errors and limits


def test_errors_are_bad_requests_naming_the_line():
    message = error_of("line one\n{{ if }}")
    assert message == "template: t:2: missing value for if"
    assert isinstance(TemplateError("x"), BadRequestError)
    assert error_of("{{ .Prompt ") == "template: t:1: unclosed action"
    assert "unexpected EOF" in error_of("{{ range .X }}")
    assert "unexpected {{end}}" in error_of("{{ end }}")
    assert 'unexpected ":=" in operand' in error_of("{{ .X := 1 }}")
    assert "bad character U+007D '}'" in error_of("{{ .X} }}")


def test_execution_errors_name_line_column_and_node():
    message = error_of("a\nb {{ .A.B }}", {"A": None})
    assert message.startswith('template: t:2:5: executing "t" at <.A.B>: nil pointer')


@pytest.mark.parametrize(
    "text",
    [
        "{{ if 1 }}" * 10_000,
        "{{ " + "(" * 10_000 + "1" + ")" * 10_000 + " }}",
        "{{ if 1 }}{{ else if 1 }}" * 10_000,
        '{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}',
        "{{ range 1000000000 }}{{ end }}",
        '{{ $s := "ab" }}{{ range 64 }}{{ $s = printf "%s%s" $s $s }}{{ end }}',
        "{{ range 100000000 }}0123456789abcdef{{ end }}",
        '{{ printf "%2000000d" 1 }}',
    ],
)
def test_hostile_templates_fail_cleanly(text):
    with pytest.raises(TemplateError):
        render(text, {})


def test_deeply_nested_data_fails_cleanly():
    data: list = []
    for _ in range(50_000):
        data = [data]
    with pytest.raises(TemplateError):
        render("{{ . }}", data)


def test_nesting_below_the_cap_works():
    depth = MAX_NESTING - 1
    assert render("{{ if 1 }}" * depth + "x" + "{{ end }}" * depth) == "x"


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda s: "{{" not in s))
def test_text_without_actions_is_unchanged(text):
    assert render(text) == text


_space = st.text(alphabet=" \t\r\n", max_size=4)


@settings(max_examples=200, deadline=None)
@given(_space, _space, st.text(alphabet="abc xyz", max_size=8), st.text(alphabet="abc xyz", max_size=8))
def test_trim_markers_drop_exactly_the_white_space(left_ws, right_ws, before, after):
    text = f"{before}{left_ws}{{{{- .X -}}}}{right_ws}{after}"
    expected = before.rstrip(" \t\r\n") + "v" + after.lstrip(" \t\r\n")
    assert render(text, {"X": "v"}) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_integers_print_in_decimal(n):
    assert render("{{ . }} {{ printf \"%d\" . }}", n) == f"{n} {n}"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_quoted_string_literals_evaluate_to_their_value(s):
    assert render("{{ " + go_quote(s) + " }}") == s.encode("utf-8", "replace").decode("utf-8", "replace")


_fragments = st.sampled_from([
    "{{", "}}", "{{-", "-}}", " ", "\n", ".", ".A", ".B.C", "$", "$x", ":=", "=", "|", "(", ")", ",",
    "if", "else", "end", "range", "with", "define", "template", "block", "break", "continue",
    '"s"', "`r`", "'c'", "1", "-2", "3.5", "0x", "true", "nil", "eq", "len", "index", "slice",
    "printf", "json", "and", "not", "print", "/*", "*/", "text", "\\", '"', "é",
])
_data = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["A", "B", "C"]), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_fragments, max_size=25).map("".join), _data)
def test_random_templates_only_raise_template_errors(text, data):
    try:
        template = Template.parse(text)
    except TemplateError:
        return
    try:
        assert isinstance(template.execute(data), str)
    except TemplateError:
        pass
