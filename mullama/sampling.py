"""Build libllama's sampler chain from Ollama's option names.

The order follows llama.cpp's common sampler, which Ollama's runner used:
penalties, then the truncation samplers, then temperature, then the final
random pick. Temperature 0 means greedy; ``mirostat`` 1 or 2 replaces the
truncation samplers. A grammar, when given, constrains the chain first.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mullama.errors import BadRequestError
from mullama.ffi import llama as L


@dataclass(frozen=True)
class SamplingParams:
    """The sampling options of one request, with Ollama's names and defaults (as in ``mullama.options.Options``)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1

    @classmethod
    def from_options(cls, options: Any) -> "SamplingParams":
        """Take the sampling fields from any object or mapping with Ollama's names."""
        get = options.get if isinstance(options, dict) else lambda k, d: getattr(options, k, d)
        values = {name: get(name, default) for name, default in _DEFAULTS.items()}
        values = {k: (_DEFAULTS[k] if v is None else v) for k, v in values.items()}
        return cls(**values)


_DEFAULTS = {name: f.default for name, f in SamplingParams.__dataclass_fields__.items()}


class Sampler:
    """A sampler chain owned by one generation; free it with :meth:`close`."""

    def __init__(self, lib: ctypes.CDLL, vocab: int, params: SamplingParams, grammar: str | None = None) -> None:
        self._lib = lib
        self.params = params
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = False
        self._chain = lib.llama_sampler_chain_init(chain_params)
        try:
            for sampler in _stages(lib, vocab, params, grammar):
                lib.llama_sampler_chain_add(self._chain, sampler)
        except BaseException:
            lib.llama_sampler_free(self._chain)
            raise

    def sample(self, ctx: int, index: int) -> int:
        """Pick the next token from the logits at output ``index`` (and accept it)."""
        return self._lib.llama_sampler_sample(self._chain, ctx, index)

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties, grammar) about a token chosen elsewhere."""
        self._lib.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        """Free the chain; safe to call twice."""
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


def _seed(value: int) -> int:
    return L.LLAMA_DEFAULT_SEED if value is None or value < 0 else value & 0xFFFFFFFF


def _stages(lib: ctypes.CDLL, vocab: int, p: SamplingParams, grammar: str | None) -> list[int]:
    stages = []
    if grammar:
        stage = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not stage:
            raise BadRequestError("the grammar for this request could not be parsed by llama.cpp")
        stages.append(stage)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    if p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
        last_n = n_vocab if p.repeat_last_n < 0 else p.repeat_last_n
        stages.append(lib.llama_sampler_init_penalties(
            n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
    if p.temperature <= 0:
        stages.append(lib.llama_sampler_init_greedy())
        return stages
    if p.mirostat == 1:
        stages.append(lib.llama_sampler_init_temp(p.temperature))
        stages.append(lib.llama_sampler_init_mirostat(n_vocab, _seed(p.seed), p.mirostat_tau, p.mirostat_eta, 100))
        return stages
    if p.mirostat == 2:
        stages.append(lib.llama_sampler_init_temp(p.temperature))
        stages.append(lib.llama_sampler_init_mirostat_v2(_seed(p.seed), p.mirostat_tau, p.mirostat_eta))
        return stages
    if p.top_k > 0:
        stages.append(lib.llama_sampler_init_top_k(p.top_k))
    if 0 < p.typical_p < 1:
        stages.append(lib.llama_sampler_init_typical(p.typical_p, 1))
    if 0 < p.top_p < 1:
        stages.append(lib.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        stages.append(lib.llama_sampler_init_min_p(p.min_p, 1))
    stages.append(lib.llama_sampler_init_temp(p.temperature))
    stages.append(lib.llama_sampler_init_dist(_seed(p.seed)))
    return stages


#: The most alternatives a request may ask for at each position (Ollama's and OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log probability, and the likeliest tokens at its position.

    ``logprob`` is the log-softmax of the model's raw logits over the whole
    vocabulary, before penalties, temperature or truncation: what llama-server
    (and so Ollama) reports with its default ``post_sampling_probs=false``.
    ``top_logprobs`` is empty for the alternatives themselves.
    """

    id: int
    token: str
    logprob: float
    #: The token's bytes, which may be part of a UTF-8 character (``token`` then holds U+FFFD).
    raw: bytes
    top_logprobs: tuple[TokenLogprob, ...] = ()


def check_top_logprobs(value: Any) -> int:
    """``top_logprobs`` as an int, or :class:`BadRequestError` when it is not one from 0 to 20."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}",
                              param="top_logprobs")
    return value


_apply_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(L.llama_token_data_array))
_name_fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


class _SamplerInterface(ctypes.Structure):
    """libllama's ``struct llama_sampler_i``; the slots left NULL are optional there."""

    _fields_ = [("name", _name_fn), ("accept", ctypes.c_void_p), ("apply", _apply_fn), ("reset", ctypes.c_void_p),
                ("clone", ctypes.c_void_p), ("free", ctypes.c_void_p), ("backend_init", ctypes.c_void_p),
                ("backend_accept", ctypes.c_void_p), ("backend_apply", ctypes.c_void_p),
                ("backend_set_input", ctypes.c_void_p), ("backend_reset", ctypes.c_void_p),
                ("copy_state", ctypes.c_void_p)]


class LogprobReader:
    """Reads token log probabilities from a context's raw logits; free it with :meth:`close`.

    The work is done by libllama, not by a Python loop over the vocabulary:
    ``llama_sampler_sample`` copies the logits into a candidate array, the
    ``dist`` sampler computes the softmax of all of them (normalised in
    double precision), ``top_k`` sorts out the likeliest
    :data:`MAX_TOP_LOGPROBS`, and a last sampler written here copies those
    few out. The log-sum-exp follows from the top candidate
    (``logit - log(p)``), and every logprob is ``logit - logsumexp``.
    """

    _NAME = ctypes.create_string_buffer(b"mullama-logprobs")

    def __init__(self, lib: ctypes.CDLL, piece: Callable[[int], bytes]) -> None:
        self._lib = lib
        self._piece = piece
        self._top: list[tuple[int, float, float]] = []
        self._interface = _SamplerInterface(name=_name_fn(self._name), apply=_apply_fn(self._collect))
        init = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_SamplerInterface), ctypes.c_void_p)(
            ("llama_sampler_init", lib))
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        # The dist sampler's seed only moves its unused draw; a fixed one spares a random_device read.
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_dist(0))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_top_k(MAX_TOP_LOGPROBS))
        lib.llama_sampler_chain_add(self._chain, init(ctypes.byref(self._interface), None))

    def _name(self, _sampler: int) -> int:
        return ctypes.addressof(self._NAME)

    def _collect(self, _sampler: int, candidates: Any) -> None:
        array = candidates.contents
        data = array.data
        self._top = [(data[i].id, data[i].logit, data[i].p) for i in range(array.size)]
        # dist chose an index into the whole vocabulary; top_k kept only the first few.
        array.selected = 0

    def read(self, ctx: int, index: int, token: int, top: int) -> TokenLogprob:
        """The logprob of ``token`` at output ``index`` of ``ctx``, with ``top`` alternatives (at most 20)."""
        self._lib.llama_sampler_sample(self._chain, ctx, index)
        _, best_logit, best_p = self._top[0]
        logsumexp = best_logit - math.log(best_p)
        logit = self._lib.llama_get_logits_ith(ctx, index)[token]
        alternatives = tuple(self._entry(i, x - logsumexp) for i, x, _ in self._top[:top])
        return self._entry(token, logit - logsumexp, alternatives)

    def _entry(self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        raw = self._piece(token)
        return TokenLogprob(token, raw.decode("utf-8", "replace"), logprob, raw, top)

    def close(self) -> None:
        """Free the sampler chain; safe to call twice."""
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
