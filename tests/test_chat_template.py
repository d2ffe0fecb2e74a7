"""Rendering a GGUF's Jinja chat template: transformers' semantics, in a sandbox."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.prompt.jinja import ChatTemplateError, render_jinja
from mullama.errors import BadRequestError
from mullama.types import Message, Tool, ToolCall

# The scalar GGUF value types and their sizes; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _chat_template_of(path: Path) -> str:
    """Read ``tokenizer.chat_template`` from a GGUF's header (a test-only reader)."""
    with path.open("rb") as file:

        def read(fmt: str) -> tuple:
            return struct.unpack("<" + fmt, file.read(struct.calcsize("<" + fmt)))

        def string() -> str:
            (length,) = read("Q")
            return file.read(length).decode()

        def skip(kind: int) -> None:
            if kind == 8:
                string()
            elif kind == 9:
                item_kind, count = read("IQ")
                if item_kind in _GGUF_SIZES:
                    file.seek(_GGUF_SIZES[item_kind] * count, 1)
                else:
                    for _ in range(count):
                        skip(item_kind)
            else:
                file.seek(_GGUF_SIZES[kind], 1)

        assert file.read(4) == b"GGUF"
        _version, _tensors, pairs = read("IQQ")
        for _ in range(pairs):
            key = string()
            (kind,) = read("I")
            if key == "tokenizer.chat_template":
                return string()
            skip(kind)
    raise AssertionError("no chat template")


@pytest.fixture(scope="module")
def smollm2_template(model_path) -> str:
    return _chat_template_of(model_path)


def _render(template: str, messages=(), tools=None, **kwargs) -> str:
    return render_jinja(template, list(messages), tools, bos_token="<s>", eos_token="</s>", **kwargs)


def test_smollm2_template_gives_chatml(smollm2_template):
    messages = [Message("system", "Be brief."), Message("user", "Hi!"), Message("assistant", "Hello."), Message("user", "Sky?")]
    assert _render(smollm2_template, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nSky?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_adds_its_default_system_prompt(smollm2_template):
    prompt = _render(smollm2_template, [Message("user", "Hi")], add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_variables_and_message_shape():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.id }} {{ c.function.name }}"
        " {{ c.function.arguments.city }}]{% endfor %}{% endif %}"
        "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}"
        "{% if m.tool_call_id is defined %}({{ m.tool_call_id }} {{ m.name }}){% endif %}|{% endfor %}"
        "{{ tools | length if tools else 'no tools' }} {{ add_generation_prompt }} {{ eos_token }} {{ custom }}"
    )
    messages = [
        Message("user", "weather?"),
        Message("assistant", "", thinking="look it up", tool_calls=[ToolCall("get_weather", {"city": "Paris"}, id="c1")]),
        Message("tool", "sunny", tool_name="get_weather", tool_call_id="c1"),
    ]
    prompt = _render(template, messages, extra={"custom": 42, "bos_token": "ignored", "messages": []})
    assert prompt == (
        "<s>user:weather?|assistant:[c1 get_weather Paris]<think>look it up|look it up</think>|"
        "tool:sunny(c1 get_weather)|no tools True </s> 42"
    )


def test_absent_fields_are_undefined_not_empty():
    # Llama 3.1's template raises on `'tool_calls' in message` with an empty list.
    template = "{% for m in messages %}{{ 'tool_calls' in m }} {{ m.reasoning_content is defined }}{% endfor %}"
    assert _render(template, [Message("assistant", "x")]) == "False False"


def test_tools_are_json_schema_functions():
    tool = Tool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}})
    prompt = _render("{% for t in tools %}{{ t | tojson }}{% endfor %}", tools=[tool])
    assert prompt == (
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
    )


def test_tojson_behaves_like_transformers():
    assert _render("{{ {'a': 'é<>&'} | tojson }}") == '{"a": "é<>&"}'
    assert _render("{{ [1] | tojson(indent=2) }}") == "[\n  1\n]"
    assert _render("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}") == '{"a": 2, "b": 1}'


def test_globals_and_extensions():
    assert _render("{{ strftime_now('%Y') }}") == time.strftime("%Y")
    assert _render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}") == "02"
    assert _render("{% generation %}kept{% endgeneration %}") == "kept"
    assert _render("  {% if true %}\n  x\n{% endif %}\n") == "  x\n"  # trim_blocks and lstrip_blocks


def test_oversized_template_is_refused_before_compiling():
    with pytest.raises(ChatTemplateError, match="chat template longer than"):
        _render("x" * 100_001)
    assert _render("x" * 100_000) == "x" * 100_000


def test_raise_exception_becomes_a_bad_request():
    with pytest.raises(ChatTemplateError) as caught:
        _render("{{ raise_exception('Conversation roles must alternate') }}")
    assert caught.value.message == "chat template error: Conversation roles must alternate"
    assert isinstance(caught.value, BadRequestError)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for x in %}", "chat template syntax error on line 1"),
        ("{{ missing.attribute }}", "chat template error: 'missing' is undefined"),
        ("{{ messages | tojson }}{{ undefined_thing | tojson }}", "chat template failed: TypeError"),
    ],
)
def test_template_errors(template, message):
    with pytest.raises(ChatTemplateError) as caught:
        _render(template, [Message("user", "hi")])
    assert caught.value.message.startswith(message)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{% if ''.__class__ %}x{% endif %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ self._TemplateReference__context }}",
        "{{ self.__dict__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__ }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages[0].__setitem__('role', 'x') }}",
        "{{ ''.format.__globals__ }}",
        "{{ '{0.__class__}'.format('') }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_blocks_escapes(template):
    messages = [Message("user", "hi")]
    with pytest.raises(ChatTemplateError) as caught:
        _render(template, messages)
    assert caught.value.message.startswith("chat template blocked by the sandbox: access to attribute")
    assert messages == [Message("user", "hi")]


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**12) %}{% endfor %}",
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ 'xxxxxxxxxx' }}{% endfor %}{% endfor %}",
        "{{ 'a' * 10**9 }}",
        "{{ [0] * 10**9 }}",
        "{{ 10 ** (10 ** 10) }}",
        "{% set ns = namespace(n=7) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'a' | center(10**9) }}",
        "{{ 'a' | center(1000000000) }}",
        "{{ 'a' | indent(10**9) }}",
        "{{ range(10) | slice(10**9) | list }}",
        "{{ 'a'.rjust(10**9) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%0999999999d' | format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ ('a' * 100000).replace('', 'bbbbbbbbbb') }}",
        "{{ ('a' * 100000) | replace('', 'bbbbbbbbbb') }}",
    ],
)
def test_hostile_templates_stop_quickly(template):
    started = time.monotonic()
    with pytest.raises(ChatTemplateError):
        _render(template, [Message("user", "hi")])
    assert time.monotonic() - started < 10


_messages = st.lists(
    st.builds(
        Message,
        role=st.sampled_from(["system", "user", "assistant", "tool", "other"]),
        content=st.text(max_size=40),
        thinking=st.text(max_size=10),
        tool_calls=st.lists(
            st.builds(
                ToolCall,
                name=st.text(max_size=10),
                arguments=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=2),
                id=st.text(max_size=5),
            ),
            max_size=2,
        ),
        tool_name=st.text(max_size=5),
        tool_call_id=st.text(max_size=5),
    ),
    max_size=6,
)

# A template in the style of Qwen's and Llama's: roles checked, tool calls dumped as JSON.
_STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{% if m.role == 'assistant' and m.tool_calls is defined %}"
    "{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}{% endif %}"
    "{% if m.reasoning_content is string %}<think>{{ m.reasoning_content | trim }}</think>{% endif %}"
    "<|{{ m.role }}|>{{ m.content | trim }}{% if loop.last %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=1) }}{% endif %}"
)


@settings(max_examples=150, deadline=None)
@given(_messages, st.booleans())
def test_any_conversation_renders_or_raises_chat_template_error(smollm2_template, messages, generation_prompt):
    tools = [Tool("f", "g")] if generation_prompt else None
    for template in (smollm2_template, _STRICT_TEMPLATE):
        try:
            prompt = _render(template, messages, tools, add_generation_prompt=generation_prompt)
        except ChatTemplateError as error:
            assert error.message.startswith("chat template")
            continue
        assert all(message.content in prompt for message in messages if template is smollm2_template)


_template_soup = st.lists(
    st.sampled_from(
        ["{{", "}}", "{%", "%}", "{#", "#}", " for ", " in ", " endfor ", " if ", " endif ", " set ", "=", "x", "messages"]
        + ["loop", ".", "__class__", "(", ")", "[", "]", "|", "tojson", "'", '"', "*", "**", "~", "9", "range", "\n", "-"]
    ),
    max_size=25,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(_template_soup | st.text(max_size=60))
def test_any_template_renders_or_raises_chat_template_error(template):
    try:
        _render(template, [Message("user", "hi")])
    except ChatTemplateError as error:
        assert error.message.startswith("chat template")
