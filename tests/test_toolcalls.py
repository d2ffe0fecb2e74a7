"""Tests of tool-call detection and streaming parsing."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import llama_cpp_source
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.prompt.toolcalls import (
    FORMATS,
    Event,
    TextDelta,
    ToolCallEvent,
    ToolCallParser,
    ToolFormat,
    detect_format,
)
from mullama.types import Tool

DATA = Path(__file__).parent / "data" / "toolcalls"
FIXTURES = sorted(DATA.glob("*.json"))


def string_params(*names: str) -> dict[str, Any]:
    """A JSON Schema of string parameters."""
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}}


TOOLS = [
    Tool("get_weather", "Current weather", string_params("location", "unit")),
    Tool("get_time", "Current time", string_params("timezone")),
    Tool("search", "Web search", string_params("query")),
    Tool("python", "Run Python code", string_params("code")),
    Tool("brave_search", "Web search", string_params("query")),
    Tool(
        "get_forecast",
        "Weather forecast",
        {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}},
    ),
]


def load(path: Path) -> dict[str, Any]:
    """One recorded output."""
    return json.loads(path.read_text(encoding="utf-8"))


def fixture_format(case: dict[str, Any]) -> ToolFormat:
    """The format a recorded output is in."""
    return ToolFormat(case["format"], case.get("open", ""), case.get("close", ""))


def run(fmt: ToolFormat, chunks: list[str], tools: list[Tool] = TOOLS) -> list[Event]:
    """Feed every chunk and finish."""
    parser = ToolCallParser(fmt, tools)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.finish()


def normalized(events: list[Event]) -> list[tuple[str, Any]]:
    """Events with adjacent texts merged and random ids left out."""
    result: list[tuple[str, Any]] = []
    for event in events:
        if isinstance(event, TextDelta):
            if result and result[-1][0] == "text":
                result[-1] = ("text", result[-1][1] + event.text)
            else:
                result.append(("text", event.text))
        else:
            call = event.call
            result.append(("call", (call.name, call.arguments, call.index, event.raw)))
    return result


def reconstructed(events: list[Event]) -> str:
    """The output the events were parsed from."""
    return "".join(event.text if isinstance(event, TextDelta) else event.raw for event in events)


def chunked(text: str, cuts: list[int]) -> list[str]:
    """Cut ``text`` at the given positions."""
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def test_every_format_has_a_fixture() -> None:
    assert {load(path)["format"] for path in FIXTURES} == set(FORMATS)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_recorded_output(path: Path) -> None:
    case = load(path)
    events = run(fixture_format(case), [case["output"]])
    calls = [event.call for event in events if isinstance(event, ToolCallEvent)]
    assert [{"name": c.name, "arguments": c.arguments} for c in calls] == case["expected_calls"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == case["expected_content"]
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    assert reconstructed(events) == case["output"]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_recorded_output_token_by_token(path: Path) -> None:
    case = load(path)
    fmt = fixture_format(case)
    assert normalized(run(fmt, list(case["output"]))) == normalized(run(fmt, [case["output"]]))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_chunking_of_a_recording_gives_the_same_events(data: st.DataObject) -> None:
    case = load(data.draw(st.sampled_from(FIXTURES)))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    fmt = fixture_format(case)
    assert normalized(run(fmt, chunked(case["output"], cuts))) == normalized(run(fmt, [case["output"]]))


# Text drawn from the markers of every format, JSON fragments and prose, so
# that real calls, broken calls and near-misses all occur.
fragments = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<|python_tag|>",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
        "<|tool_call|>",
        "Action:",
        "```json",
        "```",
        "<|START_ACTION|>",
        "<|END_ACTION|>",
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "function",
        "<function=",
        "</function>",
        "<parameter=",
        "</parameter>",
        "<arg_key>",
        "<arg_value>",
        "functools",
        '{"name": "get_time", "arguments": {"timezone": "UTC"}}',
        '{"name": "get_weather", "parameters": {}}',
        "get_time",
        "{",
        "}",
        "[",
        "]",
        '"',
        "\\",
        ":",
        ",",
        " ",
        "\n",
        "<",
        ">",
        "|",
        "x",
        "hello",
    ]
)
texts = st.one_of(st.lists(fragments, max_size=14).map("".join), st.text(max_size=30))
formats = st.sampled_from(
    [ToolFormat(name) for name in FORMATS if name != "generic"]
    + [
        ToolFormat("generic", "<call>", "</call>"),
        ToolFormat("generic", "<|tool_call|>"),
    ]
)


@st.composite
def mutated_recordings(draw: st.DrawFn) -> tuple[ToolFormat, str]:
    """A recorded output with fragments spliced in and pieces cut out, in its own format."""
    case = load(draw(st.sampled_from(FIXTURES)))
    text = case["output"]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.one_of(fragments, st.text(max_size=3))) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(min_value=1, max_value=4)) :]
    return fixture_format(case), text


def check_no_loss(fmt: ToolFormat, text: str, cuts: list[int]) -> None:
    """The events of any chunking spell out ``text`` and match feeding it whole."""
    events = run(fmt, chunked(text, cuts))
    assert reconstructed(events) == text
    assert normalized(events) == normalized(run(fmt, [text]))


@settings(max_examples=500, deadline=None)
@given(recording=mutated_recordings(), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_damaged_recordings_are_never_lost(recording: tuple[ToolFormat, str], cuts: list[int]) -> None:
    check_no_loss(*recording, cuts)


@settings(max_examples=500, deadline=None)
@given(fmt=formats, text=texts, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_arbitrary_text_is_never_lost(fmt: ToolFormat, text: str, cuts: list[int]) -> None:
    check_no_loss(fmt, text, cuts)


def test_text_streams_before_a_call_and_only_marker_prefixes_are_held() -> None:
    parser = ToolCallParser(ToolFormat("hermes"), TOOLS)
    assert normalized(parser.feed("Let me check <tool")) == [("text", "Let me check ")]
    assert parser.feed('_call>{"name": "get_time", ') == []
    events = parser.feed('"arguments": {"timezone": "UTC"}}</tool_call> Done')
    assert [type(e) for e in events] == [ToolCallEvent, TextDelta]
    assert events[0].call.arguments == {"timezone": "UTC"}
    assert events[1].text == " Done"
    assert parser.finish() == []


def test_a_false_marker_prefix_is_released() -> None:
    parser = ToolCallParser(ToolFormat("hermes"), TOOLS)
    assert parser.feed("a <tool") == [TextDelta("a ")]
    assert parser.feed("s>") == [TextDelta("<tools>")]


def test_a_json_call_is_emitted_when_its_value_closes() -> None:
    parser = ToolCallParser(ToolFormat("mistral"), TOOLS)
    assert parser.feed('[TOOL_CALLS][{"name": "get_time", "arguments": {"timezone": "}]"}}') == []
    events = parser.feed("]")
    assert [e.call.arguments for e in events if isinstance(e, ToolCallEvent)] == [{"timezone": "}]"}]


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "llama3", "deepseek", "command_r"])
def test_a_long_call_streamed_in_small_chunks_is_read_in_linear_time(fmt: str) -> None:
    code = 'print("hello")\n' * 5000
    output = {
        "hermes": "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>",
        "mistral": "[TOOL_CALLS]" + json.dumps([{"name": "python", "arguments": {"code": code}}]),
        "llama3": json.dumps({"name": "python", "parameters": {"code": code}}),
        "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>python<｜tool▁sep｜>"
        + json.dumps({"code": code})
        + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "command_r": "Action: ```json\n"
        + json.dumps([{"tool_name": "python", "parameters": {"code": code}}])
        + "\n```",
    }[fmt]
    started = time.perf_counter()
    events = run(ToolFormat(fmt), [output[i : i + 3] for i in range(0, len(output), 3)])
    # Rescanning the whole call per chunk would take tens of seconds here.
    assert time.perf_counter() - started < 5
    assert [e.call.arguments for e in events if isinstance(e, ToolCallEvent)] == [{"code": code}]


def test_leading_json_only_counts_at_the_start() -> None:
    call = '{"name": "get_time", "parameters": {"timezone": "UTC"}}'
    assert normalized(run(ToolFormat("llama3"), ["\n ", call]))[1][0] == "call"
    assert normalized(run(ToolFormat("llama3"), ["Here: " + call])) == [("text", "Here: " + call)]


def test_unparsable_calls_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mullama.prompt.toolcalls"):
        events = run(ToolFormat("hermes"), ["<tool_call>{oops}</tool_call>"])
    assert events == [TextDelta("<tool_call>{oops}</tool_call>")]
    assert "unparsable" in caplog.text


def test_without_tools_any_name_is_accepted() -> None:
    events = run(ToolFormat("hermes"), ['<tool_call>{"name": "anything", "arguments": {}}</tool_call>'], tools=[])
    assert [e.call.name for e in events if isinstance(e, ToolCallEvent)] == ["anything"]


@pytest.mark.parametrize(
    "body",
    [
        "[" * 5000 + "]" * 5000,
        '{"name": "get_time", "arguments": 5}',
        '{"name": "get_time", "arguments": "[1, 2]"}',
        '{"name": ["get_time"]}',
        "[]",
        "<function=get_time><parameter=timezone>UTC</function>",
        "<function=get_time></function> and text",
        "get_time\n<arg_key>a</arg_key>junk",
    ],
)
def test_malformed_bodies_come_back_as_text(body: str) -> None:
    output = f"<tool_call>{body}</tool_call>"
    assert run(ToolFormat("hermes"), [output]) == [TextDelta(output)]


def test_malformed_python_tag_calls_come_back_as_text() -> None:
    for body in ["print(1", "os.system('x')()", "python.call(**kw)", "python.call(1)", "python.call(code=open('f'))"]:
        output = "<|python_tag|>" + body
        assert run(ToolFormat("llama3"), [output]) == [TextDelta(output)]


def test_bad_formats_are_refused() -> None:
    with pytest.raises(ValueError):
        ToolCallParser(ToolFormat("nonsense"), TOOLS)
    with pytest.raises(ValueError):
        ToolCallParser(ToolFormat("generic"), TOOLS)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{- '<tool_call>\\n' + tool_call | tojson + '\\n</tool_call>' }}", "hermes"),
        ('{{ if .ToolCalls }}[TOOL_CALLS] [{{ range .ToolCalls }}{"name": "{{ .Function.Name }}"', "mistral"),
        ("{{- '<|python_tag|>' + tool_call.arguments | tojson }}", "llama3"),
        ('<|start_header_id|>{{ .Role }}<|end_header_id|> Respond as {"name": ..., "parameters": ...}', "llama3"),
        ("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] }}", "deepseek"),
        ("<|tool_call|>{{ .ToolCalls }}", "granite"),
        ("<|START_ACTION|>[", "command_r7b"),
        ("Write 'Action:' followed by ```json", "command_r"),
        ('<function=example_function_name>{"example_name": "example_value"}</function>', "functionary"),
        (" functools[{{ tool_calls }}]", "firefunction"),
        ("{{ message.content }}", "json"),
    ],
)
def test_detect_format_from_markers(template: str, expected: str) -> None:
    assert detect_format(template) == ToolFormat(expected)


def test_detect_format_reads_known_wrappers_as_generic() -> None:
    seed = "<seed:tool_call>\n<function=example_function_name>\n</function>\n</seed:tool_call>"
    assert detect_format(seed) == ToolFormat("generic", "<seed:tool_call>", "</seed:tool_call>")
    apriel = "{{- '<tool_calls>[' }}{{ calls }}{{- ']</tool_calls>' }}<tool_call>"
    assert detect_format(apriel) == ToolFormat("generic", "<tool_calls>", "</tool_calls>")


def test_detect_format_falls_back_to_the_model_name() -> None:
    assert detect_format("", "mistral-nemo:12b") == ToolFormat("mistral")
    assert detect_format("{{ .Prompt }}", "qwen2.5:7b") == ToolFormat("hermes")
    assert detect_format("", "smollm2") == ToolFormat("json")


LLAMA_CPP_TEMPLATES = {
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "Qwen3-Coder.jinja": "hermes",
    "Qwen-QwQ-32B.jinja": "hermes",
    "GLM-4.6.jinja": "hermes",
    "ibm-granite-granite-4.0.jinja": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct.jinja": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": "mistral",
    "unsloth-mistral-Devstral-Small-2507.jinja": "mistral",
    "ibm-granite-granite-3.3-2B-Instruct.jinja": "granite",
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": "command_r",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": "command_r7b",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": "deepseek",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": "deepseek",
    "deepseek-ai-DeepSeek-V3.1.jinja": "deepseek",
    "meetkai-functionary-medium-v3.1.jinja": "functionary",
    "fireworks-ai-llama-3-firefunction-v2.jinja": "firefunction",
    "ByteDance-Seed-OSS.jinja": "generic",
    "Apriel-1.6-15b-Thinker-fixed.jinja": "generic",
    "google-gemma-2-2b-it.jinja": "json",
    "openai-gpt-oss-120b.jinja": "harmony",
}


@pytest.mark.parametrize(("name", "expected"), sorted(LLAMA_CPP_TEMPLATES.items()))
def test_detect_format_of_real_templates(name: str, expected: str) -> None:
    path = llama_cpp_source() / "models" / "templates" / name
    if not path.exists():
        pytest.skip(f"{name} is not in this llama.cpp tree")
    assert detect_format(path.read_text(encoding="utf-8")).name == expected
