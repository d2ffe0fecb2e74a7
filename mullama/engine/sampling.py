"""Build libllama's sampler chain from Ollama's option names.

The order follows llama.cpp's common sampler, which Ollama's runner used:
penalties, then the truncation samplers, then temperature, then the final
random pick. Temperature 0 means greedy; ``mirostat`` 1 or 2 replaces the
truncation samplers. A grammar, when given, is checked against the chain's
pick, and applied to all the candidates only when it rejects it, as in
llama.cpp's common sampler. Grammar calls release the GIL (the chain's
short calls keep it): a grammar can take milliseconds per token, during
which every other request's Python code must go on running.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mullama.errors import BadRequestError, MullamaError
from mullama.ffi import llama as L
from mullama.options import MAX_NUM_CTX, Options

#: Ollama's defaults, kept in one place (mullama.options).
_OLLAMA = Options()


@dataclass(frozen=True)
class SamplingParams:
    """The sampling options of one request, with Ollama's names and defaults (as in ``mullama.options.Options``)."""

    temperature: float = _OLLAMA.temperature
    top_k: int = _OLLAMA.top_k
    top_p: float = _OLLAMA.top_p
    min_p: float = _OLLAMA.min_p
    typical_p: float = _OLLAMA.typical_p
    repeat_last_n: int = _OLLAMA.repeat_last_n
    repeat_penalty: float = _OLLAMA.repeat_penalty
    presence_penalty: float = _OLLAMA.presence_penalty
    frequency_penalty: float = _OLLAMA.frequency_penalty
    mirostat: int = _OLLAMA.mirostat
    mirostat_tau: float = _OLLAMA.mirostat_tau
    mirostat_eta: float = _OLLAMA.mirostat_eta
    seed: int = _OLLAMA.seed
    #: The context the penalty window lives in: ``repeat_last_n`` -1 means all of it, and it holds no more.
    num_ctx: int = _OLLAMA.num_ctx

    @classmethod
    def from_options(cls, options: Any) -> "SamplingParams":
        """Take the sampling fields from any object or mapping with Ollama's names."""
        get = options.get if isinstance(options, dict) else lambda k, d: getattr(options, k, d)
        values = {name: get(name, default) for name, default in _DEFAULTS.items()}
        values = {k: (_DEFAULTS[k] if v is None else v) for k, v in values.items()}
        return cls(**values)


_DEFAULTS = {name: f.default for name, f in SamplingParams.__dataclass_fields__.items()}


class Sampler:
    """A sampler chain, and the grammar if any, owned by one generation; free it with :meth:`close`.

    A grammar sampler costs milliseconds over the whole vocabulary. As in
    llama.cpp's ``common_sampler_sample``, the chain picks a token first,
    the grammar checks that one token, and only when it is rejected are the
    candidates refilled, constrained by the grammar and sampled again. The
    chain is applied to candidates copied here rather than through
    ``llama_sampler_sample``, which would also accept a rejected token into
    stateful samplers (penalties); the chosen token alone is accepted.

    :meth:`attach` has llama.cpp run the chain inside the model's graph
    instead (llama-server's ``backend_sampling``): the logits then never
    leave the device, which saves a GPU's step the copy and the host's pass
    over the whole vocabulary.
    """

    def __init__(self, lib: ctypes.CDLL, vocab: int, params: SamplingParams, grammar: str | None = None) -> None:
        self._lib = lib
        self.params = params
        self._grammar = None
        self._candidates: _Candidates | None = None
        #: The context and sequence whose graph runs the chain (see :meth:`attach`), until :meth:`close`.
        self._attached: tuple[int, int] | None = None
        #: Whether the chain was ever run in a graph (it stays true once the sampler is closed).
        self.in_graph = False
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = False
        self._chain = lib.llama_sampler_chain_init(chain_params)
        try:
            for sampler in _stages(lib, vocab, params):
                lib.llama_sampler_chain_add(self._chain, sampler)
            if grammar:
                self._grammar = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
                if not self._grammar:
                    raise BadRequestError("the grammar for this request could not be parsed by llama.cpp")
                self._candidates = _Candidates(lib, lib.llama_vocab_n_tokens(vocab))
        except BaseException:
            self.close()
            raise
        self._one = L.llama_token_data()
        self._single = L.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def sample(self, ctx: int, index: int) -> int:
        """Pick the next token from the logits at output ``index`` (and accept it)."""
        if self._grammar is None:
            return self._lib.llama_sampler_sample(self._chain, ctx, index)
        token = self._pick(ctx, index, constrained=False)
        if not self._allows(token):
            token = self._pick(ctx, index, constrained=True)
            # With every token rejected the chain still picks one, and accepting
            # it into the grammar would abort the whole process.
            if not self._allows(token):
                raise MullamaError("no token can continue the grammar of this request")
        self._accept(token)
        return token

    def _pick(self, ctx: int, index: int, constrained: bool) -> int:
        candidates = self._candidates.fill(ctx, index)
        if constrained:
            self._lib.llama_sampler_apply_nogil(self._grammar, candidates)
        self._lib.llama_sampler_apply(self._chain, candidates)
        if not 0 <= candidates.selected < candidates.size:
            raise MullamaError("the sampler chain selected no token")
        return candidates.data[candidates.selected].id

    def _allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next: it sets a rejected token's logit to -inf."""
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        self._single.size, self._single.selected, self._single.sorted = 1, -1, False
        self._lib.llama_sampler_apply_nogil(self._grammar, self._single)
        return self._one.logit != -math.inf

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties, grammar) about a token chosen elsewhere.

        Raises :class:`BadRequestError` for a token the grammar forbids, which
        libllama would answer by aborting the process.
        """
        if self._grammar and not self._allows(token):
            raise BadRequestError(f"token {token} does not fit the grammar of this request")
        self._accept(token)

    def _accept(self, token: int) -> None:
        if self._grammar:
            self._lib.llama_sampler_accept_nogil(self._grammar, token)
        self._lib.llama_sampler_accept(self._chain, token)

    @property
    def offloadable(self) -> bool:
        """Whether llama.cpp can run the whole chain in a graph: every stage has a backend version.

        A grammar, mirostat and typical sampling have none; a chain split
        between the graph and the host is not offered.
        """
        p = self.params
        return self._grammar is None and (p.temperature <= 0 or (p.mirostat == 0 and not 0 < p.typical_p < 1))

    def attach(self, ctx: int, seq: int) -> bool:
        """Run the chain in ``ctx``'s graph for sequence ``seq`` from its next decode; whether llama.cpp took it.

        :meth:`sample` then reads the token the graph picked. Only the
        thread that decodes may call it (the next decode rebuilds the
        graph); a chain is attached once, and :meth:`close` detaches it.
        """
        if self._attached is None and self.offloadable:
            if self._lib.llama_set_sampler(ctx, seq, self._chain):
                self._attached = (ctx, seq)
                self.in_graph = True
        return self._attached is not None

    def reset(self) -> None:
        """Start over, as a new sampler with the same options would: penalties forget, a seed starts again."""
        self._lib.llama_sampler_reset(self._chain)
        if self._grammar:
            self._lib.llama_sampler_reset(self._grammar)

    def close(self) -> None:
        """Detach the chain from its graph, free it and the grammar; safe to call twice."""
        if self._attached is not None:
            ctx, seq = self._attached
            self._lib.llama_set_sampler(ctx, seq, None)
            self._attached = None
        for name in ("_chain", "_grammar"):
            sampler = getattr(self, name)
            if sampler:
                self._lib.llama_sampler_free(sampler)
                setattr(self, name, None)
        if self._candidates is not None:
            self._candidates.close()
            self._candidates = None


class PythonSampler:
    """A libllama sampler whose ``apply`` selects the first candidate and calls ``collect`` with them all.

    libllama keeps pointers into this object: it must outlive the chain that owns :attr:`handle`.
    """

    _NAME = ctypes.create_string_buffer(b"mullama")

    def __init__(self, lib: ctypes.CDLL, collect: Callable[[L.llama_token_data_array], None]) -> None:
        self._collect = collect
        self._interface = L.llama_sampler_i(name=L.llama_sampler_name_fn(self._name),
                                            apply=L.llama_sampler_apply_fn(self._apply))
        self.handle = lib.llama_sampler_init(ctypes.byref(self._interface), None)

    def _name(self, _sampler: int) -> int:
        return ctypes.addressof(self._NAME)

    def _apply(self, _sampler: int, candidates: Any) -> None:
        array = candidates.contents
        # Selected first: an exception here is only printed by ctypes, and then no
        # selection would abort the process in llama_sampler_sample.
        array.selected = 0
        self._collect(array)


class _Candidates:
    """A reusable copy of every token's logit at one output, as a ``llama_token_data_array``.

    ``llama_sampler_sample`` fills the array in C and a one-sampler chain
    copies it out: about 4 times faster than filling it from Python.
    """

    def __init__(self, lib: ctypes.CDLL, n_vocab: int) -> None:
        self._lib = lib
        self._data = (L.llama_token_data * n_vocab)()
        self._array = L.llama_token_data_array(self._data, 0, -1, False)
        self._copier = PythonSampler(lib, self._copy)
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self._chain, self._copier.handle)

    def _copy(self, array: L.llama_token_data_array) -> None:
        size = min(array.size, len(self._data))
        ctypes.memmove(self._data, array.data, size * ctypes.sizeof(L.llama_token_data))
        self._array.size = size

    def fill(self, ctx: int, index: int) -> L.llama_token_data_array:
        """The candidates at output ``index`` of ``ctx``, unsorted and with none selected."""
        self._lib.llama_sampler_sample(self._chain, ctx, index)
        self._array.selected, self._array.sorted = -1, False
        return self._array

    def close(self) -> None:
        """Free the copying chain; safe to call twice."""
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


def _seed(value: int) -> int:
    return L.LLAMA_DEFAULT_SEED if value is None or value < 0 else value & 0xFFFFFFFF


def penalty_window(p: SamplingParams) -> int:
    """How many past tokens the penalties look at: ``repeat_last_n``, -1 for the whole context, at most that.

    libllama keeps the window as a buffer of that many tokens, so one option
    must not ask for gigabytes (2**31 tokens would be 8 GiB per request).
    """
    context = max(1, min(p.num_ctx, MAX_NUM_CTX))
    return context if p.repeat_last_n < 0 else min(p.repeat_last_n, context)


def _stages(lib: ctypes.CDLL, vocab: int, p: SamplingParams) -> list[int]:
    stages = []
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    if p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
        stages.append(lib.llama_sampler_init_penalties(
            n_vocab, penalty_window(p), p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
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

    def __init__(self, lib: ctypes.CDLL, piece: Callable[[int], bytes]) -> None:
        self._lib = lib
        self._piece = piece
        self._top: list[tuple[int, float, float]] = []
        self._collector = PythonSampler(lib, self._collect)
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        # The dist sampler's seed only moves its unused draw; a fixed one spares a random_device read.
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_dist(0))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_top_k(MAX_TOP_LOGPROBS))
        lib.llama_sampler_chain_add(self._chain, self._collector.handle)

    def _collect(self, array: L.llama_token_data_array) -> None:
        data = array.data
        self._top = [(data[i].id, data[i].logit, data[i].p) for i in range(array.size)]

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
