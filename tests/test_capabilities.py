"""``capabilities`` from a GGUF's header and a model's template, by Ollama's rules (server/images.go).

The headers are built as the GGUF reader returns them; the templates are
from models Ollama serves (Qwen 3, DeepSeek-R1, SmolLM2) or made to test
one rule each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mullama.prompt.templates import parse_template
from mullama.store.capabilities import (
    capabilities,
    chat_template_capabilities,
    thinking_tags,
)
from mullama.store.gguf import GGUFInfo
from mullama.store.records import ModelRecord


def header(arch: str = "llama", chat_template: str = "", **keys: object) -> GGUFInfo:
    metadata: dict[str, object] = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}
    if chat_template:
        metadata["tokenizer.chat_template"] = chat_template
    return GGUFInfo(version=3, metadata=metadata, tensors=[], alignment=32, data_offset=0, file_size=0)


def record(template: str | None = None, parser: str = "") -> ModelRecord:
    return ModelRecord(name="m:latest", digest="", model_path=Path("/nonexistent.gguf"), template=template,
                       parser=parser)


QWEN3_JINJA = ("{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>{% endif %}"
               "{%- if message.tool_calls %}<tool_call>{% endif %}"
               "{%- set content = message.content.split('</think>')[-1] %}<think>\n\n</think>")
DEEPSEEK_R1_JINJA = ("{% set content = message['content'] %}{% if '</think>' in content %}"
                     "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content}}")


@pytest.mark.parametrize(("info", "expected"), [
    (header(), ["completion"]),
    # Any pooling type, even 0, marks an embedding model; its absence a completion model, BERT or not.
    (header("qwen3", pooling_type=0), ["embedding"]),
    (header("bert", pooling_type=2), ["embedding"]),
    (header("bert"), ["completion"]),
    # Pooling type rank is a reranker's (Mullama's capability: Ollama has no rerankers).
    (header("qwen3", pooling_type=4), ["rerank"]),
    (header("bert", pooling_type=4), ["rerank"]),
    (header("qwen3", QWEN3_JINJA), ["tools", "thinking", "completion"]),
    (header("qwen2", DEEPSEEK_R1_JINJA), ["thinking", "completion"]),
    # Reasoning kept in its own field is not thinking inside the content.
    (header("qwen2", DEEPSEEK_R1_JINJA + "{{ reasoning_content }}"), ["completion"]),
    # One tag alone is not enough.
    (header("llama", "<think>{{ messages }}"), ["completion"]),
    (header("gpt-oss"), ["completion", "thinking"]),
])
def test_from_the_gguf(info: GGUFInfo, expected: list[str]) -> None:
    assert capabilities(record(), info, vision=False) == expected


def test_a_go_template_replaces_the_ggufs_own() -> None:
    # The TEMPLATE is what Mullama renders, so the GGUF's tools and thinking do not count.
    assert capabilities(record("{{ .Prompt }}"), header("qwen3", QWEN3_JINJA), vision=False) == ["completion"]
    assert capabilities(record("{{ .Prompt }}", parser="harmony"), header(), vision=False) == \
        ["completion", "tools", "thinking"]


def test_vision_is_what_the_caller_says() -> None:
    assert capabilities(record(), header(), vision=True) == ["completion", "vision"]


@pytest.mark.parametrize(("template", "tags"), [
    ("{{ range .Messages }}{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ end }}",
     ("<think>", "</think>")),
    # Outside a range over .Messages, .Thinking shows no tags.
    ("{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}", ("", "")),
    ("{{ range $i, $m := .Messages }}{{ if $m.Thinking }} <x> {{ .Thinking }} </x> {{ end }}{{ end }}",
     ("<x>", "</x>")),
    # The nearest list must start and end with text.
    ("{{ range .Messages }}{{ if .Thinking }}{{ .Thinking }}{{ end }}{{ end }}", ("", "")),
])
def test_thinking_tags(template: str, tags: tuple[str, str]) -> None:
    assert thinking_tags(parse_template(template).root) == tags


@given(st.text(max_size=200))
def test_a_chat_template_shows_tools_exactly_when_it_says_so(text: str) -> None:
    assert ("tools" in chat_template_capabilities(text)) == ("tools" in text or "tool_call" in text)
