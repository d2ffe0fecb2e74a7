"""``think`` levels reach the template on every API, as Ollama's ``ThinkValue`` reaches its templates.

The models here have templates that spell the level they are given:
``think`` and one ``a`` per step (low 1 ... max 4), ``think`` and five
``off`` when thinking is turned off, nothing when the request leaves it to the model.
What each template renders is read on Ollama's ``/api/apply-template``;
every other request is checked by its prompt's token count, which the
OpenAI and Anthropic APIs report (``usage.prompt_tokens``, ``input_tokens``)
and which differs for each level because the spelling differs in length.
Ollama's own ``prompt_eval_count`` counts only the tokens the prompt cache
did not hold, so the expected counts come from tokenizing the renderings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from daemon import create_model, exchange, running
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hardening_gguf import rewrite, text

import mullama
from mullama.errors import BadRequestError
from mullama.http import anthropic as anthropic_api
from mullama.http import openai as openai_api
from mullama.http.server import Server

TURNS = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
#: Go: Ollama's ``.IsThinkSet``, ``.Think`` and ``.ThinkLevel``.
LEVELED = TURNS + (
    '{{ if .IsThinkSet }}think{{ if .Think }}{{ if eq .ThinkLevel "low" }} a{{ else if eq .ThinkLevel "medium" }}'
    ' a a{{ else if eq .ThinkLevel "high" }} a a a{{ else if eq .ThinkLevel "max" }} a a a a{{ end }}'
    "{{ else }} off off off off off{{ end }}\n{{ end }}<|im_start|>assistant\n")
#: Jinja: ``enable_thinking`` (Qwen3's switch) and ``reasoning_effort`` (gpt-oss's level).
JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if enable_thinking is defined %}think{% if enable_thinking %}"
    "{{ ' a' * {'low': 1, 'medium': 2, 'high': 3}[reasoning_effort] }}{% else %}{{ ' off' * 5 }}{% endif %}{{ '\\n' }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: Opens thinking only at level ``high``: whether the reply has thinking shows the level the template saw.
DEEP = TURNS + '<|im_start|>assistant\n{{ if eq .ThinkLevel "high" }}<think>\n{{ end }}'
#: What each ``think`` renders as (Ollama's ``true`` is level ``medium``); Jinja knows no ``max``: it is ``high``.
SPELLED = {None: "", False: "think off off off off off\n", True: "think a a\n", "low": "think a\n", "medium": "think a a\n",
           "high": "think a a a\n", "max": "think a a a a\n"}
JINJA_SPELLED = {**SPELLED, "max": SPELLED["high"]}
HELLO = [{"role": "user", "content": "Good morning"}]


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("think-levels")
    jinja = rewrite(model_path, tmp / "jinja.gguf", {"tokenizer.chat_template": text(JINJA)}, sparse=False)
    with running(tmp) as server:
        port = server.server_address[1]
        create_model(port, model_path, "leveled", template=LEVELED, parameters={"num_thread": 1})
        create_model(port, model_path, "deep", template=DEEP, parameters={"num_thread": 1})
        create_model(port, jinja, "jinja", parameters={"num_thread": 1})
        # A gpt-oss name and no marker in the template: Mullama renders harmony, as for gpt-oss.
        create_model(port, model_path, "gpt-oss-smol", parameters={"num_thread": 1})
        yield server


def post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, data = exchange(server, "POST", path, body)
    assert status == 200, data
    return json.loads(data)


def rendered(server: Server, model: str, think: Any) -> str:
    body = {"model": model, "messages": HELLO, **({} if think is None else {"think": think})}
    return post(server, "/api/apply-template", body)["prompt"]


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Iterator[mullama.Model]:
    with mullama.Model(model_path, num_ctx=512, num_parallel=1, num_thread=1) as loaded:
        yield loaded


def native_counts(server: Server, tokenizer: mullama.Model, model: str, spelled: dict[Any, str]) -> dict[Any, int]:
    """The prompt length of each ``think`` on Ollama's API, once the template is seen to spell it."""
    out = {}
    for think, spelling in spelled.items():
        prompt = rendered(server, model, think)
        assert prompt.endswith(f"<|im_end|>\n{spelling}<|im_start|>assistant\n"), (think, prompt)
        out[think] = len(tokenizer.tokenize(prompt))
    assert len({out[think] for think in (None, False, "low", "medium", "high")}) == 5
    return out


@pytest.fixture(scope="module")
def counts(server: Server, tokenizer: mullama.Model) -> dict[Any, int]:
    return native_counts(server, tokenizer, "leveled", SPELLED)


# --- Ollama --------------------------------------------------------------------


def test_ollama_think_levels_reach_a_go_template(server: Server, tokenizer: mullama.Model) -> None:
    counts = native_counts(server, tokenizer, "leveled", SPELLED)
    assert counts[True] == counts["medium"] and counts["max"] > counts["high"]


def test_ollama_client_think_levels_change_the_reply(server: Server) -> None:
    client = ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120)
    options = {"temperature": 0, "seed": 1, "num_predict": 8}

    def chat(think: Any) -> Any:
        return client.chat(model="deep", messages=HELLO, think=think, options=options).message

    assert chat("high").thinking and not chat("high").content
    assert not chat("low").thinking and chat("low").content
    assert not chat(True).thinking  # true is "medium"
    # /api/generate renders its prompt as a one-message chat, with the same level.
    assert client.generate(model="deep", prompt="Good morning", think="high", options=options).thinking
    assert not client.generate(model="deep", prompt="Good morning", think="medium", options=options).thinking


def test_ollama_think_levels_reach_a_jinja_template(server: Server, tokenizer: mullama.Model) -> None:
    native_counts(server, tokenizer, "jinja", JINJA_SPELLED)


@pytest.mark.parametrize(("think", "line"), [("low", "Reasoning: low"), ("high", "Reasoning: high"),
                                             ("max", "Reasoning: high"), (True, "Reasoning: medium")])
def test_ollama_think_levels_reach_harmony(server: Server, think: Any, line: str) -> None:
    prompt = rendered(server, "gpt-oss-smol", think)
    assert line + "\n" in prompt and prompt.count("Reasoning:") == 1
    assert "Reasoning:" not in rendered(server, "gpt-oss-smol", False)


# --- OpenAI ----------------------------------------------------------------------

#: Ollama's thinkFromReasoningEffort (openai/openai.go).
EFFORTS = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max",
           "max": "max"}


@pytest.mark.parametrize(("effort", "think"), EFFORTS.items())
def test_openai_reasoning_effort_is_a_level(oai: openai.OpenAI, counts: dict[Any, int], effort: str,
                                            think: Any) -> None:
    reply = oai.chat.completions.create(model="leveled", messages=HELLO, max_tokens=1, temperature=0,
                                        reasoning_effort=effort)  # type: ignore[arg-type]
    assert reply.usage.prompt_tokens == counts[think]


def test_openai_reasoning_object_and_responses_effort(oai: openai.OpenAI, counts: dict[Any, int]) -> None:
    # Ollama reads ``reasoning.effort`` before ``reasoning_effort``.
    reply = oai.chat.completions.create(model="leveled", messages=HELLO, max_tokens=1, temperature=0,
                                        reasoning_effort="low", extra_body={"reasoning": {"effort": "high"}})
    assert reply.usage.prompt_tokens == counts["high"]
    for effort, think in (("low", "low"), ("xhigh", "max"), ("none", False)):
        response = oai.responses.create(model="leveled", input="Good morning", max_output_tokens=1, temperature=0,
                                        reasoning={"effort": effort})  # type: ignore[typeddict-item]
        assert response.usage.input_tokens == counts[think], effort


def test_openai_reasoning_effort_reaches_a_jinja_template(oai: openai.OpenAI, server: Server,
                                                          tokenizer: mullama.Model) -> None:
    def count(**extra: Any) -> int:
        return oai.chat.completions.create(model="jinja", messages=HELLO, max_tokens=1, temperature=0,
                                           **extra).usage.prompt_tokens

    native = native_counts(server, tokenizer, "jinja", JINJA_SPELLED)
    assert count(reasoning_effort="low") == native["low"]
    assert count(reasoning_effort="high") == count(reasoning_effort="xhigh") == native["high"]
    assert count(reasoning_effort="none") == native[False]


# --- Anthropic -------------------------------------------------------------------

#: Thinking budgets as Claude Code asks them ("think", "think hard", "ultrathink"), and their levels.
BUDGETS = {1024: "low", 4000: "low", 10000: "medium", 31999: "high"}


def test_anthropic_budgets_and_effort_are_levels(claude: anthropic.Anthropic, counts: dict[Any, int]) -> None:
    def count(**extra: Any) -> int:
        return claude.messages.count_tokens(model="leveled", messages=HELLO, **extra).input_tokens  # type: ignore

    for budget, level in BUDGETS.items():
        assert count(thinking={"type": "enabled", "budget_tokens": budget}) == counts[level], budget
    for effort, level in (("low", "low"), ("medium", "medium"), ("high", "high"), ("xhigh", "high"), ("max", "max")):
        assert count(output_config={"effort": effort}) == counts[level], effort
    # An effort says how hard enabled thinking works; disabled thinking stays off whatever the effort.
    assert count(thinking={"type": "enabled", "budget_tokens": 1024}, output_config={"effort": "high"}) == counts["high"]
    assert count(thinking={"type": "disabled"}, output_config={"effort": "high"}) == counts[False]
    assert count(thinking={"type": "adaptive"}) == counts[None]
    reply = claude.messages.create(model="leveled", max_tokens=1, messages=HELLO,
                                   thinking={"type": "enabled", "budget_tokens": 31999}, extra_body={"temperature": 0})
    assert reply.usage.input_tokens == counts["high"]


def test_anthropic_unknown_effort_is_refused(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="output_config.effort"):
        claude.messages.count_tokens(model="leveled", messages=HELLO,
                                     output_config={"effort": "extreme"})  # type: ignore[typeddict-item]


# --- parsing, against Ollama's own mappings ------------------------------------------

_efforts = st.sampled_from(["", "none", "minimal", "low", "medium", "high", "xhigh", "ultra", "max", "Low", "extreme"])
_values = _efforts | st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.lists(st.text(max_size=3))


def _ollama_think_from_reasoning_effort(effort: Any) -> Any:
    """openai/openai.go's thinkFromReasoningEffort, written out: the think value, or ValueError for a 400."""
    if effort is None or effort == "":
        return None
    if not isinstance(effort, str):
        raise ValueError(effort)  # the JSON decoder refuses a non-string effort
    mapped = {"none": False, "minimal": "low", "xhigh": "max", "ultra": "max"}
    if effort in mapped:
        return mapped[effort]
    if effort in ("low", "medium", "high", "max"):
        return effort
    raise ValueError(effort)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_reasoning_effort_maps_as_ollamas(effort: Any) -> None:
    try:
        expected = _ollama_think_from_reasoning_effort(effort)
    except ValueError:
        with pytest.raises(BadRequestError):
            openai_api._think(effort, "reasoning_effort")
        return
    assert openai_api._think(effort, "reasoning_effort") == expected


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "adaptive", "x"])},
                                                  optional={"budget_tokens": st.integers(0, 200_000)})),
       st.one_of(st.none(), st.fixed_dictionaries({}, optional={"effort": _values})))
def test_anthropic_thinking_is_ollamas_or_finer(thinking: Any, output_config: Any) -> None:
    effort = (output_config or {}).get("effort")
    effort = effort.strip().lower() or None if isinstance(effort, str) else effort  # Ollama's normalisation
    if effort is not None and effort not in ("low", "medium", "high", "xhigh", "max"):
        with pytest.raises(BadRequestError):
            anthropic_api.parse_thinking(thinking, output_config)
        return
    think = anthropic_api.parse_thinking(thinking, output_config)
    kind = (thinking or {}).get("type")
    # Ollama (anthropic/anthropic.go): disabled is off; enabled is on; else the effort, xhigh read as high.
    if kind == "disabled":
        assert think is False
    elif effort is not None:
        assert think == ("high" if effort == "xhigh" else effort)
    elif kind == "enabled":
        budget = thinking.get("budget_tokens")
        assert think is True if budget is None else think == ("low" if budget < 8192 else
                                                              "medium" if budget < 24576 else "high")
    else:
        assert think is None
