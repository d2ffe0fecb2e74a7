"""gpt-oss's harmony format: Ollama's prompt rendering, and streamed output parsed into thinking, content and calls."""

from __future__ import annotations

import datetime
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import llama_cpp_source
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.prompt.harmony import (
    FunctionNames,
    Header,
    HarmonyParser,
    ThinkingDelta,
    parse_harmony,
    parse_header,
    reasoning_level,
    render_harmony,
    renamed_tools,
    resume_point,
)
from mullama.prompt.jinja import render_jinja
from mullama.prompt.toolcalls import TextDelta, ToolCallEvent, ToolCallParser, ToolFormat, detect_format
from mullama.types import Message, Tool, ToolCall

DATA = Path(__file__).parent / "data" / "harmony"
FIXTURES = sorted(DATA.glob("*.json"))
DAY = datetime.date(2025, 8, 5)

TOOLS = [
    Tool("get_current_weather", "Gets the current weather in the provided location.", {
        "type": "object",
        "properties": {"location": {"type": "string"}, "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}),
    Tool("get-weather", "Weather by city", {"type": "object", "properties": {"city": {"type": "string"}}}),
    Tool("get_location", "Gets the location of the user."),
    Tool("generate_file", "Writes a file", {"type": "object", "properties": {"template": {"type": "string"},
                                                                              "path": {"type": "string"}}}),
]


# Rendering ----------------------------------------------------------------

SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\n")
CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
WEATHER = Tool("get-weather", "Get the current weather", {"type": "object", "properties": {
    "unit": {"type": "string", "enum": ["c", "f"]}, "city": {"type": "string", "description": "The city"},
    "days": {"type": ["integer", "null"]}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["city"]})
WEATHER_FUNCTIONS = ("<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
                     "// Get the current weather\ntype get_weather = (_: {\n  // The city\n  city: string,\n"
                     "  days: number | null,\n  tags: any[],\n  unit: string,\n}) => any;\n")


def render(messages: list[Message], tools: list[Tool] | None = None, **think: Any) -> str:
    return render_harmony(messages, tools, today=DAY, **think)


def test_a_plain_chat_reasons_at_medium_by_default():
    assert render([Message("user", "Hi")]) == (
        SYSTEM + "Reasoning: medium\n\n" + CHANNELS + "<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_tools_and_system_go_to_the_developer_message():
    prompt = render([Message("system", "Be terse."), Message("user", "Weather in Paris?")],
                    [WEATHER, Tool("get_location", "", {"type": "object", "properties": {}})], think_level="high")
    assert prompt == (
        SYSTEM + "Reasoning: high\n\n" + CHANNELS + "\nCalls to these tools must go to the commentary channel: "
        "'functions'.<|end|>" + WEATHER_FUNCTIONS + "\ntype get_location = () => any;\n\n} // namespace functions"
        "\n\n# Instructions\n\nBe terse.<|end|><|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant")


def test_a_tool_loop_shows_the_current_reasoning_and_calls():
    prompt = render([
        Message("user", "Old question"),
        Message("assistant", "Old answer", thinking="old reasoning"),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", thinking="Need the weather.", tool_calls=[ToolCall("get-weather", {"city": "Paris", "days": 2})]),
        Message("tool", '{"temp": 21}', tool_name="get-weather"),
    ], [WEATHER])
    assert prompt.endswith(
        "} // namespace functions<|end|>"
        "<|start|>user<|message|>Old question<|end|><|start|>assistant<|channel|>final<|message|>Old answer<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get-weather <|constrain|>json<|message|>{"city":"Paris","days":2}<|call|>'
        '<|start|>functions.get-weather to=assistant<|message|>{"temp": 21}<|end|><|start|>assistant')
    assert "old reasoning" not in prompt


def test_builtin_tools_are_described_in_the_system_message_and_called_on_analysis():
    prompt = render([Message("user", "Search"),
                     Message("assistant", "", tool_calls=[ToolCall("browser.search", {"query": "x"})]),
                     Message("tool", "results", tool_name="browser.search")],
                    [Tool("browser.search"), Tool("python")], think_level="max")
    assert prompt.startswith(SYSTEM + "Reasoning: high\n\n# Tools\n\n## browser\n\n// Tool for browsing.\n")
    assert "\n// Searches for information related to `query` and displays `topn` results.\ntype search = (_: {\n" in prompt
    assert "type open" not in prompt and "type find" not in prompt
    assert "} // namespace browser\n\n## python\n\nUse this tool to execute Python code" in prompt
    assert ("Depends on the cluster.\n\n" + CHANNELS + "<|end|><|start|>user<|message|>Search<|end|>"
            '<|start|>assistant<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query":"x"}<|call|>'
            "<|start|>browser.search to=assistant<|message|>results<|end|><|start|>assistant") in prompt
    assert "developer" not in prompt


@pytest.mark.parametrize(("think", "level", "line"), [
    (None, "", "Reasoning: medium"), (True, "", "Reasoning: medium"), (False, "", None),
    (True, "low", "Reasoning: low"), (None, "high", "Reasoning: high"), (True, "max", "Reasoning: high"),
])
def test_reasoning_effort(think, level, line):
    prompt = render([Message("user", "Hi")], think=think, think_level=level)
    assert reasoning_level(think, level) == (line or "").removeprefix("Reasoning: ")
    assert prompt.startswith(SYSTEM + (line + "\n\n" if line else "") + CHANNELS)


def test_a_trailing_assistant_message_is_continued():
    content = render([Message("user", "Count"), Message("assistant", "1, 2,", thinking="count up")])
    assert content.endswith("<|start|>assistant<|channel|>analysis<|message|>count up<|end|>"
                            "<|start|>assistant<|channel|>final<|message|>1, 2,")
    thinking = render([Message("user", "Count"), Message("assistant", "", thinking="Let me")])
    assert thinking.endswith("<|start|>user<|message|>Count<|end|><|start|>assistant<|channel|>analysis<|message|>Let me")


def test_the_date_is_today_by_default():
    assert f"Current date: {datetime.date.today().isoformat()}\n" in render_harmony([Message("user", "Hi")])


# Ollama's FunctionNameMap cases (harmony/harmonyparser_test.go).
@pytest.mark.parametrize(("names", "expected"), [
    (["get weather"], ["get_weather"]), (["get-weather"], ["get_weather"]), (["get.weather"], ["get_weather"]),
    (["get weather!"], ["get_weather"]), (["a🫠bc"], ["abc"]), (["🫠"], ["unnamed"]), (["123"], ["_123"]),
    (["$"], ["$"]), (["𝓸𝓵𝓵𝓪𝓶𝓪"], ["𝓸𝓵𝓵𝓪𝓶𝓪"]), (["ⓞⓛⓛⓐⓜⓐ123"], ["_123"]),
    (["get weather", "get weather"], ["get_weather", "get_weather_2"]),
    (["get weather", "get_weather", "get-weather", "something-different"],
     ["get_weather", "get_weather_2", "get_weather_3", "something_different"]),
    (["a", "a", "b", "a", "a", "b", "a"], ["a", "a_2", "b", "a_3", "a_4", "b_2", "a_5"]),
    (["browser.open", "python", "not.a.built-in.function", "browser.not_a_real_built_in"],
     ["browser.open", "python", "not_a_built_in_function", "browser_not_a_real_built_in"]),
])
def test_function_names_become_identifiers_and_map_back(names, expected):
    mapping = FunctionNames(names)
    assert mapping.converted == expected
    assert mapping.original(expected[-1]) == names[-1]


# Parsing ------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def run(chunks: list[str], tools: list[Tool] = TOOLS, prompt: str = "") -> list[Any]:
    parser = HarmonyParser(tools, prompt)
    return [event for chunk in chunks for event in parser.feed(chunk)] + parser.finish()


def normalized(events: list[Any]) -> list[tuple[str, Any]]:
    """Events with adjacent pieces of one kind merged and random ids left out."""
    result: list[tuple[str, Any]] = []
    for event in events:
        if isinstance(event, ToolCallEvent):
            result.append(("call", (event.call.name, event.call.arguments, event.call.index)))
            continue
        kind = "thinking" if isinstance(event, ThinkingDelta) else "content"
        assert event.text, "no empty text events"
        if result and result[-1][0] == kind:
            result[-1] = (kind, result[-1][1] + event.text)
        else:
            result.append((kind, event.text))
    return result


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def test_every_fixture_is_checked():
    assert len(FIXTURES) >= 15


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_recorded_output(path: Path):
    case = load(path)
    parsed = parse_harmony(case["output"], TOOLS)
    assert parsed.thinking == case["expected_thinking"]
    assert parsed.content == case["expected_content"]
    assert [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls] == case["expected_calls"]
    assert [c.index for c in parsed.tool_calls] == list(range(len(parsed.tool_calls)))
    assert all(c.id.startswith("call_") for c in parsed.tool_calls) and len({c.id for c in parsed.tool_calls}) == len(parsed.tool_calls)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_recorded_output_character_by_character(path: Path):
    output = load(path)["output"]
    assert normalized(run(list(output))) == normalized(run([output]))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_split_of_a_recording_gives_the_same_result(data: st.DataObject):
    output = load(data.draw(st.sampled_from(FIXTURES)))["output"]
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    assert normalized(run(chunked(output, cuts))) == normalized(run([output]))


# Text drawn from harmony's markers, their pieces, headers, JSON and prose, so
# that real messages, broken ones and near-misses all occur.
fragments = st.sampled_from([
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>", "<|return|>", "<|", "|>", "<",
    "assistant", "analysis", "final", "commentary", " to=functions.get_weather", " to=functions.get_location",
    " to=browser.search", "to=assistant", " json", '{"city": "Paris"}', "{}", '{"a": [1, {"b"', "[1]", "}",
    "Hello", " world", "\n", " ", "é", "\u00a0", "<think>",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(fragments, max_size=30), st.lists(st.integers(min_value=0, max_value=300), max_size=10),
       st.sampled_from(["", "<|start|>user<|message|>Hi<|end|><|start|>assistant",
                        "<|start|>assistant<|channel|>final<|message|>Par", "x<|start|>assistant<|end|>"]))
def test_any_split_of_any_output_gives_the_same_result(parts, cuts, prompt):
    output = "".join(parts)
    assert normalized(run(chunked(output, cuts), prompt=prompt)) == normalized(run([output], prompt=prompt))


# Without markers, and not " to=..." (which goes on the implicit "<|start|>assistant" as a recipient).
plain_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60).filter(
    lambda text: "<|" not in text and not (text != text.lstrip() and text.lstrip().startswith("to=")))


@settings(max_examples=300, deadline=None)
@given(plain_text, st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_output_that_is_not_harmony_is_all_content(text, cuts):
    assert normalized(run(chunked(text, cuts))) == ([("content", text)] if text else [])


def test_text_streams_as_it_arrives_and_only_marker_prefixes_wait():
    parser = HarmonyParser(TOOLS)
    assert parser.feed("<|chan") == []
    assert parser.feed("nel|>analysis<|mess") == []
    assert parser.feed("age|>Deep ") == [ThinkingDelta("Deep ")]
    assert parser.feed("thought<|") == [ThinkingDelta("thought")]
    assert parser.feed("start|>assistant<|channel|>final<|message|>Hel") == [TextDelta("Hel")]
    assert parser.feed("lo <") == [TextDelta("lo ")]
    assert parser.feed("3") == [TextDelta("<3")]
    assert parser.finish() == []


def test_a_call_is_emitted_when_its_message_ends():
    parser = HarmonyParser(TOOLS)
    assert parser.feed('<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>{"location"') == []
    assert parser.feed(': "Rome"}') == []
    (event,) = parser.feed("<|call|>")
    assert (event.call.name, event.call.arguments) == ("get_current_weather", {"location": "Rome"})
    assert event.raw.startswith("<|start|>assistant<|channel|>commentary to=functions.get_current_weather")
    assert parser.finish() == []


def test_a_call_left_open_by_a_stop_is_complete_at_the_end():
    parser = HarmonyParser(TOOLS)
    assert parser.feed('<|channel|>commentary to=functions.get_location <|constrain|>json<|message|>{}') == []
    (event,) = parser.finish()
    assert (event.call.name, event.call.arguments, event.call.index) == ("get_location", {}, 0)


@pytest.mark.parametrize("arguments", ["[1, 2]", '"text"', "{bad", "null"])
def test_arguments_that_are_not_an_object_come_back_as_content(arguments, caplog):
    output = f"<|channel|>commentary to=functions.get_location <|constrain|>json<|message|>{arguments}<|call|>"
    with caplog.at_level(logging.WARNING, logger="mullama.prompt.harmony"):
        parsed = parse_harmony(output, TOOLS)
    assert parsed.tool_calls == []
    assert parsed.content == f"<|start|>assistant<|channel|>commentary to=functions.get_location <|constrain|>json<|message|>{arguments}"
    assert "unparsable call of get_location" in caplog.text


def test_a_call_of_a_tool_the_request_lacks_is_still_a_call(caplog):
    with caplog.at_level(logging.WARNING, logger="mullama.prompt.harmony"):
        parsed = parse_harmony('<|channel|>commentary to=functions.launch <|constrain|>json<|message|>{"n": 1}', TOOLS)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("launch", {"n": 1})]
    assert "'launch', which is not one of the request's tools" in caplog.text
    assert parse_harmony('<|channel|>commentary to=functions.launch<|message|>{}').tool_calls[0].name == "launch"


# Ollama's header cases (harmony/harmonyparser_test.go).
@pytest.mark.parametrize(("header", "expected"), [
    ("assistant<|channel|>analysis", Header("assistant", "analysis", "")),
    ("assistant<|channel|>analysis to=functions.get_weather", Header("assistant", "analysis", "functions.get_weather")),
    ("assistant to=functions.get_weather<|channel|>analysis", Header("assistant", "analysis", "functions.get_weather")),
    ("to=functions.get_weather<|channel|>analysis", Header("tool", "analysis", "functions.get_weather")),
    ("assistant to=functions.get_weather abc<|channel|>analysis", Header("assistant", "analysis", "functions.get_weather")),
    ("assistant<|channel|>commentary to=functions.get_weather <|constrain|>json",
     Header("assistant", "commentary", "functions.get_weather")),
    ("assistant to=functions.get_weather<|channel|>commentary <|constrain|>json",
     Header("assistant", "commentary", "functions.get_weather")),
    ("assistant<|channel|>commentary to=functions.get_weather<|constrain|>json",
     Header("assistant", "commentary", "functions.get_weather")),
    ("assistant to=functions.get_weather<|channel|>commentary<|constrain|>json",
     Header("assistant", "commentary", "functions.get_weather")),
    ("user", Header("user", "", "")),
    ("", Header("", "", "")),
])
def test_parse_header(header, expected):
    assert parse_header(header) == expected


@pytest.mark.parametrize(("prompt", "point"), [
    ("", "<|start|>assistant"),
    ("<|start|>user<|message|>Hi<|end|><|start|>assistant", "<|start|>assistant"),
    ("...<|start|>assistant<|channel|>final<|message|>1, 2,", "<|start|>assistant<|channel|>final<|message|>"),
    ("...<|start|>assistant<|channel|>analysis<|message|>Let me", "<|start|>assistant<|channel|>analysis<|message|>"),
    ("<|start|>user<|message|>Hi<|end|>", ""),
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|start|>assistant"),
])
def test_resume_point(prompt, point):
    assert resume_point(prompt) == point


def test_the_output_continues_where_the_prompt_leaves_off():
    content = render([Message("user", "Count"), Message("assistant", "1, 2,", thinking="count up")])
    assert normalized(run([" 3, 4.<|return|>"], prompt=content)) == [("content", " 3, 4.")]
    thinking = render([Message("user", "Count"), Message("assistant", "", thinking="Let me")])
    assert normalized(run([" count.<|end|><|start|>assistant<|channel|>final<|message|>1, 2"], prompt=thinking)) == [
        ("thinking", " count."), ("content", "1, 2")]
    # Ollama's structured-output pass closes the reasoning itself and opens the answer.
    answer = render([Message("user", "JSON please")]) + "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert normalized(run(['{"a": 1}'], prompt=answer)) == [("content", '{"a": 1}')]
    # A prompt that ends with a closed message: the model opens the next one itself.
    assert normalized(run(["<|start|>assistant<|channel|>final<|message|>Hi"], prompt="<|start|>user<|message|>x<|end|>")) == [
        ("content", "Hi")]


# The two renderers against the parser --------------------------------------

CONVERSATION = [
    Message("system", "Use the tools."),
    Message("user", "Weather in Paris?"),
    Message("assistant", "", thinking="Need the weather for Paris.",
            tool_calls=[ToolCall("get_current_weather", {"location": "Paris", "format": "celsius"})]),
]


def _assistant_turn(prompt: str) -> tuple[str, str]:
    """Split a rendered conversation before the assistant's reply to the last user message."""
    at = prompt.rindex("<|end|>", 0, prompt.index("<|start|>assistant", prompt.rindex("<|start|>user"))) + len("<|end|>")
    return prompt[:at] + "<|start|>assistant", prompt[at + len("<|start|>assistant"):]


def _reads_back(prompt: str) -> None:
    before, turn = _assistant_turn(prompt)
    parsed = parse_harmony(turn, TOOLS, prompt=before)
    assert parsed.thinking == "Need the weather for Paris."
    assert parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_current_weather", {"location": "Paris", "format": "celsius"})]


def test_ollama_rendering_reads_back():
    _reads_back(render(CONVERSATION, TOOLS).removesuffix("<|start|>assistant"))


def _gpt_oss_jinja() -> str:
    path = llama_cpp_source() / "models" / "templates" / "openai-gpt-oss-120b.jinja"
    if not path.exists():
        pytest.skip("the gpt-oss template is not in this llama.cpp tree")
    return path.read_text(encoding="utf-8")


def test_the_models_own_template_is_recognised_and_its_history_reads_back():
    template = _gpt_oss_jinja()
    assert detect_format(template) == ToolFormat("harmony")
    prompt = render_jinja(template, CONVERSATION, TOOLS, bos_token="", eos_token="",
                          extra={"reasoning_effort": "low"})
    assert "\nReasoning: low\n" in prompt
    assert "# Instructions\n\nUse the tools." in prompt and "type get_current_weather = (_: {" in prompt
    _reads_back(prompt)
    # Its generation prompt is where Ollama's leaves the output too.
    fresh = render_jinja(template, CONVERSATION[:2], TOOLS, bos_token="", eos_token="")
    assert fresh.endswith("<|start|>assistant") and resume_point(fresh) == "<|start|>assistant"


@pytest.mark.parametrize(("template", "architecture", "name"), [
    ("{{- '<|start|>assistant<|channel|>final<|message|>' + content }}", "", ""),
    ("{{ range .Messages }}<|start|>{{ .Role }}<|channel|>final<|message|>{{ .Content }}<|end|>{{ end }}", "", ""),
    ("", "gpt-oss", ""),
    ("{{ .Prompt }}", "", "gpt-oss:20b"),
])
def test_detect_format_finds_harmony(template, architecture, name):
    assert detect_format(template, name, architecture) == ToolFormat("harmony")


def test_detect_format_leaves_other_models_alone():
    assert detect_format("<|im_start|>{{ .Content }}<|im_end|><tool_call>", "qwen2.5", "qwen2").name == "hermes"
    assert detect_format("<|start|>{{ .Content }}<|end|>", "", "llama").name == "json"


def test_the_generic_tool_call_parser_refuses_harmony():
    with pytest.raises(ValueError, match="HarmonyParser"):
        ToolCallParser(ToolFormat("harmony"), TOOLS)


def test_renamed_tools_are_what_a_modelfile_template_is_given():
    tools = [Tool("get-weather", "w"), Tool("python"), Tool("get weather")]
    assert [tool.name for tool in renamed_tools(tools)] == ["get_weather", "python", "get_weather_2"]
    assert [tool.description for tool in renamed_tools(tools)] == ["w", "", ""]
    assert tools[0].name == "get-weather"
    assert renamed_tools(None) == []
