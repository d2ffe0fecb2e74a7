"""``mullama rpc-server``: lend this machine's devices to a daemon on another machine (llama.cpp's RPC server).

The server is ggml's own (``ggml_backend_rpc_start_server``), from the
libraries Mullama loads, so a worker needs nothing but Mullama installed.
Its protocol has no authentication and runs whatever graph a client sends:
it listens on loopback unless ``--allow-remote`` says the network is trusted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from mullama import config
from mullama.client import is_loopback
from mullama.engine.rpc import DEFAULT_PORT, check_worker
from mullama.errors import BadRequestError, ForbiddenError, MullamaError
from mullama.ffi import load
from mullama.ffi import llama as L
from mullama.ffi.rpc import RPC_PROTO_MAJOR_VERSION, bind_rpc, device_array


def add_rpc_server_verb(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``rpc-server`` with the ``verb`` helper of :func:`mullama.cli.verbs.build_parser`."""
    sub = verb("rpc-server", cmd_rpc_server, "Serve this machine's devices to Mullama daemons elsewhere (llama.cpp RPC)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    sub.add_argument("--device", action="append", default=[], metavar="NAME",
                     help="a ggml device to serve (repeatable; default: every GPU, else the CPU)")
    sub.add_argument("--threads", type=int, default=0, help="CPU threads (default: the physical cores)")
    sub.add_argument("--cache", action="store_true",
                     help="keep tensors clients send in a local file cache, so reloading a large model is quick")
    sub.add_argument("--allow-remote", action="store_true",
                     help="listen on an address other machines can reach; the protocol has NO authentication, "
                          "so only on a network where every host is trusted")


def cmd_rpc_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    if not 0 < args.port < 65536:
        raise BadRequestError(f"--port {args.port}: not a port number")
    if args.threads < 0:
        raise BadRequestError("--threads must be positive")
    if not is_loopback(args.host) and not args.allow_remote:
        raise ForbiddenError(
            f"refusing to listen on {args.host}: the RPC protocol has no authentication, and any host that "
            "reaches the port can use this machine's devices and memory; pass --allow-remote to do it anyway, "
            "on a network where every host is trusted")
    _check_port(args.host, args.port)
    native = load()
    rpc = bind_rpc(native.llama)
    devices = _devices(native.llama, args.device)
    from mullama.engine.model import default_threads

    threads = args.threads or default_threads()
    cache = None
    if args.cache:
        cache_dir = config.user_cache_dir() / "rpc"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir).encode()
    if not is_loopback(args.host):
        print(f"Warning: listening on {args.host}: anyone who can reach port {args.port} can use this machine "
              "(the RPC protocol has no authentication)", file=sys.stderr)
    endpoint = f"{args.host}:{args.port}".encode()
    array = device_array(devices)
    server = threading.Thread(target=rpc.start_server, name="mullama-rpc-server", daemon=True,
                              args=(endpoint, cache, threads, len(devices),
                                    ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p))))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    if _listening(args.host, args.port, server):
        names = ", ".join(native.llama.ggml_backend_dev_name(d).decode() for d in devices)
        print(f"mullama rpc-server: serving {names} on {args.host}:{args.port} "
              f"(RPC protocol {RPC_PROTO_MAJOR_VERSION}, {threads} threads)", flush=True)
    while server.is_alive() and not stop.wait(0.2):
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    if stop.is_set():
        # ggml's server loop never returns: leave without running C++ destructors under it.
        os._exit(0)
    raise MullamaError(f"the RPC server on {args.host}:{args.port} stopped (see the messages above)")


def _listening(host: str, port: int, server: threading.Thread) -> bool:
    """Wait until ggml's server accepts connections (True), or its thread ended (False)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    while server.is_alive():
        if check_worker(f"{target}:{port}", timeout=1.0) is None:
            return True
        time.sleep(0.05)
    return False


def _check_port(host: str, port: int) -> None:
    """Fail with a clear message when the address cannot be listened on (ggml's own message is terse)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise BadRequestError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise MullamaError(f"could not listen on {host}:{port}: {exc.strerror or exc}") from None


def _devices(lib: ctypes.CDLL, names: list[str]) -> list[int]:
    """The devices named, else every GPU, else the CPU, as llama.cpp's rpc-server picks them."""
    found = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        found[lib.ggml_backend_dev_name(dev).decode()] = dev
    wanted = [n for name in names for n in name.split(",") if n]
    if wanted:
        missing = [n for n in wanted if n not in found]
        if missing:
            raise BadRequestError(f"no device {', '.join(missing)}; this machine has {', '.join(found)}")
        return [found[n] for n in wanted]
    gpus = [d for d in found.values() if lib.ggml_backend_dev_type(d) not in
            (L.GGML_BACKEND_DEVICE_TYPE_CPU, L.GGML_BACKEND_DEVICE_TYPE_ACCEL)]
    return gpus or [lib.ggml_backend_dev_by_type(L.GGML_BACKEND_DEVICE_TYPE_CPU)]
