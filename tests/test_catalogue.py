"""The packaged catalogue (mullama/data/aliases.json), checked against what Ollama serves.

tests/data/ollama_tags.json holds, for every tag the catalogue knows, the
quantization Ollama's library serves for it and where that was read; it is
kept apart from the catalogue so that the two are compared, not copied.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError, MullamaError, NotFoundError
from mullama.store.blobs import MEDIA_TYPES
from mullama.store.names import ModelName
from mullama.store.pull import pull
from mullama.store.registry import HubSource, canonical_quant, missing_model_message, parse_entry, resolve

CATALOGUE = json.loads(resources.files("mullama").joinpath("data/aliases.json").read_text("utf-8"))
MODELS, ALIASES, UNAVAILABLE = CATALOGUE["models"], CATALOGUE["aliases"], CATALOGUE["unavailable"]
OLLAMA = json.loads((Path(__file__).parent / "data" / "ollama_tags.json").read_text("utf-8"))["tags"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The packaged catalogue alone: no user aliases file, no Ollama store."""
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MULLAMA_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.delenv("MULLAMA_ALIASES", raising=False)


def _target(tag: str) -> str:
    seen = []
    while tag in ALIASES:
        assert tag not in seen, f"alias cycle {seen + [tag]}"
        seen.append(tag)
        tag = ALIASES[tag]
    return tag


def _model_files(entry: dict) -> list[str]:
    return [source["file"] for layer in entry["layers"] if layer.get("type", "model") == "model"
            for source in layer["sources"] if "hub" in source]


def _names_quant(file: str, quant: str) -> bool:
    """Whether a file name spells ``quant`` as one of its words (F16 also as FP16)."""
    spellings = {quant, "FP16"} if quant == "F16" else {quant}
    return any(re.search(rf"(?:^|[-._/]){re.escape(spelling)}(?:[-._]|$)", file, re.IGNORECASE)
               for spelling in spellings)


# --- the table's shape -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_entry_parses_and_says_how_it_was_checked(key):
    entry = MODELS[key]
    specs = parse_entry(entry, key)
    assert specs[0].media_type == MEDIA_TYPES["model"]
    assert ModelName.parse(key).display == key, "keys are Ollama's short names"
    assert canonical_quant(entry["quantization"]) == entry["quantization"]
    assert entry["evidence"] and all(source.startswith("https://") for source in entry["evidence"])
    assert entry["confirmed"] or entry["reason"]
    # The Ollama side of every entry is on record, as is the Hub side of every confirmed one.
    assert any(source.startswith("https://ollama.com/library/") for source in entry["evidence"])
    if entry["confirmed"]:
        assert any("huggingface.co" in source or "github.com" in source for source in entry["evidence"])


def test_aliases_lead_to_entries_without_cycles():
    for alias, target in ALIASES.items():
        assert target in MODELS, alias
        assert _target(alias) == target
    assert not set(ALIASES) & set(MODELS)
    assert not set(UNAVAILABLE) & (set(MODELS) | set(ALIASES))
    for name, item in UNAVAILABLE.items():
        assert item.get("reason") or UNAVAILABLE[item["same_as"]]["reason"], name


def test_the_catalogue_covers_the_most_pulled_names():
    for name in ("gpt-oss:20b", "gpt-oss:120b", "llama3.3", "qwen3", "qwen3-coder", "qwen2.5vl", "gemma3:270m",
                 "gemma3n", "phi4-mini", "mistral-small", "mistral-small3.1", "mistral-small3.2", "mistral-nemo",
                 "devstral", "granite3.3", "granite4", "deepseek-r1:1.5b", "deepseek-r1:70b", "embeddinggemma",
                 "qwen3-embedding", "snowflake-arctic-embed2", "minicpm-v"):
        assert resolve(name).files, name


def test_pins_are_well_formed():
    pinned = [layer for entry in MODELS.values() for layer in entry["layers"] if "sha256" in layer]
    assert len(pinned) >= 30
    revisions = [source["revision"] for entry in MODELS.values() for layer in entry["layers"]
                 for source in layer["sources"] if "revision" in source]
    assert revisions and all(re.fullmatch(r"[0-9a-f]{40}", revision) for revision in revisions)


# --- each tag serves what Ollama serves --------------------------------------------------------------


def test_every_catalogued_tag_has_ollamas_quantization_on_record():
    assert set(MODELS) | set(ALIASES) | set(UNAVAILABLE) == set(OLLAMA)
    for tag, served in OLLAMA.items():
        assert served["source"] == f"https://ollama.com/library/{tag.split(':')[0]}/tags", tag
        assert canonical_quant(served["quantization"]) == served["quantization"], tag


@pytest.mark.parametrize("tag", sorted(set(MODELS) | set(ALIASES)))
def test_each_tag_serves_the_quantization_ollama_serves(tag):
    entry = MODELS[_target(tag)]
    expected = OLLAMA[tag]["quantization"]
    for file in _model_files(entry):
        assert _names_quant(file, entry["quantization"]), (tag, file)
    if entry["confirmed"]:
        assert entry["quantization"] == expected, tag
    else:
        # A different quantization is allowed only where the entry says why.
        assert entry["quantization"] == expected or entry["reason"], tag


def test_vision_tags_carry_a_projector_and_others_do_not():
    for tag, served in OLLAMA.items():
        if tag in UNAVAILABLE:
            continue
        kinds = [spec.media_type for spec in resolve(tag).files]
        assert (MEDIA_TYPES["projector"] in kinds) == served["vision"], tag
    for name in ("llava", "gemma3:4b", "gemma3:12b", "gemma3:27b", "qwen2.5vl:3b", "qwen2.5vl:7b", "minicpm-v",
                 "moondream", "mistral-small3.1", "mistral-small3.2"):
        assert resolve(name).files[-1].media_type == MEDIA_TYPES["projector"], name
    assert all(OLLAMA[tag]["vision"] for tag in UNAVAILABLE)


def test_unavailable_names_resolve_to_the_store_only():
    resolved = resolve("llama3.2-vision")
    assert not resolved.files and resolved.name.display == "llama3.2-vision:latest"


# --- quantization tags -------------------------------------------------------------------------------


def _ollama_spelling(quant: str) -> str:
    """How Ollama writes a quantization in a tag: q4_K_M, q8_0, fp16."""
    upper = canonical_quant(quant)
    return "fp16" if upper == "F16" else upper.lower().replace("_k", "_K")


QUANT_TAGS = [(key, quant) for key, entry in sorted(MODELS.items()) if "quant_tags" in entry
              for quant in entry["quant_tags"]["quants"]]


@pytest.mark.parametrize("key, quant", QUANT_TAGS)
def test_quantization_tags_resolve_to_that_file_of_the_same_repository(key, quant):
    entry, rule = MODELS[key], MODELS[key]["quant_tags"]
    middle = f"{rule['variant']}-" if rule["variant"] else ""
    tag = f"{key}-{middle}{_ollama_spelling(quant)}"
    resolved = resolve(tag)
    assert resolved.name.display == tag
    model, *others = resolved.files
    (source,) = model.sources
    layer_source = entry["layers"][0]["sources"][0]
    assert isinstance(source, HubSource) and source.repo == layer_source["hub"]
    assert source.file == rule["file"].replace("{quant}", quant)
    assert source.revision == layer_source.get("revision", "main")
    assert others == list(resolve(key).files[1:]), "a projector comes along unchanged"
    if source.file == layer_source["file"]:
        assert resolved.files == resolve(key).files, "the entry's own file keeps its pins"
    else:
        assert model.sha256 is None


@pytest.mark.parametrize("tag, file", [
    ("llama3.2:1b-instruct-q4_K_M", "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
    ("llama3.2:1b-instruct-fp16", "Llama-3.2-1B-Instruct-f16.gguf"),
    ("LLAMA3.2:1B-INSTRUCT-Q5_K_S", "Llama-3.2-1B-Instruct-Q5_K_S.gguf"),
    ("qwen2.5:0.5b-instruct-q8_0", "qwen2.5-0.5b-instruct-q8_0.gguf"),
    ("qwen3:8b-q8_0", "Qwen3-8B-Q8_0.gguf"),
    ("qwen3:4b-thinking-2507-q8_0", "Qwen_Qwen3-4B-Thinking-2507-Q8_0.gguf"),
    ("gemma2:9b-instruct-q5_K_M", "gemma-2-9b-it-Q5_K_M.gguf"),
    ("deepseek-r1:8b-0528-qwen3-q5_K_M", "deepseek-ai_DeepSeek-R1-0528-Qwen3-8B-Q5_K_M.gguf"),
    ("minicpm-v:8b-2.6-q8_0", "ggml-model-Q8_0.gguf"),
    ("llama3.2:1b-instruct", "Llama-3.2-1B-Instruct-Q8_0.gguf"),
    ("llama3.1:8b-instruct-q8_0", "Meta-Llama-3.1-8B-Instruct-Q8_0.gguf"),
])
def test_quantization_tags_by_example(tag, file):
    assert resolve(tag).files[0].sources[0].file == file


@pytest.mark.parametrize("tag", [
    "llama3.2:3b-instruct-q2_K",     # a quantization the repository is not known to hold
    "llama3.2:1b-text-q8_0",         # another variant than the entry's
    "llama3.2:1b-q8_0",              # the variant left out
    "gpt-oss:20b-q8_0",              # an entry without quant_tags
    "llama3.2:1b-instruct-q9_Z-x",   # not a quantization
])
def test_other_tags_are_not_in_the_catalogue(tag):
    assert not resolve(tag).files


# --- a name nothing knows ----------------------------------------------------------------------------


def _pull_error(name: str) -> str:
    with pytest.raises(NotFoundError) as caught:
        pull(name)
    return caught.value.message


def test_pulling_an_unknown_name_suggests_close_names_and_hf():
    message = _pull_error("qwen3:9b")
    assert "qwen3:9b" in message and "registry" in message
    assert "close names: qwen3:8b" in message
    assert "hf:owner/repo[:QUANT" in message and "hf:Qwen/Qwen3-8B-GGUF:Q4_K_M" in message


def test_pulling_a_misspelt_family_suggests_it():
    assert "gpt-oss:latest" in _pull_error("gptoss")
    assert "deepseek-r1:1.5b" in _pull_error("deepseek-r1:1b")


def test_pulling_an_uncatalogued_quantization_names_its_hf_reference():
    message = _pull_error("llama3.2:3b-instruct-q2_K")
    assert "llama3.2:3b is, at Q4_K_M" in message
    assert "hf:bartowski/Llama-3.2-3B-Instruct-GGUF:Q2_K" in message


def test_pulling_an_unavailable_model_says_why():
    message = _pull_error("llama3.2-vision:11b")
    assert "mllama" in message and "gemma3" in message
    assert "mllama" in _pull_error("llama3.2-vision")


def test_pulling_a_name_with_nothing_close_still_shows_hf():
    message = _pull_error("someone/private-model:v3")
    assert "close names" not in message
    assert "hf:owner/repo[:QUANT|:file.gguf]" in message


FAMILIES = sorted({key.partition(":")[0] for key in OLLAMA})


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(FAMILIES), st.sampled_from([":", ":", "-", ""]),
              st.text(alphabet="0123456789abkmqxhit_.-KMFP", max_size=24)).map("".join),
    st.tuples(st.sampled_from(sorted(OLLAMA)), st.sampled_from(["-", "-instruct-", "-it-", ""]),
              st.sampled_from(["q4_K_M", "q8_0", "fp16", "bf16", "q2_K", "Q4_0", "x", "", "q4_K_M-"])).map("".join),
))
def test_resolving_any_name_fails_only_cleanly(text):
    try:
        resolved = resolve(text)
    except (BadRequestError, NotFoundError):
        return
    except MullamaError as exc:  # pragma: no cover - any other kind is a defect
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
    assert resolved.name.display
    if not resolved.files and resolved.hub_repo is None and resolved.path is None:
        message = missing_model_message(resolved.name)
        # A name Ollama serves but no Hub GGUF can explains why instead of offering hf: (llama3.2-vision).
        assert "hf:" in message or "is in Ollama's library but not in Mullama's registry" in message
