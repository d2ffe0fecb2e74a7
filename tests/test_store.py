"""The content-addressed store: blobs, manifests, references, and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError, InvalidModelFileError, ModelNotFoundError, NotFoundError
from mullama.store.names import ModelName
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MULLAMA_MODELS", str(tmp_path / "models"))
    return Store()


def _model(store: Store, data: bytes, name: str, extra: tuple[Layer, ...] = ()) -> Manifest:
    digest = store.add_blob_bytes(data)
    config = store.add_blob_bytes(b'{"model_format":"gguf"}')
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, config, 23),
                        (Layer(MEDIA_TYPES["model"], digest, len(data)), *extra))
    store.write_manifest(ModelName.parse(name), manifest)
    return manifest


def _all_files(store: Store) -> set[str]:
    return {str(path.relative_to(store.root)) for path in store.root.rglob("*") if path.is_file()}


def test_store_defaults_to_models_dir(store, tmp_path):
    assert store.root == tmp_path / "models"


def test_add_blob_bytes_is_content_addressed(store):
    digest = store.add_blob_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert store.blob_path(digest).read_bytes() == b"hello"
    assert store.blob_path(digest).name == "sha256-" + digest[7:]
    assert store.add_blob_bytes(b"hello") == digest


def test_add_blob_from_file_copies_and_verifies(store, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" * 1000)
    expected = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.add_blob_from_file(source, expected) == expected
    assert store.blob_path(expected).read_bytes() == source.read_bytes()
    assert os.stat(store.blob_path(expected)).st_ino != os.stat(source).st_ino


def test_add_blob_from_file_links_when_asked(store, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" * 1000)
    digest = store.add_blob_from_file(source, sharing="link")
    assert os.stat(store.blob_path(digest)).st_ino == os.stat(source).st_ino


def test_a_users_file_is_never_hard_linked_so_editing_it_cannot_corrupt_the_blob(store, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" * 1000)
    digest = store.add_blob_from_file(source, sharing="clone")
    assert os.stat(store.blob_path(digest)).st_ino != os.stat(source).st_ino
    with open(source, "r+b") as edited:  # an edit in place, as a quantizer rewriting its output would
        edited.write(b"EDIT")
    assert store.blob_path(digest).read_bytes() == b"GGUF" * 1000


@pytest.mark.parametrize("sharing", ["copy", "clone", "link"])
def test_wrong_digest_admits_nothing(store, tmp_path, sharing):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"not what you expected")
    with pytest.raises(InvalidModelFileError):
        store.add_blob_from_file(source, "sha256:" + "0" * 64, sharing=sharing)
    assert not any(path.is_file() for path in (store.root / "blobs").glob("*"))


def test_missing_source_file(store, tmp_path):
    with pytest.raises(NotFoundError):
        store.add_blob_from_file(tmp_path / "absent.gguf")


def test_manifest_round_trip_and_listing(store):
    manifest = _model(store, b"weights", "Smol:Tiny")
    name = ModelName.parse("smol:tiny")
    assert store.read_manifest(name) == manifest
    path = ModelName.parse("Smol:Tiny").manifest_path(store.root)
    raw = json.loads(path.read_bytes())
    assert raw["schemaVersion"] == 2
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert raw["layers"][0] == {"mediaType": "application/vnd.ollama.image.model",
                                "digest": manifest.layers[0].digest, "size": 7}
    (entry,) = store.list_models()
    assert entry.name.display == "Smol:Tiny"
    assert entry.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.size == 7 + 23
    assert entry.modified == pytest.approx(path.stat().st_mtime)


def test_read_missing_model(store):
    with pytest.raises(ModelNotFoundError):
        store.read_manifest(ModelName.parse("absent"))


def test_write_manifest_requires_its_blobs(store):
    missing = Layer(MEDIA_TYPES["model"], "sha256:" + "1" * 64, 5)
    with pytest.raises(NotFoundError):
        store.write_manifest(ModelName.parse("m"), Manifest(missing, (missing,)))
    assert store.list_models() == []


def test_copy_shares_blobs_and_delete_keeps_shared_ones(store):
    manifest = _model(store, b"shared", "a")
    store.copy(ModelName.parse("a"), ModelName.parse("b:v2"))
    assert [entry.name.display for entry in store.list_models()] == ["a:latest", "b:v2"]
    store.delete(ModelName.parse("A"))
    assert store.has_blob(manifest.layers[0].digest)
    store.delete(ModelName.parse("b:v2"))
    assert not store.has_blob(manifest.layers[0].digest)
    assert not (store.root / "manifests" / "registry.ollama.ai").exists()
    with pytest.raises(ModelNotFoundError):
        store.delete(ModelName.parse("b:v2"))


def test_delete_keeps_blobs_used_elsewhere(store):
    first = _model(store, b"one", "first")
    _model(store, b"two", "second")
    store.delete(ModelName.parse("first"))
    assert not store.has_blob(first.layers[0].digest)
    assert store.has_blob(first.config.digest)  # the config blob is shared by both
    assert [entry.name.display for entry in store.list_models()] == ["second:latest"]


def test_writers_of_two_processes_take_turns_so_a_delete_cannot_prune_a_blob_being_referenced(store):
    """Another process (a CLI command) holding the writers' lock keeps a delete, and its pruning, waiting."""
    manifest = _model(store, b"shared", "a")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from mullama.store.blobs import Store\n"
        f"with Store({str(store.root)!r}).writing():\n"
        "    print('held', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        deleting = threading.Thread(target=store.delete, args=(ModelName.parse("a"),))
        deleting.start()
        deleting.join(0.5)
        # Meanwhile the other process may write a manifest naming the blob: it is still there.
        assert deleting.is_alive() and store.has_blob(manifest.layers[0].digest)
        holder.stdin.write("\n")
        holder.stdin.flush()
        deleting.join(30)
        assert not deleting.is_alive() and not store.has_blob(manifest.layers[0].digest)
    finally:
        holder.kill()
        holder.wait()


def test_referenced_file_is_used_in_place(store, tmp_path):
    source = tmp_path / "local.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 100)
    layer = store.reference_file(source)
    assert layer.from_path == str(source.resolve())
    assert not store.has_blob(layer.digest)
    _model(store, b"x", "ref", extra=(layer,))
    manifest = store.read_manifest(ModelName.parse("ref"))
    assert manifest.layers[1] == layer
    assert json.loads(manifest.to_bytes())["layers"][1]["from"] == str(source.resolve())
    assert store.layer_path(layer) == source.resolve()
    store.delete(ModelName.parse("ref"))
    assert source.exists()


def test_referenced_file_changed_or_gone(store, tmp_path):
    source = tmp_path / "local.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 100)
    layer = store.reference_file(source)
    source.write_bytes(b"GGUF")
    with pytest.raises(InvalidModelFileError, match="changed size"):
        store.layer_path(layer)
    source.unlink()
    with pytest.raises(NotFoundError, match="gone"):
        store.layer_path(layer)


def test_relative_from_is_not_a_reference(store):
    layer = Layer(MEDIA_TYPES["model"], "sha256:" + "2" * 64, 4, "llama3.2")
    with pytest.raises(NotFoundError, match="missing from the store"):
        store.layer_path(layer)


class Crash(Exception):
    """Stands for the process dying at that instant."""


@pytest.mark.parametrize("victim", ["fsync", "replace", "write"])
def test_crash_while_replacing_a_manifest_leaves_the_old_one(store, monkeypatch, victim):
    old = _model(store, b"old weights", "m")
    new = Manifest(old.config, (Layer(MEDIA_TYPES["model"], store.add_blob_bytes(b"new weights"), 11),))
    before = _all_files(store)

    def crash(*args, **kwargs):
        raise Crash()

    if victim == "write":
        monkeypatch.setattr(Manifest, "to_bytes", lambda self: (_ for _ in ()).throw(Crash()))
    else:
        monkeypatch.setattr(os, victim, crash)
    with pytest.raises(Crash):
        store.write_manifest(ModelName.parse("m"), new)
    monkeypatch.undo()
    assert store.read_manifest(ModelName.parse("m")) == old
    assert _all_files(store) == before


@pytest.mark.parametrize("victim", ["fsync", "replace"])
def test_crash_while_adding_a_blob_leaves_no_blob(store, tmp_path, monkeypatch, victim):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" * 10)

    def crash(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(os, victim, crash)
    with pytest.raises(Crash):
        store.add_blob_bytes(b"data")
    with pytest.raises(Crash):
        store.add_blob_from_file(source)
    monkeypatch.undo()
    assert _all_files(store) == set()


@pytest.mark.parametrize("text", [b"", b"[]", b"{}", b'{"schemaVersion": 2, "layers": [1]}',
                                  b'{"schemaVersion": 2, "config": {}, "layers": []}', b"[" * 100000])
def test_malformed_manifests(text):
    with pytest.raises(InvalidModelFileError):
        Manifest.from_bytes(text)


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=70),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                            st.sampled_from(["schemaVersion", "config", "layers", "mediaType", "digest", "size",
                                             "from"]), inner, max_size=6), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSONISH.map(lambda value: json.dumps(value).encode()), st.binary(max_size=200)))
def test_manifest_parser_fails_only_cleanly(data):
    try:
        manifest = Manifest.from_bytes(data)
    except InvalidModelFileError:
        return
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_strays_in_manifests_are_ignored(store):
    _model(store, b"w", "m")
    directory = ModelName.parse("m").manifest_path(store.root).parent
    (directory / ".tmp-abc").write_text("partial")
    (directory / "broken").write_text("{")
    assert [entry.name.display for entry in store.list_models()] == ["m:latest"]


def test_bad_digest_in_layer_is_rejected(store):
    with pytest.raises(BadRequestError):
        store.blob_path("sha256:../../etc/passwd")
