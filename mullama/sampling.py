"""Build libllama's sampler chain from Ollama's option names.

The order follows llama.cpp's common sampler, which Ollama's runner used:
penalties, then the truncation samplers, then temperature, then the final
random pick. Temperature 0 means greedy; ``mirostat`` 1 or 2 replaces the
truncation samplers. A grammar, when given, constrains the chain first.
"""

from __future__ import annotations

import ctypes
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
