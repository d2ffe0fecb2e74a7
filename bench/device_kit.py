#!/usr/bin/env python3
"""Pack what a lent GPU machine needs to take the speed figures: the pinned llama.cpp source and the fast model.

    python bench/device_kit.py        # here, once: writes .device/ (ignored by git)
    sh bench/device.sh build          # there, with .device carried: the CUDA build and llama.cpp's tools
    sh bench/device.sh bench          # there, next: bench/engine.py and bench/serve.py, each with and
                                      # without --backend-sampling; the figures land under $OUT

The device machine reaches nothing outside itself and takes at most 64 MiB
of working tree. The pinned source (verified by its sha256 here, as every
build verifies it) goes as a tarball of what a build with the tools reads;
the model is the test model cut to two layers (tests/fast_model.py), the
stand-in whose decode step is as short as a GPU's, since the test model
itself (98 MB) does not fit.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import build_native  # noqa: E402

KIT = ROOT / ".device"
#: What a build of the libraries, llama-bench and llama-server reads from llama.cpp's tree.
BUILD_INPUTS = ("CMakeLists.txt", "cmake", "include", "src", "ggml", "common", "tools", "vendor", "scripts", "LICENSE")
#: The device tool's limit on what travels, less room for the repository itself.
BUDGET = 58 * 2**20


def pack_source(dest: Path) -> Path:
    """A tarball of the pinned llama.cpp's build inputs, under one top folder."""
    source = build_native.pinned_source()
    with tarfile.open(dest, "w:gz", compresslevel=9) as tar:
        for name in BUILD_INPUTS:
            tar.add(source.path / name, arcname=f"llama.cpp/{name}")
    return dest


def main() -> int:
    from fast_model import fast_model_path

    KIT.mkdir(exist_ok=True)
    source = pack_source(KIT / "llama.cpp.tar.gz")
    model = KIT / "fast.gguf"
    shutil.copyfile(fast_model_path(), model)
    total = source.stat().st_size + model.stat().st_size
    print(f"{source.relative_to(ROOT)} {source.stat().st_size / 2**20:.1f} MiB, "
          f"{model.relative_to(ROOT)} {model.stat().st_size / 2**20:.1f} MiB")
    if total > BUDGET:
        print(f"{total / 2**20:.1f} MiB: more than the device tool carries with the repository", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
