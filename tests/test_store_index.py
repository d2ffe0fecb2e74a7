"""The store's index in memory: a request to a loaded model reads no file, and writes by others are seen."""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon import create_model, post_json, running
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store
from mullama.store.names import ModelName
from mullama.store.records import find_model
from mullama.store.registry import locate

CHAT_OPTIONS = {"num_ctx": 512, "num_thread": 1, "num_predict": 1, "temperature": 0}

# --- watching file access ------------------------------------------------------

#: Audit events of the watch in progress, when one is.
_watched: list[list[tuple[str, str]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watched and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, Path)):
        _watched[-1].append((event, os.path.abspath(args[0])))


sys.addaudithook(_audit)


@contextmanager
def file_access() -> Iterator[list[tuple[str, str]]]:
    """Every file opened and directory listed by any thread of this process within the block."""
    seen: list[tuple[str, str]] = []
    _watched.append(seen)
    try:
        yield seen
    finally:
        _watched.remove(seen)


def tags(port: int) -> list[str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/api/tags")
        return sorted(model["name"] for model in json.loads(connection.getresponse().read())["models"])
    finally:
        connection.close()


def backdate(root: Path) -> None:
    """Make every manifest an hour old, as in a store written long ago (a fresh one is re-read while racy)."""
    past = time.time() - 3600
    for path in (root / "manifests").rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


# --- the daemon ----------------------------------------------------------------------


def test_a_chat_to_a_loaded_model_reads_no_manifest_layer_or_alias_file(tmp_path: Path, model_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "aliases.json").write_text(json.dumps({"aliases": {"other": "smollm2:135m"}}))
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol", system="Be brief.", parameters={"seed": 7})
        backdate(tmp_path / "models")
        os.utime(home / "aliases.json", (time.time() - 3600,) * 2)
        chat = {"model": "smol", "stream": False, "messages": [{"role": "user", "content": "Hi"}],
                "options": CHAT_OPTIONS}
        assert post_json(port, "/api/chat", chat)[0] == 200  # loads the model
        with file_access() as seen:
            status, answer = post_json(port, "/api/chat", chat)
        assert status == 200 and answer["done"], answer
    store_root = str(tmp_path / "models")
    touched = [(event, path) for event, path in seen
               if path.startswith(store_root) or path.endswith("aliases.json")]
    assert touched == []


def test_listing_known_models_again_opens_no_file(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path) as server:
        port = server.server_address[1]
        for name in ("one", "two", "three"):
            create_model(port, model_path, name, system=f"I am {name}.")
        backdate(tmp_path / "models")
        assert tags(port) == ["one:latest", "three:latest", "two:latest"]
        with file_access() as seen:
            assert tags(port) == ["one:latest", "three:latest", "two:latest"]
            assert post_json(port, "/api/show", {"model": "two"})[1]["system"] == "I am two."
    # The directories are listed (to see new models); no manifest, layer or GGUF header is read again.
    assert [path for event, path in seen if event == "open" and path.startswith(str(tmp_path))] == []


def test_manifests_written_by_another_process_are_seen(tmp_path: Path, model_path: Path) -> None:
    root = tmp_path / "models"
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        assert tags(port) == ["smol:latest"]
        other = Store(root)  # another process's view of the same directory
        base = other.read_manifest(ModelName.parse("smol"))

        def with_system(text: str) -> Manifest:
            layer = Layer(MEDIA_TYPES["system"], other.add_blob_bytes(text.encode()), len(text.encode()))
            return Manifest(base.config, (*base.layers, layer))

        other.write_manifest(ModelName.parse("second"), with_system("first words"))
        assert tags(port) == ["second:latest", "smol:latest"]
        assert post_json(port, "/api/show", {"model": "second"})[1]["system"] == "first words"

        # Replaced (a new inode), then replaced again with bytes of the same length.
        other.write_manifest(ModelName.parse("second"), with_system("other words"))
        assert post_json(port, "/api/show", {"model": "second"})[1]["system"] == "other words"
        other.write_manifest(ModelName.parse("second"), with_system("third words"))
        assert post_json(port, "/api/show", {"model": "second"})[1]["system"] == "third words"

        # Written by hand, not through a Store: no cooperation from the writer.
        by_hand = root / "manifests" / "registry.ollama.ai" / "library" / "third" / "latest"
        by_hand.parent.mkdir(parents=True)
        by_hand.write_bytes(with_system("by hand").to_bytes())
        assert post_json(port, "/api/show", {"model": "third"})[1]["system"] == "by hand"
        assert tags(port) == ["second:latest", "smol:latest", "third:latest"]

        by_hand.unlink()
        other.delete(ModelName.parse("second"))
        assert post_json(port, "/api/show", {"model": "third"})[0] == 404
        assert post_json(port, "/api/show", {"model": "second"})[0] == 404
        assert tags(port) == ["smol:latest"]


# --- the index against a fresh scan -----------------------------------------------------

NAMES = ("a", "A", "b", "c:v2", "ns/d")
#: Operations on the store: who does it (this store, or another one over the same directory) and what.
OPERATIONS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(["this", "other", "by hand"]), st.sampled_from(NAMES),
              st.integers(0, 9)),
    st.tuples(st.just("copy"), st.sampled_from(["this", "other"]), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("delete"), st.sampled_from(["this", "other"]), st.sampled_from(NAMES)),
)


def _manifest(store: Store, seed: int) -> Manifest:
    """A small manifest; seeds give different bytes of the same length."""
    model = store.add_blob_bytes(b"GGUF weights")
    params = store.add_blob_bytes(json.dumps({"seed": seed}).encode())
    config = store.add_blob_bytes(b"{}")
    return Manifest(Layer(CONFIG_MEDIA_TYPE, config, 2), (Layer(MEDIA_TYPES["model"], model, 12),
                                                         Layer(MEDIA_TYPES["params"], params, 11)))


def _apply(operation: tuple[Any, ...], stores: dict[str, Store]) -> None:
    kind, who, *args = operation
    store = stores["other" if who == "by hand" else who]
    name = ModelName.parse(args[0])
    if kind == "write" and who == "by hand":
        path = name.manifest_path(store.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_manifest(store, args[1]).to_bytes())
    elif kind == "write":
        store.write_manifest(name, _manifest(store, args[1]))
    elif kind == "copy" and store.has_model(name):
        store.copy(name, ModelName.parse(args[1]))
    elif kind == "delete" and store.has_model(name):
        store.delete(name)


def _view(store: Store) -> tuple[Any, ...]:
    """Everything the store answers about its models."""
    names = [ModelName.parse(text) for text in NAMES]
    return (store.list_models(), [store.has_model(name) for name in names],
            [store.read_manifest(name) if store.has_model(name) else None for name in names])


@settings(max_examples=60, deadline=None)
@given(st.lists(OPERATIONS, max_size=12))
def test_the_index_answers_as_a_fresh_scan_does(operations: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"this": Store(tmp), "other": Store(tmp)}
        for operation in operations:
            _apply(operation, stores)
            # Between operations the index is asked by name only, as a request would.
            for text in NAMES:
                stores["this"].has_model(ModelName.parse(text))
        assert _view(stores["this"]) == _view(Store(tmp))


def test_a_change_its_stat_cannot_show_is_seen_while_the_file_is_fresh(tmp_path: Path) -> None:
    store, name = Store(tmp_path), ModelName.parse("m")
    path = name.manifest_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_manifest(store, 1).to_bytes())
    assert store.read_manifest(name) == _manifest(store, 1)
    before = os.stat(path)
    path.write_bytes(_manifest(store, 2).to_bytes())  # in place: the same inode and size
    # A file system clock too coarse to tell the two writes apart.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_ino == before.st_ino and os.stat(path).st_size == before.st_size
    assert store.read_manifest(name) == _manifest(store, 2)


def test_a_record_is_built_once_per_version_of_its_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_manifest(ModelName.parse("m"), _manifest(store, 1))
    backdate(tmp_path)
    first = find_model(store, "m")
    assert find_model(store, "M:latest") is first and first.parameters == {"seed": 1}
    Store(tmp_path).write_manifest(ModelName.parse("m"), _manifest(store, 2))
    second = find_model(store, "m")
    assert second is not first and second.parameters == {"seed": 2}


def test_a_gguf_header_is_read_once_per_version_of_the_file(tmp_path: Path, model_path: Path) -> None:
    store = Store(tmp_path / "models")
    with file_access() as seen:
        infos = [store.gguf_info(model_path) for _ in range(3)]
    assert infos[0] is infos[1] is infos[2]
    assert [path for event, path in seen if event == "open" and path == str(model_path)] == [str(model_path)]


@pytest.mark.parametrize("text", ["hf:owner/repo:Q4_K_M", "smol"])
def test_finding_a_stored_model_never_needs_the_alias_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              text: str) -> None:
    broken = tmp_path / "aliases.json"
    broken.write_text("{not json")
    monkeypatch.setenv("MULLAMA_ALIASES", str(broken))
    store = Store(tmp_path / "models")
    name = locate(text).name
    store.write_manifest(name, _manifest(store, 3))
    assert find_model(store, text).name == name.display
