"""The in-process engine: a GGUF model, its contexts, generation, embeddings and reranking.

``Model`` is public: a program can load a model in its own process and use
it with no server::

    import mullama
    model = mullama.Model("SmolLM2-135M-Instruct.Q4_1.gguf", num_ctx=2048)
    for piece in model.generate("The capital of France is", num_predict=16, temperature=0):
        print(piece, end="", flush=True)

One llama context holds ``num_parallel`` sequences, each with its own
``num_ctx`` tokens of KV cache. Every generation, in-process or in the
daemon, runs on the model's one batcher (:mod:`mullama.engine.batching`),
which drives all of them at once with :class:`Batch` and
:meth:`Context.decode`. A model loaded with a vision projector
(``projector=``, an ``mmproj`` GGUF) also reads images
(:mod:`mullama.engine.vision`): ``model.generate("What is this? [img]",
images=[png_bytes])``. A reranking model (pooling type rank) scores
documents against a query instead: ``model.rerank(query, documents)``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mullama.store import gguf
from mullama.errors import BadRequestError, CancelledError, ModelLoadError, MullamaError
from mullama.ffi import llama as L
from mullama.ffi import load
from mullama.ffi.rpc import device_array
from mullama.options import Options
from mullama.engine.sampling import TokenLogprob
from mullama.types import RankedDocument

if TYPE_CHECKING:
    from mullama.engine.batching import Batcher, Request
    from mullama.engine.speculative import Draft
    from mullama.engine.vision import Projector

log = logging.getLogger("mullama.engine.model")

#: Ollama's defaults, kept in one place (mullama.options).
_OLLAMA = Options()


@dataclass(frozen=True)
class LoadOptions:
    """What is fixed when a model is loaded, with Ollama's option names."""

    num_ctx: int = _OLLAMA.num_ctx
    num_batch: int = _OLLAMA.num_batch
    #: Layers to offload to the GPU; -1 means all that fit (Ollama's default).
    num_gpu: int = _OLLAMA.num_gpu
    main_gpu: int = _OLLAMA.main_gpu
    #: 0 lets Mullama choose (physical cores).
    num_thread: int = _OLLAMA.num_thread
    #: Options leaves this to llama.cpp (None); the engine maps the file by default.
    use_mmap: bool = True
    use_mlock: bool = False
    #: None means llama.cpp decides (auto).
    flash_attention: bool | None = _OLLAMA.flash_attention
    kv_cache_type: str = _OLLAMA.kv_cache_type
    num_parallel: int = _OLLAMA.num_parallel

    @classmethod
    def from_options(cls, options: Any = None, **overrides: Any) -> "LoadOptions":
        """Pick the load-time fields out of an options object or mapping."""
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if isinstance(options, dict) and options.get(name) is not None:
                values[name] = options[name]
            elif options is not None and getattr(options, name, None) is not None:
                values[name] = getattr(options, name)
        values.update({k: v for k, v in overrides.items() if k in cls.__dataclass_fields__ and v is not None})
        return cls(**values)


@dataclass
class Timings:
    """Durations in nanoseconds and counts, named as Ollama reports them."""

    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    total_duration: int = 0
    #: Speculative decoding: tokens the draft model proposed, and how many of them the model kept.
    draft_proposed: int = 0
    draft_accepted: int = 0


@dataclass
class Completion:
    """The outcome of one generation."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    #: "stop" (end of turn or a stop string), "length" (num_predict or context end) or "cancel".
    done_reason: str = ""
    #: The stop string that ended generation ("" when it ended otherwise).
    stop_sequence: str = ""
    timings: Timings = field(default_factory=Timings)
    #: Prompt tokens dropped to fit the context (0 when nothing was cut).
    truncated: int = 0
    #: The whole token sequence the model saw plus what it generated (Ollama's ``context``).
    context: list[int] = field(default_factory=list)
    #: When requested: one entry per generated token whose text was emitted, in order.
    logprobs: list[TokenLogprob] = field(default_factory=list)


def default_threads() -> int:
    """Physical cores where we can tell, else all logical CPUs; as llama.cpp's tools pick."""
    try:
        cores = set()
        block: dict[str, str] = {}
        with open("/proc/cpuinfo") as handle:
            for line in list(handle) + ["\n"]:
                if not line.strip():
                    if "core id" in block:
                        cores.add((block.get("physical id"), block["core id"]))
                    block = {}
                elif ":" in line:
                    key, _, value = line.partition(":")
                    block[key.strip()] = value.strip()
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start.

    Compares doubling slices, then halves the block that differs: list
    equality runs in C, so two 30k-token conversations are compared in about
    0.15 ms where a Python loop over their tokens takes 1.7 ms of the engine
    thread, which every stream waits on.
    """
    a = a if isinstance(a, list) else list(a)
    b = b if isinstance(b, list) else list(b)
    n = min(len(a), len(b))
    low, high, step = 0, 0, 64
    while low < n:
        high = min(n, low + step)
        if a[low:high] != b[low:high]:
            break
        low, step = high, step * 2
    else:
        return n
    # a[:low] == b[:low], and they differ somewhere in [low, high).
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _kv_bytes_per_token(model: "Model", kv_type: int) -> float:
    """K and V of every layer for one token position, in the cache's element type."""
    lib, ptr = model.lib, model.ptr
    n_head = lib.llama_model_n_head(ptr) or 1
    head_dim = lib.llama_model_n_embd(ptr) // n_head
    _, elements, size = gguf.GGML_TYPES[kv_type]
    return lib.llama_model_n_layer(ptr) * lib.llama_model_n_head_kv(ptr) * 2 * head_dim * size / elements


class Batch:
    """A reusable ``llama_batch`` filled from Python without reallocating."""

    def __init__(self, lib: ctypes.CDLL, capacity: int, n_seq_max: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self.raw = lib.llama_batch_init(capacity, 0, n_seq_max)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token; return its index in the batch (the output index if ``logits``)."""
        i = self.n
        if i >= self.capacity:
            raise MullamaError(f"batch overflow: {self.capacity} tokens at most")
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = logits
        self.n = i + 1
        return i

    def close(self) -> None:
        if self.raw is not None:
            self.raw.n_tokens = self.capacity
            self._lib.llama_batch_free(self.raw)
            self.raw = None


class EmbeddingBatch:
    """A reusable ``llama_batch`` of input embeddings (an image's) for one sequence at a time.

    With M-RoPE each embedding has four positions, which ``llama_batch.pos``
    then holds section by section: a buffer of its own replaces the one
    ``llama_batch_init`` made (one per row), and is put back before freeing.
    """

    def __init__(self, lib: ctypes.CDLL, capacity: int, n_embd: int, *, mrope: bool = False) -> None:
        self._lib = lib
        self.capacity = capacity
        self.n_embd = n_embd
        self.raw = lib.llama_batch_init(capacity, n_embd, 1)
        self._own_pos = self._pos_of_init = None
        if mrope:
            self._own_pos = (L.llama_pos * (4 * capacity))()
            # The address, not the field: a pointer read from a struct field is a view of that field.
            self._pos_of_init = ctypes.cast(self.raw.pos, ctypes.c_void_p).value
            self.raw.pos = ctypes.cast(self._own_pos, ctypes.POINTER(L.llama_pos))
        self.n = 0

    def fill(self, embeddings: ctypes.Array[ctypes.c_float], first: int, n: int, positions: Sequence[int],
             seq_id: int, logits: bool) -> None:
        """Rows ``first`` to ``first + n`` of ``embeddings`` at ``positions`` (``n``, or ``4 * n`` with M-RoPE).

        Logits come out for the last row if ``logits``.
        """
        if not 0 < n <= self.capacity:
            raise MullamaError(f"an embedding batch holds 1 to {self.capacity} rows, not {n}")
        if len(positions) != (4 * n if self._own_pos is not None else n):
            raise MullamaError(f"{len(positions)} positions for {n} embeddings")
        row = self.n_embd * ctypes.sizeof(ctypes.c_float)
        ctypes.memmove(self.raw.embd, ctypes.addressof(embeddings) + first * row, n * row)
        raw = self.raw
        for i, pos in enumerate(positions):
            raw.pos[i] = pos
        for i in range(n):
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = seq_id
            raw.logits[i] = 0
        raw.logits[n - 1] = logits
        self.n = n

    def close(self) -> None:
        if self.raw is not None:
            if self._pos_of_init is not None:
                self.raw.pos = ctypes.cast(self._pos_of_init, ctypes.POINTER(L.llama_pos))
            self.raw.n_tokens = self.capacity
            self._lib.llama_batch_free(self.raw)
            self.raw = None


class Context:
    """A llama context: ``n_seq`` sequences sharing one KV cache and one decode call."""

    def __init__(self, model: "Model", opts: LoadOptions, *, embeddings: bool = False, pooling: int | None = None) -> None:
        self.model = model
        lib = self._lib = model.lib
        params = lib.llama_context_default_params()
        self.n_seq = max(1, opts.num_parallel)
        # Generation gives each sequence its own num_ctx; an embedding context is
        # unified (see kv_unified below), so its sequences share one num_ctx.
        params.n_ctx = opts.num_ctx if embeddings else opts.num_ctx * self.n_seq
        params.n_batch = opts.num_batch
        params.n_ubatch = opts.num_batch if not embeddings else opts.num_ctx
        if embeddings:
            params.n_batch = params.n_ubatch = opts.num_ctx
        params.n_seq_max = self.n_seq
        threads = opts.num_thread or default_threads()
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = {None: L.LLAMA_FLASH_ATTN_TYPE_AUTO, True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[opts.flash_attention]
        kv_type = L.GGML_TYPES.get(opts.kv_cache_type.lower())
        if kv_type is None:
            raise BadRequestError(f"unknown kv_cache_type {opts.kv_cache_type!r}; use one of {', '.join(L.GGML_TYPES)}")
        params.type_k = params.type_v = kv_type
        # Pooled embeddings of several sequences in one batch come out wrong with a
        # split KV cache in the pinned llama.cpp, so embedding contexts are unified.
        params.kv_unified = embeddings
        params.no_perf = False
        params.embeddings = embeddings
        if pooling is not None:
            params.pooling_type = pooling
        self._abort_requested = False
        self._abort_cb = L.ggml_abort_callback(lambda _data: self._abort_requested)
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {model.path.name}")
        if model._adapters:
            handles = (ctypes.c_void_p * len(model._adapters))(*model._adapters)
            scales = (ctypes.c_float * len(model._adapters))(*([1.0] * len(model._adapters)))
            if lib.llama_set_adapters_lora(self.ptr, handles, len(model._adapters), scales) != 0:
                lib.llama_free(self.ptr)
                self.ptr = None
                raise ModelLoadError(f"llama.cpp could not attach the LoRA adapters of {model.path.name}")
        self.memory = lib.llama_get_memory(self.ptr)
        self.n_ctx_seq = lib.llama_n_ctx_seq(self.ptr)
        #: About how many bytes one sequence's KV cache holds: what :meth:`share_prefix` copies.
        self.seq_bytes = self.n_ctx_seq * _kv_bytes_per_token(model, kv_type)
        self.n_batch = lib.llama_n_batch(self.ptr)
        self.batch = Batch(lib, self.n_batch, self.n_seq)
        #: Tokens currently held in the KV cache of each sequence, for prefix reuse.
        self.cached: list[list[int]] = [[] for _ in range(self.n_seq)]
        #: Per sequence, where M-RoPE images end in ``cached`` and how many positions all images so far saved.
        self.shifts: list[list[tuple[int, int]]] = [[] for _ in range(self.n_seq)]
        #: ``llama_decode`` calls made so far (what batching saves is counted in these).
        self.decode_count = 0
        self._embedding_batch: EmbeddingBatch | None = None

    def embedding_batch(self, n_embd: int, *, mrope: bool = False) -> EmbeddingBatch:
        """The batch image embeddings are read with (``n_batch`` rows of ``n_embd``), made on first use."""
        if self._embedding_batch is None:
            self._embedding_batch = EmbeddingBatch(self._lib, self.n_batch, n_embd, mrope=mrope)
        return self._embedding_batch

    def position(self, seq: int, index: int) -> int:
        """The position of the ``index``-th cached token of ``seq``: its index, less what M-RoPE images saved.

        An image of the Qwen2-VL family holds more embeddings than the
        positions it advances by (see :meth:`skip_positions`).
        """
        shifts = self.shifts[seq]
        if not shifts:
            return index
        saved = 0
        for end, total in shifts:
            if end > index:
                break
            saved = total
        return index - saved

    def skip_positions(self, seq: int, end: int, saved: int) -> None:
        """Note that the tokens of ``seq`` from index ``end`` on sit ``saved`` positions further back than before."""
        shifts = self.shifts[seq]
        shifts.append((end, saved + (shifts[-1][1] if shifts else 0)))

    def decode(self, batch: Batch | EmbeddingBatch, *, abortable: bool = False, causal: bool = True) -> None:
        """Run the model on ``batch``; raise on failure, or :class:`CancelledError` when aborted.

        ``abortable`` installs the abort callback for this call only: ggml asks
        it between graph nodes, which is worth it for a long prompt chunk and
        not for a one-token step. It stops at an :meth:`abort` made since the
        last :meth:`clear_abort`, before or during the call. ``causal=False``
        lets the batch's tokens attend to each other both ways, as some
        projectors' image embeddings need (Gemma 3), for this call only.
        """
        lib = self._lib
        batch.raw.n_tokens = batch.n
        if abortable:
            lib.llama_set_abort_callback(self.ptr, self._abort_cb, None)
        if not causal:
            lib.llama_set_causal_attn(self.ptr, False)
        self.decode_count += 1
        try:
            code = lib.llama_decode(self.ptr, batch.raw)
        finally:
            if abortable:
                lib.llama_set_abort_callback(self.ptr, L.ggml_abort_callback(), None)
            if not causal:
                lib.llama_set_causal_attn(self.ptr, True)
        if code == 2:
            raise CancelledError("generation cancelled")
        if code == 1:
            raise MullamaError("the KV cache is full: no slot for this batch (lower num_parallel or num_ctx)")
        if code != 0:
            raise MullamaError(f"llama_decode failed with code {code}")

    def abort(self) -> None:
        """Make an abortable decode stop at its next graph node, or at its first if none runs yet."""
        self._abort_requested = True

    def clear_abort(self) -> None:
        """Forget an :meth:`abort` that came too late for the decode it was meant for."""
        self._abort_requested = False

    def forget(self, seq: int, keep: int = 0) -> int:
        """Drop the KV cache of ``seq`` from position ``keep`` on; return how many positions stay.

        A recurrent or hybrid model's state cannot be cut at a position:
        llama.cpp refuses, and then the whole sequence is dropped (0 stay),
        since a state that went past ``keep`` would give wrong answers.
        """
        if not self._lib.llama_memory_seq_rm(self.memory, seq, self.position(seq, keep), -1):
            self._lib.llama_memory_seq_rm(self.memory, seq, 0, -1)
            keep = 0
        del self.cached[seq][keep:]
        self.shifts[seq][:] = [shift for shift in self.shifts[seq] if shift[0] <= keep]
        return keep

    def reuse_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """Keep the longest cached prefix of ``tokens`` in ``seq``; return its length.

        At least the last prompt token is always evaluated again, since its
        logits are needed to sample the first new token.
        """
        cached = self.cached[seq]
        n = min(common_prefix(cached, tokens), len(tokens) - 1)
        return self.forget(seq, n) if n < len(cached) else n

    def share_prefix(self, src: int, dst: int, n: int) -> int:
        """Give ``dst`` the first ``n`` cached tokens of ``src`` by copying their KV cache; return ``n``.

        With a KV cache split per sequence, llama.cpp copies the whole of
        ``src``'s cache (about :attr:`seq_bytes`) at the next decode; ``src``
        is untouched and may be generating meanwhile. Where the copy cannot
        be cut back to ``n`` (see :meth:`forget`), nothing is shared: 0.
        """
        self._lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        # In place: a running request holds this very list as its cache record.
        self.cached[dst][:] = self.cached[src]
        self.shifts[dst][:] = self.shifts[src]
        return self.forget(dst, n)

    def close(self) -> None:
        if self.ptr:
            self.batch.close()
            if self._embedding_batch is not None:
                self._embedding_batch.close()
            self._lib.llama_free(self.ptr)
            self.ptr = None


class _StallGuard:
    """llama.cpp's load progress callback: it gives the load up once progress stalls longer than ``timeout`` seconds.

    Ollama's ``OLLAMA_LOAD_TIMEOUT`` meaning: not a bound on a long load,
    only on one that stops advancing.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last = time.monotonic()
        self.stalled = False

    def __call__(self, progress: float, _user_data: Any) -> bool:
        now = time.monotonic()
        if now - self.last > self.timeout:
            self.stalled = True
            return False
        self.last = now
        return True


class Model:
    """A GGUF model loaded in this process.

    ``path`` is validated by :mod:`mullama.store.gguf` before llama.cpp opens it;
    a list of paths is a split GGUF, in order. ``adapters`` are LoRA GGUFs
    applied to every context at scale 1.0. Options use Ollama's names:
    ``num_ctx``, ``num_batch``, ``num_gpu``, ``num_thread``, ``use_mmap``,
    ``flash_attention``, ``kv_cache_type``, ``num_parallel``. ``projector``
    is a vision projector (``mmproj``) GGUF: when it loads, :attr:`projector`
    reads images; when it does not, the model loads without it and
    :attr:`projector_error` says why. ``stall_timeout`` gives the load up
    (:class:`ModelLoadError`) once llama.cpp reports no progress for that
    many seconds. ``devices`` are the ggml devices the offloaded layers go
    to, in order (RPC workers' among them, see :mod:`mullama.engine.rpc`);
    None leaves the choice to llama.cpp (this machine's GPUs), an empty list
    keeps every layer on the CPU. ``draft`` is a draft model for
    speculative decoding (:mod:`mullama.engine.speculative`), loaded with
    the same options; it must share this model's vocabulary. Use it as a
    context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], options: Any = None, *,
                 adapters: Sequence[str | os.PathLike[str]] = (), projector: str | os.PathLike[str] | None = None,
                 stall_timeout: float = math.inf, devices: Sequence[int] | None = None,
                 draft: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
        started = time.perf_counter_ns()
        parts = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not parts:
            raise BadRequestError("no model file given")
        self.path = parts[0]
        self.options = LoadOptions.from_options(options, **overrides)
        if self.options.num_ctx < 16 or self.options.num_batch < 1 or self.options.num_parallel < 1:
            raise BadRequestError("num_ctx must be at least 16, num_batch and num_parallel at least 1")
        self.info = gguf.read_gguf(self.path)
        others = [gguf.read_gguf(extra) for extra in parts[1:]]
        for adapter in adapters:
            gguf.read_gguf(adapter)
        native = load()
        self.native = native
        lib = self.lib = native.llama
        from mullama.engine.offload import place  # the placement estimates with this module's LoadOptions

        params = lib.llama_model_default_params()
        params.main_gpu = 0
        if devices is None:
            #: Where the layers went: which GPUs hold how many, and the bytes in GPU memory.
            self.placement = place(self.info, self.options, native.current_gpu_devices(), parts=others)
            handles = [d.handle for d in self.placement.devices]
            params.n_gpu_layers = self.placement.num_gpu
        else:
            # Devices given (RPC workers'): llama.cpp spreads the layers over them by their free memory, and this
            # machine's GPUs hold none.
            self.placement = place(self.info, self.options, [], parts=others)
            handles = list(devices)
            params.n_gpu_layers = self.options.num_gpu if self.options.num_gpu >= 0 else 999
        log.info("%s: %s", self.path.name, self.placement.describe())
        # The devices are named, so that llama.cpp uses exactly those chosen (none: the CPU); llama.cpp copies
        # the list while loading, and ``device_list`` keeps it alive until then.
        device_list = device_array(handles)
        params.devices = ctypes.cast(device_list, ctypes.POINTER(ctypes.c_void_p))
        split = (ctypes.c_float * max(1, len(self.placement.tensor_split)))(*self.placement.tensor_split)
        if self.placement.tensor_split:
            params.tensor_split = split
        params.load_mode = (L.LLAMA_LOAD_MODE_MMAP_MLOCK if self.options.use_mlock else L.LLAMA_LOAD_MODE_MMAP) \
            if self.options.use_mmap else (L.LLAMA_LOAD_MODE_MLOCK if self.options.use_mlock else L.LLAMA_LOAD_MODE_NONE)
        guard = _StallGuard(stall_timeout)
        if math.isfinite(stall_timeout):
            # Kept referenced until the load returns: llama.cpp calls it throughout.
            callback = L.llama_progress_callback(guard)
            params.progress_callback = callback
        if len(parts) == 1:
            self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        else:
            # Blobs are named by hash, so llama.cpp cannot find the other parts by name.
            paths = (ctypes.c_char_p * len(parts))(*(str(p).encode() for p in parts))
            self.ptr = lib.llama_model_load_from_splits(paths, len(parts), params)
        if not self.ptr and guard.stalled:
            raise ModelLoadError(f"loading {self.path.name} made no progress for {stall_timeout:g}s, so it was given "
                                 "up (MULLAMA_LOAD_TIMEOUT/OLLAMA_LOAD_TIMEOUT)")
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {self.path} (see the log for its reason)")
        self._adapters = []
        for adapter in adapters:
            handle = lib.llama_adapter_lora_init(self.ptr, str(adapter).encode())
            if not handle:
                lib.llama_model_free(self.ptr)
                self.ptr = None
                raise ModelLoadError(f"llama.cpp could not apply the adapter {adapter} to {self.path.name}")
            self._adapters.append(handle)
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.ptr)
        self.n_embd = lib.llama_model_n_embd(self.ptr)
        self.n_params = lib.llama_model_n_params(self.ptr)
        self._piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._context: Context | None = None
        self._embed_context: Context | None = None
        #: The batcher driving the generation context (see :attr:`batcher`); it sets and clears this itself.
        self._batcher: Batcher | None = None
        #: The vision projector when one was given and loaded (images are read through it).
        self.projector: Projector | None = None
        #: Why the projector given did not load ("" when it did, or none was given).
        self.projector_error = ""
        #: The draft model for speculative decoding, when one was given.
        self.draft: Draft | None = None
        try:
            self._context = Context(self, self.options)
            if projector is not None:
                self._load_projector(Path(projector))
            if draft is not None:
                from mullama.engine import speculative  # speculative builds on this module

                self.draft = speculative.Draft(self, draft, stall_timeout=stall_timeout, devices=devices)
        except BaseException:
            self.close()
            raise
        self.load_duration = time.perf_counter_ns() - started

    def _load_projector(self, path: Path) -> None:
        """Load the vision projector; a projector that does not load leaves the model text-only."""
        from mullama.engine.vision import Projector  # vision builds on this module's types

        try:
            gguf.read_gguf(path)
            self.projector = Projector(self.native, self.ptr, str(path),
                                       threads=self.options.num_thread or default_threads(),
                                       use_gpu=self.placement.num_gpu > 0,
                                       flash_attention=self.options.flash_attention)
        except MullamaError as exc:
            self.projector_error = exc.message
            log.warning("%s loads without images: %s", self.path.name, exc.message)

    # --- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End its generations, free the contexts and the weights; the model is unusable afterwards."""
        if self._batcher is not None:
            self._batcher.close()
        if getattr(self, "projector", None) is not None:
            self.projector.close()
            self.projector = None
        if getattr(self, "draft", None) is not None:
            self.draft.close()
            self.draft = None
        for ctx in (self._context, self._embed_context):
            if ctx is not None:
                ctx.close()
        self._context = self._embed_context = None
        if getattr(self, "ptr", None):
            self.lib.llama_model_free(self.ptr)
            self.ptr = None

    @property
    def context(self) -> Context:
        """The generation context (``num_parallel`` sequences)."""
        if self._context is None:
            raise MullamaError("the model is closed")
        return self._context

    @property
    def batcher(self) -> Batcher:
        """The batcher every generation of this model runs on.

        The daemon makes one with an engine thread; otherwise the first use
        makes one without (``Batcher(model, thread=False)``), whose decode
        loop runs in the threads that read the generations.
        """
        batcher = self._batcher
        if batcher is not None:
            return batcher
        with self._lock:
            if self._batcher is None:
                if self._context is None:
                    raise MullamaError("the model is closed")
                from mullama.engine.batching import Batcher  # batching builds on this module

                Batcher(self, thread=False)  # it sets self._batcher
            assert self._batcher is not None
            return self._batcher

    # --- metadata ------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The GGUF's own Jinja chat template, if it has one."""
        return self.info.chat_template

    def special_token(self, which: str) -> str:
        """Text of the ``bos``/``eos`` token (for chat templates), or ``""``."""
        token = {"bos": self.lib.llama_vocab_bos, "eos": self.lib.llama_vocab_eos}[which](self.vocab)
        return "" if token == L.LLAMA_TOKEN_NULL else self.token_bytes(token, special=True).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def apply_builtin_template(self, messages: Sequence[tuple[str, str]], *, name: str = "chatml",
                               add_assistant: bool = True) -> str:
        """Render ``(role, content)`` pairs with one of libllama's built-in templates.

        The last resort for a model whose GGUF carries no chat template and
        whose Modelfile gives none.
        """
        array = (L.llama_chat_message * len(messages))(
            *(L.llama_chat_message(role.encode(), content.encode()) for role, content in messages))
        size = sum(len(r) + len(c) for r, c in messages) * 2 + 256
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = self.lib.llama_chat_apply_template(name.encode(), array, len(messages), add_assistant, buffer, size)
            if n < 0:
                raise BadRequestError(f"libllama has no built-in chat template named {name!r}")
            if n <= size:
                return buffer.raw[:n].decode("utf-8", "replace")
            size = n
        raise MullamaError("the built-in chat template kept growing")

    # --- tokens --------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text to token ids; ``parse_special`` lets ``<|im_start|>`` and the like be one token."""
        data = text.encode("utf-8", "surrogatepass")
        capacity = len(data) + 8
        buffer = (L.llama_token * capacity)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buffer = (L.llama_token * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if n < 0:
            raise BadRequestError("the text could not be tokenized")
        return buffer[:n]

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character)."""
        key = token if not special else -token - 1
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buffer = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
        piece = buffer.raw[:max(n, 0)]
        self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Token ids back to text (special tokens rendered only if ``special``)."""
        if not tokens:
            return ""
        array = (L.llama_token * len(tokens))(*tokens)
        capacity = len(tokens) * 8 + 16
        buffer = ctypes.create_string_buffer(capacity)
        n = self.lib.llama_detokenize(self.vocab, array, len(tokens), buffer, capacity, not special, special)
        if n < 0:
            capacity = -n
            buffer = ctypes.create_string_buffer(capacity)
            n = self.lib.llama_detokenize(self.vocab, array, len(tokens), buffer, capacity, not special, special)
        return buffer.raw[:n].decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of turn, end of text); asked of libllama once per token id."""
        eog = self._eog_cache.get(token)
        if eog is None:
            eog = self._eog_cache[token] = bool(self.lib.llama_vocab_is_eog(self.vocab, token))
        return eog

    # --- generation ----------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], options: Any = None, *, grammar: str | None = None,
                 images: Sequence[bytes] = (), **overrides: Any) -> Generation:
        """Start generating from ``prompt`` (text, or token ids); iterate for text pieces.

        ``images`` (encoded JPEG, PNG, GIF or BMP files) need a model loaded
        with a projector and a text prompt; each goes where the prompt says
        ``[img-N]`` or ``[img]``, else before the text, as in Ollama.

        Sampling options use Ollama's names (``temperature``, ``top_k``,
        ``num_predict``, ``num_keep``, ``stop``, ``seed``, ...);
        ``logprobs=True`` (with ``top_logprobs``, 0 to 20) fills
        ``Completion.logprobs``; ``truncate=False`` refuses a prompt that
        does not fit the context instead of cutting it (see
        :func:`mullama.engine.batching.fit_prompt`); on a model with a draft,
        ``draft=False`` turns speculative decoding off and
        ``draft_num_predict`` sets how many tokens the draft proposes per
        step (see :mod:`mullama.engine.speculative`). Bad options, a bad
        grammar or such a prompt raise :class:`BadRequestError` here. The
        returned :class:`Generation` yields text as it is produced and holds
        the :class:`Completion` in ``.result`` once done; ``cancel()`` from
        any thread stops it within one token. Generations from several
        threads share the model's ``num_parallel`` sequences, the rest wait.
        """
        merged: dict[str, Any] = {}
        if isinstance(options, dict):
            merged.update(options)
        elif options is not None:
            merged.update({k: getattr(options, k) for k in dir(options) if not k.startswith("_")})
        merged.update(overrides)
        truncate = merged.pop("truncate", None)
        logprobs = merged.pop("logprobs", False)
        top_logprobs = merged.pop("top_logprobs", None) or 0
        chunks: list[Any] = []
        if images:
            if not isinstance(prompt, str):
                raise BadRequestError("images go with a text prompt, not token ids", param="images")
            vision = self.tokenize_with_images(prompt, images, marked=False)
            tokens, chunks = vision.tokens, vision.images
        else:
            tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        request = self.batcher.submit(tokens, merged, grammar=grammar, truncate=truncate is None or bool(truncate),
                                      logprobs=bool(logprobs), top_logprobs=top_logprobs, images=chunks)
        return Generation(request)

    def tokenize_with_images(self, text: str, images: Sequence[bytes], *, marked: bool = True,
                             add_special: bool | None = None) -> Any:
        """Tokenize ``text`` with ``images`` into a :class:`~mullama.engine.vision.VisionPrompt`.

        With ``marked``, ``text`` holds :attr:`image_marker` once per image;
        otherwise images go where Ollama would put them (see
        :func:`~mullama.engine.vision.place_images`). Raises
        :class:`BadRequestError` with Ollama's wording when the model has no
        projector, and for an image that cannot be read.
        """
        from mullama.engine.vision import place_images

        marker = self.image_marker
        assert self.projector is not None
        if not marked:
            text = place_images(text, len(images), marker)
        return self.projector.tokenize(text, images, add_special=self.add_bos if add_special is None else add_special)

    @property
    def image_marker(self) -> str:
        """Where an image goes in a prompt for :meth:`tokenize_with_images`.

        Raises :class:`BadRequestError` with Ollama's wording (and the reason
        the projector did not load, if it did not) for a model without one.
        """
        if self.projector is None:
            from mullama.engine.vision import NO_VISION

            reason = f" ({self.projector_error})" if self.projector_error else ""
            raise BadRequestError(NO_VISION + reason, param="images")
        return self.projector.marker

    def complete(self, prompt: str | Sequence[int], options: Any = None, **overrides: Any) -> Completion:
        """Generate to the end and return the :class:`Completion`."""
        generation = self.generate(prompt, options, **overrides)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    # --- embeddings ----------------------------------------------------------

    def embed(self, inputs: str | Sequence[str], *, truncate: bool = True, normalize: bool = True) -> list[list[float]]:
        """Pooled embeddings, one per input, L2-normalised; several inputs share decodes."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            return []
        token_lists = [self.embedding_tokens(t, truncate=truncate) for t in texts]
        return [l2_normalize(v) if normalize else v for v in self.embed_tokens(token_lists)]

    def embedding_tokens(self, text: str, *, truncate: bool = True) -> list[int]:
        """The tokens of one embedding input, cut to the embedding context.

        Raises :class:`BadRequestError` for an input with no tokens, or one
        longer than the context when ``truncate`` is False.
        """
        if self.is_reranker:
            raise BadRequestError(f"{self.path.name} is a reranking model (pooling type rank): it scores documents "
                                  "against a query (Model.rerank; POST /api/rerank or /v1/rerank) and does not embed")
        tokens = self.tokenize(text)
        if not tokens:
            raise BadRequestError("an embedding input is empty: there is nothing to embed")
        context = self.embedding_context
        # llama.cpp rounds n_ctx up (to 256) but not n_batch: one input must fit both.
        return self._fit_for_embedding(tokens, min(context.n_ctx_seq, context.batch.capacity), truncate)

    def embed_tokens(self, token_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """Pooled vectors (not normalised) of tokenized inputs, packed into as few decodes as fit."""
        with self._lock:
            return self._embed_tokens(self._embedding_context(), token_lists)

    @property
    def embedding_context(self) -> Context:
        """The context embeddings use, created on first use; up to 16 inputs share each decode."""
        if self._embed_context is None:
            with self._lock:
                return self._embedding_context()
        return self._embed_context

    def _embedding_context(self) -> Context:
        if self._embed_context is None:
            if not self.ptr:
                raise MullamaError("the model is closed")
            # A reranker's (rank) pools each input into n_cls_out scores, read by :meth:`score_tokens`.
            pooling = self.info.pooling_type
            if pooling is None or pooling == L.LLAMA_POOLING_TYPE_NONE:
                pooling = L.LLAMA_POOLING_TYPE_MEAN
            n_seq = 16
            opts = LoadOptions(**{**self.options.__dict__, "num_parallel": n_seq,
                                  "num_ctx": min(self.options.num_ctx, self.n_ctx_train or self.options.num_ctx)})
            self._embed_context = Context(self, opts, embeddings=True, pooling=pooling)
        return self._embed_context

    @staticmethod
    def _fit_for_embedding(tokens: list[int], limit: int, truncate: bool) -> list[int]:
        if len(tokens) <= limit:
            return tokens
        if not truncate:
            raise BadRequestError(f"input length {len(tokens)} exceeds the context length {limit}")
        return tokens[:limit]

    def _embed_tokens(self, ctx: Context, token_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """Pack inputs into as few decodes as fit in one batch, one sequence each."""
        results: list[list[float]] = [[] for _ in token_lists]
        batch = ctx.batch
        pending = list(range(len(token_lists)))
        while pending:
            batch.clear()
            group: list[int] = []
            for index in pending:
                tokens = token_lists[index]
                if group and (len(group) == ctx.n_seq or batch.n + len(tokens) > batch.capacity):
                    break
                seq = len(group)
                for pos, token in enumerate(tokens):
                    batch.add(token, pos, seq, True)
                group.append(index)
            pending = pending[len(group):]
            self.lib.llama_memory_clear(ctx.memory, True)
            ctx.decode(batch)
            width = self._pooled_width()
            for seq, index in enumerate(group):
                vector = self.lib.llama_get_embeddings_seq(ctx.ptr, seq)
                if not vector:
                    raise MullamaError("llama.cpp returned no pooled embedding for this model")
                results[index] = vector[:width]
        return results

    def _pooled_width(self) -> int:
        """Floats per input that pooling gives: a reranker's classes, else the embedding's width."""
        if self.is_reranker:
            return self.lib.llama_model_n_cls_out(self.ptr) or 1
        return self.lib.llama_model_n_embd_out(self.ptr) or self.n_embd

    # --- reranking -----------------------------------------------------------

    @property
    def is_reranker(self) -> bool:
        """Whether the GGUF's pooling type is rank: the model scores (query, document) pairs and does not embed."""
        return self.info.pooling_type == L.LLAMA_POOLING_TYPE_RANK

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None) -> list[RankedDocument]:
        """Score each of ``documents`` against ``query``: the best first, at most ``top_n`` (None: all).

        For a reranking model (pooling type rank: Qwen3-Reranker,
        bge-reranker...). Each pair is put together as llama-server puts it
        (:meth:`rerank_tokens`), so each :class:`RankedDocument` carries
        llama-server's ``relevance_score``: the first of the model's
        classes, which is the probability of "yes" for Qwen3-Reranker and a
        logit for a BERT cross-encoder. Several pairs share each decode;
        documents with equal scores keep their order. Raises
        :class:`BadRequestError` for a model that is not a reranker, a pair
        longer than the context, or a negative ``top_n``::

            with mullama.Model("Qwen3-Reranker-0.6B.Q8_0.gguf") as reranker:
                best = reranker.rerank("capital of France?", ["Paris is...", "Bananas..."], top_n=1)[0]
                print(best.index, best.relevance_score)
        """
        check_top_n(top_n)
        token_lists = [self.rerank_tokens(query, document) for document in documents]
        return rank(self.score_tokens(token_lists) if token_lists else [], top_n)

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        """The tokens of one (query, document) pair, as llama-server's ``format_prompt_rerank`` makes them.

        With a ``rerank`` template in the GGUF (``tokenizer.chat_template.rerank``,
        as Qwen3-Reranker's carries), that template with ``{query}`` and
        then ``{document}`` replaced, special tokens parsed and none added;
        otherwise BOS, the query, EOS, SEP, the document and EOS, each special
        token only where the vocabulary adds it (a BERT cross-encoder's
        ``[CLS] query [SEP] document [SEP]``). Raises
        :class:`BadRequestError` for a model that is not a reranker, or a pair
        that does not fit the context (cutting it would cut what the score is read from).
        """
        if not self.is_reranker:
            raise BadRequestError(f"{self.path.name} is not a reranking model (its pooling type is not rank): "
                                  "reranking needs a model such as Qwen3-Reranker or bge-reranker", param="model")
        lib, vocab = self.lib, self.vocab
        template = lib.llama_model_chat_template(self.ptr, b"rerank")
        if template is not None:
            prompt = template.decode("utf-8", "replace").replace("{query}", query).replace("{document}", document)
            tokens = self.tokenize(prompt, add_special=False, parse_special=True)
        else:
            eos = lib.llama_vocab_eos(vocab)
            if eos == L.LLAMA_TOKEN_NULL:
                eos = lib.llama_vocab_sep(vocab)
            add_eos = lib.llama_vocab_get_add_eos(vocab)
            tokens = [lib.llama_vocab_bos(vocab)] if lib.llama_vocab_get_add_bos(vocab) else []
            tokens += self.tokenize(query, add_special=False, parse_special=False)
            tokens += [eos] if add_eos else []
            tokens += [lib.llama_vocab_sep(vocab)] if lib.llama_vocab_get_add_sep(vocab) else []
            tokens += self.tokenize(document, add_special=False, parse_special=False)
            tokens += [eos] if add_eos else []
        if not tokens:
            raise BadRequestError("the query and the document are empty: there is nothing to score")
        context = self.embedding_context
        limit = min(context.n_ctx_seq, context.batch.capacity)
        if len(tokens) > limit:
            raise BadRequestError(f"a query with its document is {len(tokens)} tokens, more than the context "
                                  f"length {limit}")
        return tokens

    def score_tokens(self, token_lists: Sequence[Sequence[int]]) -> list[float]:
        """The relevance score of each tokenized pair (see :meth:`rerank_tokens`), in as few decodes as fit."""
        return [vector[0] for vector in self.embed_tokens(token_lists)]


def check_top_n(top_n: int | None) -> None:
    """Refuse a negative ``top_n`` (0 asks for no documents, as llama-server reads it)."""
    if top_n is not None and top_n < 0:
        raise BadRequestError("top_n must be 0 or more", param="top_n")


def rank(scores: Sequence[float], top_n: int | None = None) -> list[RankedDocument]:
    """Documents by score, the best first, cut to ``top_n``, as llama-server's ``format_response_rerank`` orders them.

    Equal scores keep the documents' order (llama-server's sort leaves theirs unspecified); callers check
    ``top_n`` (:func:`check_top_n`) before the scoring.
    """
    ranked = sorted((RankedDocument(index, score) for index, score in enumerate(scores)),
                    key=lambda document: -document.relevance_score)
    return ranked if top_n is None else ranked[:top_n]


def l2_normalize(vector: list[float]) -> list[float]:
    """``vector`` scaled to unit length (unchanged if it is all zeros)."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


class Generation:
    """One generation started by :meth:`Model.generate`; iterate it for text pieces.

    It is a request on the model's batcher (:attr:`request`). Iterating runs
    the decode loop in the reading thread unless the daemon's engine thread
    does; leaving the iteration early cancels it.
    """

    def __init__(self, request: Request) -> None:
        #: The batcher's request behind this generation.
        self.request = request

    def __iter__(self) -> Iterator[str]:
        return iter(self.request)

    def pieces(self) -> Iterator[tuple[str, list[TokenLogprob]]]:
        """Each text piece with the logprobs of the tokens that produced it (see ``Request.pieces``)."""
        return self.request.pieces()

    def cancel(self) -> None:
        """Stop at the next token (or the next graph node of a prompt chunk). Any thread."""
        self.request.cancel()

    @property
    def result(self) -> Completion | None:
        """The :class:`Completion` once the generation is done; None before."""
        return self.request.result


def quantize(source: str | os.PathLike[str], destination: str | os.PathLike[str], quantization: str,
             threads: int = 0) -> None:
    """Write ``source`` re-quantized to ``quantization`` (``Q4_K_M``, ``Q8_0``, ...) at ``destination``."""
    wanted = quantization.upper()
    ftypes = {name.upper(): number for number, name in gguf.FILE_TYPES.items()}
    if wanted not in ftypes:
        raise BadRequestError(f"unknown quantization {quantization!r}; use one of {', '.join(sorted(ftypes))}",
                              param="quantize")
    gguf.read_gguf(source)
    lib = load().llama
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftypes[wanted]
    params.nthread = threads or default_threads()
    params.allow_requantize = True
    if lib.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) != 0:
        raise ModelLoadError(f"llama.cpp could not quantize {Path(source).name} to {wanted}")
