"""Runtime options: the names, types and defaults of Ollama's ``options``.

The same table serves the ``options`` object of an API request and the
``PARAMETER`` lines of a Modelfile, so both accept exactly the same names.
Values from JSON are checked the way Ollama's ``Options.FromMap`` checks them
(an unknown name is logged and skipped, a known name with a value of the
wrong type is an error); values from a Modelfile are text, converted the way
``api.FormatParams`` does (there an unknown name is an error, as in Ollama).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mullama.errors import BadRequestError

log = logging.getLogger("mullama.options")

#: Options that Ollama once had and now accepts but ignores; clients still send them.
IGNORED_OPTIONS = frozenset(
    {
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "numa",
        "tfs_z",
    }
)

#: How many unknown option names one warning lists (a request may carry any number), and of each how much.
_LOGGED_UNKNOWN = 8
_LOGGED_NAME_CHARS = 64

#: Values accepted by ``kv_cache_type`` (llama.cpp's K/V cache element types).
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")

_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
#: The largest float32: every float option reaches llama.cpp as a C float, where a
#: larger double becomes infinity.
_FLOAT32_MAX = 3.4028234663852886e38
#: The largest context a request may ask for, and so the bound of every count of tokens.
MAX_NUM_CTX = 1 << 21
#: Bounds of every numeric option, by what it can mean: anything beyond is a
#: mistake or an attack, and would otherwise fail (or allocate) deep in
#: llama.cpp. Counts of tokens cannot exceed the largest context; sizes that
#: llama.cpp takes as int32 stay in int32; probabilities are probabilities;
#: temperatures and penalty factors are not negative.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_ctx": (1, MAX_NUM_CTX),
    "num_batch": (1, 1 << 16),
    "num_thread": (0, 1024),
    "num_parallel": (1, 256),
    "num_gpu": (-1, 100_000),
    "main_gpu": (0, 1024),
    "draft_num_predict": (0, 1024),
    "draft_p_min": (0.0, 1.0),
    "draft_ngram": (0, 1024),
    # -1 keeps the whole prompt, as in Ollama.
    "num_keep": (-1, MAX_NUM_CTX),
    # -1 is endless and -2 fills the context, as in Ollama; the context ends a generation anyway.
    "num_predict": (-2, _INT32_MAX),
    "top_k": (-1, _INT32_MAX),
    # -1 is the whole context, as in Ollama: the penalty window is a buffer of this many tokens.
    "repeat_last_n": (-1, MAX_NUM_CTX),
    "seed": (-_INT64_MAX, _INT64_MAX),
    "mirostat": (0, 2),
    "temperature": (0.0, None),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "repeat_penalty": (0.0, None),
    "presence_penalty": (None, None),
    "frequency_penalty": (None, None),
    "mirostat_tau": (0.0, None),
    "mirostat_eta": (0.0, None),
}
# Longer numbers are out of int64's range anyway, and int() refuses very long text.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOL_TEXT = {
    "1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
    "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False,
}  # fmt: skip


@dataclass(frozen=True)
class Options:
    """Every option of a generation, with Ollama's defaults.

    Load-time options (``num_ctx`` to ``flash_attention``) decide how a model
    is loaded; a request that changes them needs a reload.  ``None`` means
    "let Mullama decide".
    """

    # Load time (Ollama's ``Runner``).
    num_ctx: int = 4096
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0
    draft_num_predict: int = 4
    #: Mullama's own (llama-server's ``--spec-draft-p-min``): a draft stops proposing at a token it
    #: gives less than this probability among its ten likeliest; 0 never stops early, as llama-server.
    draft_p_min: float = 0.0
    #: Mullama's own (llama-server's ``--spec-type ngram-simple``): draft from the sequence's own text, by
    #: looking up its last this many tokens earlier in it; 0 (the default) does not.
    draft_ngram: int = 0
    num_parallel: int = 1
    kv_cache_type: str = "f16"
    flash_attention: bool | None = None
    # Prediction.
    num_keep: int = 4
    seed: int = -1
    num_predict: int = -1
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    temperature: float = 0.8
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    stop: tuple[str, ...] = field(default_factory=tuple)
    think: bool = False
    #: Mullama's own: false keeps a request from using the model's draft model (speculative decoding).
    draft: bool = True
    #: Mullama's own (llama-server's ``backend_sampling``): llama.cpp samples inside the model's graph, so
    #: the logits never leave the GPU; off by default, as in llama-server, where it is experimental.
    backend_sampling: bool = False

    def merged(self, *layers: dict[str, Any]) -> Options:
        """Return a copy with each layer of parsed values applied in turn.

        Layers come from :func:`parse_options` or a Modelfile's parameters,
        typically the Modelfile's first and the request's last; a later
        layer replaces a value (``stop`` included) rather than extending it.
        """
        changes: dict[str, Any] = {}
        for layer in layers:
            for name, value in layer.items():
                value = _typed(name, value)
                changes[name] = tuple(value) if isinstance(value, list) else value
        return replace(self, **changes)


# Field annotations are strings (postponed evaluation); a new kind of field
# must be added here, which import-time KeyError makes impossible to forget.
_ANNOTATION_TYPES = {"int": int, "float": float, "bool": bool, "bool | None": bool, "str": str, "tuple[str, ...]": list}

#: The type of every option: ``int``, ``float``, ``bool``, ``str`` or ``list`` (of str).
PARAMETER_TYPES: dict[str, type] = {f.name: _ANNOTATION_TYPES[str(f.type)] for f in fields(Options)}


def parse_options(values: dict[str, Any]) -> dict[str, Any]:
    """Check a request's ``options`` object and return its typed values.

    As in Ollama's ``Options.FromMap``: a number for an integer option is
    cut to an integer towards zero (JSON numbers are floats there); ``None``
    values and the options Ollama retired are skipped; a name that is no
    option is logged and skipped, so a client that sends another server's
    options still works.  Raises :class:`BadRequestError` naming the first
    known option whose value has the wrong type or is out of range.
    """
    if not isinstance(values, dict):
        raise BadRequestError("options must be an object", param="options")
    parsed: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in values.items():
        if value is None or name in IGNORED_OPTIONS:
            continue
        if name not in PARAMETER_TYPES:
            unknown.append(name)
            continue
        parsed[name] = _typed(name, value)
    if unknown:
        shown = ", ".join(repr(str(name)[:_LOGGED_NAME_CHARS]) for name in unknown[:_LOGGED_UNKNOWN])
        more = f" and {len(unknown) - _LOGGED_UNKNOWN} more" if len(unknown) > _LOGGED_UNKNOWN else ""
        log.warning("invalid option provided (ignored): %s%s", shown, more)
    return parsed


def parse_parameter(name: str, text: str) -> Any:
    """Convert the text of a Modelfile ``PARAMETER`` to its typed value.

    ``stop`` gives a one-item list, to be accumulated by the caller.
    Raises :class:`BadRequestError` for an unknown name or a malformed value.
    """
    kind = _type_of(name)
    if kind is list:
        return [text]
    if kind is int and _INT_TEXT.fullmatch(text):
        return _typed(name, int(text))
    if kind is float and _FLOAT_TEXT.fullmatch(text):
        return _typed(name, float(text))
    if kind is bool and text in _BOOL_TEXT:
        return _BOOL_TEXT[text]
    if kind is str:
        return _typed(name, text)
    raise BadRequestError(f'invalid {_TYPE_NAMES[kind]} value "{text}" for parameter "{name}"', param=name)


_TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array of strings"}


def _type_of(name: str) -> type:
    try:
        return PARAMETER_TYPES[name]
    except (KeyError, TypeError):
        raise BadRequestError(f'unknown option "{name}"', param=str(name)) from None


def _typed(name: str, value: Any) -> Any:
    """Check ``value`` against the type of option ``name``; return it normalised."""
    kind = _type_of(name)
    if kind is int and isinstance(value, float) and math.isfinite(value):
        # Go's int64(float64): towards zero, as Ollama reads every JSON number.
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if kind is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise BadRequestError(f'option "{name}" must be of type {_TYPE_NAMES[kind]}', param=name)
    if kind is int and abs(value) > _INT64_MAX:
        raise BadRequestError(f'option "{name}" is out of range', param=name)
    if kind is float and not math.isfinite(value):
        raise BadRequestError(f'option "{name}" must be a finite number', param=name)
    if kind in (int, float):
        _check_range(name, value)
    if name == "kv_cache_type" and value not in KV_CACHE_TYPES:
        raise BadRequestError(f'option "kv_cache_type" must be one of {", ".join(KV_CACHE_TYPES)}', param=name)
    return value


def _check_range(name: str, value: float) -> None:
    """Refuse a number outside what option ``name`` can mean (see ``_RANGES``)."""
    low, high = _RANGES[name]
    if isinstance(value, float):
        # Whatever the option, a C float must hold it.
        low = -_FLOAT32_MAX if low is None else low
        high = _FLOAT32_MAX if high is None else high
    if low <= value <= high:
        return
    shown = (f"{low:g}", f"{high:g}") if isinstance(value, float) else (str(low), str(high))
    raise BadRequestError(f'option "{name}" must be between {shown[0]} and {shown[1]}', param=name)
