"""Models spread over other machines' devices through llama.cpp's RPC backend.

``mullama serve --rpc host:port,...`` (or ``MULLAMA_RPC``) names workers,
each a ``mullama rpc-server``. Their devices join the model's devices
ahead of this machine's GPUs, as llama.cpp's own ``--rpc`` orders them, and
llama.cpp spreads the offloaded layers over them by free memory; layers
not offloaded (``num_gpu``) stay on this machine's CPU.

ggml's RPC client aborts the process when a worker stops answering. The
daemon turns that into an error of the models on that worker: it installs
ggml's abort callback, and for an RPC failure it fails those models'
requests, drops them from the registry (their memory is not freed: a thread
of theirs waits inside ggml for an answer that will never come) and parks
the failing thread instead of returning into ``abort()``. The worker is
not used again until the daemon restarts.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mullama import config
from mullama.errors import BadRequestError, RpcWorkerError
from mullama.ffi import load
from mullama.ffi import llama as L
from mullama.ffi.rpc import RpcBackend, bind_rpc, ggml_abort_callback_t

log = logging.getLogger("mullama.rpc")

#: Seconds to wait for a worker to accept a TCP connection before calling it down.
CONNECT_TIMEOUT = 3.0
DEFAULT_PORT = 50052

_ENDPOINT = re.compile(r"^([A-Za-z0-9._-]+):(\d{1,5})$")
_CONNECT_FAILED = re.compile(r"Failed to connect to (\S+)|RPC handshake failed for (\S+)")


def parse_endpoints(text: str) -> list[str]:
    """``host:port,host:port`` as a list, each checked; :class:`BadRequestError` names a bad one.

    ggml splits an endpoint at its first colon, so IPv6 addresses are not
    accepted (give a host name).
    """
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _ENDPOINT.match(item)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise BadRequestError(f"bad RPC worker address {item!r}: expected host:port (e.g. 192.168.1.7:{DEFAULT_PORT})")
        if item not in endpoints:
            endpoints.append(item)
    if not endpoints:
        raise BadRequestError("no RPC worker given: expected host:port[,host:port...]")
    return endpoints


def check_worker(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the worker at ``endpoint`` cannot be reached, or None when it accepts a connection.

    Only a TCP connection is made: a worker serves one client at a time,
    so a handshake would wait behind a client it is already serving.
    """
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


@dataclass(frozen=True)
class Placement:
    """Where a model's offloaded layers go: device handles in order, and the workers they live on."""

    devices: tuple[int, ...]
    endpoints: frozenset[str] = frozenset()


@dataclass
class _Worker:
    endpoint: str
    devices: list[int] = field(default_factory=list)
    #: Why it is not used any more (an RPC failure); empty while it is.
    failed: str = ""
    #: The (address, port) pairs its name resolved to when it was connected.
    addresses: frozenset[tuple[str, int]] = frozenset()


class RpcWorkers:
    """The RPC workers one daemon spreads models over, and what happens when one fails.

    ``on_failure(endpoints, error)`` is called (in a thread of its own) when
    ggml reports that workers stopped answering; the daemon fails and drops
    the models on them.
    """

    def __init__(self, endpoints: list[str], on_failure: Callable[[frozenset[str], RpcWorkerError], None]) -> None:
        self._workers = {endpoint: _Worker(endpoint) for endpoint in endpoints}
        self._on_failure = on_failure
        self._lock = threading.Lock()
        #: Serialises connecting to workers (never taken by the abort callback).
        self._connecting = threading.Lock()
        self._backend: RpcBackend | None = None
        #: ggml keeps the callback's address, so the object lives as long as this does (or a parked thread).
        self._abort_callback = ggml_abort_callback_t(self._on_abort)
        self._previous_callback: object = None

    @classmethod
    def from_env(cls, on_failure: Callable[[frozenset[str], RpcWorkerError], None]) -> RpcWorkers | None:
        """The workers ``MULLAMA_RPC`` names, or None when it is unset.

        Raises :class:`BadRequestError` for a bad address and
        :class:`NativeLibraryError` when the libraries have no RPC backend,
        so a daemon told to use workers fails at start, not at its first load.
        """
        text = config.env("RPC")
        if not text or not text.strip():
            return None
        workers = cls(parse_endpoints(text), on_failure)
        bind_rpc(load().llama)
        return workers

    @property
    def endpoints(self) -> list[str]:
        """Every configured worker, failed or not."""
        return list(self._workers)

    def failed(self) -> dict[str, str]:
        """Workers no longer used, with the reason."""
        with self._lock:
            return {w.endpoint: w.failed for w in self._workers.values() if w.failed}

    def placement(self, num_gpu: int) -> Placement:
        """The devices for a model loaded with ``num_gpu`` (0: none, the CPU only).

        Workers are connected on first use; one that does not answer is
        skipped with a warning (and tried again at the next load), one that
        failed is not used again.
        """
        if num_gpu == 0:
            return Placement(())
        devices: list[int] = []
        endpoints = set()
        # Not under _lock: a connection that fails calls _on_abort, which takes it.
        with self._connecting:
            for worker in self._workers.values():
                with self._lock:
                    usable, connected = not worker.failed, bool(worker.devices)
                if usable and not connected:
                    self._connect(worker)
                with self._lock:
                    if worker.devices and not worker.failed:
                        devices += worker.devices
                        endpoints.add(worker.endpoint)
        if not endpoints:
            log.warning("no RPC worker answers (%s): loading on this machine only", ", ".join(self._workers))
        return Placement(tuple(devices + _local_gpus()), frozenset(endpoints))

    def close(self) -> None:
        """Give ggml back its previous abort behaviour, unless a failed thread still runs the callback."""
        with self._lock:
            if self._backend is not None and not any(w.failed for w in self._workers.values()):
                self._backend.set_abort_callback(self._previous_callback)
                self._backend = None

    # --- internals ---------------------------------------------------------------

    def _connect(self, worker: _Worker) -> None:
        """Add ``worker``'s devices (with ``_connecting`` held); leave them empty when it does not answer."""
        problem = check_worker(worker.endpoint)
        if problem:
            log.warning("RPC worker %s does not answer (%s): not using it for this load", worker.endpoint, problem)
            return
        if self._backend is None:
            backend = bind_rpc(load().llama)
            # Before the first connection: a failed handshake aborts inside ggml too.
            self._previous_callback = backend.set_abort_callback(self._abort_callback)
            self._backend = backend
        host, port = worker.endpoint.rsplit(":", 1)
        addresses = frozenset((_plain_ip(info[4][0]), int(port))
                              for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))
        devices = self._backend.worker_devices(worker.endpoint)
        lib = self._backend.lib
        for dev in devices:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            log.info("RPC worker %s: device %s, %d MiB free of %d MiB", worker.endpoint,
                     lib.ggml_backend_dev_name(dev).decode(), free.value >> 20, total.value >> 20)
        with self._lock:
            worker.devices, worker.addresses = devices, addresses

    def _on_abort(self, message: bytes | None) -> None:
        """ggml's abort callback: an RPC failure fails the models on the worker; anything else aborts as before."""
        text = (message or b"").decode("utf-8", "replace")
        if "ggml-rpc" not in text:
            sys.stderr.write(f"ggml: {text}\n")
            sys.stderr.flush()
            return
        named = {m.group(1) or m.group(2) for m in _CONNECT_FAILED.finditer(text)}
        with self._lock:
            used = {w.endpoint: w.addresses for w in self._workers.values() if w.devices and not w.failed}
        dead = named or _closed_workers(used) or set(used)
        reason = text.split(": ", 1)[-1].strip()
        with self._lock:
            for endpoint in dead:
                if endpoint in self._workers:
                    self._workers[endpoint].failed = reason
        names = ", ".join(sorted(dead)) or "unknown"
        log.error("RPC worker %s failed (%s): its models are unloaded; the worker is not used again "
                  "until the daemon restarts", names, reason)
        error = RpcWorkerError(f"the RPC worker {names} stopped answering ({reason}); the model was unloaded, "
                               "retry to load it on the devices left")
        threading.Thread(target=self._on_failure, args=(frozenset(dead), error), name="mullama-rpc-failure",
                         daemon=True).start()
        # Returning would abort the whole daemon: this thread waits for an answer that will never come anyway.
        threading.Event().wait()


#: TCP states in /proc/net/tcp: ESTABLISHED, and CLOSE_WAIT (the peer closed its end).
_ESTABLISHED, _CLOSE_WAIT = "01", "08"


def _closed_workers(workers: dict[str, frozenset[tuple[str, int]]]) -> set[str]:
    """The workers whose connection the peer closed (or, failing that, that have none left); empty if unknown.

    Asking a worker whether it is alive does not work here: one serves a
    single client at a time, and a second connection only queues. The
    kernel knows which of this process's connections the other end closed.
    """
    connections = _tcp_connections()
    if connections is None:
        return set()
    closed = {endpoint for endpoint, addresses in workers.items()
              if any(state == _CLOSE_WAIT and peer in addresses for peer, state in connections)}
    return closed or {endpoint for endpoint, addresses in workers.items()
                      if not any(state == _ESTABLISHED and peer in addresses for peer, state in connections)}


def _tcp_connections() -> list[tuple[tuple[str, int], str]] | None:
    """This process's TCP connections as ((peer address, port), state), from Linux's /proc; None elsewhere."""
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        connections = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] in inodes:
                        connections.append((_peer(fields[2]), fields[3]))
        return connections
    except OSError:
        return None


def _peer(field: str) -> tuple[str, int]:
    """``0100007F:C3B4`` (an address in the kernel's byte order, a port in hex) as ("127.0.0.1", 50100)."""
    address, port = field.split(":")
    raw = bytes.fromhex(address)
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    text = socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
    return _plain_ip(text), int(port, 16)


def _plain_ip(address: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4, so both spellings of one peer compare equal."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _local_gpus() -> list[int]:
    """This machine's GPUs as llama.cpp picks them by default: discrete ones, else integrated ones."""
    lib = load().llama
    gpus, igpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind == L.GGML_BACKEND_DEVICE_TYPE_GPU:
            gpus.append(dev)
        elif kind == L.GGML_BACKEND_DEVICE_TYPE_IGPU:
            igpus.append(dev)
    return gpus or igpus
