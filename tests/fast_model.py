"""Models made from the test model for speed work: a fast stand-in, and a target for speculative decoding.

A stand-in for a fast accelerator that runs on these cores is the test model cut to its first layers.

On a GPU a decode step of the test model takes a millisecond or two, and
the host's work around it (sampling over the 49k-token vocabulary,
detokenising, Python) becomes a large share of each token. Here a step
takes about 8 ms, which hides that work. :func:`fast_model_path` gives the
same model with only its first ``layers`` transformer blocks: the same
tokenizer, vocabulary and output layer (so sampling and detokenising cost
what they cost on the real model) at a fraction of the compute per step.
Its text is nonsense; only its speed matters.

The file is written by llama.cpp's own ``llama_model_quantize`` with
``only_copy`` (every kept tensor copied byte for byte) and ``prune_layers``
(the blocks renumbered, ``block_count`` rewritten), as
``llama-quantize --prune-layers`` does, so nothing but the engine's own
library is needed. It is deterministic and cached next to the test model.

:func:`f16_model_path` is the test model re-quantized to F16, the target
of the speculative decoding benchmark (bench/spec.py), whose draft is the
Q4_1 test model itself.

    python tests/fast_model.py [--layers 2]     # prints the path, making the file if needed
    python tests/fast_model.py --f16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import SMOLLM2_SHA256, smollm2_path  # noqa: E402

from mullama.engine.model import quantize  # noqa: E402
from mullama.errors import ModelLoadError  # noqa: E402
from mullama.ffi import load  # noqa: E402
from mullama.store import gguf  # noqa: E402

#: Two blocks: a decode step costs about a quarter of the whole model's (most of it the 49k-row output layer).
DEFAULT_LAYERS = 2


def fast_model_path(layers: int = DEFAULT_LAYERS) -> Path:
    """The test model with only its first ``layers`` blocks, made once and cached beside it."""
    source = smollm2_path()
    dest = source.parent / f"smollm2-135m-q4_1-{SMOLLM2_SHA256[:12]}-{layers}layers.gguf"
    if not dest.exists():
        write_pruned(source, dest, layers)
    return dest


def f16_model_path() -> Path:
    """The test model re-quantized to F16 by the engine's own quantize, made once and cached beside it."""
    source = smollm2_path()
    dest = source.parent / f"smollm2-135m-q4_1-{SMOLLM2_SHA256[:12]}-f16.gguf"
    if not dest.exists():
        with _partial(dest) as partial:
            quantize(source, partial, "F16")
    return dest


def write_pruned(source: Path, dest: Path, layers: int) -> None:
    """Write ``source`` keeping its first ``layers`` blocks; ``dest`` appears only when complete."""
    total = gguf.read_gguf(source).block_count
    if not 0 < layers < total:
        raise ValueError(f"keep between 1 and {total - 1} of the {total} layers, not {layers}")
    lib = load().llama
    params = lib.llama_model_quantize_default_params()
    params.only_copy = True
    pruned = (ctypes.c_int32 * (total - layers + 1))(*range(layers, total), -1)
    params.prune_layers = pruned
    with _partial(dest) as partial:
        if lib.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise ModelLoadError(f"llama.cpp could not write {layers} layers of {source.name}")


@contextlib.contextmanager
def _partial(dest: Path) -> Iterator[Path]:
    """A file beside ``dest`` to write, renamed to ``dest`` if the block succeeds and removed otherwise.

    Tests may run in parallel processes: each writes its own file, and ``dest`` only ever appears whole.
    """
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".partial")
    os.close(fd)
    try:
        yield Path(partial)
        os.replace(partial, dest)
    finally:
        Path(partial).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Print the path of a speed model, making it if needed.")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--f16", action="store_true", help="the F16 target instead")
    args = parser.parse_args()
    print(f16_model_path() if args.f16 else fast_model_path(args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
