"""ctypes over ggml's RPC backend (``ggml-rpc.h``) and the registry calls that reach it.

The RPC functions are not linked by name: they are asked of the backend
registry (``ggml_backend_reg_get_proc_address``), as llama.cpp's own tools
do, so they are found whether the RPC backend is linked into libggml or
loaded as a module. ``tests/test_ffi_header.py`` checks every prototype
here against the pinned ``ggml-backend.h``, ``ggml.h`` and ``ggml-rpc.h``.
"""

from __future__ import annotations

import ctypes
from ctypes import CFUNCTYPE, POINTER, c_bool, c_char_p, c_size_t, c_void_p
from dataclasses import dataclass

from mullama.errors import NativeLibraryError

p = c_void_p
c_enum = ctypes.c_int

#: ``void (*)(const char * error_message)``: called by ``ggml_abort`` before it aborts the process.
ggml_abort_callback_t = CFUNCTYPE(None, c_char_p)

#: Functions of ``ggml-backend.h`` (registry and devices) the RPC layer needs.
BACKEND_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_backend_reg_by_name": (p, [c_char_p]),
    "ggml_backend_reg_get_proc_address": (p, [p, c_char_p]),
    "ggml_backend_reg_dev_count": (c_size_t, [p]),
    "ggml_backend_reg_dev_get": (p, [p, c_size_t]),
    "ggml_backend_dev_by_type": (p, [c_enum]),
}

#: Functions of ``ggml.h``.
GGML_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_set_abort_callback": (ggml_abort_callback_t, [ggml_abort_callback_t]),
}

#: Functions of ``llama.h``.
LLAMA_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "llama_supports_rpc": (c_bool, []),
}

#: Functions of ``ggml-rpc.h``, reached through the RPC registry's proc addresses: name to (restype, argtypes).
RPC_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_backend_rpc_add_server": (p, [c_char_p]),
    "ggml_backend_rpc_start_server": (None, [c_char_p, c_char_p, c_size_t, c_size_t, POINTER(p)]),
}

#: ``RPC_PROTO_MAJOR_VERSION`` of the pinned ``ggml-rpc.h``: workers and clients must agree on it.
RPC_PROTO_MAJOR_VERSION = 7

#: What the RPC functions are called through: ctypes releases the GIL around each call.
_PROTOTYPES = {name: CFUNCTYPE(restype, *argtypes) for name, (restype, argtypes) in RPC_FUNCTIONS.items()}


@dataclass
class RpcBackend:
    """ggml's RPC backend in this process: add workers as devices, or serve this machine's devices."""

    lib: ctypes.CDLL
    add_server: ctypes._CFuncPtr  # type: ignore[name-defined]
    start_server: ctypes._CFuncPtr  # type: ignore[name-defined]

    def worker_devices(self, endpoint: str) -> list[int]:
        """Connect to the worker at ``host:port`` (once per process) and return its devices' handles.

        The devices are not registered with ggml, so nothing else in the
        process lists them, and a model uses them only when told to. A worker
        that does not answer aborts the process inside ggml: callers check it
        answers first (:func:`mullama.engine.rpc.check_worker`).
        """
        reg = self.add_server(endpoint.encode())
        if not reg:
            return []
        return [self.lib.ggml_backend_reg_dev_get(reg, i) for i in range(self.lib.ggml_backend_reg_dev_count(reg))]

    def set_abort_callback(self, callback: object) -> object:
        """Install ``callback`` (a :data:`ggml_abort_callback_t`) for every ggml abort; return the previous one."""
        return self.lib.ggml_set_abort_callback(callback)


def bind_rpc(lib: ctypes.CDLL) -> RpcBackend:
    """The RPC backend of the loaded libraries; :class:`NativeLibraryError` when they were built without it."""
    from mullama.ffi import llama as L

    L.bind(lib, {**BACKEND_FUNCTIONS, **GGML_FUNCTIONS, **LLAMA_FUNCTIONS})
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg or not lib.llama_supports_rpc():
        raise NativeLibraryError("these llama.cpp libraries have no RPC backend: "
                                 "build them with `python build_native.py --backend rpc`")
    functions = {}
    for name, prototype in _PROTOTYPES.items():
        address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
        if not address:
            raise NativeLibraryError(f"the RPC backend lacks {name}: it is not the ggml Mullama is built for")
        functions[name] = prototype(address)
    return RpcBackend(lib, functions["ggml_backend_rpc_add_server"], functions["ggml_backend_rpc_start_server"])


def device_array(devices: list[int]) -> ctypes.Array[c_void_p]:
    """A NULL-terminated ``ggml_backend_dev_t`` array, as ``llama_model_params.devices`` takes it."""
    return (c_void_p * (len(devices) + 1))(*devices, None)
