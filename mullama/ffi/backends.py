"""Which ggml backends a process uses, and loading them as run-time modules.

A build made with ``build_native.py --backend-modules`` links no backend
into libggml: each (``libggml-cpu.so``, ``libggml-vulkan.so``, and with
``--cpu-variants`` one CPU module per CPU generation such as
``libggml-cpu-haswell.so``) is a module loaded at start. Modules are
looked for only in Mullama's library directory, never in the current
directory or ``GGML_BACKEND_PATH`` (which ggml's own ``load_all`` would
honour); of several variants of one backend the one scoring best on this
machine is loaded, as ggml picks it.

``MULLAMA_BACKENDS`` (or Ollama's ``OLLAMA_LLM_LIBRARY``) names the
backends to use, e.g. ``cpu`` or ``vulkan``; the CPU backend is always
loaded, since llama.cpp runs what is not offloaded on it. In a build
whose backends are linked in, the selection limits the devices models
are offloaded to.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mullama import config
from mullama.errors import NativeLibraryError

#: ggml's module names, in the order ggml's own loader tries them; the CPU last.
MODULES = ("blas", "zendnn", "cann", "cuda", "hip", "metal", "rpc", "sycl", "vulkan", "virtgpu", "opencl",
           "hexagon", "musa", "openvino", "cpu")

#: The name each backend registers under (``ggml_backend_reg_name``), by module name.
REGISTRY_NAMES = {"blas": "BLAS", "cuda": "CUDA", "hip": "ROCm", "metal": "MTL", "rpc": "RPC", "sycl": "SYCL",
                  "vulkan": "Vulkan", "opencl": "OpenCL", "cpu": "CPU", "cann": "CANN", "musa": "MUSA"}

#: Names users write for a backend (Ollama's runner names among them) and the module they mean.
_ALIASES = {"rocm": "hip", "mtl": "metal", "cl": "opencl"}


@dataclass(frozen=True)
class Selection:
    """The backends to use; ``None`` for every one found."""

    modules: frozenset[str] | None

    def allows(self, registry_name: str) -> bool:
        """Whether devices of the backend registered as ``registry_name`` may be used."""
        if self.modules is None or registry_name.lower() == "cpu":
            return True
        return registry_name.lower() in {REGISTRY_NAMES.get(m, m).lower() for m in self.modules}


def selection() -> Selection:
    """The backends ``MULLAMA_BACKENDS`` or ``OLLAMA_LLM_LIBRARY`` name (comma-separated); all when unset.

    Ollama's runner names are read by their stem, so ``cpu_avx2`` means the
    CPU and ``cuda_v12`` CUDA. Raises :class:`NativeLibraryError` for a name
    that is no backend.
    """
    text = config.env("BACKENDS") or os.environ.get("OLLAMA_LLM_LIBRARY")
    if not text:
        return Selection(None)
    modules = set()
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        stem = re.split(r"[_\s]", word, maxsplit=1)[0]
        name = _ALIASES.get(stem, stem)
        if name not in MODULES:
            raise NativeLibraryError(f"MULLAMA_BACKENDS: {word!r} is not a backend "
                                     f"(known: {', '.join(sorted(set(MODULES) | set(_ALIASES)))})")
        modules.add(name)
    return Selection(frozenset(modules | {"cpu"}))


def module_files(directory: Path, name: str) -> list[Path]:
    """The files in ``directory`` that may be module ``name``: ``libggml-NAME.so`` and its variants."""
    prefix = "" if os.name == "nt" else "lib"
    suffix = ".dll" if os.name == "nt" else ".so"
    pattern = re.compile(rf"{re.escape(prefix)}ggml-{re.escape(name)}(-[A-Za-z0-9_]+)?{re.escape(suffix)}")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name)) if directory.is_dir() else []


def module_score(path: Path) -> int:
    """How well a module suits this machine (0: not at all, or not a module but a linked library).

    A CPU variant exports ``ggml_backend_score``, which checks this CPU's
    features without running code that needs them; a module without one
    scores 1.
    """
    try:
        library = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError:
        return 0
    try:
        if not hasattr(library, "ggml_backend_init"):
            return 0
        if not hasattr(library, "ggml_backend_score"):
            return 1
        library.ggml_backend_score.restype = ctypes.c_int
        library.ggml_backend_score.argtypes = []
        return max(0, library.ggml_backend_score())
    finally:
        _close(library)


def _close(library: ctypes.CDLL) -> None:
    """Let the system unload a library opened only to read its score."""
    import _ctypes

    closer = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if closer is not None:
        closer(library._handle)


def best_modules(directory: Path, chosen: Selection) -> list[Path]:
    """The module to load for each backend found in ``directory`` and allowed by ``chosen``, in ggml's order."""
    found = []
    for name in MODULES:
        if chosen.modules is not None and name not in chosen.modules:
            continue
        scored = [(module_score(path), path) for path in module_files(directory, name)]
        scored = [(score, path) for score, path in scored if score > 0]
        if scored:
            found.append(max(scored, key=lambda pair: pair[0])[1])
    return found


def load_modules(llama: ctypes.CDLL, directory: Path, chosen: Selection) -> list[str]:
    """Load the best module of each allowed backend from ``directory``; return the files loaded.

    A build whose backends are linked in has no modules, and nothing is loaded.
    """
    loaded = []
    for path in best_modules(directory, chosen):
        if llama.ggml_backend_load(str(path).encode()):
            loaded.append(path.name)
    return loaded
