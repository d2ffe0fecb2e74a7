"""A pull onto a disk without room: a clear error, and the store as it was (issue #14).

The store lies on a small tmpfs mounted in a private mount namespace
(``unshare``, as an unprivileged user mapped to root where needed), so the
disk that fills is a real one; the pulls run in that namespace's process
against the local Hub server of this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import HubServer

REPO = Path(__file__).resolve().parent.parent

#: Runs in the namespace: pulls each name (at once, on threads) and reports what happened and what the store holds.
_CHILD = r"""
import json, os, sys, threading
from pathlib import Path
from mullama.errors import MullamaError
from mullama.store.blobs import Store
from mullama.store.pull import pull

root = Path(os.environ["MULLAMA_MODELS"])
outcomes = {}

def run(name):
    try:
        pull(name)
        outcomes[name] = {"ok": True}
    except MullamaError as exc:
        outcomes[name] = {"ok": False, "type": type(exc).__name__, "status": exc.status, "message": exc.message}

threads = [threading.Thread(target=run, args=(name,)) for name in sys.argv[1:]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
store = Store(root)
models = {str(entry.name): [layer.digest for layer in store.read_manifest(entry.name).layers]
          for entry in store.list_models()}
files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.stat().st_size)
print(json.dumps({"outcomes": outcomes, "models": models, "files": files}))
"""


def _random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(bytes((index * seed + index // 251) % 256 for index in range(size)))
    return path


def _pull_on_small_disk(hub: HubServer, store: Path, megabytes: int, *names: str) -> dict:
    store.mkdir()
    env = {**os.environ, "MULLAMA_MODELS": str(store), "MULLAMA_HOME": str(store.parent / "home"),
           "OLLAMA_MODELS": str(store.parent / "no-ollama"), "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": str(REPO)}
    for variable in ("HF_TOKEN", "HF_HUB_OFFLINE", "MULLAMA_ALIASES"):
        env.pop(variable, None)
    script = f'mount -t tmpfs -o size={megabytes}m mullama-test "$1" && shift && exec "$@"'
    command = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(store),
               sys.executable, "-c", _CHILD, *names]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _tmpfs_mountable() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--map-root-user", "mount", "-t", "tmpfs", "none", "/mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _tmpfs_mountable(),
                                reason="cannot mount a tmpfs in a private mount namespace (unshare) here")


def test_a_file_larger_than_the_free_space_is_refused_before_any_byte(tmp_path):
    with HubServer() as hub:
        hub.add("someone/Big-GGUF", "Big-Q4_K_M.gguf", _random_file(tmp_path / "big", 6 << 20, 3))
        report = _pull_on_small_disk(hub, tmp_path / "store", 4, "hf.co/someone/Big-GGUF")
        assert hub.state.gets("Big-Q4_K_M.gguf") == []
    outcome = report["outcomes"]["hf.co/someone/Big-GGUF"]
    assert outcome["type"] == "StorageFullError" and outcome["status"] == 507
    assert "someone/Big-GGUF/Big-Q4_K_M.gguf needs 6.0 MiB but the disk holding" in outcome["message"]
    assert "nothing was downloaded" in outcome["message"]
    assert report["models"] == {} and report["files"] == []


def test_a_disk_that_fills_during_two_pulls_keeps_the_one_that_fits_and_nothing_of_the_other(tmp_path):
    with HubServer() as hub:
        for index in (1, 2):
            hub.add(f"someone/Part{index}-GGUF", f"Part{index}-Q4_K_M.gguf",
                    _random_file(tmp_path / f"part{index}", 5 << 20, index + 5))
        # Slow enough that both pass the free-space check before either has written much.
        hub.state.delay = 0.005
        report = _pull_on_small_disk(hub, tmp_path / "store", 8, "hf.co/someone/Part1-GGUF",
                                     "hf.co/someone/Part2-GGUF")
    outcomes = report["outcomes"]
    failed = [name for name, outcome in outcomes.items() if not outcome["ok"]]
    assert failed, outcomes  # 10 MiB cannot fit on 8
    for name in failed:
        assert outcomes[name]["type"] == "StorageFullError" and outcomes[name]["status"] == 507
        assert "filled up after" in outcomes[name]["message"] and "nothing was kept" in outcomes[name]["message"]
    # Only complete models are visible, each with all its blobs; no partial download is left behind.
    kept = {name for name, outcome in outcomes.items() if outcome["ok"]}
    assert len(report["models"]) == len(kept)
    blobs = {path for path in report["files"] if path.startswith("blobs/")}
    for digests in report["models"].values():
        assert {"blobs/" + digest.replace(":", "-") for digest in digests} <= blobs
    assert not [path for path in report["files"] if path.startswith("partial/")], report["files"]
