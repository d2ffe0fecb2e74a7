"""Where Mullama keeps things, read from the environment each time it is asked.

Functions rather than module constants, so tests (and a daemon started with a
new environment) see the current values, and nothing here is mutable state.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def env(name: str, default: str | None = None) -> str | None:
    """Return ``MULLAMA_<name>``, else ``OLLAMA_<name>``, else ``default``.

    Ollama's variable is honoured so an existing setup keeps working after
    replacing the word ``ollama`` with ``mullama``.
    """
    for prefix in ("MULLAMA_", "OLLAMA_"):
        value = os.environ.get(prefix + name)
        if value not in (None, ""):
            return value
    return default


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
