"""Nothing from the user's current directory runs: ggml backends, or a ``mullama`` shadowing the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from daemon import CLOSED_HUB, REPO, free_port

from mullama.cli import daemon as autostart
from mullama.spawn import child_environment

#: A shared library whose constructor writes the file named by $EVIL_MARKER: loading it is running it.
EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
    const char *marker = getenv("EVIL_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory) -> Path:
    """``libevil.so``, compiled from :data:`EVIL_C`."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or os.name == "nt":
        pytest.skip("needs a C compiler and ELF shared libraries")
    build = tmp_path_factory.mktemp("evil")
    (build / "evil.c").write_text(EVIL_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(build / "libevil.so"), str(build / "evil.c")], check=True)
    return build / "libevil.so"


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True, timeout=120,
                          check=False)


def test_backends_in_the_current_directory_are_not_loaded(evil_library, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Names ggml's default search picks up: a variant of a backend, and a backend's base library.
    for name in ("libggml-cpu-evil.so", "libggml-blas.so", "libggml-rpc.so"):
        shutil.copy(evil_library, cwd / name)
    marker = tmp_path / "marker"

    # The control: loading the library does write the marker.
    control = _python(f"import ctypes; ctypes.CDLL({str(cwd / 'libggml-cpu-evil.so')!r})", cwd,
                      EVIL_MARKER=str(tmp_path / "control"))
    assert control.returncode == 0, control.stderr
    assert (tmp_path / "control").exists()

    result = _python("from mullama.ffi import loader\nnative = loader.load()\n"
                     "print(sorted(d.kind for d in native.devices))", cwd, EVIL_MARKER=str(marker))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert "cpu" in result.stdout  # the real backends still load


def test_a_system_librarys_directory_is_absolute():
    from mullama.ffi import loader

    native = loader.load()
    # As ctypes.util.find_library names it on Linux: no directory at all.
    directory = loader._directory_of(native.llama, "libllama.so")
    assert directory.is_absolute() and (directory / "libllama.so").exists()
    assert directory.resolve() == Path(native.directory).resolve()


#: Files that would be imported as ``mullama`` from the current directory.
SHADOWS = {"package": ["mullama/__init__.py", "mullama/__main__.py"], "module": ["mullama.py"]}


@pytest.mark.parametrize("shadow", sorted(SHADOWS))
def test_a_shadow_in_the_current_directory_does_not_hijack_the_started_daemon(shadow, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    marker = tmp_path / "hijacked"
    code = f"open({str(marker)!r}, 'w').write('hijacked')\nraise SystemExit(3)\n"
    for name in SHADOWS[shadow]:
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(code)
    port = free_port()
    for name in ("MULLAMA_API_KEY", "MULLAMA_ORIGINS", "OLLAMA_ORIGINS", "MULLAMA_MAX_BODY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MULLAMA_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MULLAMA_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_HUB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(cwd)
    # The daemon outlives connect() on purpose; the test keeps its handle to stop it.
    started: list[subprocess.Popen[bytes]] = []

    def popen(*args, **kwargs):
        started.append(subprocess.Popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(autostart, "subprocess", types.SimpleNamespace(**{**vars(subprocess), "Popen": popen}))
    try:
        client = autostart.connect()
        assert client.heartbeat()
        assert not marker.exists()
        if sys.platform.startswith("linux"):
            assert Path(f"/proc/{started[0].pid}/cwd").resolve() == (tmp_path / "home").resolve()
    finally:
        for process in started:
            process.terminate()
            process.wait(15)


def test_relative_paths_keep_their_meaning_in_a_child(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MULLAMA_MODELS", "store")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["lib", "", "/abs"]))
    env = child_environment()
    assert env["MULLAMA_MODELS"] == str(tmp_path / "store")
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "lib"), "/abs"])


def test_a_child_imports_the_package_its_parent_runs(tmp_path):
    """``python -m mullama`` in a checkout that was never installed: its children find the same code."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "mullama", checkout / "mullama", ignore=shutil.ignore_patterns("__pycache__"))
    # Only this copy has the module, so the child can run it only from the parent's package.
    (checkout / "mullama" / "_where.py").write_text("import mullama\nprint(mullama.__file__)\n")
    parent = ("import subprocess\nfrom mullama.spawn import module_command\n"
              "child = subprocess.run(module_command('mullama._where'), cwd='/', capture_output=True, text=True)\n"
              "print(child.stdout, child.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", parent], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.split()[0] == str(checkout / "mullama" / "__init__.py"), result.stdout
