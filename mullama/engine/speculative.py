"""Speculative decoding: a small draft model proposes tokens, the target checks them all in one decode.

A :class:`Draft` is a second model with the target's vocabulary, loaded
beside it (``Model(path, draft=draft_path)``, or a Modelfile's ``DRAFT``)
with a context of its own: one sequence per target sequence, the same
``num_ctx``. In each step of the batcher a drafting sequence's draft
proposes up to ``draft_num_predict`` tokens, greedily; the target decodes
its pending token and the proposals in the same batch as every other
sequence's step, with logits at each; the batcher then samples the
target's own token at each position in turn, exactly as it would one step
at a time, and keeps a proposal only while it equals that token. So the
output is the target's own, token for token (greedy or seeded), and a step
yields from one to ``draft_num_predict + 1`` tokens. What was decoded past
the first disagreement is cut from the target's KV cache; the draft's cache
is brought back in step with the target's at its next proposal (its common
prefix kept, the rest read again). With ``draft_p_min`` above 0 a draft
also stops at a token it is unsure of, as llama-server's
``--spec-draft-p-min``: one whose probability among the draft's ten
likeliest tokens is below it (a proposal likely to be rejected costs a
decode of the draft and a position in the target's batch).

Without a draft model, a request may draft from its own text
(``draft_ngram`` N, llama-server's ``--spec-type ngram-simple``): when the
last N tokens (its pending token last) occurred earlier in the sequence,
the tokens that followed them there are proposed, up to
``draft_num_predict``. Text that repeats what came before (code being
edited, a document being quoted or summarised, a list in a set format) is
then read several tokens per step, and verified exactly as a draft model's
proposals are.

Requests with a grammar, with logprobs or with images do not draft, and
neither does a request with the option ``draft`` false.
"""

from __future__ import annotations

import array
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mullama.engine.model import common_prefix
from mullama.engine.sampling import PythonSampler
from mullama.errors import ModelLoadError

if TYPE_CHECKING:
    from mullama.engine.model import Model

log = logging.getLogger("mullama.engine.speculative")

#: How many of the draft's likeliest tokens its confidence is measured among, as llama-server's draft sampler.
_TOP_K = 10


@dataclass
class Proposal:
    """What one sequence asks of the draft: its tokens so far, and how many to propose after them."""

    seq: int
    #: The target's cached tokens of the sequence plus its pending (sampled, not yet decoded) token.
    tokens: list[int]
    limit: int
    #: Stop at a proposal whose probability among the draft's ten likeliest tokens is below this (0: never).
    p_min: float = 0.0
    #: The draft's proposals, filled by :meth:`Draft.propose`.
    drafted: list[int] = field(default_factory=list)
    #: Set once the draft was unsure of its next token (see ``p_min``).
    unsure: bool = False


def ngram_proposal(history: Sequence[int], pending: int, n: int, limit: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the last ``n`` tokens, as llama-server finds them.

    The last ``n`` tokens are ``history``'s last ``n - 1`` and ``pending``.
    As llama.cpp's ``common_ngram_simple_draft``: the history must hold more
    than ``n + limit + 1`` tokens, the occurrence must start after the first
    token and end before the last, and fewer than ``n`` tokens after it
    propose nothing. Returns at most ``limit`` tokens.
    """
    length = len(history)
    if n < 1 or limit < 1 or length <= n + limit + 1:
        return []
    tokens = array.array("i", history)
    pattern = array.array("i", history[length - n + 1:])
    pattern.append(pending)
    # bytes.rfind searches at C speed; a match that does not start on a token boundary is searched past.
    haystack, needle, size = tokens.tobytes(), pattern.tobytes(), tokens.itemsize
    end = (length - 1) * size
    while True:
        found = haystack.rfind(needle, size, end)
        if found < 0:
            return []
        if found % size == 0:
            break
        end = found + len(needle) - 1
    after = found // size + n
    count = min(limit, length - after)
    return list(history[after:after + count]) if count >= n else []


def check_vocabulary(target: Model, draft: Model) -> None:
    """Raise :class:`ModelLoadError` unless ``draft`` has exactly ``target``'s vocabulary.

    A proposal is a token id: the same id must mean the same text in both.
    """
    lib = target.lib
    same = (target.n_vocab == draft.n_vocab
            and lib.llama_vocab_type(target.vocab) == lib.llama_vocab_type(draft.vocab)
            and target.add_bos == draft.add_bos
            and lib.llama_vocab_bos(target.vocab) == lib.llama_vocab_bos(draft.vocab)
            and lib.llama_vocab_eos(target.vocab) == lib.llama_vocab_eos(draft.vocab)
            and all(lib.llama_vocab_get_text(target.vocab, t) == lib.llama_vocab_get_text(draft.vocab, t)
                    for t in range(target.n_vocab)))
    if not same:
        raise ModelLoadError(f"the draft model {draft.path.name} does not share the vocabulary of "
                             f"{target.path.name}, so it cannot draft for it")


class Draft:
    """A draft model loaded for ``target``, with the target's load options; free it with :meth:`close`."""

    def __init__(self, target: Model, path: str | os.PathLike[str], *, stall_timeout: float = float("inf"),
                 devices: Sequence[int] | None = None) -> None:
        from mullama.engine.model import Model  # the target's module builds on this one

        lib = target.lib
        if lib.llama_model_is_recurrent(target.ptr) or lib.llama_model_is_hybrid(target.ptr):
            # Rejected proposals are cut from the KV cache, which a recurrent state cannot be.
            raise ModelLoadError(f"{target.path.name} is a recurrent model: it cannot decode speculatively")
        self.model = Model(path, target.options, stall_timeout=stall_timeout, devices=devices)
        lib = self.model.lib
        self._greedy = self._confident = None
        try:
            check_vocabulary(target, self.model)
            self._greedy = lib.llama_sampler_init_greedy()
            # llama-server's draft sampler: the ten likeliest tokens, the first of them drafted.
            self._top = PythonSampler(lib, self._note_top)
            self._confident = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(self._confident, lib.llama_sampler_init_top_k(_TOP_K))
            lib.llama_sampler_chain_add(self._confident, self._top.handle)
        except BaseException:
            self.close()
            raise
        self._top_p = 1.0
        self.ctx = self.model.context

    def propose(self, proposals: list[Proposal]) -> None:
        """Fill each proposal's ``drafted`` with up to ``limit`` tokens the draft picks greedily.

        First the draft reads what it lacks of each sequence (all of a new
        prompt, or the last accepted tokens), then one token per still
        drafting sequence per decode. What it reads first is one batch at
        most, so a long prompt does not hold up every sequence's step: a
        sequence whose tokens do not all fit drafts nothing this time and
        goes on reading at its next proposal. A proposal that reaches an end of
        generation stops before it. A failed decode drafts nothing more, and
        the sequences it touched are read again next time.
        """
        ctx = self.ctx
        batch = ctx.batch
        batch.clear()
        fed: list[tuple[int, int]] = []
        outputs: list[tuple[Proposal, int]] = []
        try:
            for proposal in proposals:
                cached = ctx.cached[proposal.seq]
                tokens = proposal.tokens
                keep = min(common_prefix(cached, tokens), len(tokens) - 1)
                if keep < len(cached):
                    ctx.forget(proposal.seq, keep)
                for i in range(keep, len(tokens)):
                    if batch.n == batch.capacity:
                        break
                    last = i == len(tokens) - 1
                    index = batch.add(tokens[i], i, proposal.seq, last)
                    fed.append((proposal.seq, tokens[i]))
                    if last:
                        outputs.append((proposal, index))
            self._decode(fed, outputs)
            active = [p for p in proposals if self._goes_on(p)]
            while active:
                for proposal in active:
                    index = batch.add(proposal.drafted[-1], len(ctx.cached[proposal.seq]), proposal.seq, True)
                    fed.append((proposal.seq, proposal.drafted[-1]))
                    outputs.append((proposal, index))
                self._decode(fed, outputs)
                active = [p for p in active if self._goes_on(p)]
            for proposal in proposals:
                # The target ends at an end of generation it samples itself: checking one proposed gains nothing.
                if proposal.drafted and self.model.is_end_of_generation(proposal.drafted[-1]):
                    proposal.drafted.pop()
        except Exception:  # drafting is an optimisation: the target goes on without it
            log.exception("the draft model failed; these sequences go on without drafts")
            for proposal in proposals:
                ctx.forget(proposal.seq, 0)
                proposal.drafted.clear()
            batch.clear()

    def _goes_on(self, proposal: Proposal) -> bool:
        return 0 < len(proposal.drafted) < proposal.limit and not proposal.unsure \
            and not self.model.is_end_of_generation(proposal.drafted[-1])

    def _note_top(self, candidates: Any) -> None:
        """Record the probability of the likeliest of the (top-k) candidates, and select it."""
        logits = [candidates.data[i].logit for i in range(candidates.size)]
        best = max(range(len(logits)), key=logits.__getitem__)
        candidates.selected = best
        self._top_p = 1.0 / math.fsum(math.exp(logit - logits[best]) for logit in logits)

    def _pick(self, proposal: Proposal, index: int) -> None:
        """Draft the next token of ``proposal`` at output ``index``, unless the draft is unsure of it."""
        lib, ctx = self.model.lib, self.ctx.ptr
        if proposal.p_min <= 0:
            proposal.drafted.append(lib.llama_sampler_sample(self._greedy, ctx, index))
            return
        token = lib.llama_sampler_sample(self._confident, ctx, index)
        if self._top_p < proposal.p_min:
            proposal.unsure = True
        else:
            proposal.drafted.append(token)

    def _decode(self, fed: list[tuple[int, int]], outputs: list[tuple[Proposal, int]]) -> None:
        """Decode the batch, record what it fed, and draft a token at each of ``outputs``; empties all three."""
        ctx = self.ctx
        if ctx.batch.n:
            ctx.decode(ctx.batch)
        for seq, token in fed:
            ctx.cached[seq].append(token)
        for proposal, index in outputs:
            self._pick(proposal, index)
        ctx.batch.clear()
        fed.clear()
        outputs.clear()

    def close(self) -> None:
        """Free the draft model and its context; safe to call twice."""
        for name in ("_greedy", "_confident"):
            sampler = getattr(self, name, None)
            if sampler:
                self.model.lib.llama_sampler_free(sampler)
                setattr(self, name, None)
        self.model.close()
