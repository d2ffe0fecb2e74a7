"""Thinking on a real daemon: ``<think>`` split out on the Ollama, OpenAI and Anthropic APIs, and turned off.

SmolLM2 does not reason by itself, so the models here get Go templates that
end the prompt inside ``<think>``: with ``prompt_opens_thinking`` the output
starts as thinking. ``thinker`` never closes it (the whole output is
thinking); ``fewshot`` shows three answers that close it first, and the
greedy model follows them, so its output crosses a real ``</think>``.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from daemon import create_model, running

from mullama.http.server import Server

TURNS = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
THINKER = TURNS + "<think>\n"
FEWSHOT = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n{t}\n</think>\n{a}<|im_end|>\n"
                  for q, t, a in [("Hi", "A greeting.", "Hello!"), ("Bye", "A farewell.", "Goodbye!"),
                                  ("Thanks", "Gratitude.", "You are welcome!")]) + THINKER
#: Opens thinking only when the template's ``.Think`` is set (by the request or ``PARAMETER think``).
CONDITIONAL = TURNS + "{{ if .Think }}<think>\n{{ end }}"
THREADS = {"num_thread": 1}
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1, "num_predict": 16}
HELLO = [{"role": "user", "content": "Good morning"}]
#: The Anthropic SDK takes no ``temperature``: it rides along as an extra field.
SEEDED = {"temperature": 0, "seed": 1}


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ollama_chat(server: Server, model: str, **fields: Any) -> list[dict[str, Any]]:
    """The NDJSON lines of ``/api/chat`` (one line when ``stream`` is false)."""
    status, data = post(server, "/api/chat", {"model": model, "messages": HELLO, "options": GREEDY, **fields})
    assert status == 200, data
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("thinking-api")) as server:
        for name, template, parameters in [("thinker", THINKER, {}), ("fewshot", FEWSHOT, {}),
                                           ("thinker-off", THINKER, {"think": False}),
                                           ("quiet", CONDITIONAL, {"think": False}),
                                           ("eager", CONDITIONAL, {"think": True})]:
            create_model(server.server_address[1], model_path, name, template=template,
                         parameters={**THREADS, **parameters})
        yield server


@pytest.fixture(scope="module")
def split(server: Server) -> dict[str, str]:
    """``fewshot``'s greedy message on Ollama: thinking, then content after a real ``</think>``."""
    message = ollama_chat(server, "fewshot", stream=False)[0]["message"]
    assert message["thinking"].strip() and message["content"].strip()
    return message


# --- Ollama --------------------------------------------------------------------


def test_ollama_whole_output_is_thinking_when_the_prompt_opens_it(server: Server) -> None:
    final = ollama_chat(server, "thinker", stream=False)[0]
    assert final["message"]["content"] == "" and final["message"]["thinking"].strip()
    lines = ollama_chat(server, "thinker")
    assert all(line["message"]["content"] == "" for line in lines)
    assert "".join(line["message"].get("thinking", "") for line in lines) == final["message"]["thinking"]


def test_ollama_think_false_keeps_the_output_as_content(server: Server) -> None:
    thinking = ollama_chat(server, "thinker", stream=False)[0]["message"]["thinking"]
    message = ollama_chat(server, "thinker", stream=False, think=False)[0]["message"]
    assert "thinking" not in message and message["content"].strip() == thinking.strip()


def test_ollama_generate_reports_thinking(server: Server) -> None:
    status, data = post(server, "/api/generate", {"model": "thinker", "prompt": "Good morning", "stream": False,
                                                   "options": GREEDY})
    thinking = json.loads(data)
    assert status == 200 and thinking["response"] == "" and thinking["thinking"].strip()
    status, data = post(server, "/api/generate", {"model": "thinker", "prompt": "Good morning", "stream": False,
                                                   "options": GREEDY, "think": False})
    plain = json.loads(data)
    assert "thinking" not in plain and plain["response"].strip() == thinking["thinking"].strip()


def test_ollama_split_at_a_real_boundary(server: Server, split: dict[str, str]) -> None:
    assert "<think>" not in split["thinking"] + split["content"] and "</think>" not in split["content"]
    lines = ollama_chat(server, "fewshot")
    assert "".join(line["message"].get("thinking", "") for line in lines) == split["thinking"]
    assert "".join(line["message"]["content"] for line in lines) == split["content"]
    # Thinking off: the model still closes a thought it was never told about, and all of it stays content.
    whole = ollama_chat(server, "fewshot", stream=False, think=False)[0]["message"]["content"]
    assert "</think>" in whole
    assert whole.split() == (split["thinking"] + " </think> " + split["content"]).split()


def test_modelfile_parameter_think_is_the_default(server: Server) -> None:
    # thinker-off ends the prompt in <think> regardless, so only the splitting changes.
    message = ollama_chat(server, "thinker-off", stream=False)[0]["message"]
    assert "thinking" not in message and message["content"].strip()
    assert ollama_chat(server, "thinker-off", stream=False, think=True)[0]["message"]["thinking"].strip()
    # quiet and eager render .Think from the parameter, so the prompt itself changes.
    prompt = json.loads(post(server, "/api/apply-template", {"model": "quiet", "messages": HELLO})[1])["prompt"]
    assert not prompt.rstrip().endswith("<think>")
    assert "thinking" not in ollama_chat(server, "quiet", stream=False)[0]["message"]
    assert ollama_chat(server, "quiet", stream=False, think=True)[0]["message"]["thinking"].strip()
    assert ollama_chat(server, "eager", stream=False)[0]["message"]["thinking"].strip()
    assert "thinking" not in ollama_chat(server, "eager", stream=False, think=False)[0]["message"]


# --- OpenAI --------------------------------------------------------------------


def test_openai_reasoning(oai: openai.OpenAI, split: dict[str, str]) -> None:
    # ``reasoning`` as Ollama names it; ``reasoning_content`` too, for the clients that read only that name.
    reply = oai.chat.completions.create(model="fewshot", messages=HELLO, max_tokens=GREEDY["num_predict"],
                                        temperature=0, seed=1)
    message = reply.choices[0].message
    assert (message.model_extra["reasoning"], message.content) == (split["thinking"], split["content"])
    assert message.model_extra["reasoning_content"] == split["thinking"]
    reasoning, mirrored, content = "", "", ""
    for chunk in oai.chat.completions.create(model="fewshot", messages=HELLO, max_tokens=GREEDY["num_predict"],
                                             temperature=0, seed=1, stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning") or ""
        mirrored += (delta.model_extra or {}).get("reasoning_content") or ""
        assert not (delta.content and reasoning != split["thinking"]), "content before the thinking ended"
        content += delta.content or ""
    assert (reasoning, mirrored, content) == (split["thinking"], split["thinking"], split["content"])


def test_openai_reasoning_effort(oai: openai.OpenAI) -> None:
    def message(model: str, **extra: Any) -> Any:
        return oai.chat.completions.create(model=model, messages=HELLO, max_tokens=GREEDY["num_predict"],
                                           temperature=0, seed=1, **extra).choices[0].message

    off = message("fewshot", reasoning_effort="none")
    assert "</think>" in off.content and "reasoning" not in off.model_extra
    assert message("thinker").model_extra["reasoning"].strip()
    # Absent, the Modelfile decides; any effort but "none" turns thinking on.
    assert "reasoning" not in message("quiet").model_extra
    assert message("quiet", reasoning_effort="low").model_extra["reasoning"].strip()
    assert message("quiet", extra_body={"reasoning": {"effort": "high"}}).model_extra["reasoning"].strip()


# --- Anthropic -----------------------------------------------------------------


def test_anthropic_thinking_blocks(claude: anthropic.Anthropic, split: dict[str, str]) -> None:
    reply = claude.messages.create(model="fewshot", max_tokens=GREEDY["num_predict"], messages=HELLO,
                                   extra_body=SEEDED)
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert (reply.content[0].thinking, reply.content[1].text) == (split["thinking"], split["content"])
    events = claude.messages.create(model="fewshot", max_tokens=GREEDY["num_predict"], messages=HELLO,
                                    extra_body=SEEDED, stream=True)
    deltas = [event.delta for event in events if event.type == "content_block_delta"]
    kinds = [delta.type for delta in deltas]
    assert kinds == sorted(kinds, key=("thinking_delta", "text_delta").index)
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == split["thinking"]
    assert "".join(d.text for d in deltas if d.type == "text_delta") == split["content"]


def test_anthropic_thinking_disabled_and_whole_thinking(claude: anthropic.Anthropic) -> None:
    off = claude.messages.create(model="fewshot", max_tokens=GREEDY["num_predict"], messages=HELLO,
                                 extra_body=SEEDED, thinking={"type": "disabled"})
    assert [block.type for block in off.content] == ["text"] and "</think>" in off.content[0].text
    only = claude.messages.create(model="thinker", max_tokens=GREEDY["num_predict"], messages=HELLO, extra_body=SEEDED)
    assert [block.type for block in only.content] == ["thinking"] and only.content[0].thinking.strip()
    on = claude.messages.create(model="quiet", max_tokens=GREEDY["num_predict"], messages=HELLO, extra_body=SEEDED,
                                thinking={"type": "enabled", "budget_tokens": 1024})
    assert on.content[0].type == "thinking"
