"""Per-model limits: parallel sequences, queue, context, memory, keep-alive, pinning, allowed keys.

They come from ``limits.json`` in the data directory (``MULLAMA_LIMITS``
names another file) over defaults from the environment::

    {
      "defaults": {"max_queue": 64},
      "models": {
        "llama3.2:*":   {"max_parallel": 4, "max_context": 8192, "keep_alive": "30m"},
        "qwen2.5:7b":   {"max_memory": "6GiB", "pinned": true, "keys": ["ci", "alice"]}
      }
    }

JSON rather than TOML: Python 3.10, which Mullama supports, has no TOML
reader in its standard library, and one format on every version beats two;
the other files of the data directory (``aliases.json``, ``keys.json``) are
JSON too.

A model's limits are, from weakest to strongest: the environment
(``MULLAMA_MAX_QUEUE``, ``MULLAMA_MAX_CONTEXT``, ``MULLAMA_KEEP_ALIVE``), the
file's ``defaults``, the glob patterns matching its name in file order, then
entries naming it exactly. A name without a tag (``qwen2.5``) stands for
every tag of it. :meth:`Limits.reload` rereads everything (SIGHUP); a bad
file leaves the limits in force as they were.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mullama import config
from mullama.engine.memory import describe, parse_size
from mullama.errors import ModelLoadError, MullamaError
from mullama.ops.durations import parse_duration
from mullama.options import Options

log = logging.getLogger("mullama.limits")

_GLOB_CHARS = frozenset("*?[")
#: Models whose limits are kept worked out (a name is a model of the store or a local file: few).
_KNOWN_MODELS = 1024


class LimitsError(MullamaError):
    """The limits file or a limit in the environment is invalid; the message names the place and the value."""

    kind = "invalid_configuration"


@dataclass(frozen=True)
class ModelLimits:
    """The limits of one model; None where nothing limits it."""

    #: Sequences decoded together at most (caps ``num_parallel``).
    max_parallel: int | None = None
    #: Requests waiting for a sequence at most; beyond it a request is refused with a Retry-After.
    max_queue: int | None = None
    #: Largest ``num_ctx`` a request may ask for.
    max_context: int | None = None
    #: Bytes the model may take when loaded (its estimate is checked before the load).
    max_memory: int | None = None
    #: Default keep-alive in seconds (negative: forever) when a request names none.
    keep_alive: float | None = None
    #: Never evicted, as with a negative keep-alive.
    pinned: bool = False
    #: Names of the keys that may use the model; None lets any key in.
    keys: tuple[str, ...] | None = None

    def capped(self, options: Options) -> Options:
        """``options`` with ``num_parallel`` and ``num_ctx`` held to :attr:`max_parallel` and :attr:`max_context`."""
        changes = {}
        if self.max_parallel is not None and options.num_parallel > self.max_parallel:
            changes["num_parallel"] = self.max_parallel
        if self.max_context is not None and options.num_ctx > self.max_context:
            changes["num_ctx"] = self.max_context
        return replace(options, **changes) if changes else options

    def check_memory(self, model: str, size: int) -> None:
        """:class:`ModelLoadError` when a load of ``model`` estimated at ``size`` bytes exceeds :attr:`max_memory`."""
        if self.max_memory is not None and size > self.max_memory:
            raise ModelLoadError(f"{model} needs {describe(size)} but its max_memory in the limits file is "
                                 f"{describe(self.max_memory)}; lower num_ctx or num_parallel")

    def allows_key(self, name: str) -> bool:
        """Whether the key named ``name`` (``""`` for a request without one) may use the model."""
        return self.keys is None or name in self.keys

    def as_dict(self) -> dict[str, Any]:
        """The limits that are set, for ``/api/ps`` and ``/api/status``."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and value is not False:
                out[item.name] = list(value) if isinstance(value, tuple) else value
        return out


def _count(minimum: int) -> Any:
    def read(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LimitsError(f"{where}: expected an integer of at least {minimum}, got {value!r}")
        return value
    return read


def _memory(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise LimitsError(f"{where}: expected bytes or a size such as \"8GiB\", got {value!r}")
    if isinstance(value, str):
        try:
            value = parse_size(value.strip())
        except ValueError as exc:
            raise LimitsError(f"{where}: {exc}") from None
    if value <= 0:
        raise LimitsError(f"{where}: the size must be positive")
    return value


def _keep_alive(value: Any, where: str) -> float:
    try:
        return parse_duration(value, negative=True)
    except ValueError as exc:
        raise LimitsError(f"{where}: {exc}") from None


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LimitsError(f"{where}: expected true or false, got {value!r}")
    return value


def _key_names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise LimitsError(f"{where}: expected a list of key names, got {value!r}")
    return tuple(value)


_READERS = {"max_parallel": _count(1), "max_queue": _count(0), "max_context": _count(1), "max_memory": _memory,
            "keep_alive": _keep_alive, "pinned": _flag, "keys": _key_names}
#: The environment variables that give every model a default, and the limit each sets.
_ENVIRONMENT = (("MAX_QUEUE", "max_queue"), ("MAX_CONTEXT", "max_context"), ("KEEP_ALIVE", "keep_alive"))


def _entry(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LimitsError(f"{where}: expected an object of limits, got {_kind(value)}")
    parsed = {}
    for name, item in value.items():
        reader = _READERS.get(name)
        if reader is None:
            raise LimitsError(f"{where}: unknown limit {name!r}; the limits are {', '.join(_READERS)}")
        parsed[name] = reader(item, f"{where}.{name}")
    return parsed


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


@dataclass(frozen=True)
class LimitsConfig:
    """Parsed limits: defaults, then (pattern, limits) rules in the order they apply."""

    defaults: dict[str, Any] = field(default_factory=dict)
    rules: tuple[tuple[str, dict[str, Any]], ...] = ()

    def for_model(self, name: str) -> ModelLimits:
        """The limits of the model named ``name`` (its canonical name, ``smollm2:135m``)."""
        values = dict(self.defaults)
        for pattern, limits in self.rules:
            if fnmatch.fnmatchcase(name, pattern) or (":" not in pattern and name.startswith(pattern + ":")):
                values |= limits
        return replace(ModelLimits(), **values)


def parse_limits(data: Any, source: str = "limits", env: Mapping[str, str] | None = None) -> LimitsConfig:
    """Limits from the decoded JSON ``data`` over the environment ``env``; :class:`LimitsError` when invalid.

    ``source`` names the file in messages. ``env`` defaults to this
    process's environment (``MULLAMA_X``, else ``OLLAMA_X``).
    """
    defaults: dict[str, Any] = {}
    for variable, limit in _ENVIRONMENT:
        text = _env(variable, env)
        if text is not None:
            value: Any = text
            if limit != "keep_alive":
                try:
                    value = int(text)
                except ValueError:
                    raise LimitsError(f"MULLAMA_{variable}: expected an integer, got {text!r}") from None
            defaults |= _entry({limit: value}, f"MULLAMA_{variable}")
    if data is None:
        return LimitsConfig(defaults)
    if not isinstance(data, dict):
        raise LimitsError(f"{source}: expected an object with \"defaults\" and \"models\", got {_kind(data)}")
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise LimitsError(f"{source}: unknown section {sorted(unknown)[0]!r}; the sections are defaults and models")
    defaults |= _entry(data.get("defaults", {}), f"{source}: defaults")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise LimitsError(f"{source}: models: expected an object of model names or patterns, got {_kind(models)}")
    patterns, names = [], []
    for pattern, limits in models.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise LimitsError(f"{source}: models: a model name or pattern must not be empty")
        rule = (pattern, _entry(limits, f"{source}: models.{json.dumps(pattern)}"))
        (patterns if _GLOB_CHARS & set(pattern) else names).append(rule)
    return LimitsConfig(defaults, tuple(patterns + names))


def _env(variable: str, env: Mapping[str, str] | None) -> str | None:
    if env is None:
        return config.env(variable)
    for prefix in ("MULLAMA_", "OLLAMA_"):
        value = env.get(prefix + variable)
        if value:
            return value
    return None


def limits_path() -> Path:
    """The limits file: ``MULLAMA_LIMITS``, else ``limits.json`` in the data directory."""
    explicit = os.environ.get("MULLAMA_LIMITS")
    return Path(explicit).expanduser() if explicit else config.data_dir() / "limits.json"


def load_limits(path: Path) -> LimitsConfig:
    """Read and parse the limits file at ``path`` (only the environment when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parse_limits(None, str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise LimitsError(f"cannot read the limits file {path}: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise LimitsError(f"{path} is not JSON: {exc}") from None
    return parse_limits(data, str(path))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a limit")


class Limits:
    """The daemon's limits, replaced whole by :meth:`reload` so a request never sees half of a change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: The parsed limits and each model's limits worked out from them (a request asks several times).
        self._state: tuple[LimitsConfig, dict[str, ModelLimits]] = (load_limits(path), {})
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "Limits":
        """The daemon's limits: :func:`limits_path` over the environment."""
        return cls(limits_path())

    def for_model(self, name: str) -> ModelLimits:
        """The limits of the model named ``name`` now."""
        config, known = self._state
        found = known.get(name)
        if found is None:
            found = config.for_model(name)
            if len(known) < _KNOWN_MODELS:
                known[name] = found
        return found

    def reload(self) -> None:
        """Reread the file and the environment; raises :class:`LimitsError` and keeps the old limits if invalid."""
        with self._lock:
            self._state = (load_limits(self.path), {})
