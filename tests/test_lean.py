"""A lean daemon and a lean library: what is imported and loaded is what the work at hand needs.

The in-process API (``import mullama; mullama.Model``) brings no HTTP
server, no operations, no Hub or template library; the daemon loads
llama.cpp's libraries (and through them any GPU runtime) with its first
model, not at start-up, and imports nothing optional before it is asked for.
(Ollama's automatic defaults, the context length and the models kept per
GPU, need the GPUs discovered, which loads the libraries at start-up as
Ollama's own discovery does; with both set, as these tests set them,
nothing is loaded before the first model.)
Memory itself is measured in ``bench/daemon.py``; these tests guard its
causes, which do not vary from run to run.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon import REPO, create_model, environment, free_port, serve

#: Loaded only for the work that needs them: none is needed to build a ``mullama.Model``.
NOT_FOR_THE_LIBRARY = ("mullama.http", "mullama.ops", "mullama.service", "mullama.cli", "mullama.client",
                       "mullama.prompt", "mullama.speech", "mullama.store.pull", "huggingface_hub", "jinja2",
                       "sqlite3", "http.server", "http.client", "ssl")
#: Loaded by the daemon only when a request needs them (a pull, a template, speech, the TUI).
#: (The Go template parser and the speech package's pure-Python modules are not here: listing models reads each
#: one's capabilities from its template and its kind from its file, and they map no native library.)
NOT_FOR_AN_IDLE_DAEMON = ("huggingface_hub", "jinja2", "mullama.cli.tui", "mullama.prompt.grammar",
                          "mullama.prompt.jinja", "mullama.prompt.harmony")
#: The native libraries a model needs; an idle daemon maps none of them.
NATIVE = ("libllama", "libggml", "libmtmd", "libwhisper")
#: A generous ceiling on the modules of an idle daemon (about 250 today, the interpreter's own included).
IDLE_MODULES = 320

_LIBRARY_PROBE = """
import json, sys
import mullama
mullama.Model
imported = {"modules": sorted(sys.modules), "maps": open("/proc/self/maps").read()}
with mullama.Model(sys.argv[1], num_ctx=256) as model:
    model.complete("Hi", num_predict=2)
print(json.dumps({**imported, "used": sorted(sys.modules)}))
"""

_DAEMON_PROBE = """
import http.client, json, sys, threading
import mullama.cli.verbs  # what `mullama serve` imports before the server
from mullama.http.app import make_server
server = make_server("127.0.0.1:0")
threading.Thread(target=server.serve_forever, daemon=True).start()
connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
for path in ("/api/version", "/api/tags", "/api/ps", "/metrics", "/"):
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    assert response.status == 200, (path, response.status)
print(json.dumps({"modules": sorted(sys.modules), "maps": open("/proc/self/maps").read()}))
server.shutdown()
"""

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")


#: The settings that spare the daemon discovering the GPUs at start-up (see the module's docstring).
NO_DISCOVERY = {"MULLAMA_CONTEXT_LENGTH": "4096", "MULLAMA_MAX_LOADED_MODELS": "3"}


def _probe(code: str, tmp: Path, *args: str) -> dict[str, object]:
    """Run ``code`` with ``args`` in a fresh interpreter with a store of its own; the JSON it prints."""
    env = environment(tmp, free_port()) | NO_DISCOVERY
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _loaded(modules: object, forbidden: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that are, or lie under, one of ``forbidden``."""
    assert isinstance(modules, list)
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]


def _native(maps: str) -> list[str]:
    """The native libraries of :data:`NATIVE` mapped in a process, given its ``/proc/<pid>/maps``."""
    return sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if any(n in line for n in NATIVE)})


@linux_only
def test_the_in_process_api_imports_no_server_and_loads_llama_cpp_with_its_first_model(tmp_path: Path,
                                                                                         model_path: Path) -> None:
    found = _probe(_LIBRARY_PROBE, tmp_path, str(model_path))
    assert _loaded(found["modules"], NOT_FOR_THE_LIBRARY) == []
    assert _native(str(found["maps"])) == []  # libllama loads with the first Model, not with the import
    assert _loaded(found["used"], NOT_FOR_THE_LIBRARY) == []  # nor does generating bring the server in


@linux_only
def test_an_idle_daemon_imports_nothing_optional_and_loads_no_model_library(tmp_path: Path) -> None:
    found = _probe(_DAEMON_PROBE, tmp_path)
    modules = found["modules"]
    assert _loaded(modules, NOT_FOR_AN_IDLE_DAEMON) == []
    assert _native(str(found["maps"])) == []
    assert isinstance(modules, list) and len(modules) < IDLE_MODULES, len(modules)


@linux_only
def test_mullama_serve_maps_llama_cpp_with_its_first_model_only(tmp_path: Path, model_path: Path) -> None:
    serving = serve(tmp_path, **NO_DISCOVERY)
    try:
        maps = Path(f"/proc/{serving.process.pid}/maps")
        create_model(serving.port, model_path)
        assert _native(maps.read_text()) == []  # creating a model reads its file; it loads no library
        connection = http.client.HTTPConnection("127.0.0.1", serving.port, timeout=300)
        connection.request("POST", "/api/generate", json.dumps(
            {"model": "smol", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}))
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["done"] is True
        connection.close()
        assert any(name.startswith("libllama") for name in _native(maps.read_text()))
    finally:
        serving.stop()


_CONCURRENT_LOADS = """
import threading
from mullama.ffi import loader
barrier = threading.Barrier(8)
found = []
def first_load():
    barrier.wait()
    found.append(loader.load())
threads = [threading.Thread(target=first_load) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len({id(native) for native in found}), len(found[0].devices))
"""


def test_first_loads_at_once_load_the_libraries_once(tmp_path: Path) -> None:
    # The daemon loads llama.cpp with its first model, and two requests may bring two first models at once.
    result = subprocess.run([sys.executable, "-c", _CONCURRENT_LOADS], env=environment(tmp_path, free_port()),
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    natives, devices = map(int, result.stdout.split())
    alone = subprocess.run([sys.executable, "-c", "from mullama.ffi import loader; print(len(loader.load().devices))"],
                           env=environment(tmp_path, free_port()), cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=True)
    assert (natives, devices) == (1, int(alone.stdout))


@linux_only
def test_an_idle_daemon_finds_the_gpus_for_ollama_s_defaults_without_loading_llama_cpp(tmp_path: Path) -> None:
    """Without CONTEXT_LENGTH and MAX_LOADED_MODELS the defaults need the GPUs: a child process finds them."""
    serving = serve(tmp_path)
    try:
        # The daemon answers while the child looks for GPUs; the settings line follows.
        deadline = time.monotonic() + 120
        while "settings: " not in serving.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = serving.log.read_text()
        assert "settings: num_ctx" in log and "(automatic)" in log, log
        assert _native(Path(f"/proc/{serving.process.pid}/maps").read_text()) == []
    finally:
        serving.stop()


_DISCOVERY = """
import json
from dataclasses import asdict
from mullama.engine import gpus
from mullama.ffi import loader
child = gpus.gpus()
assert not loader.is_loaded()
loader.load()
here = gpus.gpus()
same = lambda found: [(g.name, g.description, g.backend, g.memory_total) for g in found]
print(json.dumps({"child": same(child), "here": same(here)}))
"""


@pytest.mark.parametrize("library", ["selected", "vulkan"])
def test_the_gpus_a_child_finds_are_those_llama_cpp_finds_here(library: str, tmp_path: Path) -> None:
    env = environment(tmp_path, free_port())
    if library == "vulkan":
        from test_vulkan import child_env, require_vulkan

        require_vulkan()  # lavapipe: a GPU as llama.cpp's Vulkan backend sees it, on any machine
        env = child_env(MULLAMA_HOME=env["MULLAMA_HOME"], MULLAMA_MODELS=env["MULLAMA_MODELS"])
    result = subprocess.run([sys.executable, "-c", _DISCOVERY], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["child"] == found["here"]
    if library == "vulkan":
        assert found["child"] and found["child"][0][2] == "Vulkan"
