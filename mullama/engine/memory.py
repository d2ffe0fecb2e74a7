"""How much memory a model needs, and how much the daemon may use.

:func:`estimate` predicts what llama.cpp allocates for a GGUF loaded with
given :class:`~mullama.engine.model.LoadOptions`: the weights, the KV cache of
every sequence, and the compute buffers of one batch (:func:`estimate_speech`
the same for a whisper.cpp speech model). :func:`budget` is
what the daemon's models may occupy together: ``MULLAMA_MAX_MEMORY`` when
set, else system RAM plus the GPUs' memory when the model is offloaded.

The formulas follow what llama.cpp reports when it loads a model (its
``model buffer``, ``KV buffer`` and ``compute buffer`` lines). They are
approximations in two known cases: sliding-window attention layers are
counted with a full-size cache (an overestimate), and recurrent models
(Mamba, RWKV) whose state is not a KV cache are counted with none.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mullama import config
from mullama.engine.model import LoadOptions
from mullama.engine.gpus import gpus
from mullama.errors import NativeLibraryError
from mullama.store.gguf import GGML_TYPES, GGUFInfo, SkippedArray

if TYPE_CHECKING:  # the in-process text API imports this module, and needs nothing of speech
    from mullama.speech.model_file import WhisperFile

#: Elements per block and bytes per block of each KV cache type, from ggml's type table.
_KV_BLOCKS = {name.lower(): (elements, size) for name, elements, size in GGML_TYPES.values()}

#: Fraction of physical memory the daemon may plan on when only the total is known.
_TOTAL_SHARE = 0.9

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


@dataclass(frozen=True)
class Estimate:
    """Bytes a loaded model occupies, by what holds them."""

    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        """Everything together: what the model costs the budget."""
        return self.weights + self.kv_cache + self.compute


def estimate(info: GGUFInfo, load: LoadOptions, *, parts: Sequence[GGUFInfo] = ()) -> Estimate:
    """The memory ``info``'s model takes when loaded with ``load``.

    ``parts`` are the other files of a split GGUF (``info`` is the first,
    which carries the metadata); their tensors add to the weights.
    """
    weights = sum(t.nbytes for part in (info, *parts) for t in part.tensors)
    n_embd = info.embedding_length or 0
    n_head = info.head_count or 0
    n_vocab = _vocab_size(info)
    cells = load.num_ctx * max(1, load.num_parallel)
    kv_cache = _kv_cache(info, cells, load.kv_cache_type)
    # llama.cpp's graph keeps the batch's hidden state and logits in f32 at once;
    # without flash attention it also materialises the attention scores of
    # every head (each sequence attends to its own num_ctx cells).
    width = n_embd + n_vocab
    if load.flash_attention is False:
        width = max(width, 4 * n_embd + load.num_ctx * (1 + n_head))
    # Plus the output buffer: one row of logits per sequence.
    compute = 4 * load.num_batch * width + 4 * n_vocab * max(1, load.num_parallel)
    return Estimate(weights=weights, kv_cache=kv_cache, compute=compute)


def estimate_speech(info: WhisperFile, load: LoadOptions) -> Estimate:
    """The memory a whisper.cpp model takes with ``load.num_parallel`` transcriptions at once.

    Each transcription runs on a state of its own: f16 caches for
    self-attention (the text context padded to 256), cross-attention and the
    encoder's padding (the audio context padded to 256), and compute buffers,
    approximated here by the encoder's activations, its attention scores and
    the decoder's logits (the sizes whisper.cpp logs as ``compute buffer``).
    """
    states = max(1, load.num_parallel)
    audio_cells, text_cells = _pad(info.n_audio_ctx, 256), _pad(info.n_text_ctx, 256)
    kv_cache = 2 * 2 * (info.n_text_state * info.n_text_layer * (text_cells + audio_cells)
                        + info.n_audio_state * audio_cells)
    compute = 4 * (16 * info.n_audio_ctx * info.n_audio_state + info.n_audio_head * info.n_audio_ctx ** 2
                   + info.n_vocab * info.n_text_ctx)
    return Estimate(weights=info.size, kv_cache=states * kv_cache, compute=states * compute)


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _kv_cache(info: GGUFInfo, cells: int, kv_type: str) -> int:
    """K and V of every layer for ``cells`` token positions."""
    n_layer, n_embd = info.block_count or 0, info.embedding_length or 0
    n_head = info.head_count or 0
    n_head_kv = info.head_count_kv or n_head
    if not (n_layer and n_head_kv):
        return 0
    arch = info.architecture or ""
    default_dim = n_embd // n_head if n_head else 0
    key_dim = _int(info.metadata.get(f"{arch}.attention.key_length"), default_dim)
    value_dim = _int(info.metadata.get(f"{arch}.attention.value_length"), key_dim)
    elements, size = _KV_BLOCKS.get(kv_type.lower(), _KV_BLOCKS["f16"])
    return math.ceil(n_layer * cells * n_head_kv * (key_dim + value_dim) * size / elements)


def _vocab_size(info: GGUFInfo) -> int:
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, SkippedArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    return _int(info.metadata.get(f"{info.architecture}.vocab_size"), 0)


def _int(value: object, default: int) -> int:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def parse_size(text: str) -> int:
    """Bytes from ``"8GiB"``, ``"512MB"``, ``"1.5g"`` or ``"1073741824"``.

    ``KiB``/``MiB``/``GiB`` and the bare letters ``K``/``M``/``G`` are powers
    of 1024 (as ``docker --memory`` reads them); ``KB``/``MB``/``GB`` are
    powers of 1000. Raises :class:`ValueError` for anything else.
    """
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 8GiB, 512MB or 1073741824")
    number, prefix, binary, byte = match.groups()
    value = float(number) * (1000 if prefix and byte and not binary else 1024) ** _POWERS[prefix.lower()]
    if (binary and not prefix) or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a size such as 8GiB, 512MB or 1073741824")
    return int(value)


def budget(load: LoadOptions | None = None, *, in_use: int = 0) -> int:
    """Bytes the daemon's loaded models may occupy together.

    ``MULLAMA_MAX_MEMORY`` wins. Otherwise system RAM: what is available
    now plus ``in_use``, the bytes the daemon's own loaded models hold (they
    can be unloaded to make room), never more than physical memory; plus,
    for a model that offloads layers (``num_gpu`` not 0), the GPUs' memory,
    since a model larger than the GPUs runs split between them and the CPU.

    Available rather than total memory, so that other programs' memory is
    respected; plus our own models, or an idle model would never be evicted
    to make room for another.
    """
    explicit = max_memory()
    if explicit:
        return explicit
    load = load or LoadOptions()
    total, available = system_memory()
    ram = min(total, available + in_use)
    # What does not fit on the GPUs runs from RAM (see mullama.engine.offload), so both count.
    return ram + (gpu_memory() if load.num_gpu != 0 else 0)


def max_memory() -> int:
    """``MULLAMA_MAX_MEMORY`` in bytes; 0 when unset."""
    return config.setting("MAX_MEMORY", 0, parse_size)


def gpu_overhead() -> int:
    """Bytes of each GPU's memory left to others (``MULLAMA_GPU_OVERHEAD``/``OLLAMA_GPU_OVERHEAD``, as Ollama's)."""
    return config.setting("GPU_OVERHEAD", 0, parse_size)


def gpu_memory() -> int:
    """Total memory of the GPUs models may use: each capped by ``MULLAMA_GPU_MEMORY``, less the overhead kept free.

    0 when there are none (or no native library).
    """
    limit, overhead = gpu_memory_limit(), gpu_overhead()
    try:
        devices = gpus()
    except NativeLibraryError:
        return 0
    return sum(max(0, (d.memory_total if limit is None else min(d.memory_total, limit)) - overhead) for d in devices)


def gpu_count() -> int:
    """How many GPUs llama.cpp sees; 0 when none (or no native library)."""
    try:
        return len(gpus())
    except NativeLibraryError:
        return 0


def gpu_memory_limit() -> int | None:
    """``MULLAMA_GPU_MEMORY``: the most memory of each GPU models may plan on; None when unset."""
    return config.setting("GPU_MEMORY", None, parse_size)


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM.

    Linux's ``MemAvailable`` counts reclaimable caches as free, as the
    kernel does; elsewhere ``os.sysconf`` is asked, and a system that does
    not report free memory is assumed to have 90% of its total.
    """
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        return total, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (OSError, ValueError, AttributeError):
        return sys.maxsize, sys.maxsize
    try:
        return total, os.sysconf("SC_AVPHYS_PAGES") * page
    except (OSError, ValueError):
        return total, int(total * _TOTAL_SHARE)


def describe(size: int) -> str:
    """A byte count for messages, for example ``"1.5 GiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
