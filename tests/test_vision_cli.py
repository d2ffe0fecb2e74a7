"""Image paths in ``mullama run`` prompts, attached as ``ollama run`` attaches them."""

from __future__ import annotations

import base64
import io
import signal
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
from daemon import cli, serve
from projector import tiny_projector_path
from test_vision import png

from mullama.cli.generate import RunOptions
from mullama.cli.images import attach_images, find_image_paths
from mullama.cli.interactive import Session, parse_command
from mullama.client import Client, parse_host
from mullama.errors import BadRequestError

RED, BLUE = png(30, 30, (220, 10, 10)), png(30, 30, (10, 10, 220))


def test_paths_are_found_quoted_escaped_relative_and_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    prompt = ("compare '/a b/one.PNG' with \"./two.jpg\", ~/three.jpeg and /x/four\\ 4.webp; "
              "not this.png nor http://host/five.png")
    assert [(named, str(path)) for named, path in find_image_paths(prompt)] == [
        ("'/a b/one.PNG'", "/a b/one.PNG"), ('"./two.jpg"', "two.jpg"),
        ("~/three.jpeg", str(tmp_path / "three.jpeg")), ("/x/four\\ 4.webp", "/x/four 4.webp")]
    assert find_image_paths("no pictures here, just /etc/passwd and ./notes.txt") == []


def test_images_are_attached_in_order_and_a_missing_one_is_an_error(tmp_path):
    (tmp_path / "my pictures").mkdir()
    first, second = tmp_path / "my pictures" / "red.png", tmp_path / "blue.png"
    first.write_bytes(RED)
    second.write_bytes(BLUE)
    err = io.StringIO()
    text, images = attach_images(f"Compare '{first}' with {second} please", err)
    assert text == "Compare  with  please"
    assert images == [base64.b64encode(RED).decode(), base64.b64encode(BLUE).decode()]
    assert err.getvalue().splitlines() == [f"Added image '{first}'", f"Added image '{second}'"]
    with pytest.raises(BadRequestError, match="couldn't find image '/nowhere/cat.png': no such file"):
        attach_images("what is /nowhere/cat.png", err)
    assert attach_images("just text", err) == ("just text", [])


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A ``mullama serve`` with a vision model (greedy) and a text-only one."""
    serving = serve(tmp_path_factory.mktemp("vision-cli"))
    client = ollama.Client(host=f"http://127.0.0.1:{serving.port}", timeout=180)
    greedy = {"temperature": 0, "num_predict": 12}
    client.create(model="smol", files={"smol.gguf": client.create_blob(model_path)}, parameters=greedy)
    client.create(model="smolvision", from_="smol", parameters=greedy,
                  files={"mmproj.gguf": client.create_blob(tiny_projector_path())})
    yield serving.env
    serving.stop(signal.SIGINT)


def test_run_attaches_the_images_a_prompt_names(daemon, tmp_path):
    picture = tmp_path / "a picture.png"
    picture.write_bytes(RED)
    result = cli(daemon, "run", "smolvision", f"What is in '{picture}'?")
    assert result.returncode == 0, result.stderr
    assert f"Added image '{picture}'" in result.stderr
    api = ollama.Client(host=f"http://{daemon['MULLAMA_HOST']}", timeout=180)
    assert result.stdout.strip() == api.generate(model="smolvision", prompt="What is in ?", images=[RED]).response.strip()
    missing = cli(daemon, "run", "smolvision", f"What is in {tmp_path / 'gone.png'}?")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: couldn't find image '{tmp_path / 'gone.png'}': no such file"
    # A model that does not see takes the path as text, as with ollama.
    text = cli(daemon, "run", "smol", f"What is in {tmp_path / 'gone.png'}?")
    assert text.returncode == 0 and "Added image" not in text.stderr


def test_the_interactive_session_attaches_images_and_survives_a_missing_one(daemon, tmp_path):
    picture = tmp_path / "blue.png"
    picture.write_bytes(BLUE)
    out, err = io.StringIO(), io.StringIO()
    session = Session(Client(parse_host(daemon["MULLAMA_HOST"]), timeout=180), RunOptions(model="smolvision",
                                                                                         vision=True), out, err)
    assert session.handle(parse_command(f"What is {tmp_path / 'gone.png'}"))
    assert out.getvalue().startswith("Error: couldn't find image") and session.opts.messages == []
    assert session.handle(parse_command(f"Describe {picture}"))
    question, answer = session.opts.messages
    assert question == {"role": "user", "content": "Describe", "images": [base64.b64encode(BLUE).decode()]}
    assert answer["role"] == "assistant" and answer["content"]
