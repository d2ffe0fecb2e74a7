"""The GPUs of this machine, found by a child process while llama.cpp is not loaded here.

Ollama's GPU-based defaults (the context length by GPU memory, three models
per GPU) and the memory budget need the GPUs before any model loads.
Loading llama.cpp's GPU backends to find them would start each GPU's runtime
in the daemon (a CUDA context holds hundreds of MiB of GPU memory and of
RAM) for as long as it runs, though no model is loaded. So, as Ollama does,
a child process loads the libraries, reports the GPUs and exits. Once
llama.cpp is loaded here for a model, it is asked directly.

``python -m mullama.engine.gpus`` is that child: it prints the GPUs as JSON.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass

from mullama import config
from mullama.errors import NativeLibraryError
from mullama.ffi import loader
from mullama.spawn import child_environment, module_command

log = logging.getLogger("mullama.engine.gpus")

#: How long the child may take: loading the libraries and asking each GPU, seconds.
_TIMEOUT = 120.0


@dataclass(frozen=True)
class Gpu:
    """A GPU models may be offloaded to, as llama.cpp's backends report it."""

    name: str
    description: str
    backend: str
    memory_total: int
    memory_free: int


def gpus() -> list[Gpu]:
    """The GPUs models may use: asked of llama.cpp if it is loaded here, else found by a child process (once).

    Raises :class:`NativeLibraryError` when the libraries cannot be loaded.
    """
    if loader.is_loaded():
        return [_gpu(device) for device in loader.load().gpu_devices]
    return list(_discovered())


def _gpu(device: loader.Device) -> Gpu:
    return Gpu(device.name, device.description, device.backend, device.memory_total, device.memory_free)


@functools.lru_cache(maxsize=1)
def _discovered() -> tuple[Gpu, ...]:
    """Run the child once; a child that fails in any other way than a missing library means no GPUs (logged)."""
    cwd = config.user_cache_dir()
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        child = subprocess.run(module_command("mullama.engine.gpus"), cwd=cwd, env=child_environment(),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("GPU discovery failed (%s): planning as if there were no GPU", exc)
        return ()
    try:
        report = json.loads(child.stdout)
        if "error" in report:
            raise NativeLibraryError(report["error"])
        return tuple(Gpu(**entry) for entry in report["gpus"])
    except (ValueError, TypeError, KeyError) as exc:
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        log.warning("GPU discovery failed (%s; %s): planning as if there were no GPU", tail[0], exc)
        return ()


def main() -> int:
    """Print this machine's GPUs as JSON (``{"gpus": [...]}``, or ``{"error": ...}`` without a library)."""
    try:
        report = {"gpus": [asdict(_gpu(device)) for device in loader.load().gpu_devices]}
    except NativeLibraryError as exc:
        report = {"error": str(exc)}
    sys.stdout.write(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
