"""Images on a real daemon through the official ``ollama``, ``openai`` and ``anthropic`` clients.

The model is SmolLM2-135M with the tiny generated projector (tests/projector.py),
created in the daemon's store the way an Ollama user would: the projector
uploaded as a blob, then ``create`` with it as a file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from conftest import llama_cpp_source
from daemon import anthropic_client, create_model, exchange, openai_client, running
from projector import IMAGE_TOKENS, projector_bytes, tiny_projector_path
from test_vision import png

from mullama.engine.vision import NO_VISION
from mullama.http.server import Server

VISION, PLAIN = "smolvision", "smol"
QUESTION = "What is in this picture?"
TOKENS = 12


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("vision-api")) as server:
        port = server.server_address[1]
        create_model(port, model_path, PLAIN)
        client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=180)
        digest = client.create_blob(tiny_projector_path())
        client.create(model=VISION, from_=PLAIN, files={"mmproj-tiny.gguf": digest})
        yield server


@pytest.fixture(scope="module")
def local(server: Server) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{server.server_address[1]}", timeout=180)


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic_client(server)


@pytest.fixture(scope="module")
def picture() -> bytes:
    return (llama_cpp_source() / "tools" / "mtmd" / "test-1.jpeg").read_bytes()


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def ollama_answer(local: ollama.Client, images: list[Any], model: str = VISION) -> Any:
    return local.chat(model=model, messages=[{"role": "user", "content": QUESTION, "images": images}],
                      options={"temperature": 0, "num_predict": TOKENS})


def openai_answer(oai: openai.OpenAI, url: str, model: str = VISION) -> Any:
    return oai.chat.completions.create(model=model, max_tokens=TOKENS, temperature=0, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": QUESTION}]}])


def anthropic_answer(claude: anthropic.Anthropic, data: bytes, model: str = VISION, media: str = "image/jpeg") -> Any:
    return claude.messages.create(model=model, max_tokens=TOKENS, extra_body={"temperature": 0}, messages=[{
        "role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": media,
                                         "data": base64.b64encode(data).decode()}},
            {"type": "text", "text": QUESTION}]}])


def test_each_client_sends_an_image_and_gets_the_same_answer(local, oai, claude, picture):
    by_ollama = ollama_answer(local, [picture])
    by_openai = openai_answer(oai, data_url(picture))
    by_anthropic = anthropic_answer(claude, picture)
    text = by_ollama.message.content
    assert text
    assert by_openai.choices[0].message.content == text
    assert by_anthropic.content[0].text == text
    # Without the picture the greedy answer differs: the image was read.
    assert ollama_answer(local, []).message.content != text
    # Each reports the image's tokens in its prompt (the cache may have held some of the prompt, never the image).
    assert by_openai.usage.prompt_tokens > IMAGE_TOKENS
    assert by_anthropic.usage.input_tokens > IMAGE_TOKENS


def test_ollama_generate_and_openai_responses_take_images(local, oai, picture):
    red, blue = png(30, 30, (220, 10, 10)), png(30, 30, (10, 10, 220))
    answers = [local.generate(model=VISION, prompt=QUESTION, images=[image], options={
        "temperature": 0, "num_predict": TOKENS}) for image in (red, blue, red)]
    assert answers[0].response and answers[0].response == answers[2].response != answers[1].response
    assert answers[0].prompt_eval_count > IMAGE_TOKENS
    # Ollama's raw prompts name the image where it goes.
    raw = local.generate(model=VISION, prompt="Look: [img-0] What is it?", images=[red], raw=True,
                         options={"temperature": 0, "num_predict": TOKENS})
    assert raw.response
    response = oai.responses.create(model=VISION, max_output_tokens=TOKENS, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": data_url(picture)},
                                    {"type": "input_text", "text": QUESTION}]}])
    assert response.output_text == ollama_answer(local, [picture]).message.content


def test_a_second_turn_does_not_read_the_image_again(local, picture):
    first = ollama_answer(local, [picture])
    history = [{"role": "user", "content": QUESTION, "images": [picture]},
               {"role": "assistant", "content": first.message.content},
               {"role": "user", "content": "Tell me more."}]
    second = local.chat(model=VISION, messages=history, options={"temperature": 0, "num_predict": TOKENS})
    assert second.message.content
    assert second.prompt_eval_count < IMAGE_TOKENS


def test_a_corrupt_image_is_a_400_on_every_api_and_the_daemon_keeps_serving(local, oai, claude, picture):
    corrupt = b"\x89PNG\r\n\x1a\n" + bytes(64)
    with pytest.raises(ollama.ResponseError) as by_ollama:
        ollama_answer(local, [corrupt])
    assert by_ollama.value.status_code == 400 and "corrupt" in by_ollama.value.error
    with pytest.raises(openai.BadRequestError, match="corrupt"):
        openai_answer(oai, data_url(corrupt, "image/png"))
    with pytest.raises(anthropic.BadRequestError, match="corrupt"):
        anthropic_answer(claude, corrupt, media="image/png")
    with pytest.raises(openai.BadRequestError, match="WebP images are not supported"):
        openai_answer(oai, data_url(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(32), "image/webp"))
    assert ollama_answer(local, [picture]).message.content


def test_remote_image_urls_are_refused_on_every_api(server, oai, claude):
    # The ollama client itself refuses a URL (it reads a string as a file name), so this one goes by hand.
    status, body = exchange(server, "POST", "/api/chat", {"model": VISION, "messages": [
        {"role": "user", "content": QUESTION, "images": ["https://example.com/cat.png"]}]})
    assert status == 400 and "base64" in json.loads(body)["error"]
    with pytest.raises(openai.BadRequestError, match="does not fetch remote images"):
        openai_answer(oai, "https://example.com/cat.png")
    with pytest.raises(anthropic.BadRequestError, match="base64"):
        claude.messages.create(model=VISION, max_tokens=TOKENS, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])


def test_a_model_without_vision_refuses_images_with_ollamas_words(local, oai, claude, picture):
    with pytest.raises(ollama.ResponseError) as by_ollama:
        ollama_answer(local, [picture], model=PLAIN)
    assert by_ollama.value.status_code == 400 and by_ollama.value.error == NO_VISION
    with pytest.raises(openai.BadRequestError, match=NO_VISION):
        openai_answer(oai, data_url(picture), model=PLAIN)
    with pytest.raises(anthropic.BadRequestError, match=NO_VISION):
        anthropic_answer(claude, picture, model=PLAIN)


def show(server: Server, name: str) -> dict[str, Any]:
    """``/api/show`` by hand: the ollama client drops ``projector_info``."""
    status, body = exchange(server, "POST", "/api/show", {"model": name})
    assert status == 200, body
    return json.loads(body)


def test_show_reports_the_projector_and_vision_only_where_images_work(server, local, model_path, picture, tmp_path):
    shown = show(server, VISION)
    assert "vision" in shown["capabilities"]
    assert shown["projector_info"]["general.architecture"] == "clip"
    assert shown["projector_info"]["clip.projector_type"] == "mlp"
    plain = show(server, PLAIN)
    assert "vision" not in plain["capabilities"] and "projector_info" not in plain
    # A projector of a type libmtmd does not know looks right from its file, but does not load.
    unknown = projector_bytes().replace(b"\x03\x00\x00\x00\x00\x00\x00\x00mlp", b"\x03\x00\x00\x00\x00\x00\x00\x00xyz")
    (tmp_path / "odd.gguf").write_bytes(unknown)
    digest = local.create_blob(tmp_path / "odd.gguf")
    local.create(model="smolodd", from_=PLAIN, files={"odd.gguf": digest})
    assert show(server, "smolodd")["projector_info"]["clip.projector_type"] == "xyz"
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_answer(local, [picture], model="smolodd")
    assert refused.value.status_code == 400 and refused.value.error.startswith(NO_VISION + " (")
    # Loaded, the model knows better than its files: no vision, and text still works.
    assert "vision" not in show(server, "smolodd")["capabilities"]
    assert local.chat(model="smolodd", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 4}).done
