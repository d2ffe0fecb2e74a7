"""Token log probabilities on the real model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mullama
from mullama import service
from mullama.errors import BadRequestError
from mullama.engine.sampling import MAX_TOP_LOGPROBS, LogprobReader, check_top_logprobs
from mullama.engine.batching import Batcher
from mullama.prompt.thinking import ThinkingSplitter

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def model(model_path):
    with mullama.Model(model_path, num_ctx=512, num_parallel=2, num_thread=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def batcher(model):
    with Batcher(model) as running:
        yield running


def prompt(model, question="Name three colours."):
    return model.tokenize(CHAT.format(question))


def log_softmax(logits: list[float]) -> list[float]:
    """The reference: a plain, exact log-softmax in Python."""
    top = max(logits)
    lse = top + math.log(math.fsum(math.exp(x - top) for x in logits))
    return [x - lse for x in logits]


def test_reader_matches_a_pure_python_log_softmax(model):
    ctx = model.context
    tokens = model.tokenize("The capital of France is")
    ctx.forget(0)
    batch = ctx.batch
    batch.clear()
    for pos, token in enumerate(tokens):
        batch.add(token, pos, 0, pos == len(tokens) - 1)
    ctx.decode(batch)
    ctx.cached[0].extend(tokens)
    expected = log_softmax(model.lib.llama_get_logits_ith(ctx.ptr, -1)[:model.n_vocab])
    ranked = sorted(range(model.n_vocab), key=lambda t: -expected[t])
    unlikely = ranked[5000]
    reader = LogprobReader(model.lib, model.token_bytes)
    try:
        entry = reader.read(ctx.ptr, -1, unlikely, MAX_TOP_LOGPROBS)
    finally:
        reader.close()
        ctx.forget(0)
    assert entry.id == unlikely and entry.raw == model.token_bytes(unlikely)
    assert entry.logprob == pytest.approx(expected[unlikely], abs=1e-5)
    assert [alt.id for alt in entry.top_logprobs] == ranked[:MAX_TOP_LOGPROBS]
    for alt in entry.top_logprobs:
        assert alt.logprob == pytest.approx(expected[alt.id], abs=1e-5)
        assert alt.token == model.token_bytes(alt.id).decode("utf-8", "replace")
    assert entry.top_logprobs[0].token == " Paris"


def test_greedy_tokens_are_the_likeliest_and_aligned_with_the_text(model, batcher):
    request = batcher.submit(prompt(model), GREEDY, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
    pieces = list(request.pieces())
    result = request.wait(60)
    assert len(result.logprobs) == len(result.tokens) > 5
    assert [e.id for e in result.logprobs] == result.tokens
    for entry in result.logprobs:
        best = entry.top_logprobs[0]
        assert len(entry.top_logprobs) == MAX_TOP_LOGPROBS
        assert entry.logprob <= 0
        assert (best.id, best.logprob) == (entry.id, entry.logprob)
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))
        assert sum(math.exp(alt.logprob) for alt in entry.top_logprobs) <= 1 + 1e-6
    # Each piece carries exactly the tokens that spelled it.
    for text, entries in pieces:
        assert "".join(e.token for e in entries) == text
    assert [e for _, entries in pieces for e in entries] == result.logprobs


def test_logprobs_are_absent_unless_requested(model, batcher):
    request = batcher.submit(prompt(model), GREEDY)
    assert all(entries == [] for _, entries in request.pieces())
    assert request.wait(60).logprobs == []
    request = batcher.submit(prompt(model), GREEDY, top_logprobs=5)
    assert request.wait(60).logprobs == []


def test_zero_alternatives_still_gives_each_token_its_logprob(model, batcher):
    request = batcher.submit(prompt(model), GREEDY, logprobs=True)
    result = request.wait(60)
    assert len(result.logprobs) == len(result.tokens) > 5
    assert all(e.top_logprobs == () and e.logprob <= 0 for e in result.logprobs)


def test_sampled_tokens_get_the_raw_distributions_logprob(model, batcher):
    # Temperature and top_k change what is drawn, not the reported probabilities.
    options = {"temperature": 1.5, "top_k": 100, "seed": 7, "num_predict": 24}
    result = batcher.submit(prompt(model, "Tell me a story."), options, logprobs=True, top_logprobs=3).wait(60)
    greedy = batcher.submit(prompt(model, "Tell me a story."), dict(GREEDY, num_predict=1),
                              logprobs=True, top_logprobs=3).wait(60)
    assert result.logprobs[0].top_logprobs == greedy.logprobs[0].top_logprobs
    assert all(e.logprob <= e.top_logprobs[0].logprob for e in result.logprobs)
    assert any(e.id != e.top_logprobs[0].id for e in result.logprobs)


def test_tokens_of_a_stop_string_have_no_entry(model, batcher):
    full = batcher.submit(prompt(model), GREEDY, logprobs=True).wait(60)
    k = len(full.logprobs) // 2
    stop = full.logprobs[k].token + full.logprobs[k + 1].token
    cut = batcher.submit(prompt(model), dict(GREEDY, stop=[stop]), logprobs=True).wait(60)
    assert cut.done_reason == "stop" and cut.stop_sequence == stop
    assert cut.logprobs == full.logprobs[:k]
    assert "".join(e.token for e in cut.logprobs) == cut.text


def test_a_token_cut_by_a_stop_string_keeps_its_entry(model, batcher):
    full = batcher.submit(prompt(model), GREEDY, logprobs=True).wait(60)
    k = max(i for i, e in enumerate(full.logprobs) if len(e.token.strip()) > 1)
    stop = full.logprobs[k].token[-1:]
    cut = batcher.submit(prompt(model), dict(GREEDY, stop=[stop]), logprobs=True).wait(60)
    assert cut.stop_sequence == stop
    # The token that the stop string cuts is reported, as it shows some text; none after it is.
    shown = "".join(e.token for e in cut.logprobs)
    assert shown.startswith(cut.text) and shown != cut.text
    assert len(shown) - len(cut.logprobs[-1].token) < len(cut.text)
    assert cut.logprobs == full.logprobs[:len(cut.logprobs)]


def test_concurrent_requests_keep_their_own_logprobs(model, batcher):
    alone = batcher.submit(prompt(model, "Who wrote Hamlet?"), GREEDY, logprobs=True, top_logprobs=2).wait(60)
    with_logprobs = batcher.submit(prompt(model, "Who wrote Hamlet?"), GREEDY, logprobs=True, top_logprobs=2)
    without = batcher.submit(prompt(model, "Describe a cat."), GREEDY)
    assert without.wait(60).logprobs == []
    together = with_logprobs.wait(60)
    assert [e.id for e in together.logprobs] == [e.id for e in alone.logprobs]
    for a, b in zip(together.logprobs, alone.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_in_process_generation_reports_the_same_logprobs(model, model_path, batcher):
    expected = batcher.submit(prompt(model), GREEDY, logprobs=True, top_logprobs=3).wait(60)
    with mullama.Model(model_path, num_ctx=512, num_thread=1) as single:
        generation = single.generate(prompt(model), GREEDY, logprobs=True, top_logprobs=3)
        text = "".join(generation)
    assert text == expected.text
    assert [e.id for e in generation.result.logprobs] == [e.id for e in expected.logprobs]
    for a, b in zip(generation.result.logprobs, expected.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t.id for t in a.top_logprobs] == [t.id for t in b.top_logprobs]


def test_chat_deltas_carry_the_logprobs_of_markup_too(model, batcher):
    # The model echoes "<think>hello</think> world"; the splitter swallows the tags,
    # so their tokens travel with the next delta that has text.
    tokens = prompt(model, "Repeat exactly: <think>hello</think> world")
    tokens += model.tokenize("Repeat exactly:", add_special=False)
    request = batcher.submit(tokens, dict(GREEDY, num_predict=30), logprobs=True)
    reply = service.Reply("smol", ExitStack(), request, ThinkingSplitter(), None, time.perf_counter_ns(), 0, 0)
    deltas = list(reply)
    assert reply.result is not None and reply.result.message.thinking == "hello"
    assert [e for d in deltas for e in d.logprobs] == reply.result.logprobs
    assert "".join(e.token for e in reply.result.logprobs) == request.result.text
    spelled = ["".join(e.token for e in d.logprobs) for d in deltas]
    assert all(d.content + d.thinking in text for d, text in zip(deltas, spelled))
    assert any("<think>" in text or "</think>" in text for text in spelled)


def test_chat_deltas_have_no_logprobs_unless_requested(model, batcher):
    request = batcher.submit(prompt(model), GREEDY)
    reply = service.Reply("smol", ExitStack(), request, None, None, time.perf_counter_ns(), 0, 0)
    assert all(d.logprobs == [] for d in reply)
    assert reply.result is not None and reply.result.logprobs == []


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "3", True, None])
def test_top_logprobs_out_of_range_is_a_bad_request(model, batcher, bad):
    with pytest.raises(BadRequestError, match="top_logprobs"):
        batcher.submit(prompt(model), GREEDY, logprobs=True, top_logprobs=bad)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.floats(), st.text(), st.booleans(), st.none()))
def test_check_top_logprobs_accepts_exactly_the_integers_0_to_20(value):
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20
    if valid:
        assert check_top_logprobs(value) == value
    else:
        with pytest.raises(BadRequestError):
            check_top_logprobs(value)
