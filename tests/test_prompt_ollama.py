"""Chat prompts rendered the way Ollama renders them.

The byte-identity tests read Ollama's own templates and expected renderings
from a checkout of its ``template`` directory named by ``MULLAMA_OLLAMA_REPO``
(the directory that holds ``template/``); they skip when it is unset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.prompt.gotemplate import TemplateError, go_unquote
from mullama.prompt.templates import parse_template, render_chat, render_generate, template_vars
from mullama.types import Message, Tool, ToolCall

# ---------------------------------------------------------------- Ollama's reference renderings


def _reference_dir() -> Path | None:
    root = os.environ.get("MULLAMA_OLLAMA_REPO")
    return Path(root) / "template" if root else None


def _reference_conversations(template_dir: Path) -> dict[str, list[Message]]:
    """The conversations of Ollama's ``TestTemplate``, read from its template_test.go."""
    source = (template_dir / "template_test.go").read_bytes().decode()
    body = source[source.index("func TestTemplate(") :]
    body = body[body.index("[][]api.Message{") : body.index("filepath.Glob")]
    conversations = {}
    for block in re.findall(r"\{\s*((?:\{Role: [^\n]*\},\s*)+)\}", body):
        messages = [
            Message(role=role, content=go_unquote(content))
            for role, content in re.findall(r'\{Role: "(\w+)", Content: ("(?:[^"\\]|\\.)*")\}', block)
        ]
        conversations["-".join(m.role for m in messages)] = messages
    return conversations


def _reference_cases() -> list[tuple[str, str]]:
    template_dir = _reference_dir()
    if template_dir is None or not template_dir.is_dir():
        return []
    names = sorted(p.name for p in template_dir.glob("*.gotmpl"))
    return [(name, case) for name in names for case in sorted(_reference_conversations(template_dir))]


#: Templates whose expected files lack the trailing space Ollama's own test also strips.
_TRAILING_SPACE_STRIPPED = {"chatqa.gotmpl", "llama2-chat.gotmpl", "mistral-instruct.gotmpl", "openchat.gotmpl",
                            "vicuna.gotmpl"}


@pytest.mark.skipif(not os.environ.get("MULLAMA_OLLAMA_REPO"), reason="MULLAMA_OLLAMA_REPO is not set")
def test_reference_material_is_present():
    cases = _reference_cases()
    assert len(cases) >= 3 * 20, "expected Ollama's template directory with its test data"


@pytest.mark.skipif(not os.environ.get("MULLAMA_OLLAMA_REPO"), reason="MULLAMA_OLLAMA_REPO is not set")
@pytest.mark.parametrize(("name", "case"), _reference_cases())
def test_renders_like_ollama(name, case):
    template_dir = _reference_dir()
    assert template_dir is not None
    text = (template_dir / name).read_bytes().decode()
    expected = (template_dir / "testdata" / name / case).read_bytes().decode()
    got = render_chat(text, _reference_conversations(template_dir)[case])
    if name in _TRAILING_SPACE_STRIPPED and got.endswith(" "):
        got = got[:-1]
    assert got == expected


# ---------------------------------------------------------------- messages and legacy templates

LEGACY = "<s>{{ if .System }}<<{{ .System }}>>{{ end }}[Q] {{ .Prompt }} [A]"
LEGACY_WITH_RESPONSE = "<s>{{ if .System }}<<{{ .System }}>>{{ end }}[Q] {{ .Prompt }} [A] {{ .Response }}</s>"
MESSAGES = (
    "{{ if .System }}<s><<{{ .System }}>>{{ end }}"
    "{{- range .Messages }}"
    '{{- if eq .Role "user" }}<s>[Q] {{ .Content }} [A]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}'
    "{{- end }}"
)

CHAT = [
    Message("user", "Hi there"),
    Message("assistant", "Hello!"),
    Message("user", "Tell me a joke"),
]


def test_legacy_template_runs_once_per_turn():
    assert render_chat(LEGACY, CHAT) == "<s>[Q] Hi there [A]Hello!<s>[Q] Tell me a joke [A]"
    assert render_chat(LEGACY_WITH_RESPONSE, CHAT) == "<s>[Q] Hi there [A] Hello!</s><s>[Q] Tell me a joke [A] "


def test_system_message_goes_to_the_first_turn_or_to_dot_system():
    with_system = [Message("system", "Be brief"), *CHAT]
    assert render_chat(LEGACY, with_system) == "<s><<Be brief>>[Q] Hi there [A]Hello!<s>[Q] Tell me a joke [A]"
    assert render_chat(MESSAGES, with_system) == "<s><<Be brief>><s>[Q] Hi there [A] Hello!</s><s>[Q] Tell me a joke [A]"


def test_trailing_assistant_message_is_continued():
    partial = [*CHAT, Message("assistant", "Why did the")]
    assert render_chat(LEGACY_WITH_RESPONSE, partial).endswith("<s>[Q] Tell me a joke [A] Why did the")
    assert render_chat(LEGACY_WITH_RESPONSE, CHAT, response="Why did the") == render_chat(LEGACY_WITH_RESPONSE, partial)
    assert render_chat(MESSAGES, CHAT, response="Why").endswith("[A] Why</s>")


def test_response_is_appended_only_when_missing():
    assert "response" in template_vars(parse_template("{{ .Prompt }}"))
    assert render_chat("{{ .Prompt }}", CHAT[:2]) == "Hi thereHello!"
    assert template_vars(parse_template("{{ range .Messages }}{{ .Content }}{{ end }}")) == {"messages", "content"}


def test_consecutive_messages_of_one_role_are_merged_but_tool_results_are_not():
    template = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ .System }}"
    messages = [
        Message("system", "s1"), Message("system", "s2"), Message("user", "a"), Message("user", "b"),
        Message("tool", "t1"), Message("tool", "t2"),
    ]
    assert render_chat(template, messages) == "[system:s1\n\ns2][user:a\n\nb][tool:t1][tool:t2]|s1\n\ns2"


def test_missing_values_print_no_value():
    assert render_chat("{{ range .Messages }}{{ end }}{{ .Prompt }}|{{ .Suffix }}", CHAT) == "<no value>|<no value>"


def test_template_without_argument_is_rejected_like_ollama():
    with pytest.raises(TemplateError, match="undefined template specified"):
        render_chat('{{ define "x" }}x{{ end }}{{ template "x" }}', CHAT)


def test_legacy_final_turn_has_no_custom_functions():
    # Ollama executes the cut template without its function map.
    with pytest.raises(TemplateError, match='"json" is not a defined function'):
        render_chat("{{ json .Prompt }}", CHAT)


# ---------------------------------------------------------------- tools

WEATHER = Tool(
    "get_weather",
    "Get the weather",
    {
        "type": "object",
        "properties": {
            "unit": {"type": ["string", "null"], "enum": ["c", "f"], "default": "c"},
            "city": {"type": "string", "description": "City <name>"},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
)


def test_tools_print_as_json_with_unknown_schema_keys_dropped():
    out = render_chat("{{ range .Messages }}{{ end }}{{ .Tools }}", CHAT, [WEATHER])
    assert out == (
        '[{"type":"function","function":{"name":"get_weather","description":"Get the weather",'
        '"parameters":{"type":"object","required":["city"],"properties":{'
        '"city":{"type":"string","description":"City \\u003cname\\u003e"},'
        '"unit":{"type":["string","null"],"enum":["c","f"]}}}}}]'
    )
    assert render_chat("{{ range .Messages }}{{ end }}{{ .Tools }}|{{ json .Tools }}", CHAT) == "null|null"
    assert render_chat("{{ range .Messages }}{{ end }}{{ if .Tools }}t{{ end }}", CHAT, []) == ""


def test_tool_properties_range_in_key_order():
    template = (
        "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ .Function.Name }}("
        "{{ range $name, $p := .Function.Parameters.Properties }}{{ $name }}: {{ $p.Type }} "
        "[{{ toTypeScriptType $p }}]; {{ end }}){{ end }}"
    )
    assert render_chat(template, CHAT, [WEATHER]) == (
        "get_weather(city: string [string]; unit: [string null] [string | null]; )"
    )


def test_tool_calls_and_arguments():
    call = ToolCall("get_weather", {"city": "Paris & <Rome>", "days": 3, "scale": 1234567, "ratio": 0.5}, id="c1")
    messages = [*CHAT, Message("assistant", tool_calls=[call]), Message("tool", "sunny", tool_name="get_weather")]
    template = (
        "{{ range .Messages }}{{ range .ToolCalls }}{{ .ID }} {{ .Function.Name }} {{ .Function.Arguments }}"
        " {{ range $k, $v := .Function.Arguments }}{{ $k }}={{ $v }},{{ end }}{{ end }}"
        '{{ if eq .Role "tool" }} {{ .ToolName }}:{{ .Content }}{{ end }}{{ end }}'
    )
    assert render_chat(template, messages) == (
        'c1 get_weather {"city":"Paris \\u0026 \\u003cRome\\u003e","days":3,"ratio":0.5,"scale":1234567}'
        " city=Paris & <Rome>,days=3,ratio=0.5,scale=1.234567e+06, get_weather:sunny"
    )


# ---------------------------------------------------------------- thinking, images, generate


@pytest.mark.parametrize(
    ("think", "level", "shown"),
    [(None, "", "false||false"), (False, "", "false||true"), (True, "", "true|medium|true"),
     (None, "high", "true|high|true"), (None, "bogus", "false|bogus|true")],
)
def test_think_values(think, level, shown):
    template = "{{ range .Messages }}{{ end }}{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}"
    assert render_chat(template, CHAT, think=think, think_level=level) == shown


def test_images_become_numbered_tags():
    messages = [
        Message("user", "first", images=[b"a", b"b"]),
        Message("assistant", "ok"),
        Message("user", "compare [img] with this", images=[b"c"]),
    ]
    out = render_chat("{{ range .Messages }}{{ .Content }}|{{ end }}", messages)
    assert out == "[img-0][img-1]first|ok|compare [img-2] with this|"


def test_generate_with_system_history_and_images():
    template = "{{ range .Messages }}{{ .Role }}:{{ .Content }} {{ end }}{{ json .Tools }}"
    out = render_generate(template, "describe", system="be terse", images=[b"x"],
                          history=[Message("user", "q"), Message("assistant", "a")])
    assert out == "system:be terse user:q assistant:a user:[img-0]describe []"


def test_generate_fill_in_the_middle():
    template = "{{ if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"
    assert render_generate(template, "def f(", suffix="return x") == "<PRE> def f( <SUF>return x <MID>"
    assert render_generate(template, "def f(") == "def f("


def test_generate_with_legacy_template():
    assert render_generate("{{ .System }}|{{ .Prompt }}|", "hi", system="sys") == "sys|hi|"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.text(max_size=20)), max_size=8))
def test_any_conversation_renders_with_both_kinds_of_template(turns):
    messages = [Message(role, content) for role, content in turns]
    for template in (LEGACY, LEGACY_WITH_RESPONSE, MESSAGES):
        assert isinstance(render_chat(template, messages), str)
