"""Model names and digests: Ollama's grammar, display form, and confinement to the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.store.names import ModelName, blob_path, canonical_digest, parse_digest

HEX = "ab" * 32
ROOT = Path("/store")


@pytest.mark.parametrize("text, parts, display", [
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("user/model:tag", ("registry.ollama.ai", "user", "model", "tag"), "user/model:tag"),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"), "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
    ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
    ("https://example.com/ns/m:v1", ("example.com", "ns", "m", "v1"), "example.com/ns/m:v1"),
    ("registry.ollama.ai/library/qwen2.5:7b", ("registry.ollama.ai", "library", "qwen2.5", "7b"), "qwen2.5:7b"),
    ("  mistral  ", ("registry.ollama.ai", "library", "mistral", "latest"), "mistral:latest"),
])
def test_parse_fills_defaults_and_displays_like_ollama(text, parts, display):
    name = ModelName.parse(text)
    assert (name.host, name.namespace, name.model, name.tag) == parts
    assert name.display == str(name) == display


@pytest.mark.parametrize("text", [
    "", "   ", ":", "a:", ":tag", "/a", "a/", "a//b", "a/b/c/d", "a:b:c", ".a", "-a", "a/.b", "../x", "a/../b",
    "ns.with.dot/m", "a b", "a\\b", "mödel", "a:t/x", "x" * 81, "a:" + "t" * 81, "h" * 351 + "/n/m",
    "a@sha256:" + HEX,
])
def test_invalid_names_are_rejected(text):
    with pytest.raises(BadRequestError):
        ModelName.parse(text)


def test_non_string_is_rejected():
    with pytest.raises(BadRequestError):
        ModelName.parse(None)  # type: ignore[arg-type]


def test_matching_ignores_case_but_keeps_spelling():
    upper, lower = ModelName.parse("Llama3.2:1B"), ModelName.parse("llama3.2:1b")
    assert upper.key == lower.key
    assert upper.display == "Llama3.2:1B"


def test_manifest_path_follows_ollama_layout():
    name = ModelName.parse("user/model:tag")
    assert name.manifest_path(ROOT) == ROOT / "manifests" / "registry.ollama.ai" / "user" / "model" / "tag"


def test_a_forged_name_cannot_escape():
    forged = ModelName("registry.ollama.ai", "..", "..", "etc")
    with pytest.raises(BadRequestError):
        forged.manifest_path(ROOT)


@pytest.mark.parametrize("digest", ["sha256:" + HEX, "sha256-" + HEX])
def test_digest_forms(digest):
    assert parse_digest(digest) == HEX
    assert canonical_digest(digest) == "sha256:" + HEX
    assert blob_path(ROOT, digest) == ROOT / "blobs" / ("sha256-" + HEX)


@pytest.mark.parametrize("digest", [
    "", HEX, "sha256:" + HEX.upper(), "sha256:" + HEX[:-1], "sha256:" + HEX + "0", "sha512:" + HEX,
    "sha256:../../" + HEX[6:], "sha256:" + HEX + "\n", None,
])
def test_bad_digests_are_rejected(digest):
    with pytest.raises(BadRequestError):
        blob_path(ROOT, digest)


def _inside(path: Path, base: Path) -> bool:
    return base in path.parents and ".." not in path.parts


_TRICKY = st.lists(st.sampled_from(list("aZ09_-.:/\\@ ~") + ["..", "sha256", "\x00", "é"]), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), _TRICKY))
def test_no_text_resolves_outside_the_store(text):
    try:
        name = ModelName.parse(text)
    except BadRequestError:
        return
    path = name.manifest_path(ROOT)
    assert _inside(path, ROOT / "manifests")
    assert len(path.relative_to(ROOT / "manifests").parts) == 4


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), _TRICKY.map(lambda text: "sha256:" + text)))
def test_no_digest_resolves_outside_the_blobs(text):
    try:
        path = blob_path(ROOT, text)
    except BadRequestError:
        return
    assert path.parent == ROOT / "blobs"


_PART = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_NAMESPACE = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(_NAMESPACE, _PART, _PART)
def test_display_round_trips(namespace, model, tag):
    name = ModelName.parse(f"{namespace}/{model}:{tag}")
    assert ModelName.parse(name.display) == name
