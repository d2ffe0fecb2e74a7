"""The Vulkan backend, really run: on Mesa's software Vulkan device (lavapipe) where nothing better exists.

These tests need a Vulkan build of the native libraries
(``python build_native.py --backend vulkan --backend-modules``; CI builds
one into a cache of its own and names it with
``MULLAMA_VULKAN_LIBRARY_PATH``) and a Vulkan device; without either they
skip, saying which is missing. Each run happens in a child process, since
a process loads one build of llama.cpp: the same build with the CPU alone
(``MULLAMA_BACKENDS=cpu``) is the reference the Vulkan answers are held to.

Run as a script (``python tests/test_vulkan.py MODEL RUNS``), this file is
that child: for each run it loads the model, answers one prompt greedily and
measures the perplexity of a fixed text, and prints what it found as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The greedy answers must agree on their first tokens (" Paris.\n\n"). lavapipe sums in another order than
#: the CPU, and this small model soon meets near-ties: here they part at the fifth token.
AGREEING_TOKENS = 4
NUM_PREDICT = 16
#: At each position of the fixed text, the token ranked first must be the same in this share of positions.
SAME_FIRST_SHARE = 0.9
#: Perplexities on the fixed text may differ by this fraction at most (measured here: about 1%).
PERPLEXITY_TOLERANCE = 0.03
#: The load options of every run: a context that keeps the KV cache a fair share of each layer's cost.
SPLIT_OPTIONS = {"num_ctx": 2048}
PROMPT = "The capital of France is"
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def probe(model_path: str, options: dict) -> dict:
    """Load the model in this process; its placement, greedy answer, and on :data:`TEXT` its perplexity and
    the token it ranks first at each position."""
    from mullama.engine.model import Batch, Model

    with Model(model_path, options) as model:
        tokens = model.complete(PROMPT, temperature=0, num_predict=NUM_PREDICT, seed=1).tokens
        text = model.tokenize(TEXT)
        context = model.context
        context.forget(0)
        batch = Batch(model.lib, len(text), 1)
        for i, token in enumerate(text):
            batch.add(token, i, 0, True)
        context.decode(batch)
        nll, ranked_first = 0.0, []
        for i in range(len(text) - 1):
            row = model.lib.llama_get_logits_ith(context.ptr, i)
            logits = [row[j] for j in range(model.n_vocab)]
            top = max(logits)
            nll += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[text[i + 1]]
            ranked_first.append(logits.index(top))
        return {"num_gpu": model.placement.num_gpu, "gpu_devices": [d.name for d in model.placement.devices],
                "tokens": tokens, "perplexity": math.exp(nll / (len(text) - 1)), "ranked_first": ranked_first}


def probe_all(model_path: str, runs: list[dict]) -> dict:
    """The devices and modules of this process, and :func:`probe` once per run (its ``options`` and ``env``).

    Runs share one process: on lavapipe most of a start is compiling ggml's
    Vulkan pipelines, which happens once.
    """
    from mullama.ffi import loader

    native = loader.load()
    results = []
    for run in runs:
        os.environ.update(run.get("env", {}))
        results.append(probe(model_path, run.get("options", {})))
    return {"devices": [[d.backend, d.name, d.kind] for d in native.devices], "modules": native.modules,
            "runs": results}


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens two sequences share from their start."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def same_share(a: list[int], b: list[int]) -> float:
    """The share of positions where two sequences hold the same token."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


# --- finding a Vulkan build and device --------------------------------------


@lru_cache(maxsize=1)
def vulkan_library() -> Path | None:
    """The library directory of a Vulkan build: ``MULLAMA_VULKAN_LIBRARY_PATH``, else the newest in the cache.

    The cache searched is the user cache's own, and the ``vulkan`` cache root inside it that CI builds in.
    """
    explicit = os.environ.get("MULLAMA_VULKAN_LIBRARY_PATH")
    if explicit:
        return Path(explicit)
    from mullama import config

    roots = [config.native_build_dir(), config.user_cache_dir() / "vulkan" / "native"]
    manifests = sorted((m for root in roots for m in root.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime,
                       reverse=True)
    for manifest in manifests:
        if "vulkan" in json.loads(manifest.read_text()).get("backends", []):
            return manifest.parent / "lib"
    return None


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child on the Vulkan build; lavapipe counts as a device only when named.

    ggml's Vulkan backend passes over CPU-type devices unless
    ``GGML_VK_VISIBLE_DEVICES`` names them, so that a real GPU is not shadowed.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MULLAMA_", "OLLAMA_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["MULLAMA_LIBRARY_PATH"] = str(vulkan_library())
    env.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    return env | extra


def run_probe(model_path: Path, runs: list[dict], **env: str) -> dict:
    """:func:`probe_all` in a child with ``env``."""
    result = subprocess.run([sys.executable, __file__, str(model_path), json.dumps(runs)],
                            env=child_env(**env), capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@lru_cache(maxsize=1)
def vulkan_devices() -> tuple[str, ...]:
    """The Vulkan devices the Vulkan build sees (with lavapipe named), by name; empty when none."""
    code = ("from mullama.ffi import loader\n"
            "print('\\n'.join(d.name for d in loader.load().devices if d.backend == 'Vulkan'))")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    return tuple(result.stdout.split()) if result.returncode == 0 else ()


def require_vulkan() -> None:
    """Skip, saying why, unless a Vulkan build and a Vulkan device are here."""
    library = vulkan_library()
    if library is None or not library.is_dir():
        pytest.skip("no Vulkan build: run `python build_native.py --backend vulkan --backend-modules` "
                    "(needs glslc, libvulkan-dev, spirv-headers) or set MULLAMA_VULKAN_LIBRARY_PATH")
    if not vulkan_devices():
        pytest.skip("the Vulkan build sees no Vulkan device (install mesa-vulkan-drivers for lavapipe)")


@pytest.fixture(scope="module")
def vulkan(model_path):
    """The model's answers on the CPU (same build, ``MULLAMA_BACKENDS=cpu``), and on the Vulkan device whole
    and split by a device-memory limit that holds about half of its layers."""
    require_vulkan()
    cpu = run_probe(model_path, [{"options": SPLIT_OPTIONS}], MULLAMA_BACKENDS="cpu")
    limit = str(split_limit(model_path, SPLIT_OPTIONS))
    gpu = run_probe(model_path, [{"options": SPLIT_OPTIONS},
                                 {"options": SPLIT_OPTIONS, "env": {"MULLAMA_GPU_MEMORY": limit}}])
    return {"cpu": cpu, "vulkan": gpu, "reference": cpu["runs"][0], "whole": gpu["runs"][0], "split": gpu["runs"][1]}


def split_limit(model_path: Path, options: dict) -> int:
    """A device-memory limit that holds about half of the model's layers with ``options``."""
    from mullama.engine.model import LoadOptions
    from mullama.engine.offload import layer_costs
    from mullama.store.gguf import read_gguf

    costs, compute, _ = layer_costs(read_gguf(model_path), LoadOptions.from_options(options))
    return compute + sum(costs) // 2


# --- tests ------------------------------------------------------------------


def build_native_module():
    """``build_native.py``, imported."""
    sys.path.insert(0, str(REPO))
    try:
        import build_native
    finally:
        sys.path.remove(str(REPO))
    return build_native


def test_vulkan_headers_too_old_for_the_pin_are_refused_with_a_way_out(tmp_path, monkeypatch):
    build_native = build_native_module()
    core = tmp_path / "include" / "vulkan" / "vulkan_core.h"
    core.parent.mkdir(parents=True)
    # The two lines of Debian 12's vulkan_core.h that name its version.
    core.write_text("#define VK_HEADER_VERSION 239\n"
                    "#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 3, VK_HEADER_VERSION)\n")
    monkeypatch.setenv("VULKAN_SDK", str(tmp_path))
    with pytest.raises(build_native.BuildError, match=r"are 1\.3\.239; .* needs 1\.3\.272 or newer.*VULKAN_SDK"):
        build_native._check_vulkan_headers()
    core.write_text(core.read_text().replace("239", "275"))
    build_native._check_vulkan_headers()


def test_module_builds_leave_native_out_and_plain_builds_keep_their_options():
    build_native = build_native_module()
    # A plain build's options, hence its cache key, are what they were before modules existed.
    assert build_native.build_options(["cpu"], False, False) == build_native.COMMON_OPTIONS
    modules = build_native.build_options(["cpu", "vulkan"], True, False)
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF", "-DGGML_VULKAN=ON"} <= set(modules)
    assert "-DGGML_NATIVE=ON" not in modules and "-DGGML_CPU_ALL_VARIANTS=ON" not in modules
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in build_native.build_options(["cpu"], True, True)


def test_the_build_loads_its_backends_as_modules_and_sees_the_device(vulkan):
    assert {"libggml-vulkan.so", "libggml-cpu.so"} <= set(vulkan["vulkan"]["modules"])
    assert any(backend == "Vulkan" and kind in ("gpu", "igpu") for backend, _, kind in vulkan["vulkan"]["devices"])


def test_forcing_the_cpu_loads_no_vulkan_module(vulkan):
    assert vulkan["cpu"]["modules"] == ["libggml-cpu.so"]
    assert [backend for backend, _, _ in vulkan["cpu"]["devices"]] == ["CPU"]
    assert vulkan["reference"]["num_gpu"] == 0


def test_every_layer_goes_to_the_vulkan_device(vulkan, model_path):
    from mullama.store.gguf import read_gguf

    assert vulkan["whole"]["num_gpu"] == read_gguf(model_path).block_count + 1
    assert vulkan["whole"]["gpu_devices"] == [vulkan_devices()[0]]


@pytest.mark.parametrize("run", ["whole", "split"])
def test_vulkan_answers_agree_with_the_cpu(vulkan, run):
    cpu, gpu = vulkan["reference"], vulkan[run]
    assert agreeing(cpu["tokens"], gpu["tokens"]) >= AGREEING_TOKENS, (cpu["tokens"], gpu["tokens"])
    assert same_share(cpu["ranked_first"], gpu["ranked_first"]) >= SAME_FIRST_SHARE
    assert abs(gpu["perplexity"] - cpu["perplexity"]) <= PERPLEXITY_TOLERANCE * cpu["perplexity"], \
        (cpu["perplexity"], gpu["perplexity"])


def test_a_device_memory_limit_splits_the_model(vulkan):
    assert 0 < vulkan["split"]["num_gpu"] < vulkan["whole"]["num_gpu"]


def test_the_daemon_serves_a_split_model_through_the_three_apis_and_ps_shows_it(vulkan, model_path, tmp_path):
    import anthropic
    import ollama
    import openai
    from daemon import cli, create_model, serve

    env = child_env()
    daemon = serve(tmp_path, MULLAMA_LIBRARY_PATH=env["MULLAMA_LIBRARY_PATH"],
                   GGML_VK_VISIBLE_DEVICES=env["GGML_VK_VISIBLE_DEVICES"],
                   MULLAMA_GPU_MEMORY=str(split_limit(model_path, SPLIT_OPTIONS)))
    try:
        create_model(daemon.port, model_path, "smol", parameters={**SPLIT_OPTIONS, "temperature": 0})
        base = f"http://127.0.0.1:{daemon.port}"
        answer = ollama.Client(host=base, timeout=300).generate(model="smol", prompt=PROMPT, raw=True,
                                                                 options={"num_predict": 4})
        assert "Paris" in answer.response
        chat = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300).chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert chat.choices[0].message.content
        message = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=300).messages.create(
            model="smol", max_tokens=8, messages=[{"role": "user", "content": "Say hello."}])
        assert message.content[0].text
        running = ollama.Client(host=base).ps().models
        assert len(running) == 1 and 0 < running[0].size_vram < running[0].size
        table = cli(daemon.env, "ps")
        assert table.returncode == 0, table.stderr
        assert re.search(r"\b\d+%/\d+% CPU/GPU\b", table.stdout), table.stdout
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert "libggml-vulkan.so" in log and vulkan_devices()[0] in log, log[-2000:]


if __name__ == "__main__":
    print(json.dumps(probe_all(sys.argv[1], json.loads(sys.argv[2]))))
