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
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mullama import config
from mullama.errors import InvalidModelFileError, ModelLoadError
from mullama.spawn import child_environment, module_command

log = logging.getLogger("mullama.probe")

#: Seconds a child may go without progress (a byte of output) before it is killed: OLLAMA_LOAD_TIMEOUT's default.
STALL_TIMEOUT = 300.0
#: The child's exit status when llama.cpp refused the files without crashing.
_REFUSED = 2
#: Deaths that the files cause every time; a child killed (out of memory) or timed out says nothing about them.
_CRASHES = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
#: Context the child builds: enough for llama.cpp to build the model's graph.
_PROBE_CTX = 256


def verify(paths: Sequence[str | os.PathLike[str]], digest: str, stall_timeout: float = STALL_TIMEOUT) -> None:
    """Return if ``paths`` (a model's GGUF, split parts in order) load in a child; raise otherwise.

    Raises :class:`InvalidModelFileError` when llama.cpp crashes on the
    files or refuses them, :class:`ModelLoadError` when the child could not
    tell (it was killed, made no progress for ``stall_timeout`` seconds, or
    could not start llama.cpp).
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
    ok, message = _probe(files, stall_timeout)
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


def _probe(files: list[Path], stall_timeout: float = STALL_TIMEOUT) -> tuple[bool | None, str]:
    """Load ``files`` in a child: (True, "") if they load, (False, why) if they crash or are refused, (None, why) if unknown.

    The child writes a byte for each progress report of llama.cpp's and its
    log to stderr; one that writes nothing for ``stall_timeout`` seconds has
    stalled and is killed, as Ollama kills a runner whose load stalls.
    """
    name = files[0].name
    log.info("test-loading %s in a child process", name)
    env = child_environment() | {"GGML_NO_BACKTRACE": "1"}
    cwd = _cache_dir()
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        child = subprocess.Popen(module_command("mullama.engine.probe", *map(str, files)), cwd=cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        return None, f"could not start a process to test-load {name}: {exc}"
    with child:
        stderr = _follow(child, stall_timeout)
        if stderr is None:
            return None, (f"test-loading {name} made no progress for {stall_timeout:g}s, so it was given up "
                          "(MULLAMA_LOAD_TIMEOUT/OLLAMA_LOAD_TIMEOUT)")
        returncode = child.wait()
    if returncode == 0:
        return True, ""
    why = _reason(stderr.decode("utf-8", "replace"))
    if returncode == _REFUSED:
        return False, f"llama.cpp cannot load {name}: {why}"
    if -returncode in _CRASHES:
        crash = signal.Signals(-returncode).name
        return False, f"{name} crashes llama.cpp ({crash} while loading it in a test process): {why}"
    return None, f"test-loading {name} failed (exit status {returncode}): {why}"


def _follow(child: subprocess.Popen[bytes], stall_timeout: float) -> bytes | None:
    """The child's stderr once both its outputs close; None (the child killed) when it is silent ``stall_timeout`` s."""
    stderr = bytearray()
    last = time.monotonic()
    with selectors.DefaultSelector() as selector:
        for stream in (child.stdout, child.stderr):
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            wait = None if math.isinf(stall_timeout) else max(0.0, last + stall_timeout - time.monotonic())
            ready = selector.select(wait)
            if not ready:
                child.kill()
                child.wait()
                return None
            for key, _ in ready:
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.fileobj is child.stderr:
                    stderr += data
                last = time.monotonic()
    return bytes(stderr)


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
    # A byte on stdout per progress report tells the daemon the load advances (see _follow).
    progress = L.llama_progress_callback(lambda _fraction, _data: os.write(1, b".") > 0)
    params.progress_callback = progress
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
