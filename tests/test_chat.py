"""The layer below the APIs: prompts, grammars and refusals shared by all three."""

from __future__ import annotations

import pytest

import mullama
from mullama import service
from mullama.errors import BadRequestError
from mullama.prompt.harmony import HarmonyParser
from mullama.store.records import ModelRecord
from mullama.types import Message, Tool, ToolCall

WEATHER = Tool(name="get_weather", description="Weather in a city",
               parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.fixture(scope="module")
def model(model_path):
    with mullama.Model(model_path, num_ctx=512) as loaded:
        yield loaded


def record(model_path, **fields) -> ModelRecord:
    return ModelRecord(**{"name": "smol", "digest": "", "model_path": model_path, **fields})


def test_gguf_template_renders_with_modelfile_system(model, model_path):
    prompt = service.render_prompt(record(model_path, system="Be brief."), model,
                                [Message(role="user", content="Hi")], [], None)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_modelfile_go_template_wins_over_the_gguf_template(model, model_path):
    template = "{{ range .Messages }}[{{ .Role }}] {{ .Content }}\n{{ end }}[assistant] "
    prompt = service.render_prompt(record(model_path, template=template), model,
                                [Message(role="user", content="Hi")], [], None)
    assert prompt == "[user] Hi\n[assistant] "


def test_tools_and_their_history_reach_a_template_without_tool_support(model, model_path):
    messages = [
        Message(role="user", content="Weather in Paris?"),
        Message(role="assistant", tool_calls=[ToolCall(name="get_weather", arguments={"city": "Paris"})]),
        Message(role="tool", content="18 C, sunny", tool_name="get_weather"),
    ]
    prompt = service.render_prompt(record(model_path), model, messages, [WEATHER], None)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt


def test_forced_tool_choice_gives_a_single_call_grammar():
    hermes = service.DEFAULT_TOOL_FORMAT
    single = service.grammar_for(None, [WEATHER], "get_weather", hermes)
    several = service.grammar_for(None, [WEATHER], "required", hermes, parallel=True)
    assert single and several and single != several
    assert service.grammar_for(None, [WEATHER], "auto", hermes) is None


def test_invalid_format_is_a_bad_request():
    with pytest.raises(BadRequestError):
        service.grammar_for("yaml", [], "auto", service.DEFAULT_TOOL_FORMAT)
    with pytest.raises(BadRequestError, match="patternProperties"):
        service.grammar_for({"type": "object", "patternProperties": {"a": {}}}, [], "auto", service.DEFAULT_TOOL_FORMAT)


def test_images_are_refused_not_dropped(model):
    """A model without a projector refuses images with Ollama's words (tests/test_vision*.py: with one)."""
    with pytest.raises(BadRequestError, match="this model is missing data required for image input"):
        service._mark_images(model, [Message(role="user", content="What is this?", images=[b"\x89PNG"])])
    plain = [Message(role="user", content="Hi")]
    assert service._mark_images(model, plain) is plain


# --- gpt-oss (harmony) through the service --------------------------------------


class RecordedRequest:
    """A finished generation that wrote ``text``: the part of a batcher request a :class:`service.Reply` reads."""

    truncated = 0

    def __init__(self, text: str) -> None:
        self.text = text
        self.result = mullama.Completion(done_reason="stop")

    def pieces(self):
        # Three characters at a time: markers arrive split, as tokens split them.
        for start in range(0, len(self.text), 3):
            yield self.text[start:start + 3], []

    def cancel(self) -> None:
        pass


def test_a_gpt_oss_model_gets_the_harmony_prompt(model, model_path):
    prompt = service.render_prompt(record(model_path, name="gpt-oss-tiny"), model,
                                   [Message(role="user", content="Weather in Paris?")], [WEATHER], None)
    assert prompt.startswith("<|start|>system<|message|>")
    assert "namespace functions" in prompt and "type get_weather = " in prompt
    assert prompt.endswith("<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant")


def test_harmony_output_becomes_thinking_content_and_calls(model, model_path):
    import json
    from contextlib import ExitStack
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "data" / "harmony" / "thinking-tool-call.json").read_text())
    fmt = service.tool_format(record(model_path, name="gpt-oss-tiny"), model)
    assert fmt.name == "harmony"
    parser = HarmonyParser([Tool(name="get_current_weather")], "")
    reply = service.Reply("gpt-oss-tiny", ExitStack(), RecordedRequest(recorded["output"]), None, parser, 0, 0, 1)
    deltas = list(reply)
    message = reply.result.message
    assert message.thinking == recorded["expected_thinking"] == "".join(d.thinking for d in deltas)
    assert message.content == recorded["expected_content"]
    assert [(c.name, c.arguments) for c in message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in recorded["expected_calls"]]
