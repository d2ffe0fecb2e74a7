"""Find and load libllama (and libmtmd, and libwhisper when asked), once per process.

Search order: ``MULLAMA_LIBRARY_PATH`` (a directory or the libllama file),
then the libraries a wheel carries (``mullama/_native/lib``, from
``build_native.py --wheel``), then the build in the user cache that
``build_native.py`` last built or found up to date (its ``selected`` file;
a variant built with ``--keep-selection`` is used only through
``MULLAMA_LIBRARY_PATH``), then the newest other build there, then a
libllama the system linker knows. ggml's backend modules are loaded from the
directory libllama came from, never from the current directory (which ggml
would search by default: a stray ``libggml-*.so`` there would run its code
in the daemon), only those ``MULLAMA_BACKENDS`` allows
(:mod:`mullama.ffi.backends`), and the devices they expose are reported, so
a user sees at once whether the GPU was found.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mullama import config
from mullama.errors import NativeLibraryError
from mullama.ffi import backends
from mullama.ffi import llama as L
from mullama.ffi import mtmd as M
from mullama.ffi import whisper as W

log = logging.getLogger("mullama.native")
#: What was loaded and found: a logger of its own, since the daemon quiets llama.cpp's own (``mullama.native``).
found = logging.getLogger("mullama.ffi.loader")

if sys.platform == "darwin":
    _SUFFIX = ".dylib"
elif os.name == "nt":
    _SUFFIX = ".dll"
else:
    _SUFFIX = ".so"

#: Loaded first and globally so libllama and the backends resolve their ggml symbols.
_GGML_LIBRARIES = ["ggml-base", "ggml"]
#: Where a wheel made by ``build_native.py --wheel`` carries the libraries. Its manifest's ``preload``
#: lists every linked library in dependency order: their build-time RUNPATH does not exist here.
BUNDLED = Path(__file__).resolve().parent.parent / "_native" / "lib"


@dataclass(frozen=True)
class Device:
    """A ggml compute device, as the backend reports it."""

    name: str
    description: str
    kind: str
    memory_total: int
    memory_free: int
    #: The backend it belongs to, as registered ("CPU", "Vulkan", "CUDA").
    backend: str = ""
    #: ggml's handle (``ggml_backend_dev_t``), for naming the device to llama.cpp.
    handle: int = field(default=0, compare=False, repr=False)


@dataclass
class Native:
    """The loaded libraries and what they found on this machine."""

    llama: ctypes.CDLL
    mtmd: ctypes.CDLL | None
    directory: Path
    devices: list[Device]
    system_info: str
    manifest: dict = field(default_factory=dict)
    #: The C side keeps the log callback's pointer forever, so Python must keep the object.
    log_callback: object = None
    #: The backends ``MULLAMA_BACKENDS`` allows (all when unset).
    selection: backends.Selection = field(default_factory=lambda: backends.Selection(None))
    #: The backend modules loaded at start (empty for a build whose backends are linked in).
    modules: list[str] = field(default_factory=list)

    @property
    def gpu_devices(self) -> list[Device]:
        """The GPUs found at start that models may be offloaded to."""
        return [d for d in self.devices if d.kind in ("gpu", "igpu")]

    def current_gpu_devices(self) -> list[Device]:
        """The GPUs models may use, asked now: their free memory is as it is at this moment."""
        return [d for d in _devices(self.llama, self.selection) if d.kind in ("gpu", "igpu")]

    def describe(self) -> str:
        """One line for logs: where the libraries came from and the devices they see."""
        devices = ", ".join(f"{d.name} ({d.description})" for d in self.devices) or "no devices"
        return f"llama.cpp {self.manifest.get('llama_cpp_commit', 'unknown')[:10]} from {self.directory}: {devices}"


def _libname(stem: str) -> str:
    return stem + ".dll" if os.name == "nt" else "lib" + stem + _SUFFIX


def candidate_directories() -> list[Path]:
    """Directories that may hold libllama, most preferred first."""
    found: list[Path] = []
    explicit = os.environ.get("MULLAMA_LIBRARY_PATH")
    if explicit:
        # Absolute now: a relative directory must not follow later changes of directory.
        path = Path(explicit).expanduser().absolute()
        found.append(path.parent if path.is_file() else path)
    found.append(BUNDLED)
    builds = config.native_build_dir()
    if builds.is_dir():
        try:
            found.append(builds / (builds / "selected").read_text().strip() / "lib")
        except OSError:
            pass  # nothing selected yet (a cache from before selections): the newest build is used
        manifests = sorted(builds.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        found += [m.parent / "lib" for m in manifests if m.parent / "lib" not in found]
    return found


def _find_directory() -> Path | None:
    for directory in candidate_directories():
        if (directory / _libname("llama")).exists():
            return directory
    if os.environ.get("MULLAMA_LIBRARY_PATH"):
        raise NativeLibraryError(f"MULLAMA_LIBRARY_PATH={os.environ['MULLAMA_LIBRARY_PATH']} holds no {_libname('llama')}")
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def _directory_of(library: ctypes.CDLL, name: str) -> Path:
    """The absolute directory of a library the linker found by its bare name (``libllama.so.0``)."""
    if os.path.isabs(name):
        return Path(name).parent
    info = _DlInfo()
    address = ctypes.cast(library.llama_backend_init, ctypes.c_void_p)
    if os.name != "nt" and ctypes.CDLL(None).dladdr(address, ctypes.byref(info)) and info.fname:
        path = Path(os.fsdecode(info.fname))
        if path.is_absolute():
            return path.parent
    raise NativeLibraryError(f"could not tell where the system's {name} lies: set MULLAMA_LIBRARY_PATH")


def _read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _route_logs(llama: ctypes.CDLL, mtmd: ctypes.CDLL | None) -> object:
    """Send llama.cpp's log lines to the ``mullama.native`` logger.

    llama.cpp writes a message in pieces (``GGML_LOG_LEVEL_CONT`` continues
    the previous one), so pieces are joined until a newline ends them.
    """
    levels = {L.GGML_LOG_LEVEL_DEBUG: logging.DEBUG, L.GGML_LOG_LEVEL_INFO: logging.DEBUG,
              L.GGML_LOG_LEVEL_WARN: logging.WARNING, L.GGML_LOG_LEVEL_ERROR: logging.ERROR}
    pending = threading.local()

    def callback(level: int, text: bytes | None, _user: int | None) -> None:
        piece = (text or b"").decode("utf-8", "replace")
        if level != L.GGML_LOG_LEVEL_CONT:
            pending.level = levels.get(level, logging.DEBUG)
            pending.text = ""
        pending.text = getattr(pending, "text", "") + piece
        if pending.text.endswith("\n"):
            line, pending.text = pending.text.rstrip(), ""
            if line:
                log.log(getattr(pending, "level", logging.DEBUG), "%s", line)

    c_callback = L.ggml_log_callback(callback)
    llama.llama_log_set(c_callback, None)
    if mtmd is not None and hasattr(mtmd, "mtmd_log_set"):
        mtmd.mtmd_log_set.argtypes = [L.ggml_log_callback, ctypes.c_void_p]
        mtmd.mtmd_log_set.restype = None
        mtmd.mtmd_log_set(c_callback, None)
    return c_callback


def _devices(llama: ctypes.CDLL, selection: backends.Selection) -> list[Device]:
    """The devices of the backends ``selection`` allows, in ggml's order."""
    kinds = {L.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", L.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
             L.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", L.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}
    devices = []
    for i in range(llama.ggml_backend_dev_count()):
        dev = llama.ggml_backend_dev_get(i)
        backend = llama.ggml_backend_reg_name(llama.ggml_backend_dev_backend_reg(dev)).decode(errors="replace")
        if not selection.allows(backend):
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        llama.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(
            name=llama.ggml_backend_dev_name(dev).decode(),
            description=llama.ggml_backend_dev_description(dev).decode(errors="replace"),
            kind=kinds.get(llama.ggml_backend_dev_type(dev), "unknown"),
            memory_total=total.value,
            memory_free=free.value,
            backend=backend,
            handle=dev,
        ))
    return devices


#: Held while the libraries load: the daemon loads them with its first model, and two models may be asked for at
#: once; both must not register the backends and the log callback.
_LOADING = threading.Lock()


def load() -> Native:
    """Load the libraries once; later calls return the same :class:`Native`."""
    with _LOADING:
        return _load()


def is_loaded() -> bool:
    """Whether :func:`load` has loaded the libraries in this process."""
    return _load.cache_info().currsize > 0


@functools.lru_cache(maxsize=1)
def _load() -> Native:
    directory = _find_directory()
    mode = ctypes.RTLD_GLOBAL
    try:
        if directory is not None:
            for stem in _read_manifest(directory).get("preload", _GGML_LIBRARIES):
                path = directory / _libname(stem)
                if path.exists():
                    ctypes.CDLL(str(path), mode=mode)
            llama = ctypes.CDLL(str(directory / _libname("llama")), mode=mode)
            mtmd_path = directory / _libname("mtmd")
            mtmd = ctypes.CDLL(str(mtmd_path), mode=mode) if mtmd_path.exists() else None
        else:
            system = ctypes.util.find_library("llama")
            if not system:
                raise NativeLibraryError(
                    "libllama not found: run `python build_native.py` (or set MULLAMA_LIBRARY_PATH)")
            llama = ctypes.CDLL(system, mode=mode)
            directory = _directory_of(llama, system)
            found_mtmd = ctypes.util.find_library("mtmd")
            mtmd = ctypes.CDLL(found_mtmd, mode=mode) if found_mtmd else None
    except OSError as exc:
        raise NativeLibraryError(f"could not load libllama from {directory}: {exc}") from exc
    L.bind(llama, L.FUNCTIONS)
    L.bind(llama, L.GGML_FUNCTIONS)
    if mtmd is not None:
        L.bind(mtmd, M.FUNCTIONS)
    log_callback = _route_logs(llama, mtmd)
    selection = backends.selection()
    modules = backends.load_modules(llama, directory, selection)
    llama.llama_backend_init()
    native = Native(
        llama=llama,
        mtmd=mtmd,
        directory=directory,
        devices=_devices(llama, selection),
        system_info=llama.llama_print_system_info().decode(errors="replace"),
        manifest=_read_manifest(directory),
        log_callback=log_callback,
        selection=selection,
        modules=modules,
    )
    if modules:
        found.info("backend modules: %s", ", ".join(modules))
    found.info("%s", native.describe())
    return native


def build_manifest() -> dict:
    """The manifest of the build :func:`load` loads, read without loading it when it is not loaded yet.

    The daemon labels its metrics with it at start-up, before any model
    needs the libraries: loading them (and through them every GPU runtime
    the build has) costs resident memory an idle daemon need not hold.
    """
    if _load.cache_info().currsize:
        return load().manifest
    directory = _find_directory()
    return _read_manifest(directory) if directory is not None else {}


@dataclass
class Whisper:
    """libwhisper, loaded beside libllama on the same ggml, and what its build recorded."""

    lib: ctypes.CDLL
    manifest: dict
    #: The Silero VAD model ``build_native.py --with-whisper`` installed from the pinned source, if any.
    vad_model: Path | None


@functools.lru_cache(maxsize=1)
def load_whisper() -> Whisper:
    """Load libwhisper from libllama's directory, once; later calls return the same :class:`Whisper`."""
    native = load()
    path = native.directory / _libname("whisper")
    if not path.exists():
        raise NativeLibraryError(f"{_libname('whisper')} not found in {native.directory}: "
                                 "run `python build_native.py --with-whisper`")
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise NativeLibraryError(f"could not load libwhisper from {native.directory}: {exc}") from exc
    missing = [name for name in W.FUNCTIONS if not hasattr(lib, name)]
    if missing:
        raise NativeLibraryError(f"{path} lacks {', '.join(missing[:5])}: it is not the whisper.cpp version "
                                 "Mullama is built for (run `python build_native.py --with-whisper`)")
    L.bind(lib, W.FUNCTIONS)
    # whisper.cpp's log setter also sets ggml's, which libllama shares: give it the same callback.
    lib.whisper_log_set(native.log_callback, None)
    try:
        manifest = json.loads((native.directory.parent / "whisper.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    vad = native.directory.parent / manifest["vad_model"] if manifest.get("vad_model") else None
    log.info("whisper.cpp %s from %s", lib.whisper_version().decode(), native.directory)
    return Whisper(lib=lib, manifest=manifest, vad_model=vad if vad and vad.exists() else None)
