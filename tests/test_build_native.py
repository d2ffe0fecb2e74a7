"""build_native.py: cached builds return at once, and problems are one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "build_native.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_second_run_is_up_to_date_in_seconds():
    run()  # the test session's libraries come from this same build
    started = time.monotonic()
    result = run("--print-lib-dir")
    assert result.returncode == 0
    assert "up to date" in result.stdout
    lib_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (lib_dir / "libllama.so").exists() or (lib_dir / "libllama.dylib").exists()
    assert time.monotonic() - started < 10
    manifest = (lib_dir.parent / "manifest.json").read_text()
    assert "0c1e57098bba43ac29e6e3b677cdceebdd22334f" in manifest


def test_missing_cmake_is_one_line_naming_what_to_install(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = run(env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "cmake not found" in result.stderr and "install" in result.stderr


def test_missing_backend_toolchain_is_named(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("cmake", "c++"):
        (fake / tool).symlink_to("/bin/true")
    result = run("--backend", "rocm", env={"PATH": str(fake)})
    assert result.returncode == 1
    assert "hipcc not found" in result.stderr and "ROCm" in result.stderr


def test_source_that_is_not_llama_cpp_is_refused(tmp_path):
    archive = tmp_path / "not-llama.tar.gz"
    readme = tmp_path / "README"
    readme.write_text("hello")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(readme, arcname="project/README")
    result = run("--source", str(archive), env={"MULLAMA_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert "no llama.cpp tree found" in result.stderr
    assert run("--source", str(tmp_path / "missing")).stderr.count("no such file") == 1


def test_the_build_asked_for_last_is_loaded_not_the_newest(tmp_path, monkeypatch):
    """A variant built for a test (``--keep-selection``) never replaces the build the test command selected."""
    import build_native
    from mullama.ffi import loader

    monkeypatch.setenv("MULLAMA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MULLAMA_LIBRARY_PATH", raising=False)
    native = tmp_path / "native"
    for name in ("cpu-aaaa", "cpu-rpc-bbbb"):
        (native / name / "lib").mkdir(parents=True)
        (native / name / "manifest.json").write_text("{}")
    os.utime(native / "cpu-aaaa" / "manifest.json", (1, 1))  # the selected build is the older one
    assert loader.candidate_directories()[1] == native / "cpu-rpc-bbbb" / "lib"  # nothing selected: the newest
    plan = build_native.BuildPlan(None, ["cpu"], [], [], native / "cpu-aaaa", 1, {})
    build_native.select_build(plan)
    directories = loader.candidate_directories()
    assert directories[1:] == [native / "cpu-aaaa" / "lib", native / "cpu-rpc-bbbb" / "lib"]
