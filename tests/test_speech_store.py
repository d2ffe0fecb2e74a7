"""Speech models in the store: catalogue names, Hub and local pulls, creation from a blob, list/show/tags, refusals."""

from __future__ import annotations

import json
import re

import pytest
from daemon import create_model, exchange, running
from hub_server import sha256_of
from speech_helpers import whisper_cpp_source
from test_pull import hub  # noqa: F401 - the same fresh store and local Hub as the pull tests
from whisper_weights import whisper_tiny_en_path

from mullama.errors import InvalidModelFileError
from mullama.store.blobs import Store
from mullama.store.pull import pull
from mullama.store.records import find_model
from mullama.store.registry import HubSource, load_aliases, resolve

WHISPER_REPO = "ggerganov/whisper.cpp"




# --- the catalogue -------------------------------------------------------------------------------------


def test_every_speech_name_is_a_model_whisper_cpps_download_script_fetches():
    script = (whisper_cpp_source() / "models" / "download-ggml-model.sh").read_text()
    listed = re.search(r'models="([^"]*)"', script).group(1).split()
    speech = load_aliases()["speech"]
    assert "huggingface.co/ggerganov/whisper.cpp" in script
    for key in speech:
        (spec,) = resolve(key).files
        (source,) = spec.sources
        assert isinstance(source, HubSource) and source.repo == WHISPER_REPO
        size = key.split(":")[1]
        assert source.file == f"ggml-{'base' if size == 'latest' else size}.bin"
        assert source.file[len("ggml-"):-len(".bin")] in listed
    # Every model of the script is named, but for the diarization one that lives in another repository.
    assert {f"whisper:{name}" for name in listed if "tdrz" not in name} <= set(speech)


@pytest.mark.parametrize("text,file", [("whisper:tiny.en", "ggml-tiny.en.bin"), ("whisper", "ggml-base.bin"),
                                       ("WHISPER:Large-V3-Turbo", "ggml-large-v3-turbo.bin")])
def test_speech_names_resolve_like_other_names(text, file):
    assert resolve(text).files[0].sources[0].file == file


def test_a_misspelt_speech_name_suggests_the_real_ones(hub):
    with pytest.raises(Exception, match="whisper:tiny"):
        pull("whisper:tinny")


# --- pulls -------------------------------------------------------------------------------------------------


def test_pull_a_speech_name_through_the_hub(hub):
    path = whisper_tiny_en_path()
    hub.add(WHISPER_REPO, "ggml-tiny.en.bin", path)
    name = pull("whisper:tiny.en")
    store = Store()
    manifest = store.read_manifest(name)
    assert [layer.digest for layer in manifest.layers] == ["sha256:" + sha256_of(path)]
    assert json.loads(store.blob_path(manifest.config.digest).read_bytes())["model_format"] == "ggml"
    record = find_model(store, "whisper:tiny.en")
    assert record.speech and record.whisper.n_audio_layer == 4


def test_pull_a_hub_file_by_name(hub):
    hub.add(WHISPER_REPO, "ggml-tiny.en.bin", whisper_tiny_en_path())
    name = pull(f"hf:{WHISPER_REPO}:ggml-tiny.en.bin")
    assert name.display == f"hf.co/{WHISPER_REPO}:ggml-tiny.en.bin"
    assert find_model(Store(), name.display).speech


def test_a_bin_that_is_no_whisper_model_is_not_stored(hub, model_path):
    hub.add(WHISPER_REPO, "ggml-tiny.bin", model_path)  # a GGUF under a speech model's name
    with pytest.raises(InvalidModelFileError, match="GGUF"):
        pull("whisper:tiny")
    assert not Store().list_models()


def test_a_local_file_is_a_speech_model():
    record = find_model(Store(), str(whisper_tiny_en_path()))
    assert record.speech and not record.whisper.multilingual


# --- the daemon: create, list, show, refusals --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("speech-store")) as server:
        create_model(server.server_address[1], whisper_tiny_en_path(), "whisper:tiny.en")
        yield server


def test_created_from_an_uploaded_blob_and_listed_with_its_details(server):
    status, body = exchange(server, "GET", "/api/tags")
    (model,) = json.loads(body)["models"]
    assert status == 200 and model["name"] == "whisper:tiny.en"
    assert model["details"] == {"parent_model": "", "format": "ggml", "family": "whisper", "families": ["whisper"],
                                "parameter_size": "37.76M", "quantization_level": "F16"}
    assert model["size"] > whisper_tiny_en_path().stat().st_size


def test_show_gives_the_speech_capability_and_the_header(server):
    status, body = exchange(server, "POST", "/api/show", {"model": "whisper:tiny.en"})
    shown = json.loads(body)
    assert status == 200 and shown["capabilities"] == ["speech"]
    info = shown["model_info"]
    assert info["general.architecture"] == "whisper" and info["whisper.n_text_layer"] == 4
    assert info["whisper.n_vocab"] == 51864 and info["whisper.multilingual"] is False
    assert shown["modelfile"].splitlines()[-1].startswith("FROM ")


def test_a_speech_model_cannot_chat_generate_or_embed(server):
    for path, body in [("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/api/generate", {"prompt": "hi"}), ("/api/embed", {"input": "hi"})]:
        status, answer = exchange(server, "POST", path, {"model": "whisper:tiny.en", "stream": False, **body})
        assert status == 400 and "is a speech model" in json.loads(answer)["error"], path
    assert json.loads(exchange(server, "GET", "/api/ps")[1])["models"] == [], "refused before loading"
    # A request that only loads the model (Ollama's way to preload one) loads a speech model too.
    status, answer = exchange(server, "POST", "/api/generate", {"model": "whisper:tiny.en"})
    assert status == 200 and json.loads(answer.splitlines()[-1])["done_reason"] == "load"
    (loaded,) = json.loads(exchange(server, "GET", "/api/ps")[1])["models"]
    assert loaded["name"] == "whisper:tiny.en" and loaded["details"]["family"] == "whisper" and loaded["active"] == 0


def test_a_damaged_speech_model_is_refused_at_creation(server, tmp_path):
    damaged = tmp_path / "ggml-damaged.bin"
    damaged.write_bytes(whisper_tiny_en_path().read_bytes()[:1_000_000])
    with pytest.raises(AssertionError, match="truncated"):
        create_model(server.server_address[1], damaged, "broken")
