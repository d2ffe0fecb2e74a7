"""Settings from the environment, read each time they are asked for, and where Mullama keeps things.

Functions rather than module constants, so tests (and a daemon started with a
new environment) see the current values, and nothing here is mutable state.
Each ``MULLAMA_X`` falls back to Ollama's ``OLLAMA_X`` with Ollama's meaning,
read as Ollama reads it (:func:`env`, :func:`flag`); a value that does not
parse is a :class:`SettingError` naming the variable (:func:`setting`).
Ollama's variables that mean nothing here are :data:`NOT_APPLICABLE`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mullama.errors import MullamaError

T = TypeVar("T")

#: Go's ``strconv.ParseBool`` spellings of false; any other value set counts as true, as Ollama reads a flag.
_GO_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_GO_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})

#: Ollama's variables Mullama has no use for, each with the reason; :func:`ignored_settings` names those set.
NOT_APPLICABLE: dict[str, str] = {
    "OLLAMA_AUTH": "Ollama's signing of requests with its own keys; Mullama's keys are MULLAMA_API_KEY and "
                   "`mullama keys`",
    "OLLAMA_DEBUG_LOG_REQUESTS": "request bodies are not written to disk; every request is logged with its id "
                                 "(MULLAMA_LOG_FORMAT=json for JSON lines)",
    "OLLAMA_EDITOR": "the interactive session has no external-editor key (Ctrl+G)",
    "OLLAMA_GO_TEMPLATE": "a Modelfile's TEMPLATE is always rendered when set (the GGUF's own template "
                          "otherwise); Ollama's alternative, its built-in renderers, does not exist here",
    "OLLAMA_IGPU_ENABLE": "llama.cpp chooses the devices; hide a device with its runtime's variable "
                          "(CUDA_VISIBLE_DEVICES, GGML_VK_VISIBLE_DEVICES...)",
    "OLLAMA_MAX_TRANSFER_STREAMS": "it limits safetensors transfers; Mullama pulls GGUF files only",
    "OLLAMA_NO_CLOUD": "Mullama has no cloud features: it always behaves as if this were set",
    "OLLAMA_REMOTES": "Mullama runs no remote models",
    "OLLAMA_VULKAN": "the Vulkan backend is chosen when llama.cpp is built (build_native.py), not at run time",
    "LLAMA_ARG_FIT": "llama-server's own memory fitting; Mullama estimates each load itself (MULLAMA_MAX_MEMORY)",
    "LLAMA_ARG_FIT_TARGET": "llama-server's own memory fitting; Mullama estimates each load itself "
                            "(MULLAMA_MAX_MEMORY)",
}


class SettingError(MullamaError):
    """An environment variable holds a value Mullama cannot use; the daemon does not start with one."""


def variable(name: str) -> str:
    """An environment variable as Ollama's ``envconfig.Var`` reads it: spaces, then quotes, trimmed."""
    return os.environ.get(name, "").strip().strip("\"'")


def source(name: str) -> str:
    """The variable that sets ``name``: ``MULLAMA_<name>`` unless only ``OLLAMA_<name>`` is set."""
    return f"MULLAMA_{name}" if variable(f"MULLAMA_{name}") or not variable(f"OLLAMA_{name}") else f"OLLAMA_{name}"


def env(name: str, default: str | None = None) -> str | None:
    """Return ``MULLAMA_<name>``, else ``OLLAMA_<name>``, else ``default``.

    Ollama's variable is honoured so an existing setup keeps working after
    replacing the word ``ollama`` with ``mullama``; values are trimmed of
    spaces and quotes as Ollama trims them.
    """
    for prefix in ("MULLAMA_", "OLLAMA_"):
        value = variable(prefix + name)
        if value:
            return value
    return default


def setting(name: str, default: T, parse: Callable[[str], T]) -> T:
    """``env(name)`` parsed, ``default`` when unset.

    Raises :class:`SettingError` naming the variable that was set when
    ``parse`` raises ``ValueError`` (or any :class:`MullamaError`).
    """
    text = env(name)
    if text is None:
        return default
    try:
        return parse(text)
    except (ValueError, MullamaError) as error:
        detail = error.message if isinstance(error, MullamaError) else ""
        reason = f": {detail}" if detail and text not in detail else ""
        raise SettingError(f"{source(name)}={text!r} is not valid{reason}") from None


def flag(name: str, default: bool = False) -> bool:
    """A boolean ``env(name)`` as Ollama reads its flags: Go's false spellings are false, anything else set true."""
    text = env(name)
    if text is None:
        return default
    return text not in _GO_FALSE


def optional_flag(name: str) -> bool | None:
    """Like :func:`flag`, but None when unset, so the default stays the model's (Ollama's ``BoolWithDefault``)."""
    return flag(name) if env(name) is not None else None


def go_bool(text: str) -> bool:
    """Go's ``strconv.ParseBool``; raises ``ValueError`` for anything else."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError(text)


def ignored_settings() -> list[str]:
    """One line for each of Ollama's variables that is set but means nothing to Mullama (see :data:`NOT_APPLICABLE`)."""
    return [f"{name} is set but has no effect on Mullama: {reason}"
            for name, reason in NOT_APPLICABLE.items() if variable(name)]


def user_cache_dir() -> Path:
    """The per-user cache: native builds and test fixtures live here."""
    explicit = os.environ.get("MULLAMA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mullama"


def data_dir() -> Path:
    """Mullama's home (``~/.mullama``): logs, config and, by default, models."""
    explicit = os.environ.get("MULLAMA_HOME")
    return Path(explicit).expanduser() if explicit else Path.home() / ".mullama"


def models_dir() -> Path:
    """The model store (``MULLAMA_MODELS``, default ``~/.mullama/models``).

    ``OLLAMA_MODELS`` is deliberately not a fallback here: that is Ollama's
    own store, which Mullama reads from but never writes into.
    """
    explicit = os.environ.get("MULLAMA_MODELS")
    return Path(explicit).expanduser() if explicit else data_dir() / "models"


def native_build_dir() -> Path:
    """Root of the native build cache, one subdirectory per build key."""
    return user_cache_dir() / "native"
