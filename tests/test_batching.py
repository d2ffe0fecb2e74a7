"""Continuous batching on the real model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mullama
from mullama.errors import BadRequestError, MullamaError, OverloadedError
from mullama.engine.sampling import Sampler
from mullama.engine.batching import Batcher, fit_prompt

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = [
    "Write a short story about a dragon.", "What is the capital of France?", "Name a colour.",
    "Write a haiku about rain.", "Tell me about the moon.", "Who wrote Hamlet?", "Describe a cat.",
    "List three fruits.",
]
GREEDY = {"temperature": 0, "num_predict": 12}
#: A grammar with no end: the model can only stop at num_predict, the context end or a cancel.
ENDLESS = 'root ::= "la " root'

# One thread per context: on a small shared CI machine, llama.cpp's spinning
# thread barriers make two threads much slower than one when cores are busy.


@pytest.fixture(scope="module")
def model(model_path):
    # A small batch forces prompts to be read in chunks between generated tokens.
    with mullama.Model(model_path, num_ctx=512, num_parallel=8, num_batch=48, num_thread=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def batcher(model):
    with Batcher(model) as running:
        yield running


@pytest.fixture(scope="module")
def single(model_path):
    with mullama.Model(model_path, num_ctx=512, num_parallel=1, num_thread=1) as loaded:
        yield loaded


def tokens_of(model, question):
    return model.tokenize(CHAT.format(question))


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_concurrent_greedy_requests_match_single_sequence_generation(model, batcher, single):
    alone = [single.complete(CHAT.format(q), GREEDY) for q in QUESTIONS]
    # The first request generates while the others are queued, admitted and read in chunks.
    first = batcher.submit(tokens_of(model, QUESTIONS[0]), dict(GREEDY, num_predict=100))
    pieces = iter(first)
    head = next(pieces)
    others = [batcher.submit(tokens_of(model, q), GREEDY) for q in QUESTIONS[1:]]
    results = [r.wait(60) for r in others]
    assert not first.done, "the other requests should finish while the long one still runs"
    head += "".join(pieces)
    assert first.result.done_reason == "length" and first.result.text == head
    assert first.result.tokens[:12] == alone[0].tokens
    first_prompt = tokens_of(model, QUESTIONS[0])
    for question, reference, result in zip(QUESTIONS[1:], alone[1:], results):
        # "Write a haiku" shares "<|im_start|>user\nWrite a" with the first request's cache.
        prompt = tokens_of(model, question)
        shared = common_prefix(first_prompt, prompt)
        assert result.timings.prompt_eval_count == len(prompt) - (shared if shared >= 4 else 0)
        assert result.tokens == reference.tokens
        assert result.text == reference.text
        assert result.done_reason == reference.done_reason
        assert result.timings.eval_duration > 0 and result.timings.total_duration >= result.timings.eval_duration


def test_prompt_cache_goes_to_the_sequence_that_holds_it(model, batcher):
    prompt = tokens_of(model, "Tell me about the sun and its planets.")
    first = batcher.submit(prompt, GREEDY).wait(60)
    assert first.timings.prompt_eval_count > len(prompt) // 2
    # Seven other prompts fill the other sequences without evicting this one.
    for request in [batcher.submit(tokens_of(model, f"Count to {n}."), GREEDY) for n in range(7)]:
        request.wait(60)
    again = batcher.submit(prompt, GREEDY).wait(60)
    assert again.timings.prompt_eval_count == 1
    assert again.tokens == first.tokens
    # A conversation that goes on evaluates only what is new.
    follow_up = first.context + tokens_of(model, "And the moon?")
    longer = batcher.submit(follow_up, GREEDY).wait(60)
    assert longer.timings.prompt_eval_count <= len(follow_up) - len(prompt)


def test_a_shared_prefix_is_copied_from_a_busy_sequence(model, batcher, single):
    system = ("<|im_start|>system\nYou are a careful assistant. Answer in one short sentence, "
              "and never use more words than needed.<|im_end|>\n")
    first_text, second_text = system + CHAT.format("Name a planet."), system + CHAT.format("Name a river.")
    shared = common_prefix(model.tokenize(first_text), model.tokenize(second_text))
    assert shared > 20
    busy = batcher.submit(model.tokenize(first_text), {"temperature": 0, "num_predict": -1}, grammar=ENDLESS)
    pieces = iter(busy)
    head = next(pieces)
    second = model.tokenize(second_text)
    result = batcher.submit(second, GREEDY).wait(60)
    assert not busy.done
    busy.cancel()
    assert result.timings.prompt_eval_count == len(second) - shared
    assert result.tokens == single.complete(second_text, GREEDY).tokens
    # The donor went on undisturbed by the copy.
    assert (head + "".join(pieces)).startswith("la la la")


def test_requests_arriving_together_read_their_shared_prefix_once(model, batcher, single):
    system = ("<|im_start|>system\nPretend to be a patient tutor for curious children. Keep answers short, "
              "friendly and true.<|im_end|>\n")
    texts = [system + CHAT.format(q) for q in ("Why is grass green?", "Why do cats purr?", "What is rain?")]
    prompts = [model.tokenize(text) for text in texts]
    shared = min(common_prefix(prompts[0], p) for p in prompts[1:])
    assert shared > 20
    # While the engine reads a long prompt, the three arrive and are admitted together.
    busy = batcher.submit(model.tokenize("word " * 200), {"temperature": 0, "num_predict": 1})
    time.sleep(0.05)
    group = [batcher.submit(p, GREEDY) for p in prompts]
    results = [r.wait(60) for r in group]
    busy.wait(60)
    # The first reads the whole prompt (but a token or two its sequence may still hold)...
    assert results[0].timings.prompt_eval_count > len(prompts[0]) - 4
    # ...and the others copy the shared prefix from it.
    for prompt, result in zip(prompts[1:], results[1:]):
        assert result.timings.prompt_eval_count == len(prompt) - common_prefix(prompts[0], prompt)
    for text, result in zip(texts, results):
        assert result.tokens == single.complete(text, GREEDY).tokens


def test_long_prompt_is_truncated_and_reported(model, batcher, caplog):
    words = model.tokenize("word " * 800)
    with caplog.at_level(logging.WARNING, logger="mullama.engine.batching"):
        request = batcher.submit(words, {"temperature": 0, "num_predict": 3, "num_keep": 5})
    result = request.wait(60)
    n_ctx = model.context.n_ctx_seq
    assert result.truncated == request.truncated == len(words) - len(request.tokens) > 0
    assert request.tokens[:5] == words[:5] and request.tokens[5:] == words[-(len(request.tokens) - 5):]
    assert len(request.tokens) + 3 <= n_ctx
    assert result.context == request.tokens + result.tokens
    assert "truncated" in caplog.text
    with pytest.raises(BadRequestError, match=f"{len(words)} tokens.*{n_ctx}"):
        batcher.submit(words, GREEDY, truncate=False)


@pytest.mark.parametrize("n_ctx, num_keep, add_bos, length, expected", [
    # Ollama's TestLlamaServerCompletionContextShiftTruncatesPromptOverContext: tokens 0..9, NumCtx 8, NumKeep 3.
    (8, 3, False, 10, [0, 1, 2, 7, 8, 9]),
    # Its TestContextShiftPromptLimit cases (a BOS the tokenizer adds is kept on top of num_keep).
    (8, 3, False, 20, [0, 1, 2, 17, 18, 19]),
    (4096, 4, False, 5000, list(range(4)) + list(range(5000 - 2046, 5000))),
    (4096, 4, True, 5000, list(range(5)) + list(range(5000 - 2046, 5000))),
    (8, 99, False, 20, list(range(7))),
    # A negative num_keep keeps the whole prompt, as much of it as fits.
    (8, -1, False, 20, list(range(7))),
])
def test_a_long_prompt_is_cut_by_ollamas_rule(n_ctx, num_keep, add_bos, length, expected):
    tokens = list(range(length))
    fitted, dropped = fit_prompt(tokens, n_ctx, num_keep, add_bos=add_bos)
    assert fitted == expected and dropped == length - len(expected)


@given(st.integers(2, 300), st.integers(1, 900), st.integers(-3, 400), st.booleans())
def test_fit_prompt_keeps_the_front_and_the_end_and_leaves_room(n_ctx, length, num_keep, add_bos):
    tokens = list(range(length))
    fitted, dropped = fit_prompt(tokens, n_ctx, num_keep, add_bos=add_bos)
    if length < n_ctx:
        assert (fitted, dropped) == (tokens, 0)
        assert fit_prompt(tokens, n_ctx, num_keep, add_bos=add_bos, truncate=False) == (tokens, 0)
        return
    with pytest.raises(BadRequestError, match=f"{length} tokens.*{n_ctx}"):
        fit_prompt(tokens, n_ctx, num_keep, add_bos=add_bos, truncate=False)
    keep = min(length if num_keep < 0 else max(0, num_keep + add_bos), n_ctx - 1)
    assert len(fitted) + dropped == length and dropped > 0
    assert fitted[:keep] == tokens[:keep] and fitted[keep:] == tokens[length - (len(fitted) - keep):]
    # About half of what follows the kept tokens stays free for the answer, at least one token.
    assert n_ctx - len(fitted) == max((n_ctx - keep) // 2, 1)


def test_generation_stops_with_length_at_the_context_end(model, batcher):
    n_ctx = model.context.n_ctx_seq
    prompt = model.tokenize("word " * 600)[:n_ctx - 20]
    request = batcher.submit(prompt, {"temperature": 0, "num_predict": -1}, grammar=ENDLESS, truncate=False)
    result = request.wait(60)
    assert result.done_reason == "length" and result.truncated == 0
    assert n_ctx <= len(result.context) <= n_ctx + 1
    assert result.text.startswith("la la la")


def test_cancel_frees_the_sequence_for_a_queued_request_and_the_queue_is_bounded(model_path):
    with mullama.Model(model_path, num_ctx=256, num_parallel=1, num_thread=1) as model, \
            Batcher(model, max_queue=2) as batcher:
        endless = batcher.submit(tokens_of(model, "Sing."), {"temperature": 0}, grammar=ENDLESS)
        pieces = iter(endless)
        head = next(pieces)
        queued = [batcher.submit(tokens_of(model, q), GREEDY) for q in QUESTIONS[1:3]]
        assert batcher.queued_count == 2 and batcher.active_count == 1 and batcher.busy
        with pytest.raises(OverloadedError, match="max_queue is 2"):
            batcher.submit(tokens_of(model, "One more?"), GREEDY)
        queued[1].cancel()
        assert queued[1].wait(1).done_reason == "cancel" and list(queued[1]) == []
        assert batcher.queued_count == 1
        cancelled_at = time.monotonic()
        threading.Thread(target=endless.cancel).start()
        rest = list(pieces)
        result = queued[0].wait(60)
        assert endless.result.done_reason == "cancel"
        assert endless.result.timings.eval_count < 100
        assert endless.result.text == head + "".join(rest) and endless.result.text.startswith("la")
        assert result.done_reason in ("stop", "length") and result.text
        assert time.monotonic() - cancelled_at < 30
        assert not batcher.busy


def test_leaving_the_iteration_early_cancels(model, batcher):
    request = batcher.submit(tokens_of(model, "Sing."), {"temperature": 0}, grammar=ENDLESS)
    for _ in request:
        break
    assert request.wait(30).done_reason == "cancel"
    assert request.result.timings.eval_count < 100


def test_cancel_all_and_close(model_path):
    with mullama.Model(model_path, num_ctx=256, num_parallel=2, num_thread=1) as model:
        batcher = Batcher(model, max_queue=4)
        requests = [batcher.submit(tokens_of(model, "Sing."), {"temperature": 0}, grammar=ENDLESS)
                    for _ in range(4)]
        pieces = iter(requests[0])
        next(pieces)
        batcher.cancel_all()
        assert [r.wait(30).done_reason for r in requests] == ["cancel"] * 4
        assert not batcher.busy
        running = batcher.submit(tokens_of(model, "Sing."), {"temperature": 0}, grammar=ENDLESS)
        pieces = iter(running)
        next(pieces)
        batcher.close()
        assert running.wait(1).done_reason == "cancel"
        with pytest.raises(OverloadedError):
            batcher.submit(tokens_of(model, "Hello"), GREEDY)
        batcher.close()


def test_engine_errors_reach_the_request_and_the_engine_survives(model, batcher, monkeypatch):
    def broken(self, ctx, index):
        raise RuntimeError("sampler exploded")

    with monkeypatch.context() as patch:
        patch.setattr(Sampler, "sample", broken)
        request = batcher.submit(tokens_of(model, "Hello"), GREEDY)
        with pytest.raises(RuntimeError, match="exploded"):
            list(request)
        with pytest.raises(RuntimeError, match="exploded"):
            request.wait(1)
    assert batcher.submit(tokens_of(model, "Hello"), GREEDY).wait(60).done_reason in ("stop", "length")

    def failing(batch, **kwargs):
        raise MullamaError("llama_decode failed with code -1")

    prompt = tokens_of(model, "Tell me a secret about the ocean.")
    with monkeypatch.context() as patch:
        patch.setattr(model.context, "decode", failing)
        with pytest.raises(MullamaError, match="code -1"):
            batcher.submit(prompt, GREEDY).wait(10)
    # The failed sequence's cache was forgotten, not trusted.
    assert all(cached[:len(prompt)] != prompt for cached in model.context.cached)
    assert batcher.submit(prompt, GREEDY).wait(60).done_reason in ("stop", "length")


def test_bad_requests_are_rejected_at_submit(model, batcher):
    with pytest.raises(BadRequestError, match="empty"):
        batcher.submit([], GREEDY)
    with pytest.raises(BadRequestError, match="vocabulary"):
        batcher.submit([model.n_vocab + 5], GREEDY)
    with pytest.raises(BadRequestError, match="grammar"):
        batcher.submit(tokens_of(model, "Hi"), GREEDY, grammar="root ::= (")
    with pytest.raises(BadRequestError, match="option"):
        batcher.submit(tokens_of(model, "Hi"), {"num_predict": "many"})


def test_stop_strings_and_seeds(model, batcher, single):
    prompt = CHAT.format(QUESTIONS[0])
    reference = single.complete(prompt, temperature=0.9, seed=11, num_predict=16)
    sampled = batcher.submit(model.tokenize(prompt), {"temperature": 0.9, "seed": 11, "num_predict": 16}).wait(60)
    assert sampled.tokens == reference.tokens
    stop = reference.text[5:9]
    stopped = batcher.submit(model.tokenize(prompt), {"temperature": 0.9, "seed": 11, "stop": [stop]}).wait(60)
    assert stopped.done_reason == "stop" and stopped.text == reference.text[:reference.text.index(stop)]
    assert stopped.stop_sequence == stop and sampled.stop_sequence == ""


def test_embeddings_run_alongside_generation(model, batcher):
    texts = ["The cat sleeps on the sofa.", "Quantum chromodynamics."]
    expected = model.embed(texts)
    request = batcher.submit(tokens_of(model, "Sing."), {"temperature": 0, "num_predict": 60}, grammar=ENDLESS)
    pieces = iter(request)
    next(pieces)
    during = batcher.embed(texts)
    assert not request.done or request.result.timings.eval_count == 60
    for a, b in zip(expected, during):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert request.wait(60).done_reason == "length"
