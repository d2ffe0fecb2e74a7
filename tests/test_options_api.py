"""Options over HTTP, with the official clients: as lenient as Ollama's ``Options.FromMap``, and no more."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from daemon import create_model, running

from mullama.http.server import Server

MODEL = "smol"
HELLO = [{"role": "user", "content": "Hi"}]
#: Options of other servers (llama-server, vLLM) and a typo, that Ollama logs and ignores.
FOREIGN = {"n_probs": 0, "tempreature": 0.5, "use_beam_search": False}


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("options-api")) as server:
        create_model(server.server_address[1], model_path, MODEL, parameters={"num_thread": 1})
        yield server


@pytest.fixture(scope="module")
def native(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=120) as client:
        yield client


def test_unknown_options_are_logged_and_ignored_on_every_api(
        native: ollama.Client, oai: openai.OpenAI, claude: anthropic.Anthropic, caplog: pytest.LogCaptureFixture,
) -> None:
    greedy = {"temperature": 0, "seed": 1, "num_predict": 4}
    with caplog.at_level(logging.WARNING, logger="mullama.options"):
        plain = native.chat(model=MODEL, messages=HELLO, options=greedy).message.content
        assert native.chat(model=MODEL, messages=HELLO, options={**greedy, **FOREIGN}).message.content == plain
        assert native.generate(model=MODEL, prompt="Hi", options={**greedy, **FOREIGN}).done
        reply = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, seed=1,
                                            extra_body={"options": FOREIGN})
        assert reply.choices[0].message.content == plain
        message = claude.messages.create(model=MODEL, max_tokens=4, messages=HELLO,
                                         extra_body={"temperature": 0, "seed": 1, "options": FOREIGN})
        assert message.content[0].text == plain
    warnings = [record.getMessage() for record in caplog.records if "invalid option provided" in record.getMessage()]
    assert len(warnings) == 4 and all("'tempreature'" in warning for warning in warnings)


def test_a_known_option_of_the_wrong_type_is_an_error(native: ollama.Client, oai: openai.OpenAI,
                                                      claude: anthropic.Anthropic) -> None:
    # Beside unknown names, which are passed over: the error names the known option.
    with pytest.raises(ollama.ResponseError) as caught:
        native.chat(model=MODEL, messages=HELLO, options={"tempreature": 0.5, "num_ctx": "big"})
    assert caught.value.status_code == 400 and caught.value.error == 'option "num_ctx" must be of type integer'
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"options": {"n_probs": 1, "stop": "x"}})
    assert refused.value.body["param"] == "stop"
    with pytest.raises(anthropic.BadRequestError, match="use_mmap"):
        claude.messages.create(model=MODEL, max_tokens=4, messages=HELLO, extra_body={"options": {"use_beam_search": True, "use_mmap": 1}})


def test_a_number_for_an_integer_option_is_cut_towards_zero(native: ollama.Client) -> None:
    # Ollama sets an int option with int64(float64): num_predict 3.9 is 3.
    reply = native.generate(model=MODEL, prompt="Count to ten", options={"temperature": 0, "num_predict": 3.9})
    assert reply.eval_count == 3 and reply.done_reason == "length"
