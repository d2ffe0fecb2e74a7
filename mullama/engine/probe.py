"""A model's first load happens in a child process, so a file that aborts llama.cpp costs a child, not the daemon.

The GGUF validator (:mod:`mullama.store.gguf`) checks what a header can get
wrong, but llama.cpp asserts on much more (a vocabulary with a duplicate
token, a hyperparameter one architecture's graph cannot use...), and an
assertion ends the whole process. So the first time the daemon loads a
model's files, a child (``python -m mullama.engine.probe PATH...``) loads
them the same way and builds a small context, which builds the graph; the
daemon loads the model only if the child exits cleanly. The verdict is kept
in the user cache, keyed by the llama.cpp build and the model's digest (a
file outside the store: its path, size and modification time), so each
model costs one child once per build.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mullama import config
from mullama.errors import InvalidModelFileError, ModelLoadError
from mullama.spawn import child_environment, module_command

log = logging.getLogger("mullama.probe")

#: Seconds a child may take to load a model: a large one is read from a slow disk once.
PROBE_TIMEOUT = 600.0
#: The child's exit status when llama.cpp refused the files without crashing.
_REFUSED = 2
#: Deaths that the files cause every time; a child killed (out of memory) or timed out says nothing about them.
_CRASHES = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
#: Context the child builds: enough for llama.cpp to build the model's graph.
_PROBE_CTX = 256


def verify(paths: Sequence[str | os.PathLike[str]], digest: str) -> None:
    """Return if ``paths`` (a model's GGUF, split parts in order) load in a child; raise otherwise.

    Raises :class:`InvalidModelFileError` when llama.cpp crashes on the
    files or refuses them, :class:`ModelLoadError` when the child could not
    tell (it was killed, timed out, or could not start llama.cpp).
    """
    files = [Path(p).absolute() for p in paths]
    verdict = _cache_dir() / f"{_key(files, digest)}.json"
    try:
        cached = json.loads(verdict.read_text())
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and isinstance(cached.get("message"), str):
        if cached.get("ok") is True:
            return
        raise InvalidModelFileError(cached["message"], param="model")
    ok, message = _probe(files)
    if ok is not None:
        _store(verdict, {"ok": ok, "message": message})
    if ok is False:
        raise InvalidModelFileError(message, param="model")
    if ok is None:
        raise ModelLoadError(message)


def _cache_dir() -> Path:
    return config.user_cache_dir() / "probes"


def _key(files: list[Path], digest: str) -> str:
    """The verdict's name: the model's digest (its content) or, for a file outside the store, the file itself."""
    from mullama.ffi import loader

    native = loader.load()
    identity: list[object] = [native.manifest.get("llama_cpp_commit", ""), str(native.directory)]
    if digest:
        identity.append(digest)
    else:
        for path in files:
            stat = path.stat()
            identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _store(verdict: Path, value: dict[str, object]) -> None:
    """Write a verdict atomically; a cache that cannot be written only costs another child later."""
    try:
        verdict.parent.mkdir(parents=True, exist_ok=True)
        partial = verdict.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(value))
        os.replace(partial, verdict)
    except OSError as exc:
        log.warning("could not keep the verdict on %s: %s", verdict.name, exc)


def _probe(files: list[Path]) -> tuple[bool | None, str]:
    """Load ``files`` in a child: (True, "") if they load, (False, why) if they crash or are refused, (None, why) if unknown."""
    name = files[0].name
    log.info("test-loading %s in a child process", name)
    env = child_environment() | {"GGML_NO_BACKTRACE": "1"}
    cwd = _cache_dir()
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        child = subprocess.run(module_command("mullama.engine.probe", *map(str, files)), cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return None, f"test-loading {name} took more than {PROBE_TIMEOUT:g} s"
    except OSError as exc:
        return None, f"could not start a process to test-load {name}: {exc}"
    if child.returncode == 0:
        return True, ""
    why = _reason(child.stderr.decode("utf-8", "replace"))
    if child.returncode == _REFUSED:
        return False, f"llama.cpp cannot load {name}: {why}"
    if -child.returncode in _CRASHES:
        crash = signal.Signals(-child.returncode).name
        return False, f"{name} crashes llama.cpp ({crash} while loading it in a test process): {why}"
    return None, f"test-loading {name} failed (exit status {child.returncode}): {why}"


def _reason(stderr: str) -> str:
    """The line of a child's error output that says what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "error", "Error"):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][-500:]
    return lines[-1][-500:] if lines else "no output"


def main(argv: Sequence[str]) -> int:
    """The child: load the files given, build a small context; 0 if both work, 2 if llama.cpp refuses."""
    from mullama.ffi import llama as L
    from mullama.ffi import loader

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    if not argv:
        print("usage: python -m mullama.engine.probe MODEL.gguf [PART.gguf...]", file=sys.stderr)
        return _REFUSED
    lib = loader.load().llama
    params = lib.llama_model_default_params()
    # As the daemon reads the files, but on the CPU, mapped, and without repacking the weights into copies.
    params.n_gpu_layers = 0
    params.load_mode = L.LLAMA_LOAD_MODE_MMAP
    params.use_extra_bufts = False
    if len(argv) == 1:
        model = lib.llama_model_load_from_file(os.fsencode(argv[0]), params)
    else:
        paths = (ctypes.c_char_p * len(argv))(*(os.fsencode(p) for p in argv))
        model = lib.llama_model_load_from_splits(paths, len(argv), params)
    if not model:
        print(f"error: llama.cpp could not load {argv[0]} (see its log above)", file=sys.stderr)
        return _REFUSED
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = _PROBE_CTX
    cparams.n_seq_max, cparams.n_threads, cparams.n_threads_batch = 1, 1, 1
    context = lib.llama_init_from_model(model, cparams)
    if not context:
        lib.llama_model_free(model)
        print(f"error: llama.cpp could not create a context for {argv[0]} (see its log above)", file=sys.stderr)
        return _REFUSED
    lib.llama_free(context)
    lib.llama_model_free(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
