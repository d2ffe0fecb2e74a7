"""build_native.py --with-whisper: libwhisper beside libllama, on its ggml, cached, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "build_native.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def test_with_whisper_keeps_the_llama_build_and_adds_libwhisper_beside_it():
    plain = run("--print-lib-dir")
    with_whisper = run("--with-whisper", "--print-lib-dir")
    assert plain.returncode == with_whisper.returncode == 0, with_whisper.stderr
    lib_dir = Path(with_whisper.stdout.strip().splitlines()[-1])
    assert lib_dir == Path(plain.stdout.strip().splitlines()[-1])  # the llama.cpp build and its key are unchanged
    assert "whisper up to date" in run("--with-whisper").stdout
    manifest = json.loads((lib_dir.parent / "whisper.json").read_text())
    pin = json.loads((ROOT / "native" / "whisper.json").read_text())
    assert manifest["whisper_cpp_version"] == pin["whisper_cpp_version"]
    assert manifest["source_sha256"] == pin["sha256"]
    assert all((lib_dir.parent / f).exists() for f in manifest["files"])
    assert (lib_dir.parent / manifest["vad_model"]).stat().st_size > 500_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ldd's resolution")
def test_libwhisper_links_the_ggml_of_the_llama_build():
    """The same ggml sonames as libllama, found in the very directory the loader loads libllama's from."""
    lib_dir = Path(run("--with-whisper", "--print-lib-dir").stdout.strip().splitlines()[-1])

    def ggml_of(library: str) -> dict[str, Path]:
        listing = subprocess.run(["ldd", str(lib_dir / library)], capture_output=True, text=True).stdout
        return {line.split("=>")[0].strip(): Path(line.split("=>")[1].split()[0])
                for line in listing.splitlines() if "libggml" in line}

    whisper, llama = ggml_of("libwhisper.so"), ggml_of("libllama.so")
    assert {"libggml.so.0", "libggml-base.so.0"} <= set(whisper) <= set(llama)
    for soname in ("libggml.so.0", "libggml-base.so.0"):
        assert whisper[soname].parent.resolve() == lib_dir.resolve()


def test_a_whisper_source_that_is_not_whisper_cpp_is_refused(tmp_path):
    archive = tmp_path / "not-whisper.tar.gz"
    readme = tmp_path / "README"
    readme.write_text("hello")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(readme, arcname="project/README")
    # An empty cache: the local source is refused before any llama.cpp build starts.
    result = run("--whisper-source", str(archive), env={"MULLAMA_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "--whisper-source" in result.stderr and "no whisper.cpp tree found" in result.stderr
    missing = run("--whisper-source", str(tmp_path / "missing"), env={"MULLAMA_CACHE_DIR": str(tmp_path / "cache")})
    assert missing.returncode == 1 and "no such file" in missing.stderr
