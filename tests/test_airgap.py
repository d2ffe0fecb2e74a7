"""An air-gapped install, proven: the wheelhouse installs and runs a model with no network at all.

``build_native.py --wheelhouse DIR`` makes a platform wheel of Mullama
carrying the native libraries plus a wheel of every dependency. Here a fresh
virtual environment installs it inside a network namespace of its own
(``unshare -n``: loopback only, nothing beyond it), with ``pip install
--no-index --find-links``, and runs a local GGUF through ``mullama run`` and
the daemon's API, with no user cache and no source tree in reach, so the
libraries must come from the wheel. The wheelhouse is cached by its key
(the libraries' build and Mullama's files) in the user cache: building it
takes 10 to 30 s on two cores (pip fetches the dependencies), a cached one
0.3 s; the install and the run take about 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import REPO

from mullama import config

pytestmark = pytest.mark.slow

#: Runs inside the namespace: install, start the daemon, create a model from the GGUF, run it, ask the API.
SCRIPT = r"""
set -eu
ip link set lo up
if "$VENV/bin/python" - <<'EOF'
import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=5)
except OSError:
    raise SystemExit(1)
EOF
then echo "the namespace reaches the network" >&2; exit 3; fi
"$VENV/bin/pip" install -q --no-index --find-links "$WHEELHOUSE" mullama
cd "$WORK"
"$VENV/bin/mullama" serve > serve.log 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
"$VENV/bin/python" - <<'EOF'
import os, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://{os.environ['MULLAMA_HOST']}/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
EOF
printf 'FROM ./model.gguf\nPARAMETER temperature 0\n' > Modelfile
"$VENV/bin/mullama" create local -f Modelfile
"$VENV/bin/mullama" run local "Name a colour." > run.txt
"$VENV/bin/python" - <<'EOF' > api.json
import json, os, urllib.request
body = json.dumps({"model": "local", "prompt": "Name a colour.", "stream": False,
                   "options": {"temperature": 0, "num_predict": 12}}).encode()
request = urllib.request.Request(f"http://{os.environ['MULLAMA_HOST']}/api/generate", body,
                                 {"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=600).read().decode())
EOF
if "$VENV/bin/mullama" pull smollm2:360m 2> pull.txt; then exit 4; fi
"""


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """The wheelhouse of this checkout and its libraries, built once per key into the user cache."""
    directory = config.user_cache_dir() / "wheelhouse"
    result = subprocess.run([sys.executable, str(REPO / "build_native.py"), "--wheelhouse", str(directory)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return directory


def test_the_wheel_carries_the_libraries_the_loader_needs(wheelhouse):
    import zipfile

    wheels = list(wheelhouse.glob("mullama-*.whl"))
    assert len(wheels) == 1 and not wheels[0].name.endswith("-any.whl"), wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        manifest = json.loads(wheel.read("mullama/_native/manifest.json"))
    libraries = {name.rsplit("/", 1)[1] for name in names if name.startswith("mullama/_native/lib/")}
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    assert {f"libllama{suffix}", f"libggml{suffix}", f"libggml-base{suffix}"} <= libraries
    assert manifest["preload"][0] == "ggml-base"
    assert {f"lib{stem}{suffix}" for stem in manifest["preload"]} <= libraries
    assert "mullama/cli/verbs.py" in names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces are Linux's")
def test_wheelhouse_installs_and_runs_a_model_with_no_network(wheelhouse, tmp_path, model_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a network namespace here (`unshare -n` needs root or user namespaces)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    try:
        os.link(model_path, work / "model.gguf")
    except OSError:
        shutil.copy(model_path, work / "model.gguf")
    # Nothing of this machine's Mullama in reach: no source tree, no user cache, no settings.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MULLAMA_", "OLLAMA_", "PYTHON", "PIP_", "XDG_", "HF_"))}
    env |= {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "VENV": str(venv),
            "WHEELHOUSE": str(wheelhouse), "WORK": str(work), "MULLAMA_HOST": "127.0.0.1:11434",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MULLAMA_DEBUG": "1", "MULLAMA_OFFLINE": "1"}
    result = subprocess.run(["unshare", "-n", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)
    log = (work / "serve.log").read_text() if (work / "serve.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + log[-3000:]
    assert (work / "run.txt").read_text().strip()
    answer = json.loads((work / "api.json").read_text())
    assert answer["done"] and answer["response"].strip() and answer["eval_count"] > 0
    assert "MULLAMA_OFFLINE is set (offline mode)" in (work / "pull.txt").read_text()
    # The daemon loaded the libraries the wheel installed, not a build of this machine.
    site = next(venv.glob("lib/python*/site-packages"))
    assert f"from {site / 'mullama' / '_native' / 'lib'}" in log
