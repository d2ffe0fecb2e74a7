"""Continuous batching: every generation of a model runs through one decode loop.

A :class:`Batcher` owns the generation context of a :class:`Model` (its
``num_parallel`` sequences). Each turn of its decode loop admits waiting
requests, then builds a single batch holding the next token of every
generating sequence plus chunks of the prompts still being read, decodes it
once, and samples each sequence whose logits came out. Callers only call
:meth:`Batcher.submit` and read the :class:`Request` it returns::

    batcher = Batcher(model)
    request = batcher.submit(model.tokenize(prompt), {"temperature": 0, "num_predict": 32})
    for piece in request:
        print(piece, end="")
    print(request.result.done_reason)

``submit(..., logprobs=True)`` also gives each token's log probability:
:meth:`Request.pieces` yields them with the text they produced.

The same loop runs in one of two ways. The daemon's batcher has an engine
thread of its own, so HTTP threads never decode. The batcher behind
:meth:`Model.generate` (``thread=False``, made by :attr:`Model.batcher`)
has none: a caller that waits for output runs turns of the loop itself, as
a plain generation loop would, so nothing decodes ahead of what is read and
a cancel lands before the next token; callers in several threads advance
each other's requests in shared batches.

Requests wait in a bounded FIFO queue for a free sequence. A free sequence
whose KV cache shares the longest prefix with the new prompt is chosen, so a
conversation that goes on only pays for its new tokens. A longer prefix held
by any other sequence (a shared system prompt), even one still generating or
still reading it, is copied from its KV cache rather than read again.

A prompt may hold images (``submit(..., images=...)``, see
:mod:`mullama.engine.vision`): their embeddings stand in the prompt as
placeholder ids, so prefix reuse and sharing treat an image like the tokens
around it (a prefix is never cut inside an image). The projector's thread
encodes an image once a request needs it; meanwhile the request waits and
the others go on. Encoded, an image is read into the request's sequence in
decodes of its own, at most ``num_batch`` embeddings each, one per turn of
the loop, as llama.cpp's server reads them, so text and image requests
share the model's sequences and no image holds the others up longer than a
chunk of text prompt would.

A model has one batcher at a time (:attr:`Model.batcher`), the only user of
``model.context``. Embeddings use their own context and run alongside:
:meth:`Batcher.embed` packs the inputs of concurrent calls into shared
decodes, and so does :meth:`Batcher.score` with a reranker's (query,
document) pairs.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mullama.engine.model import Batch, Completion, Context, Model, Timings, common_prefix, l2_normalize
from mullama.errors import BadRequestError, CancelledError, MullamaError, OverloadedError
from mullama.engine.sampling import LogprobReader, Sampler, SamplingParams, TokenLogprob, check_top_logprobs
from mullama.engine.speculative import Proposal, ngram_proposal
from mullama.engine.textstream import TextStream
from mullama.options import Options

if TYPE_CHECKING:
    from mullama.engine.vision import ImageChunk

log = logging.getLogger("mullama.engine.batching")

#: Marks the end of a request's output queue.
_END = object()

#: Shorter shared prefixes are evaluated again rather than copied from another sequence.
_MIN_SHARED_TOKENS = 4

#: Ollama's default ``num_keep``: prompt tokens kept at the front when a prompt is cut.
DEFAULT_NUM_KEEP = 4


def fit_prompt(tokens: list[int], n_ctx: int, num_keep: int = DEFAULT_NUM_KEEP, *, add_bos: bool = False,
               truncate: bool = True) -> tuple[list[int], int]:
    """Ollama's rule for a prompt that does not fit a context of ``n_ctx`` tokens; returns it and the count dropped.

    A prompt of up to ``n_ctx - 1`` tokens is left alone. A longer one is
    refused with :class:`BadRequestError` when ``truncate`` is False;
    otherwise its first ``keep`` tokens stay, where ``keep`` is
    ``num_keep`` (the whole prompt when negative) plus one when the
    tokenizer adds a BOS token, at most ``n_ctx - 1``, and the oldest
    tokens after them are dropped until ``n_ctx - max((n_ctx - keep) // 2, 1)``
    remain.

    This is Ollama's ``completionPromptForRequest`` with
    ``contextShiftPromptLimit`` (llm/llama_server.go, commit c191a145b,
    "preserve generation headroom for shifted prompts"); its own test cases
    are in tests/test_batching.py. Why the limit: cut to ``n_ctx - 1``
    tokens (Ollama's rule before that commit, and Mullama's in-process one
    before this function), a prompt leaves room for one generated token.
    Ollama's older runners cut to ``n_ctx`` and then, on the first
    generated token, shifted the context, dropping half of what follows
    ``keep``; cutting straight to where that shift landed leaves about half
    of the context for the answer. Mullama does not shift the context: a
    generation that fills it ends with done_reason "length", as Ollama's
    runners do with ``shift: false``. ``Model.generate`` and the daemon
    both submit to a :class:`Batcher`, so this one rule serves both.
    """
    cut = _cut(len(tokens), n_ctx, num_keep, add_bos, truncate)
    if cut is None:
        return tokens, 0
    keep, dropped = cut
    return tokens[:keep] + tokens[keep + dropped:], dropped


def fit_prompt_with_images(tokens: list[int], images: list[ImageChunk], n_ctx: int,
                           num_keep: int = DEFAULT_NUM_KEEP, *, add_bos: bool = False,
                           truncate: bool = True) -> tuple[list[int], int, list[ImageChunk]]:
    """:func:`fit_prompt` for a prompt with images: an image is dropped whole or kept whole.

    Returns the prompt, the count of tokens dropped, and the images left
    (with their new places); the images dropped are released.
    """
    cut = _cut(len(tokens), n_ctx, num_keep, add_bos, truncate)
    if cut is None:
        return tokens, 0, images
    start, end = cut[0], cut[0] + cut[1]
    for image in images:
        if image.start < start < image.end:
            start = image.start
        if image.start < end < image.end:
            end = image.end
    kept = []
    for image in images:
        if start <= image.start and image.end <= end:
            image.release()
            continue
        if image.start >= end:
            image.start -= end - start
        kept.append(image)
    return tokens[:start] + tokens[end:], end - start, kept


def _cut(n_tokens: int, n_ctx: int, num_keep: int, add_bos: bool, truncate: bool) -> tuple[int, int] | None:
    """Where :func:`fit_prompt` cuts a prompt of ``n_tokens``: (tokens kept at the front, tokens dropped after them)."""
    if n_tokens < n_ctx:
        return None
    if not truncate:
        raise BadRequestError(f"the prompt has {n_tokens} tokens but the context holds {n_ctx} "
                              f"(at most {n_ctx - 1} for the prompt); shorten it or raise num_ctx")
    keep = n_tokens if num_keep < 0 else num_keep
    keep = max(0, min(keep + add_bos, n_ctx - 1))
    limit = n_ctx - max((n_ctx - keep) // 2, 1)
    log.warning("prompt of %d tokens truncated to %d to fit a context of %d tokens (num_keep=%d)",
                n_tokens, limit, n_ctx, num_keep)
    return keep, n_tokens - limit


class Request:
    """One generation submitted to a :class:`Batcher`.

    Iterate it for text pieces as they are produced (iteration blocks, and
    raises the error if the generation failed), or iterate :meth:`pieces`
    for the logprobs too; afterwards ``result`` holds the :class:`Completion`.
    Leaving the iteration early cancels the request.
    """

    def __init__(self, batcher: Batcher, tokens: list[int], truncated: int, sampler: Sampler,
                 stream: TextStream, num_predict: int, logprobs: bool = False, top_logprobs: int = 0,
                 images: Sequence[ImageChunk] = (), draft_limit: int = 0, draft_p_min: float = 0.0,
                 draft_ngram: int = 0, backend_sampling: bool = False) -> None:
        #: The prompt as the model reads it (after any truncation); placeholder ids where images go.
        self.tokens = tokens
        #: The prompt's images, in order.
        self.images = list(images)
        #: Prompt tokens dropped to fit the context.
        self.truncated = truncated
        #: The completion, set once the request is done (None while it runs or if it failed).
        self.result: Completion | None = None
        #: The exception that ended the request, if it failed.
        self.error: BaseException | None = None
        #: Whether each token's logprob is computed, and how many alternatives come with it.
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self._scheduler = batcher
        self._sampler = sampler
        self._stream = stream
        self._num_predict = num_predict
        self._output: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = False
        # Decode-loop state, meaningful once the request holds a sequence.
        self._seq = -1
        self._cached: list[int] = []
        self._fed = 0
        self._chunk_end = 0
        #: An earlier request still reading a prefix this one shares, and how many tokens of it;
        #: this one waits for them and copies them instead of reading them too.
        self._awaits: Request | None = None
        self._awaited = 0
        self._pending = -1
        self._out = -1
        #: The most tokens the model's draft proposes per step for this request (0: it does not draft),
        #: and its proposals of the current step, decoded after ``_pending``.
        self._draft_limit = draft_limit
        #: The draft stops proposing at a token it is less sure of than this (see mullama.engine.speculative).
        self._draft_p_min = draft_p_min
        #: Draft from the sequence's own text with n-grams of this size instead of the draft model (0: not).
        self._draft_ngram = draft_ngram
        #: Whether to ask llama.cpp to sample in the model's graph once the request holds a sequence.
        self._backend_sampling = backend_sampling
        self._drafted: list[int] = []
        self._pieces: list[str] = []
        #: Logprobs of sampled tokens whose text the stream still holds back.
        self._held: list[TokenLogprob] = []
        #: Pieces of this step not yet handed to the reader (see :meth:`Batcher._publish`).
        self._outbox: list[tuple[str, list[TokenLogprob]]] = []
        self._completion = Completion(truncated=truncated, timings=Timings())
        self._submitted = time.perf_counter_ns()
        self._started = 0
        self._first_token = 0

    def __iter__(self) -> Iterator[str]:
        for text, _ in self.pieces():
            yield text

    def pieces(self) -> Iterator[tuple[str, list[TokenLogprob]]]:
        """Yield each text piece with the logprobs of the tokens that produced it.

        The list is empty unless the request asked for logprobs. A token
        whose text is held back (part of a UTF-8 character, or maybe of a
        stop string) comes with the piece that finally shows its text; tokens
        that only formed a stop string have no entry.
        """
        take = self._output.get if self._scheduler.threaded else self._drive
        try:
            while True:
                item = take()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                text, logprobs = item
                # Under load several pieces wait here already: handing them over as one
                # spares the reader a write (and the engine thread the GIL) per token.
                terminal = None
                while terminal is None:
                    try:
                        more = self._output.get_nowait()
                    except queue.Empty:
                        break
                    if more is _END or isinstance(more, BaseException):
                        terminal = more
                    else:
                        text, logprobs = text + more[0], logprobs + more[1]
                yield text, logprobs
                if terminal is _END:
                    return
                if terminal is not None:
                    raise terminal
        finally:
            if not self._done.is_set():
                self.cancel()

    def cancel(self) -> None:
        """Stop the generation; its sequence is free again within one decode step. Any thread.

        A step that reads prompt chunks for cancelled requests only is
        aborted between graph nodes.
        """
        self._scheduler._cancel(self)

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the request is done; return its completion or raise its error."""
        scheduler = self._scheduler
        if not scheduler.threaded:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._done.is_set() and (deadline is None or time.monotonic() < deadline):
                scheduler._turn()
        if not self._done.wait(timeout if scheduler.threaded else 0):
            raise TimeoutError("the generation is still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    @property
    def sampled_in_graph(self) -> bool:
        """Whether llama.cpp samples this request's tokens inside the model's graph (``backend_sampling``)."""
        return self._sampler.in_graph

    @property
    def done(self) -> bool:
        """True once the request finished, failed or was cancelled."""
        return self._done.is_set()

    def _image_at(self, index: int) -> ImageChunk | None:
        """The image whose embeddings include prompt position ``index``, if any."""
        for image in self.images:
            if image.start <= index < image.end:
                return image
        return None

    def _text_end(self, index: int) -> int:
        """Where the text run of the prompt from ``index`` ends: the next image, else the prompt's end."""
        for image in self.images:
            if image.end > index:
                return max(index, image.start)
        return len(self.tokens)

    def _snap(self, n: int) -> int:
        """``n`` prompt tokens, or fewer so as not to end inside an image: images are read whole or not at all."""
        image = self._image_at(n)
        return image.start if image is not None and image.start < n else n

    def _release_images(self) -> None:
        for image in self.images:
            image.release()

    def _drive(self) -> Any:
        """The next output item, running turns of the decode loop in this thread until there is one."""
        output, turn = self._output, self._scheduler._turn
        while True:
            try:
                return output.get_nowait()
            except queue.Empty:
                turn()


class Batcher:
    """Runs every generation of one model through a single decode loop.

    With ``thread`` (the daemon's way) an engine thread of its own runs the
    loop; without, the threads waiting for output run it (see the module's
    docstring). A model has one batcher at a time: making one replaces an
    idle one the model made for :meth:`Model.generate`, and refuses if
    another is running. ``max_queue`` bounds the requests that wait for a
    free sequence; past it :meth:`submit` raises :class:`OverloadedError`.
    Call :meth:`close` (or use the batcher as a context manager) to stop it;
    the model stays open.
    """

    def __init__(self, model: Model, *, max_queue: int = 512, thread: bool = True) -> None:
        previous = model._batcher
        if previous is not None:
            if previous.threaded or previous.busy:
                raise MullamaError(f"{model.path.name} already has a running batcher")
            previous.close()
        self.model = model
        self.max_queue = max_queue
        self._ctx: Context = model.context
        self._is_eog = model.is_end_of_generation
        self._token_bytes = model.token_bytes
        self._add_bos = model.add_bos
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        #: Held by whoever runs a turn of the loop: only one at a time.
        self._turning = threading.Lock()
        self._waiting: collections.deque[Request] = collections.deque()
        #: The request holding each sequence, or None.
        self._slots: list[Request | None] = [None] * self._ctx.n_seq
        #: Holders in admission order, which is also the order prompts are read in.
        self._running: list[Request] = []
        #: The requests of a decode in progress that reads prompt chunks (one that :meth:`_cancel` may abort).
        self._abortable: list[Request] = []
        self._last_used = [0] * self._ctx.n_seq
        self._admissions = 0
        self._closing = False
        #: Per sequence, the sampler chain left running in the graph by its last request (``backend_sampling``):
        #: attaching a chain re-plans the graph at the next decode, so while the batcher is busy a next request
        #: on the sequence that samples the same way takes it over instead.
        self._graph_samplers: list[Sampler | None] = [None] * self._ctx.n_seq
        self._logprobs = LogprobReader(model.lib, model.token_bytes)
        self._draft = model.draft
        self._embedder = EmbeddingBatcher(model)
        self._projector = model.projector
        self._thread: threading.Thread | None = None
        model._batcher = self
        if thread:
            self._thread = threading.Thread(target=self._loop, name=f"mullama-engine-{model.path.name}", daemon=True)
            self._thread.start()

    # --- public API ------------------------------------------------------------

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, tokens: Sequence[int], options: Any = None, *, grammar: str | None = None,
               truncate: bool = True, logprobs: bool = False, top_logprobs: int = 0,
               images: Sequence[ImageChunk] = ()) -> Request:
        """Queue a generation from prompt ``tokens``; options use Ollama's names.

        ``logprobs`` asks for each generated token's log probability and
        ``top_logprobs`` (0 to 20) for that many likeliest alternatives too;
        as in Ollama, ``top_logprobs`` means nothing without ``logprobs``.
        ``images`` are the prompt's images, as the model's projector
        tokenized them with ``tokens`` (``Model.tokenize_with_images``); the
        request owns them from here on and releases them when it ends.

        Raises :class:`BadRequestError` for an empty or invalid prompt, a bad
        grammar, a ``top_logprobs`` out of range, or (with ``truncate=False``)
        a prompt longer than the context; :class:`OverloadedError` when the
        queue is full or the batcher closed.
        """
        images = sorted(images, key=lambda image: image.start)
        try:
            return self._submit(list(tokens), options, grammar, truncate, logprobs, top_logprobs, images)
        except BaseException:
            for image in images:
                image.release()
            raise

    def _submit(self, tokens: list[int], options: Any, grammar: str | None, truncate: bool, logprobs: bool,
                top_logprobs: int, images: list[ImageChunk]) -> Request:
        get = _getter(options)
        if not tokens:
            raise BadRequestError("the prompt is empty")
        self._check_prompt(tokens, images)
        try:
            num_predict = int(_value(get, "num_predict", -1))
            num_keep = int(_value(get, "num_keep", DEFAULT_NUM_KEEP))
            params = SamplingParams.from_options(options or {})
            draft_ngram = max(0, int(_value(get, "draft_ngram", Options.draft_ngram)))
            draft_limit = self._draft_limit(get, grammar, logprobs, images, draft_ngram)
            draft_p_min = float(_value(get, "draft_p_min", Options.draft_p_min))
            if not 0.0 <= draft_p_min <= 1.0:
                raise ValueError(f"draft_p_min must be between 0 and 1, not {draft_p_min}")
            # Logprobs, a grammar and the draft's verification read the logits on the host; images are
            # left to the plain path, as for drafting.
            backend_sampling = (bool(_value(get, "backend_sampling", Options.backend_sampling))
                                and not (grammar or logprobs or images or draft_limit))
        except (TypeError, ValueError) as exc:
            raise BadRequestError(f"invalid option: {exc}") from None
        top_logprobs = check_top_logprobs(top_logprobs)
        if images:
            tokens, truncated, images = fit_prompt_with_images(tokens, images, self._ctx.n_ctx_seq, num_keep,
                                                               add_bos=self._add_bos, truncate=truncate)
        else:
            tokens, truncated = fit_prompt(tokens, self._ctx.n_ctx_seq, num_keep, add_bos=self._add_bos,
                                           truncate=truncate)
        stop = _value(get, "stop", [])
        stream = TextStream(stop=[stop] if isinstance(stop, str) else list(stop))
        sampler = Sampler(self.model.lib, self.model.vocab, params, grammar)
        request = Request(self, tokens, truncated, sampler, stream, num_predict, bool(logprobs), top_logprobs,
                          images, draft_limit, draft_p_min, draft_ngram, backend_sampling)
        with self._wakeup:
            if self._closing:
                sampler.close()
                raise OverloadedError("the model is shutting down")
            if len(self._waiting) >= self.max_queue:
                sampler.close()
                raise OverloadedError(f"server busy: {len(self._waiting)} requests already wait for "
                                      f"{self.model.path.name} (max_queue is {self.max_queue}); retry later")
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def _draft_limit(self, get: Any, grammar: str | None, logprobs: bool, images: list[ImageChunk],
                     ngram: int) -> int:
        """How many tokens the draft model, or the n-gram lookup, may propose per step for a request (0: none).

        The option ``draft`` false turns drafting off, ``draft_num_predict``
        (Ollama's name) sets the count. A grammar would reject most of an
        unconstrained draft's proposals, and logprobs and images are left
        to the plain path: such requests do not draft.
        """
        if (self._draft is None and not ngram) or grammar or logprobs or images or not _value(get, "draft", True):
            return 0
        return max(0, int(_value(get, "draft_num_predict", Options.draft_num_predict)))

    def _check_prompt(self, tokens: list[int], images: list[ImageChunk]) -> None:
        """Every id a token of the vocabulary, except exactly the images' placeholders where they go."""
        n_vocab = self.model.n_vocab
        start = 0
        for image in images:
            if image.projector is not self._projector:
                raise BadRequestError("the images were not tokenized by this model's projector", param="images")
            if image.start < start or tokens[image.start:image.end] != image.placeholders:
                raise BadRequestError("the prompt's image placeholders do not match its images", param="images")
            if self._projector.non_causal and image.n_tokens > self._ctx.n_batch:
                raise BadRequestError(f"an image takes {image.n_tokens} tokens, which this model reads in one batch, "
                                      f"but num_batch is {self._ctx.n_batch}: raise num_batch", param="images")
            if any(not 0 <= t < n_vocab for t in tokens[start:image.start]):
                break
            start = image.end
        else:
            if all(0 <= t < n_vocab for t in tokens[start:]):
                return
        raise BadRequestError(f"the prompt holds a token id outside the vocabulary (0..{n_vocab - 1})")

    def embed(self, texts: str | Sequence[str], *, truncate: bool = True, normalize: bool = True) -> list[list[float]]:
        """Pooled embeddings, as :meth:`Model.embed` gives them; concurrent calls share decodes.

        Runs alongside generation, on the model's embedding context.
        """
        return self._embedder.embed(texts, truncate=truncate, normalize=normalize)

    def score(self, token_lists: list[list[int]]) -> list[float]:
        """Relevance scores of tokenized (query, document) pairs (:meth:`Model.rerank_tokens`), as
        :meth:`Model.score_tokens` gives them; concurrent calls share decodes, with embedding calls' batcher.
        """
        return [vector[0] for vector in self._embedder.pooled(token_lists)]

    def cancel_all(self) -> None:
        """End every queued and running generation with done_reason "cancel"."""
        with self._wakeup:
            waiting = list(self._waiting)
            self._waiting.clear()
            for request in self._running:
                request._cancelled = True
            self._abort_if_all_cancelled()
            self._wakeup.notify()
        for request in waiting:
            request._cancelled = True
            self._finish_unstarted(request)

    def close(self) -> None:
        """Cancel everything and stop the engine thread; safe to call twice."""
        with self._wakeup:
            self._closing = True
        self.cancel_all()
        if self._thread is not None:
            self._thread.join()
        else:
            with self._turning:
                self._shutdown()
        self._embedder.close()
        if self.model._batcher is self:
            self.model._batcher = None

    def strand(self, error: BaseException) -> None:
        """End every queued and running request with ``error`` and take no more, without waiting for the engine.

        For a model whose engine thread can never come back (an RPC worker
        under it stopped answering mid-decode): :meth:`close` would wait for it.
        """
        with self._wakeup:
            self._closing = True
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in waiting:
            request.error = error
            request._sampler.close()
            request._release_images()
            request._output.put(error)
            request._done.set()
        self._fail(list(self._running), error)

    @property
    def threaded(self) -> bool:
        """True when an engine thread of its own runs the decode loop (the daemon's batchers)."""
        return self._thread is not None

    @property
    def busy(self) -> bool:
        """True while any request runs or waits."""
        with self._lock:
            return bool(self._running or self._waiting)

    @property
    def active_count(self) -> int:
        """Requests holding a sequence."""
        with self._lock:
            return len(self._running)

    @property
    def queued_count(self) -> int:
        """Requests waiting for a free sequence."""
        with self._lock:
            return len(self._waiting)

    # --- called from any thread ---------------------------------------------------

    def _cancel(self, request: Request) -> None:
        with self._wakeup:
            if request._done.is_set():
                return
            request._cancelled = True
            try:
                self._waiting.remove(request)
            except ValueError:
                self._abort_if_all_cancelled()
                self._wakeup.notify()
                return
        self._finish_unstarted(request)

    def _abort_if_all_cancelled(self) -> None:
        """Abort the decode in progress when every request in it is cancelled (called with the lock held)."""
        if self._abortable and all(r._cancelled for r in self._abortable):
            self._ctx.abort()

    def _finish_unstarted(self, request: Request) -> None:
        request._completion.done_reason = "cancel"
        request._completion.timings.total_duration = time.perf_counter_ns() - request._submitted
        request._sampler.close()
        request._release_images()
        request.result = request._completion
        request._output.put(_END)
        request._done.set()

    # --- the decode loop: its engine thread, or the threads waiting for output ---

    def _loop(self) -> None:
        """The engine thread of a threaded batcher: turns of the loop while there is work."""
        while True:
            with self._wakeup:
                while not (self._closing or self._waiting or self._running):
                    self._wakeup.wait()
                if self._closing:
                    break
            self._cycle()
        self._shutdown()

    def _turn(self) -> None:
        """Run one turn of the loop in the calling thread, once no other thread runs one (unthreaded batchers)."""
        with self._turning:
            self._cycle()

    def _cycle(self) -> None:
        """One turn of the decode loop: admit waiting requests, end cancelled ones, decode one step.

        Only one thread at a time runs it: the engine thread, or whoever holds ``_turning``.
        """
        with self._lock:
            admitted = self._admit()
        try:
            for request in admitted:
                self._start(request)
            for request in [r for r in self._running if r._cancelled]:
                self._finish(request, "cancel")
            if self._running and not self._step():
                self._wait_for_an_image()
            if not self._running and not self._waiting:
                # Idle: the context is anyone's (Model.context), and it outlives the batcher.
                self._drop_graph_samplers()
        except Exception as exc:  # the loop must outlive any request's failure
            log.exception("generation step failed")
            self._fail(list(self._running), exc)
        except BaseException:
            # A KeyboardInterrupt in a caller's thread may cut a step anywhere: trust no cache it touched.
            for request in list(self._running):
                self._ctx.forget(request._seq, 0)
            self._fail(list(self._running), CancelledError("generation interrupted"))
            raise

    def _shutdown(self) -> None:
        """End what still runs once the batcher closes; safe to call twice."""
        for request in list(self._running):
            self._finish(request, "cancel")
        self._drop_graph_samplers()
        self._logprobs.close()

    def _drop_graph_samplers(self) -> None:
        """Detach and free the chains left in the graph, so that whoever decodes next samples on the host."""
        for seq, sampler in enumerate(self._graph_samplers):
            if sampler is not None:
                sampler.close()
                self._graph_samplers[seq] = None

    def _admit(self) -> list[Request]:
        """Give free sequences to waiting requests, FIFO (called with the lock held)."""
        admitted = []
        free = [seq for seq, holder in enumerate(self._slots) if holder is None]
        while free and self._waiting:
            request = self._waiting.popleft()
            seq = self._choose(free, request.tokens)
            free.remove(seq)
            self._admissions += 1
            self._last_used[seq] = self._admissions
            request._seq = seq
            self._slots[seq] = request
            self._running.append(request)
            admitted.append(request)
        return admitted

    def _choose(self, free: list[int], tokens: list[int]) -> int:
        """The free sequence whose cache holds most of the prompt, else the least recently used one.

        A cache that shares only a little (a chat template's first tokens) is
        not worth evicting a conversation for: it is used only when it holds
        more than half of the prompt, and a smaller shared part is copied
        from it instead (see :meth:`_start`).
        """
        cached = self._ctx.cached
        shared = {seq: common_prefix(cached[seq], tokens) for seq in free}
        best = max(free, key=lambda seq: (shared[seq], -self._last_used[seq]))
        if shared[best] * 2 > len(tokens):
            return best
        return min(free, key=self._last_used.__getitem__)

    def _start(self, request: Request) -> None:
        request._started = time.perf_counter_ns()
        ctx, seq, tokens = self._ctx, request._seq, request.tokens
        request._cached = ctx.cached[seq]
        request._fed = ctx.reuse_prefix(seq, tokens)
        if request.images and request._snap(request._fed) < request._fed:
            request._fed = ctx.forget(seq, request._snap(request._fed))
        donor, shared = self._donor(seq, tokens)
        shared = request._snap(shared)
        if shared > request._fed and self._worth_copying(shared - request._fed):
            request._fed = ctx.share_prefix(donor, seq, shared)
        reader, coming = self._reader(request)
        coming = request._snap(coming)
        if coming > request._fed and self._worth_copying(coming - request._fed):
            request._awaits, request._awaited = reader, coming
        request._completion.timings.prompt_eval_count = len(tokens) - request._fed
        self._sample_in_graph(request)
        # Start encoding what this request will read itself, so it is ready by the time the text before it is read.
        for image in request.images:
            if image.start >= max(request._fed, request._awaited if request._awaits else 0):
                image.encode()

    def _sample_in_graph(self, request: Request) -> None:
        """Give ``request``'s sequence the graph sampling it asks for: its own chain, the same one reset, or none."""
        seq, kept = request._seq, self._graph_samplers[request._seq]
        wanted = request._backend_sampling
        if wanted and kept is not None and kept.params == request._sampler.params:
            request._sampler.close()
            kept.reset()
            request._sampler = kept
            return
        if kept is not None:
            kept.close()
            self._graph_samplers[seq] = None
        if wanted and request._sampler.attach(self._ctx.ptr, seq):
            self._graph_samplers[seq] = request._sampler

    def _donor(self, seq: int, tokens: list[int]) -> tuple[int, int]:
        """The other sequence whose cache shares most of ``tokens`` (busy or not), and how much.

        The last prompt token is never shared: its logits are needed.
        """
        cached = self._ctx.cached
        limit = len(tokens) - 1
        best, shared = -1, 0
        for other in range(len(cached)):
            if other != seq and cached[other]:
                n = min(common_prefix(cached[other], tokens), limit)
                if n > shared:
                    best, shared = other, n
        return best, shared

    def _reader(self, request: Request) -> tuple[Request | None, int]:
        """The started request still reading a prompt that shares most of ``request``'s, and how much.

        Requests that arrive together with one system prompt then read it once.
        """
        limit = len(request.tokens) - 1
        best, shared = None, 0
        for other in self._running:
            if other is request or not other._started or other._pending >= 0:
                continue
            n = min(common_prefix(other.tokens, request.tokens), limit)
            if n > max(shared, other._fed):
                best, shared = other, n
        return best, shared

    def _take_awaited_prefixes(self) -> None:
        """Copy in each awaited prefix that has been read; stop waiting on a reader that ended."""
        for request in self._running:
            reader = request._awaits
            if reader is None:
                continue
            if reader._done.is_set() or reader._cancelled:
                request._awaits = None
            elif reader._fed >= request._awaited:
                if request._awaited > request._fed:
                    request._fed = self._ctx.share_prefix(reader._seq, request._seq, request._awaited)
                    request._completion.timings.prompt_eval_count = len(request.tokens) - request._fed
                request._awaits = None

    def _worth_copying(self, tokens: int) -> bool:
        """Whether copying a sequence's KV cache beats evaluating ``tokens`` prompt tokens.

        Evaluating a token costs about two FLOPs per weight; the copy moves the
        whole sequence cache once. CPUs and GPUs do roughly ten FLOPs in the
        time they move a byte, so the copy pays once the tokens it saves times
        the weights exceed about five times the bytes it moves.
        """
        return tokens >= _MIN_SHARED_TOKENS and tokens * self.model.n_params >= 5 * self._ctx.seq_bytes

    def _step(self) -> bool:
        """One decode: a token for each generating sequence, then prompt chunks in the room left.

        Before it, a chunk of image embeddings may be read in a decode of its
        own. Returns False when there was nothing to decode (every request
        waits for an image to be encoded).
        """
        ctx = self._ctx
        running = self._running
        self._take_awaited_prefixes()
        read_image = self._projector is not None and self._read_image()
        if any(request._draft_limit for request in running):
            self._propose(running)
        batch = ctx.batch
        batch.clear()
        # llama.cpp splits a batch whose sequences are out of order into several
        # ubatches (one compute each): in sequence order the step is ~40% faster.
        for request in sorted(running, key=_seq_of):
            if request._pending >= 0:
                seq, n = request._seq, len(request._cached)
                request._out = batch.add(request._pending, ctx.position(seq, n), seq, True)
                for i, token in enumerate(request._drafted, 1):
                    batch.add(token, ctx.position(seq, n + i), seq, True)
            else:
                request._out = -1
        generating = batch.n
        room = batch.capacity - generating
        for request in running:
            if room <= 0:
                break
            if request._pending < 0 and request._awaits is None:
                prompt = request.tokens
                start, seq, last = request._fed, request._seq, len(prompt) - 1
                end = min(request._text_end(start) if request.images else len(prompt), start + room)
                saved = start - ctx.position(seq, start)
                for i in range(start, end):
                    batch.add(prompt[i], i - saved, seq, i == last)
                if end == len(prompt):
                    request._out = batch.n - 1
                request._chunk_end = end
                room -= end - start
        if batch.n == 0:
            return read_image
        try:
            if batch.n > generating:
                self._decode_abortable(batch)
            else:
                ctx.decode(batch)
        except CancelledError:
            # Aborted for requests that are all cancelled (see _cancel): the next turn ends them.
            for request in running:
                if request._pending >= 0 or request._chunk_end > request._fed:
                    ctx.forget(request._seq, len(request._cached))
            return True
        except Exception as exc:  # noqa: BLE001 - fail the requests in this batch only
            # What a failed decode left in the KV cache is unknown: forget the sequences it touched.
            touched = [r for r in running if r._pending >= 0 or r._chunk_end > r._fed]
            for request in touched:
                ctx.forget(request._seq, 0)
            self._fail(touched, exc)
            return True
        for request in running:
            if request._pending >= 0:
                request._cached.append(request._pending)
                request._pending = -1
            elif request._chunk_end > request._fed:
                request._cached.extend(request.tokens[request._fed:request._chunk_end])
                request._fed = request._chunk_end
        ended: list[tuple[Request, str | Exception]] = []
        for request in running:
            if request._out >= 0:
                try:
                    reason = self._verify(request) if request._drafted else self._advance(request)
                except Exception as exc:  # noqa: BLE001 - fail this request only
                    ended.append((request, exc))
                    continue
                if reason:
                    ended.append((request, reason))
        for request in running:
            self._publish(request)
        for request, outcome in ended:
            if isinstance(outcome, str):
                self._finish(request, outcome)
            else:
                self._fail([request], outcome)
        return True

    def _read_image(self) -> bool:
        """Read a chunk of image embeddings for the first request whose prompt is at an encoded image.

        A request at an image not yet encoded has it encoded and waits. The
        chunk is at most ``num_batch`` embeddings, or the whole image when
        the projector needs non-causal attention (it is then read in one
        decode, as llama.cpp's server reads it). Returns whether it decoded.
        """
        for request in list(self._running):
            if request._pending >= 0 or request._awaits is not None or request._cancelled:
                continue
            image = request._image_at(request._fed)
            if image is None:
                continue
            if not image.ready.is_set():
                image.encode()
                continue
            if image.error is not None:
                self._fail([request], image.error)
                continue
            self._decode_image(request, image)
            return True
        return False

    def _decode_image(self, request: Request, image: ImageChunk) -> None:
        """Decode the next chunk of ``image``'s embeddings into ``request``'s sequence; sample if it ends the prompt."""
        projector = self._projector
        assert projector is not None and image.embeddings is not None
        ctx, fed, seq = self._ctx, request._fed, request._seq
        batch = ctx.embedding_batch(projector.n_embd, mrope=projector.mrope)
        causal = not projector.non_causal
        first = fed - image.start
        n = image.n_tokens - first
        if causal:
            n = min(n, batch.capacity)
        end = fed + n
        last = end == len(request.tokens)
        try:
            pos = ctx.position(seq, image.start)
            positions = image.positions(pos, first, n) if projector.mrope else range(pos + first, pos + first + n)
            batch.fill(image.embeddings, first, n, positions, seq, last)
            ctx.decode(batch, causal=causal)
        except Exception as exc:  # noqa: BLE001 - fail this request only
            ctx.forget(seq, 0)
            self._fail([request], exc)
            return
        request._cached.extend(request.tokens[fed:end])
        request._fed = request._chunk_end = end
        if end == image.end and image.n_pos != image.n_tokens:
            # Text after an M-RoPE image goes on from its n_pos positions on (as libmtmd's helper counts).
            ctx.skip_positions(seq, end, image.n_tokens - image.n_pos)
        if not last:
            return
        request._out = n - 1
        try:
            reason = self._advance(request)
        except Exception as exc:  # noqa: BLE001 - fail this request only
            self._fail([request], exc)
            return
        if reason:
            self._finish(request, reason)
        else:
            self._publish(request)

    def _wait_for_an_image(self) -> None:
        """Wait (briefly, so cancels and new requests are seen) for an image a request waits for to be encoded."""
        for request in self._running:
            image = request._image_at(request._fed) if request._pending < 0 else None
            if image is not None and not image.ready.is_set():
                image.ready.wait(0.05)
                return

    def _decode_abortable(self, batch: Batch) -> None:
        """Decode a batch that reads prompt chunks, abortable while it runs: such a decode takes long.

        Only a cancel of every request in it aborts it, so no request fails for another's cancel.
        """
        ctx = self._ctx
        ctx.clear_abort()
        with self._lock:
            self._abortable = [r for r in self._running if r._pending >= 0 or r._chunk_end > r._fed]
            self._abort_if_all_cancelled()
        try:
            ctx.decode(batch, abortable=True)
        finally:
            with self._lock:
                self._abortable = []

    def _propose(self, running: list[Request]) -> None:
        """Draft the next tokens of each drafting request, in room the step has.

        A request with ``draft_ngram`` drafts from its own text, the others
        with the draft model. A request drafts no further than its
        ``num_predict`` or its context allow; the proposals of all requests
        share the target's batch with every generating sequence's token.
        """
        ctx = self._ctx
        room = ctx.batch.capacity - sum(1 for r in running if r._pending >= 0)
        proposals: list[tuple[Request, Proposal]] = []
        for request in sorted(running, key=_seq_of):
            request._drafted = []
            if request._pending < 0 or not request._draft_limit:
                continue
            limit = min(request._draft_limit, ctx.n_ctx_seq - len(request._cached) - 1, room)
            if request._num_predict > 0:
                # This step samples up to limit + 1 tokens.
                limit = min(limit, request._num_predict - request._completion.timings.eval_count - 1)
            if limit <= 0:
                continue
            if request._draft_ngram:
                request._drafted = ngram_proposal(request._cached, request._pending, request._draft_ngram, limit)
                room -= len(request._drafted)
            else:
                proposals.append((request, Proposal(request._seq, request._cached + [request._pending], limit,
                                                    request._draft_p_min)))
                room -= limit
        if not proposals:
            return
        assert self._draft is not None
        self._draft.propose([proposal for _, proposal in proposals])
        for request, proposal in proposals:
            request._drafted = proposal.drafted

    def _verify(self, request: Request) -> str:
        """Sample ``request``'s tokens along its proposals, decoded this step; keep them while they agree.

        Each token is sampled as :meth:`_advance` samples one step's, from the
        logits after the tokens kept so far, so the output is exactly what it
        would be without a draft. What was decoded after the first
        disagreement leaves the KV cache. Returns a done reason, or "".
        """
        drafted, request._drafted = request._drafted, []
        timings = request._completion.timings
        timings.draft_proposed += len(drafted)
        accepted = 0
        try:
            for token in drafted:
                reason = self._advance(request)
                if reason or request._pending != token:
                    return reason
                # The model picked the proposal, which this step decoded already: it is cached.
                request._cached.append(token)
                request._pending = -1
                request._out += 1
                accepted += 1
            return self._advance(request)
        finally:
            timings.draft_accepted += accepted
            if accepted < len(drafted):
                self._ctx.forget(request._seq, len(request._cached))

    def _advance(self, request: Request) -> str:
        """Sample the next token of ``request``; return a done reason, or "" to go on."""
        token = request._sampler.sample(self._ctx.ptr, request._out)
        if not request._first_token:
            request._first_token = time.perf_counter_ns()
        if self._is_eog(token):
            return "stop"
        completion = request._completion
        completion.tokens.append(token)
        completion.timings.eval_count += 1
        if request.logprobs:
            request._held.append(self._logprobs.read(self._ctx.ptr, request._out, token, request.top_logprobs))
        stream = request._stream
        text = stream.feed(self._token_bytes(token))
        if text:
            self._emit(request, text)
        if stream.stopped:
            return "stop"
        if completion.timings.eval_count == request._num_predict or len(request._cached) >= self._ctx.n_ctx_seq:
            return "length"
        request._pending = token
        return ""

    @staticmethod
    def _emit(request: Request, text: str) -> None:
        """Record ``text`` for the caller with the logprobs of the tokens it completes; see :meth:`_publish`."""
        logprobs, request._held = request._held, []
        request._completion.logprobs += logprobs
        request._pieces.append(text)
        request._outbox.append((text, logprobs))

    @staticmethod
    def _publish(request: Request) -> None:
        """Hand the pieces recorded for ``request`` to its reader.

        Called once the step has sampled every sequence, so a reader (an
        HTTP thread, which then wants the GIL) wakes after the engine's
        work for the step is done, and once per step.
        """
        outbox = request._outbox
        if not outbox:
            return
        if len(outbox) == 1:
            request._output.put(outbox[0])
        else:
            texts, logprobs = zip(*outbox)
            request._output.put(("".join(texts), [entry for held in logprobs for entry in held]))
        outbox.clear()

    def _finish(self, request: Request, reason: str) -> None:
        """Complete a running request and free its sequence."""
        tail = request._stream.finish()
        if tail:
            self._emit(request, tail)
        self._publish(request)
        now = time.perf_counter_ns()
        completion = request._completion
        completion.done_reason = reason
        completion.text = "".join(request._pieces)
        completion.stop_sequence = request._stream.stop_hit
        completion.context = request.tokens + completion.tokens
        timings = completion.timings
        first = request._first_token or now
        timings.prompt_eval_duration = first - request._started
        timings.eval_duration = now - first
        timings.total_duration = now - request._submitted
        request.result = completion
        self._release(request)
        request._output.put(_END)
        request._done.set()

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        """End ``requests`` with ``error``, raised to whoever iterates or waits on them."""
        for request in requests:
            if request._done.is_set():
                continue
            request.error = error
            self._release(request)
            self._publish(request)
            request._output.put(error)
            request._done.set()

    def _release(self, request: Request) -> None:
        # A chain running in the graph stays there for the sequence's next request (see _sample_in_graph), and
        # is detached before it is freed, by the engine's thread: this may run in another (Batcher.strand).
        if self._graph_samplers[request._seq] is not request._sampler:
            request._sampler.close()
        request._release_images()
        request._pending = -1
        with self._lock:
            self._slots[request._seq] = None
            self._running.remove(request)


@dataclass
class _EmbedJob:
    """One embedding call waiting for the batcher's thread."""

    tokens: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: list[list[float]] = field(default_factory=list)
    error: BaseException | None = None


class EmbeddingBatcher:
    """Packs the inputs of concurrent embedding (or reranking) calls into shared decodes.

    Callers tokenize in their own thread and queue a job; one worker thread
    takes every job waiting, gives later callers ``window`` seconds to join
    unless the embedding context is already full, and decodes all their
    inputs together (one sequence each, as many per decode as fit). The
    first caller pays at most ``window`` of latency; under load, jobs pile up
    while a decode runs and the next decode takes them all.
    """

    def __init__(self, model: Model, *, window: float = 0.002) -> None:
        self.model = model
        self.window = window
        self._wakeup = threading.Condition()
        self._jobs: list[_EmbedJob] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    def embed(self, texts: str | Sequence[str], *, truncate: bool = True, normalize: bool = True) -> list[list[float]]:
        """Pooled embeddings, one per input, L2-normalised unless ``normalize`` is False.

        Raises :class:`BadRequestError` for an empty input or (with
        ``truncate=False``) one longer than the context, before anything is
        queued; :class:`OverloadedError` once the batcher is closed.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        vectors = self.pooled([self.model.embedding_tokens(text, truncate=truncate) for text in texts])
        return [l2_normalize(v) for v in vectors] if normalize else vectors

    def pooled(self, token_lists: list[list[int]]) -> list[list[float]]:
        """What pooling gives for each tokenized input, as :meth:`Model.embed_tokens` does, sharing decodes.

        An embedding (not normalised) for an embedding model, the classes'
        scores for a reranker. Raises :class:`OverloadedError` once the
        batcher is closed.
        """
        if not token_lists:
            return []
        job = _EmbedJob(token_lists)
        with self._wakeup:
            if self._closing:
                raise OverloadedError("the model is shutting down")
            if self._thread is None:
                ctx = self.model.embedding_context
                self._thread = threading.Thread(target=self._loop, args=(ctx.n_seq, ctx.n_batch), daemon=True,
                                                name=f"mullama-embed-{self.model.path.name}")
                self._thread.start()
            self._jobs.append(job)
            self._wakeup.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.vectors

    def close(self) -> None:
        """Finish the queued jobs and stop the worker thread; safe to call twice."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self, n_seq: int, n_batch: int) -> None:
        while True:
            with self._wakeup:
                while not (self._jobs or self._closing):
                    self._wakeup.wait()
                if not self._jobs:
                    return
                deadline = time.monotonic() + self.window
                while not self._closing and not self._full(n_seq, n_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wakeup.wait(left)
                jobs, self._jobs = self._jobs, []
            self._run(jobs)

    def _full(self, n_seq: int, n_batch: int) -> bool:
        """True when the waiting inputs already fill a decode (called with the lock held)."""
        inputs = [tokens for job in self._jobs for tokens in job.tokens]
        return len(inputs) >= n_seq or sum(map(len, inputs)) >= n_batch

    def _run(self, jobs: list[_EmbedJob]) -> None:
        try:
            vectors = self.model.embed_tokens([tokens for job in jobs for tokens in job.tokens])
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        start = 0
        for job in jobs:
            job.vectors = vectors[start:start + len(job.tokens)]
            start += len(job.tokens)
            job.done.set()


def _seq_of(request: Request) -> int:
    return request._seq


def _getter(options: Any) -> Any:
    if options is None:
        return lambda name, default: default
    if isinstance(options, dict):
        return options.get
    return lambda name, default: getattr(options, name, default)


def _value(get: Any, name: str, default: Any) -> Any:
    value = get(name, default)
    return default if value is None else value
