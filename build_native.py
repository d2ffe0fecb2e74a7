#!/usr/bin/env python3
"""Build llama.cpp's shared libraries for Mullama, from a pinned source.

    python build_native.py                       # CPU build of the pinned source
    python build_native.py --backend cuda        # CUDA (repeatable: --backend cuda --backend rpc)
    python build_native.py --source ~/llama.cpp  # a local checkout or tarball (air-gapped machines)
    python build_native.py --with-tools          # also llama-bench and llama-server, for bench/
    python build_native.py --with-whisper        # also libwhisper (speech), on the same ggml
    python build_native.py --wheel               # a platform wheel of Mullama carrying the libraries (dist/)
    python build_native.py --wheelhouse DIR      # that wheel and every dependency, for an air-gapped install
    python build_native.py --backend vulkan --backend-modules   # backends as run-time modules
    python build_native.py --cpu-variants        # modules, with the CPU backend for every x86/ARM generation

The pinned source is described in ``native/source.json``: an archive on the
Python package index whose sha256 is checked before anything is extracted.
Builds go to the user cache directory, one folder per key (source hash,
backends, options, CPU), each with a ``manifest.json``; a second run with
nothing changed returns at once. Only the standard library is used, so this
runs before Mullama itself is installed.

whisper.cpp (``native/whisper.json``, pinned the same way) is built against
the ggml that llama.cpp's build produced, headers and shared libraries both,
so one process holds one ggml for text and speech. Its build lives inside
the llama.cpp build folder, keyed by its own ``whisper.json`` manifest.

``--wheel`` packs Mullama with the built libraries (``mullama/_native``,
which the loader searches before the user cache) into a wheel for this
platform; ``--wheelhouse DIR`` puts it in DIR with a wheel of every
dependency, so ``pip install --no-index --find-links DIR mullama`` works
with no network. A wheelhouse records its key (the libraries' build and
Mullama's files); a second run with nothing changed returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINNED = HERE / "native" / "source.json"
#: Bump when the way libraries are built changes, so old cache entries are not reused.
BUILDER_VERSION = 1

LIBRARY_TARGETS = ["llama", "mtmd"]
TOOL_TARGETS = ["llama-bench", "llama-server"]

WHISPER_PINNED = HERE / "native" / "whisper.json"
#: Bump when the way libwhisper is built changes, so old whisper builds are not reused.
WHISPER_BUILDER_VERSION = 1
WHISPER_LIBRARY_TARGETS = ["whisper"]
WHISPER_TOOL_TARGETS = ["whisper-cli"]
#: whisper.cpp's options: its library and the CLI (for bench/), nothing that downloads or needs SDL.
WHISPER_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DWHISPER_BUILD_TESTS=OFF",
    "-DWHISPER_BUILD_EXAMPLES=ON",
    "-DWHISPER_BUILD_SERVER=OFF",
    "-DWHISPER_CURL=OFF",
    "-DWHISPER_SDL2=OFF",
    "-DWHISPER_ALL_WARNINGS=OFF",
]
#: The definitions ggml's own CMake makes public per backend; whisper.cpp reads some (KV padding on CUDA, Metal).
GGML_BACKEND_DEFINITIONS = {"cpu": "GGML_USE_CPU", "cuda": "GGML_USE_CUDA", "vulkan": "GGML_USE_VULKAN",
                            "rocm": "GGML_USE_HIP", "sycl": "GGML_USE_SYCL", "opencl": "GGML_USE_OPENCL",
                            "metal": "GGML_USE_METAL", "rpc": "GGML_USE_RPC"}
#: whisper.cpp adds its own ggml only when no target named ggml exists; this wrapper defines that
#: target over llama.cpp's built ggml, so libwhisper links the very libraries libllama does.
WHISPER_WRAPPER = """\
cmake_minimum_required(VERSION 3.14)
project(mullama_whisper C CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
if(APPLE)
  set(CMAKE_INSTALL_RPATH "@loader_path;@loader_path/../lib")
else()
  set(CMAKE_INSTALL_RPATH "$ORIGIN;$ORIGIN/../lib")
endif()
file(GLOB MULLAMA_GGML_LIBS "${MULLAMA_GGML_LIB_DIR}/${CMAKE_SHARED_LIBRARY_PREFIX}ggml*${CMAKE_SHARED_LIBRARY_SUFFIX}")
if(NOT MULLAMA_GGML_LIBS)
  message(FATAL_ERROR "no ggml libraries in ${MULLAMA_GGML_LIB_DIR}")
endif()
add_library(ggml INTERFACE)
target_include_directories(ggml INTERFACE "${MULLAMA_GGML_INCLUDE_DIR}")
target_link_libraries(ggml INTERFACE ${MULLAMA_GGML_LIBS})
target_compile_definitions(ggml INTERFACE ${MULLAMA_GGML_DEFINITIONS})
add_subdirectory("${MULLAMA_WHISPER_SOURCE}" whisper)
"""

#: Options every build shares: shared libraries, no network access at build
#: time (no OpenSSL, no prebuilt web UI download), nothing Mullama does not load.
COMMON_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_NATIVE=ON",
]

#: Backends as modules that libggml loads at run time (``GGML_BACKEND_DL``), so one install holds several
#: and the best is picked at start. ggml refuses GGML_NATIVE with it: the CPU module is built for a
#: portable x86-64 level (AVX2 on x86), or in every variant with ``--cpu-variants``.
MODULE_OPTIONS = ["-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF"]
CPU_VARIANT_OPTIONS = ["-DGGML_CPU_ALL_VARIANTS=ON"]


class BuildError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class Backend:
    """How to enable one ggml backend, and what it needs installed."""

    options: tuple[str, ...]
    #: (program, what to install) pairs that must be on PATH.
    programs: tuple[tuple[str, str], ...] = ()
    #: (header, what to install) pairs that must be found in an include directory.
    headers: tuple[tuple[str, str], ...] = ()
    systems: tuple[str, ...] = ("Linux", "Darwin", "Windows")


BACKENDS: dict[str, Backend] = {
    "cpu": Backend(()),
    "cuda": Backend(("-DGGML_CUDA=ON",), programs=(("nvcc", "the CUDA toolkit (nvcc)"),)),
    "vulkan": Backend(
        ("-DGGML_VULKAN=ON",),
        programs=(("glslc", "the Vulkan SDK or your distribution's glslc package"),),
        headers=(("vulkan/vulkan.h", "the Vulkan headers (libvulkan-dev or the Vulkan SDK)"),
                 ("spirv/unified1/spirv.hpp", "the SPIR-V headers (spirv-headers or the Vulkan SDK)")),
    ),
    "rocm": Backend(("-DGGML_HIP=ON",), programs=(("hipcc", "ROCm (hipcc)"),)),
    "sycl": Backend(
        ("-DGGML_SYCL=ON", "-DCMAKE_C_COMPILER=icx", "-DCMAKE_CXX_COMPILER=icpx"),
        programs=(("icpx", "Intel oneAPI DPC++ (icpx; source setvars.sh first)"),),
    ),
    "opencl": Backend(
        ("-DGGML_OPENCL=ON",),
        headers=(("CL/cl.h", "the OpenCL headers and ICD loader (opencl-headers, ocl-icd-opencl-dev)"),),
    ),
    "metal": Backend(("-DGGML_METAL=ON",), systems=("Darwin",)),
    "rpc": Backend(("-DGGML_RPC=ON",)),
}


@dataclass
class Source:
    """A llama.cpp source tree ready to configure."""

    path: Path
    #: Content hash identifying the source (archive sha256, or a tree hash).
    digest: str
    commit: str
    origin: str


@dataclass
class BuildPlan:
    """Everything that determines a build, and where it goes."""

    source: Source
    backends: list[str]
    options: list[str]
    targets: list[str]
    root: Path
    jobs: int
    extra: dict = field(default_factory=dict)

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"


@dataclass
class WhisperPlan:
    """How whisper.cpp is built inside a llama.cpp build folder, and its key."""

    source: Source
    llama: BuildPlan
    targets: list[str]
    key: str

    @property
    def root(self) -> Path:
        return self.llama.root / "whisper"

    @property
    def manifest_path(self) -> Path:
        return self.llama.root / "whisper.json"


#: The file in the build cache naming the build ``mullama`` loads (see :func:`select_build`).
SELECTED_FILE = "selected"


def cache_root() -> Path:
    """The user cache directory, as ``mullama.config.user_cache_dir`` computes it."""
    explicit = os.environ.get("MULLAMA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mullama"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "mullama"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mullama"


def say(message: str) -> None:
    print(f"build_native: {message}", flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- toolchain -------------------------------------------------------------


def check_toolchain(backends: list[str]) -> None:
    """Fail with one line naming what to install when a tool is missing."""
    if not shutil.which("cmake"):
        raise BuildError("cmake not found: install CMake 3.14 or newer (e.g. `pip install cmake` or `apt install cmake`)")
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++", "cl"]
    if not any(c and shutil.which(c) for c in compilers):
        raise BuildError("no C++ compiler found: install g++ or clang++ (e.g. `apt install build-essential`)")
    for name in backends:
        backend = BACKENDS[name]
        if platform.system() not in backend.systems:
            raise BuildError(f"the {name} backend is only available on {', '.join(backend.systems)}")
        for program, what in backend.programs:
            if not shutil.which(program):
                raise BuildError(f"{program} not found for the {name} backend: install {what}")
        for header, what in backend.headers:
            if not _header_exists(header):
                raise BuildError(f"{header} not found for the {name} backend: install {what}")
    if "vulkan" in backends:
        _check_vulkan_headers()


#: The oldest Vulkan headers the pinned llama.cpp compiles with: it uses VK_EXT_layer_settings.
VULKAN_HEADERS_MINIMUM = (1, 3, 272)


def _check_vulkan_headers() -> None:
    """Refuse Vulkan headers older than the pinned llama.cpp needs, naming a way out (CMake would fail late)."""
    roots = ([os.path.join(os.environ["VULKAN_SDK"], "include")] if os.environ.get("VULKAN_SDK") else []) + \
        ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    core = next((Path(root, "vulkan", "vulkan_core.h") for root in roots
                 if Path(root, "vulkan", "vulkan_core.h").exists()), None)
    if core is None:
        return
    text = core.read_text(errors="replace")
    patch = re.search(r"#define VK_HEADER_VERSION (\d+)", text)
    complete = re.search(r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(0, (\d+), (\d+),", text)
    if not (patch and complete):
        return
    version = (int(complete.group(1)), int(complete.group(2)), int(patch.group(1)))
    if version < VULKAN_HEADERS_MINIMUM:
        found, needed = ".".join(map(str, version)), ".".join(map(str, VULKAN_HEADERS_MINIMUM))
        raise BuildError(f"the Vulkan headers in {core.parent} are {found}; the pinned llama.cpp needs {needed} or "
                         "newer: install newer ones (the Vulkan SDK, or a newer distribution's libvulkan-dev) "
                         "and set VULKAN_SDK to the directory holding their include/")


def _header_exists(header: str) -> bool:
    roots = ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    for variable in ("VULKAN_SDK", "CUDA_PATH", "OCL_ROOT"):
        if os.environ.get(variable):
            roots.append(os.path.join(os.environ[variable], "include"))
    roots += [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    return any(Path(root, header).exists() for root in roots)


# --- sources ---------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    """A native project built here: its pin, how its tree is recognised, what its content hash covers."""

    name: str
    header: str
    #: The option that names a local tree or tarball instead of the pin.
    flag: str
    pin: Path
    #: The pin's key naming the revision the archive carries.
    revision: str
    tree: tuple[str, ...]


LLAMA = Project("llama.cpp", "llama.h", "--source", PINNED, "llama_cpp_commit",
                ("CMakeLists.txt", "cmake", "include", "src", "ggml", "common", "tools", "vendor"))
WHISPER = Project("whisper.cpp", "whisper.h", "--whisper-source", WHISPER_PINNED, "whisper_cpp_version",
                  ("CMakeLists.txt", "cmake", "include", "src", "examples", "models"))


def pinned_source(project: Project = LLAMA) -> Source:
    """Fetch (once) and verify the pinned archive, then extract the project's tree from it."""
    pin = json.loads(project.pin.read_text())
    sources = cache_root() / "sources"
    tree = sources / f"{project.name}-{pin['sha256'][:16]}"
    if (tree / "include" / project.header).exists():
        return Source(tree, pin["sha256"], pin[project.revision], f"{pin['package']}=={pin['version']} (cached)")
    archive = sources / pin["archive"]
    if not archive.exists() or sha256_file(archive) != pin["sha256"]:
        _download_pinned(pin, sources, project)
    actual = sha256_file(archive)
    if actual != pin["sha256"]:
        raise BuildError(f"{archive} has sha256 {actual}, expected {pin['sha256']}: refusing to build it")
    say(f"verified {archive.name} (sha256 {actual[:16]}...)")
    _extract_subdir(archive, pin["subdir"], tree)
    return Source(tree, pin["sha256"], pin[project.revision], f"{pin['package']}=={pin['version']}")


def _download_pinned(pin: dict, sources: Path, project: Project) -> None:
    sources.mkdir(parents=True, exist_ok=True)
    say(f"downloading {pin['package']}=={pin['version']} from the package index")
    with tempfile.TemporaryDirectory(dir=sources) as tmp:
        # ":all:" also builds pip's build dependencies from source; a pin may name its own package only.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", pin.get("no_binary", ":all:"),
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{pin['package']}=={pin['version']}"]
        if subprocess.run(command).returncode != 0:
            raise BuildError(f"could not download {pin['package']}=={pin['version']}; on an air-gapped machine "
                             f"pass {project.flag} PATH to a {project.name} checkout or tarball")
        os.replace(Path(tmp) / pin["archive"], sources / pin["archive"])


def _extract_subdir(archive: Path, subdir: str, dest: Path) -> None:
    """Extract ``subdir`` of a tarball into ``dest``, atomically."""
    say(f"extracting {subdir}")
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            prefix = subdir.rstrip("/") + "/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=[m for m in members if m.name], filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def local_source(path: Path, project: Project = LLAMA) -> Source:
    """A checkout of the project, a tree that vendors one, or a tarball/zip of either."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise BuildError(f"{project.flag} {path}: no such file or directory")
    if path.is_file():
        digest = sha256_file(path)
        tree = cache_root() / "sources" / f"local-{digest[:16]}"
        if not tree.exists():
            tree.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".extract-"))
            try:
                _extract_any(path, staging, project)
                os.replace(staging, tree)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        root = _find_root(tree, project)
        pin = json.loads(project.pin.read_text())
        commit = pin[project.revision] if digest == pin["sha256"] else _commit_of(root)
        return Source(root, digest, commit, f"archive {path}")
    root = _find_root(path, project)
    return Source(root, _tree_digest(root, project.tree), _commit_of(root), f"directory {root}")


def _extract_any(archive: Path, dest: Path, project: Project) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                target = (dest / name).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise BuildError(f"{archive}: member {name!r} would escape the extraction directory")
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"{project.flag} {archive}: not a readable tarball or zip ({exc})") from exc


def _find_root(base: Path, project: Project) -> Path:
    """The directory holding ``include/<header>``, at most three levels down."""
    for depth in range(4):
        pattern = "/".join(["*"] * depth + ["include", project.header])
        for candidate in sorted(base.glob(pattern)):
            root = candidate.parent.parent
            if (root / "CMakeLists.txt").exists():
                return root
    raise BuildError(f"{project.flag} {base}: no {project.name} tree found "
                     f"(looked for include/{project.header} and CMakeLists.txt)")


def _commit_of(root: Path) -> str:
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _tree_digest(root: Path, tops: tuple[str, ...]) -> str:
    """Hash of the files that go into the build, so edits give a new cache key."""
    digest = hashlib.sha256()
    for top in tops:
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()


# --- building --------------------------------------------------------------


def cpu_fingerprint() -> str:
    """GGML_NATIVE compiles for this CPU, so the CPU is part of the cache key."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return flags + ":" + hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    return flags + ":" + platform.processor()


def build_options(backends: list[str], modules: bool, cpu_variants: bool) -> list[str]:
    """The CMake options of a build: the common ones, each backend's, and the module options when asked."""
    common = [o for o in COMMON_OPTIONS if not (modules and o.startswith("-DGGML_NATIVE="))]
    module = (MODULE_OPTIONS if modules else []) + (CPU_VARIANT_OPTIONS if cpu_variants else [])
    return common + [o for b in backends for o in BACKENDS[b].options] + module


def make_plan(source: Source, backends: list[str], with_tools: bool, extra_options: list[str], jobs: int,
              modules: bool = False, cpu_variants: bool = False) -> BuildPlan:
    options = build_options(backends, modules or cpu_variants, cpu_variants) + extra_options
    identity = {"source": source.digest, "backends": sorted(backends), "options": options,
                "cpu": cpu_fingerprint(), "builder": BUILDER_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = "-".join(sorted(backends)) + "-" + key
    targets = LIBRARY_TARGETS + (TOOL_TARGETS if with_tools else [])
    return BuildPlan(source, backends, options, targets, cache_root() / "native" / name, jobs, identity)


def read_manifest(plan: BuildPlan) -> dict | None:
    try:
        return json.loads((plan.root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(plan: BuildPlan) -> bool:
    manifest = read_manifest(plan)
    if not manifest or not set(plan.targets) <= set(manifest.get("targets", [])):
        return False
    return all((plan.root / rel).exists() for rel in manifest.get("files", []))


def run_build(plan: BuildPlan) -> None:
    build = plan.root / "build"
    build.mkdir(parents=True, exist_ok=True)
    configured = build / ".configured"
    if not configured.exists():
        say(f"configuring ({', '.join(plan.backends)}) in {build}")
        # CMake leaves a cache behind even when configuring fails; start clean each time.
        (build / "CMakeCache.txt").unlink(missing_ok=True)
        _run_logged(["cmake", "-S", str(plan.source.path), "-B", str(build), *plan.options], build / "configure.log")
        configured.touch()
    say(f"compiling {', '.join(plan.targets)} with {plan.jobs} jobs (log: {build / 'build.log'})")
    _run_logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(plan.jobs),
                 "--target", *plan.targets], build / "build.log", progress=True)


def _run_logged(command: list[str], log_path: Path, progress: bool = False) -> None:
    """Run a command with its output in a log; show percentages as they come."""
    started = time.monotonic()
    # make prints a percentage per target, so it goes back and forth; show only progress.
    shown = -1
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = re.match(r"\[\s*(\d+)%\]", line)
            if progress and match and int(match.group(1)) > shown:
                shown = int(match.group(1))
                say(f"{shown:>3}% {time.monotonic() - started:6.0f}s  {line[match.end():].strip()[:90]}")
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise BuildError(f"{command[0]} {command[1]} failed with exit code {code}; full log in {log_path}")


def install_outputs(plan: BuildPlan) -> list[str]:
    """Copy the shared libraries and tools out of the build tree."""
    outputs = plan.root / "build" / "bin"
    plan.lib_dir.mkdir(exist_ok=True)
    copied = []
    for item in sorted(outputs.iterdir()):
        if re.search(r"\.(so(\.\d+)*|dylib|dll)$", item.name):
            target = plan.lib_dir / item.name
            if target.is_symlink() or target.exists():
                target.unlink()
            if item.is_symlink():
                os.symlink(os.readlink(item), target)
            else:
                shutil.copy2(item, target)
            copied.append(str(target.relative_to(plan.root)))
    for tool in TOOL_TARGETS:
        if tool in plan.targets:
            plan.bin_dir.mkdir(exist_ok=True)
            exe = outputs / (tool + (".exe" if os.name == "nt" else ""))
            shutil.copy2(exe, plan.bin_dir / exe.name)
            copied.append(str((plan.bin_dir / exe.name).relative_to(plan.root)))
    return copied


def write_manifest(plan: BuildPlan, files: list[str]) -> None:
    manifest = {
        "llama_cpp_commit": plan.source.commit,
        "source": plan.source.origin,
        "source_sha256": plan.source.digest,
        "source_path": str(plan.source.path),
        "backends": plan.backends,
        "options": plan.options,
        "targets": plan.targets,
        "cpu": plan.extra["cpu"],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    tmp = plan.root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, plan.root / "manifest.json")


# --- a wheel carrying the libraries, and a wheelhouse for air-gapped installs --

#: Where the wheel's libraries go inside the package (mullama/ffi/loader.py looks there first).
BUNDLE = "_native"
#: What of the repository goes into the wheel, besides the libraries.
WHEEL_SOURCES = ("mullama", "setup.cfg", "pyproject.toml", "README.md")
#: Bump when the way wheels or wheelhouses are made changes.
WHEEL_BUILDER_VERSION = 1


def platform_tag() -> str:
    """This platform's wheel tag (``linux_x86_64``, ``macosx_14_0_arm64``): the libraries run here, not elsewhere."""
    import sysconfig

    return re.sub(r"[-.]", "_", sysconfig.get_platform())


def _linked_libraries(lib_dir: Path) -> list[str]:
    """The libraries other libraries link by soname, in an order that loads each after what it needs.

    A build's RUNPATH names its build folder, which a wheel does not carry;
    the loader preloads these by path instead, and the dynamic linker
    matches later dependencies on the sonames already loaded.
    """
    stems = {m.group(1) for f in lib_dir.iterdir() if (m := re.match(r"lib([\w-]+)\.so\.\d+$", f.name))}
    stems |= {m.group(1) for f in lib_dir.iterdir() if (m := re.match(r"lib([\w-]+)\.\d+\.dylib$", f.name))}
    first = ["ggml-base"]
    backends = sorted(s for s in stems if s.startswith("ggml-") and s not in first)
    last = ["ggml", "llama", "mtmd", "whisper"]
    return [s for s in first + backends + last if s in stems]


def _stage_bundle(plan: BuildPlan, package: Path) -> None:
    """Copy the libraries (one file each, under the name the loader opens), the manifests and the VAD model."""
    bundle = package / BUNDLE
    (bundle / "lib").mkdir(parents=True)
    for item in sorted(plan.lib_dir.iterdir()):
        # Wheels cannot hold symbolic links: each library goes in once, under its unversioned name.
        # Only what Mullama loads: ggml and its backends, libllama, libmtmd, libwhisper (not the tools' libraries).
        if re.match(r"(lib)?(ggml[\w-]*|llama|mtmd|whisper)\.(so|dylib|dll)$", item.name):
            shutil.copy2(item.resolve(), bundle / "lib" / item.name)
    manifest = read_manifest(plan) or {}
    manifest["preload"] = _linked_libraries(plan.lib_dir)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    whisper = plan.root / "whisper.json"
    if whisper.exists():
        shutil.copy2(whisper, bundle / "whisper.json")
        if (plan.root / "models").is_dir():
            shutil.copytree(plan.root / "models", bundle / "models")


def _stage_sources(staging: Path) -> None:
    for name in WHEEL_SOURCES:
        source = HERE / name
        if source.is_dir():
            shutil.copytree(source, staging / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", BUNDLE))
        else:
            shutil.copy2(source, staging / name)
    setup_cfg = staging / "setup.cfg"
    text = setup_cfg.read_text()
    text, found = re.subn(r"(?m)^(mullama = .*)$", rf"\1, {BUNDLE}/*.json, {BUNDLE}/lib/*, {BUNDLE}/models/*", text)
    if found != 1:
        raise BuildError("setup.cfg has no `mullama = ...` package_data line to add the libraries to")
    text += f"\n[bdist_wheel]\npython_tag = py3\nplat_name = {platform_tag()}\n"
    setup_cfg.write_text(text)


def sources_digest() -> str:
    """Hash of what goes into the wheel from this repository, so a changed file gives a new wheel."""
    digest = hashlib.sha256()
    for name in WHEEL_SOURCES:
        base = HERE / name
        files = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts and BUNDLE not in p.parts)
        for file in files:
            digest.update(str(file.relative_to(HERE)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def build_wheel(plan: BuildPlan, out_dir: Path) -> Path:
    """Build Mullama's wheel for this platform with ``plan``'s libraries inside; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mullama-wheel-") as tmp:
        staging = Path(tmp) / "src"
        staging.mkdir()
        _stage_sources(staging)
        _stage_bundle(plan, staging / "mullama")
        built = Path(tmp) / "out"
        say(f"building the wheel ({platform_tag()}) with the libraries of {plan.root.name}")
        _run_logged([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                     "-w", str(built), str(staging)], Path(tmp) / "wheel.log")
        wheels = list(built.glob("mullama-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"pip wheel made {len(wheels)} Mullama wheels, expected one")
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    say(f"wheel: {target}")
    return target


def wheelhouse_key(plan: BuildPlan) -> str:
    """What a wheelhouse is made of: the libraries' build, Mullama's files, this Python and platform."""
    identity = {"build": plan.root.name, "manifest": (read_manifest(plan) or {}).get("built_at"),
                "whisper": (plan.root / "whisper.json").exists(), "sources": sources_digest(),
                "python": f"{sys.version_info.major}.{sys.version_info.minor}", "platform": platform_tag(),
                "builder": WHEEL_BUILDER_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def build_wheelhouse(plan: BuildPlan, directory: Path) -> Path:
    """Fill ``directory`` with Mullama's wheel and a wheel of each dependency; skip it when its key matches."""
    key = wheelhouse_key(plan)
    record = directory / "wheelhouse.json"
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = {}
    if previous.get("key") == key and all((directory / name).exists() for name in previous.get("files", [])):
        say(f"wheelhouse up to date: {directory}")
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.whl"):
        old.unlink()
    wheel = build_wheel(plan, directory)
    say("downloading the dependencies' wheels (pip download)")
    # A dependency without a wheel would need a compiler on the air-gapped machine: pip builds one here.
    _run_logged([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--prefer-binary",
                 "-w", str(directory), str(wheel)], directory / "pip.log")
    files = sorted(p.name for p in directory.glob("*.whl"))
    record.write_text(json.dumps({"key": key, "files": files, "python": sys.version.split()[0],
                                  "platform": platform_tag()}, indent=2) + "\n")
    say(f"wheelhouse: {directory} ({len(files)} wheels); install with "
        f"`pip install --no-index --find-links {directory} mullama`")
    return directory


# --- whisper.cpp, on llama.cpp's ggml ----------------------------------------


def make_whisper_plan(source: Source, llama: BuildPlan, with_tools: bool) -> WhisperPlan:
    """The whisper build inside ``llama``'s folder; its key covers the source, options and wrapper."""
    identity = {"source": source.digest, "options": WHISPER_OPTIONS, "builder": WHISPER_BUILDER_VERSION,
                "wrapper": hashlib.sha256(WHISPER_WRAPPER.encode()).hexdigest(), "ggml": llama.root.name}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    targets = WHISPER_LIBRARY_TARGETS + (WHISPER_TOOL_TARGETS if with_tools else [])
    return WhisperPlan(source, llama, targets, key)


def read_whisper_manifest(plan: WhisperPlan) -> dict | None:
    try:
        return json.loads(plan.manifest_path.read_text())
    except (OSError, ValueError):
        return None


def whisper_is_up_to_date(plan: WhisperPlan) -> bool:
    manifest = read_whisper_manifest(plan)
    if not manifest or manifest.get("key") != plan.key or not set(plan.targets) <= set(manifest.get("targets", [])):
        return False
    return all((plan.llama.root / rel).exists() for rel in manifest.get("files", []))


def run_whisper_build(plan: WhisperPlan, ggml_include: Path) -> None:
    """Configure the wrapper (once per key) and build the targets against the llama build's ggml."""
    plan.root.mkdir(parents=True, exist_ok=True)
    (plan.root / "CMakeLists.txt").write_text(WHISPER_WRAPPER)
    build = plan.root / "build"
    build.mkdir(exist_ok=True)
    configured = build / f".configured-{plan.key}"
    if not configured.exists():
        say(f"configuring whisper.cpp on {plan.llama.lib_dir}'s ggml in {build}")
        (build / "CMakeCache.txt").unlink(missing_ok=True)
        # A module build links no backend into libggml, so ggml makes no GGML_USE_* public either.
        modular = "-DGGML_BACKEND_DL=ON" in plan.llama.options
        definitions = "" if modular else ";".join(GGML_BACKEND_DEFINITIONS[b] for b in plan.llama.backends)
        _run_logged(["cmake", "-S", str(plan.root), "-B", str(build), *WHISPER_OPTIONS,
                     f"-DMULLAMA_GGML_LIB_DIR={plan.llama.lib_dir}", f"-DMULLAMA_GGML_INCLUDE_DIR={ggml_include}",
                     f"-DMULLAMA_GGML_DEFINITIONS={definitions}", f"-DMULLAMA_WHISPER_SOURCE={plan.source.path}"],
                    build / "configure.log")
        configured.touch()
    say(f"compiling {', '.join(plan.targets)} with {plan.llama.jobs} jobs (log: {build / 'build.log'})")
    _run_logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(plan.llama.jobs),
                 "--target", *plan.targets], build / "build.log", progress=True)


def install_whisper_outputs(plan: WhisperPlan) -> tuple[list[str], str | None]:
    """Copy libwhisper beside libllama, the CLI beside llama-bench, and the pinned Silero VAD model.

    Returns the copied files and the VAD model's path (relative to the build folder) when the source has one.
    """
    outputs = plan.root / "build" / "bin"
    root = plan.llama.root
    copied = []
    for item in sorted(outputs.iterdir()):
        if re.match(r"(lib)?whisper\.(so(\.\d+)*|dylib|dll)$|libwhisper\.\d.*\.dylib$", item.name):
            target = plan.llama.lib_dir / item.name
            if target.is_symlink() or target.exists():
                target.unlink()
            if item.is_symlink():
                os.symlink(os.readlink(item), target)
            else:
                shutil.copy2(item, target)
            copied.append(str(target.relative_to(root)))
    for tool in WHISPER_TOOL_TARGETS:
        if tool in plan.targets:
            plan.llama.bin_dir.mkdir(exist_ok=True)
            exe = outputs / (tool + (".exe" if os.name == "nt" else ""))
            shutil.copy2(exe, plan.llama.bin_dir / exe.name)
            copied.append(str((plan.llama.bin_dir / exe.name).relative_to(root)))
    pin = json.loads(WHISPER_PINNED.read_text())
    vad_source = plan.source.path / pin["vad_model"]
    if not vad_source.exists():
        return copied, None
    # The file whisper.cpp's tests run on is Silero VAD v6.2.0 whole; named as its download script names it.
    vad = root / "models" / "ggml-silero-v6.2.0.bin"
    vad.parent.mkdir(exist_ok=True)
    shutil.copy2(vad_source, vad)
    copied.append(str(vad.relative_to(root)))
    return copied, str(vad.relative_to(root))


def write_whisper_manifest(plan: WhisperPlan, files: list[str], vad_model: str | None) -> None:
    manifest = {
        "key": plan.key,
        "whisper_cpp_version": plan.source.commit,
        "source": plan.source.origin,
        "source_sha256": plan.source.digest,
        "source_path": str(plan.source.path),
        "targets": plan.targets,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "vad_model": vad_model,
    }
    tmp = plan.manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, plan.manifest_path)


def whisper_source(source_arg: str | None) -> Source:
    """The whisper.cpp to build: a local tree or tarball, checked now; else the pin (fetched only if needed)."""
    if os.name == "nt":
        raise BuildError("--with-whisper is not supported on Windows yet")
    if source_arg is None:
        pin = json.loads(WHISPER_PINNED.read_text())
        return Source(Path(), pin["sha256"], pin[WHISPER.revision], f"{pin['package']}=={pin['version']}")
    source = local_source(Path(source_arg), WHISPER)
    say(f"found whisper.cpp at {source.path} (content sha256 {source.digest[:16]}...)")
    return source


def build_whisper(llama: BuildPlan, llama_source_arg: str | None, source: Source, pinned: bool,
                  with_tools: bool) -> None:
    """Build libwhisper (and whisper-cli with tools) on the ggml of an up-to-date llama.cpp build."""
    plan = make_whisper_plan(source, llama, with_tools)
    if whisper_is_up_to_date(plan):
        say(f"whisper up to date: {llama.lib_dir}")
        return
    if pinned:
        plan.source = pinned_source(WHISPER)
    if llama_source_arg is None and not (llama.source.path / "ggml" / "include").is_dir():
        llama.source = pinned_source(LLAMA)
    run_whisper_build(plan, llama.source.path / "ggml" / "include")
    previous = read_whisper_manifest(plan) or {}
    if previous.get("key") == plan.key:
        plan.targets = sorted(set(plan.targets) | set(previous.get("targets", [])))
    files, vad_model = install_whisper_outputs(plan)
    write_whisper_manifest(plan, files, vad_model)
    say(f"built whisper: {llama.lib_dir}")


def build(source_arg: str | None, backends: list[str], with_tools: bool, extra_options: list[str], jobs: int,
          with_whisper: bool = False, whisper_source_arg: str | None = None, modules: bool = False,
          cpu_variants: bool = False) -> BuildPlan:
    """Build (or find already built) the libraries; return the plan describing them."""
    check_toolchain(backends)
    # A local whisper.cpp is checked before llama.cpp's build, which may take minutes.
    whisper = whisper_source(whisper_source_arg) if with_whisper or whisper_source_arg else None
    pin = json.loads(PINNED.read_text())
    if source_arg is None:
        # The key of the pinned source is known without downloading it.
        source = Source(Path(), pin["sha256"], pin["llama_cpp_commit"], f"{pin['package']}=={pin['version']}")
    else:
        source = local_source(Path(source_arg))
        say(f"found llama.cpp at {source.path} (commit {source.commit}, content sha256 {source.digest[:16]}...)")
    plan = make_plan(source, backends, with_tools, extra_options, jobs, modules, cpu_variants)
    if is_up_to_date(plan):
        say(f"up to date: {plan.lib_dir}")
    else:
        if source_arg is None:
            plan.source = pinned_source()
        run_build(plan)
        previous = read_manifest(plan) or {}
        if previous.get("targets"):
            plan.targets = sorted(set(plan.targets) | set(previous["targets"]))
        write_manifest(plan, install_outputs(plan))
        say(f"built: {plan.lib_dir}")
    if whisper is not None:
        build_whisper(plan, source_arg, whisper, whisper_source_arg is None, with_tools)
    return plan


def select_build(plan: BuildPlan) -> None:
    """Make ``plan``'s build the one ``mullama`` loads: the last build asked for wins, not the newest made.

    Written as ``<cache>/native/selected`` (the build's folder name), read by
    ``mullama.ffi.loader``.
    """
    selected = plan.root.parent / SELECTED_FILE
    tmp = selected.with_name(f".{SELECTED_FILE}.{os.getpid()}")
    tmp.write_text(plan.root.name + "\n")
    os.replace(tmp, selected)


def package_wheels(plan: BuildPlan, wheel: bool, wheel_dir: Path, wheelhouse: str | None) -> None:
    """``--wheel`` and ``--wheelhouse``, after the libraries are built."""
    if wheelhouse:
        build_wheelhouse(plan, Path(wheelhouse).expanduser().absolute())
    elif wheel:
        build_wheel(plan, wheel_dir.expanduser().absolute())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build llama.cpp's shared libraries for Mullama.")
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS), default=None,
                        help="ggml backend to build (repeatable; default: cpu)")
    parser.add_argument("--source", metavar="PATH", help="a llama.cpp checkout or tarball instead of the pinned archive")
    parser.add_argument("--with-tools", action="store_true",
                        help="also build llama-bench and llama-server (with --with-whisper, whisper-cli), for bench/")
    parser.add_argument("--with-whisper", action="store_true",
                        help="also build whisper.cpp's libwhisper (speech) on the same ggml")
    parser.add_argument("--whisper-source", metavar="PATH",
                        help="a whisper.cpp checkout or tarball instead of the pinned one (implies --with-whisper)")
    parser.add_argument("--backend-modules", action="store_true",
                        help="build the backends as modules loaded at run time (GGML_BACKEND_DL)")
    parser.add_argument("--cpu-variants", action="store_true",
                        help="with --backend-modules, build the CPU backend for every CPU generation "
                             "(GGML_CPU_ALL_VARIANTS; implies --backend-modules)")
    parser.add_argument("--cmake-option", action="append", default=[], metavar="-DNAME=VALUE",
                        help="an extra CMake option (repeatable)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--print-lib-dir", action="store_true", help="print only the library directory on success")
    parser.add_argument("--keep-selection", action="store_true",
                        help="build without making this the build `mullama` loads (for a variant used through "
                             "MULLAMA_LIBRARY_PATH, such as a test's)")
    parser.add_argument("--wheel", action="store_true",
                        help="also build a wheel of Mullama for this platform carrying the libraries")
    parser.add_argument("--wheel-dir", metavar="DIR", default=str(HERE / "dist"),
                        help="where --wheel puts the wheel (default: dist/)")
    parser.add_argument("--wheelhouse", metavar="DIR",
                        help="build the wheel into DIR with a wheel of every dependency (an air-gapped install's "
                             "`pip install --no-index --find-links DIR mullama`)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = sorted(set(args.backend or ["cpu"]))
    if "cpu" not in backends:
        # ggml always builds its CPU backend; naming it keeps the cache key honest.
        backends = ["cpu", *backends]
    try:
        plan = build(args.source, backends, args.with_tools, args.cmake_option, max(1, args.jobs),
                     args.with_whisper, args.whisper_source, args.backend_modules, args.cpu_variants)
        package_wheels(plan, args.wheel, Path(args.wheel_dir), args.wheelhouse)
        if not args.keep_selection:
            select_build(plan)
    except BuildError as exc:
        print(f"build_native: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build_native: interrupted", file=sys.stderr)
        return 130
    if args.print_lib_dir:
        print(plan.lib_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
