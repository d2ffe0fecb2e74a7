"""The in-process engine on the real model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import math
import threading

import pytest
from gil import counter_rates
from hypothesis import given
from hypothesis import strategies as st

import mullama
from mullama.engine.batching import Batcher
from mullama.engine.model import common_prefix
from mullama.errors import BadRequestError, CancelledError, InvalidModelFileError

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: A grammar with no end: the model can only stop at num_predict, the context end or a cancel.
ENDLESS = 'root ::= "la " root'


@pytest.fixture(scope="module")
def model(model_path):
    with mullama.Model(model_path, num_ctx=1024) as loaded:
        yield loaded


def test_metadata(model):
    assert model.info.architecture == "llama"
    assert model.info.quantization == "Q4_1"
    assert model.n_ctx_train == 8192
    assert "<|im_start|>" in model.chat_template
    assert model.special_token("eos") == "<|im_end|>"


def test_greedy_output_is_deterministic_and_survives_cache_reuse(model):
    prompt = CHAT.format("What is the capital of France?")
    first = model.complete(prompt, temperature=0, num_predict=24)
    model.complete(CHAT.format("Name a colour."), temperature=0, num_predict=8)
    again = model.complete(prompt, temperature=0, num_predict=24)
    assert "Paris" in first.text
    assert again.text == first.text
    assert again.tokens == first.tokens


def test_prompt_cache_reuse_evaluates_only_new_tokens(model):
    prompt = CHAT.format("Tell me about the moon.")
    model.complete(prompt, temperature=0, num_predict=4)
    second = model.complete(prompt, temperature=0, num_predict=4)
    assert second.timings.prompt_eval_count == 1


def test_same_seed_gives_same_text(model):
    prompt = CHAT.format("Write a short poem about the sea.")
    runs = [model.complete(prompt, temperature=1.0, seed=seed, num_predict=24).text for seed in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1


def test_stop_string_spanning_tokens_is_cut_cleanly(model):
    prompt = CHAT.format("What is the capital of France?")
    full = model.complete(prompt, temperature=0, num_predict=24)
    tokens = [model.token_bytes(t).decode() for t in full.tokens]
    # A stop string made of the end of one token and the start of the next.
    boundary = len(tokens[0]) + len(tokens[1])
    stop = full.text[boundary - 2:boundary + 2]
    assert len(stop) == 4 and tokens[1][-2:] + tokens[2][:2] == stop
    generation = model.generate(prompt, temperature=0, num_predict=24, stop=[stop])
    pieces = list(generation)
    assert "".join(pieces) == full.text[:full.text.index(stop)]
    assert all(stop not in p for p in pieces)
    assert generation.result.done_reason == "stop"


def test_multibyte_text_round_trips(model):
    text = "héllo wörld — 你好，世界 🎉🦙 ½ ∑"
    assert model.detokenize(model.tokenize(text, add_special=False)) == text


def test_streamed_pieces_are_valid_utf8_across_token_boundaries(model):
    target = "你好世界🎉🦙 naïve"
    generation = model.generate(CHAT.format("Say hello."), grammar=f'root ::= "{target}"', temperature=0)
    pieces = list(generation)
    assert "".join(pieces) == target
    assert all("\ufffd" not in piece for piece in pieces)
    # The point of the test: some character needed more than one token.
    assert len(generation.result.tokens) > len(pieces) or len(pieces) < len(target)


def test_num_predict_and_timings(model):
    result = model.complete(CHAT.format("Count from one to one hundred."), temperature=0, num_predict=5)
    assert result.done_reason == "length"
    assert result.timings.eval_count == 5 == len(result.tokens)
    assert result.timings.prompt_eval_count > 10
    assert result.timings.total_duration >= result.timings.eval_duration > 0
    assert result.timings.prompt_eval_duration > 0


def test_long_prompt_is_truncated_and_reported(model):
    prompt = "word " * 3000
    result = model.complete(prompt, temperature=0, num_predict=2)
    assert result.truncated > 0
    assert len(result.context) <= model.context.n_ctx_seq


def test_truncate_false_refuses_a_long_prompt(model):
    with pytest.raises(BadRequestError, match=r"tokens but the context holds 1024"):
        model.generate("word " * 3000, temperature=0, num_predict=2, truncate=False)


def test_in_process_generation_stops_at_the_context_end_as_the_daemons_batcher_does(model_path):
    with mullama.Model(model_path, num_ctx=256, num_thread=1) as small:
        n_ctx = small.context.n_ctx_seq
        prompt = small.tokenize("word " * 600)[:n_ctx - 20]
        local = small.complete(prompt, temperature=0, num_predict=-1, grammar=ENDLESS, truncate=False)
        # A batcher with an engine thread, as the daemon makes, replaces the idle in-process one.
        with Batcher(small) as batcher:
            daemon = batcher.submit(prompt, {"temperature": 0, "num_predict": -1}, grammar=ENDLESS,
                                    truncate=False).wait(60)
    assert local.done_reason == daemon.done_reason == "length"
    # The KV cache fills to the last position; the token sampled from it ends the answer.
    assert local.tokens == daemon.tokens and len(local.context) == n_ctx + 1
    assert local.context == daemon.context == prompt + local.tokens


def test_generations_from_several_threads_match_their_single_runs(model, model_path):
    questions = ["What is the capital of France?", "Name a colour.", "Who wrote Hamlet?", "Describe a cat.",
                 "List three fruits."]
    alone = [model.complete(CHAT.format(q), temperature=0, num_predict=16) for q in questions]
    # Two sequences for five threads: some are batched together, the others wait for a free one.
    with mullama.Model(model_path, num_ctx=512, num_parallel=2, num_thread=1) as shared:
        start = threading.Barrier(len(questions))
        results: list = [None] * len(questions)

        def run(i: int) -> None:
            start.wait()
            generation = shared.generate(CHAT.format(questions[i]), temperature=0, num_predict=16)
            results[i] = ("".join(generation), generation.result)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    for reference, (text, result) in zip(alone, results):
        assert text == result.text == reference.text and result.tokens == reference.tokens


def test_cancel_aborts_a_prompt_chunk_while_it_is_decoded(model, monkeypatch):
    ctx = model.context
    prompt = model.tokenize("stone " * 900)
    # Whatever the cache already holds of this prompt stays; the rest is one chunk to read.
    kept = min(common_prefix(ctx.cached[0], prompt), len(prompt) - 1)
    assert len(prompt) - kept > 500
    decode = ctx.decode
    aborted = []
    generation = model.generate(prompt, temperature=0, num_predict=4)

    def cancelled_as_it_starts(batch, *, abortable=False):
        # Another thread's cancel, landing as the chunk's decode starts: ggml stops at its first graph node.
        if abortable:
            generation.cancel()
        try:
            decode(batch, abortable=abortable)
        except CancelledError as exc:
            aborted.append(exc)
            raise

    with monkeypatch.context() as patch:
        patch.setattr(ctx, "decode", cancelled_as_it_starts)
        assert list(generation) == []
    assert len(aborted) == 1
    assert generation.result.done_reason == "cancel" and generation.result.timings.eval_count == 0
    # Nothing of the aborted chunk is left in the KV cache, nor believed to be.
    assert ctx.cached[0] == prompt[:kept] and model.lib.llama_memory_seq_pos_max(ctx.memory, 0) == kept - 1
    again = model.complete(prompt, temperature=0, num_predict=4)
    assert again.done_reason == "length" and again.timings.prompt_eval_count == len(prompt) - kept


def test_embeddings_rank_paraphrases_closer(model):
    cat, kitten, physics = model.embed([
        "The cat is sleeping on the sofa.",
        "A cat naps on the couch.",
        "Quantum chromodynamics describes the strong interaction.",
    ])
    assert len(cat) == model.n_embd
    assert math.isclose(sum(x * x for x in cat), 1.0, rel_tol=1e-4)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(cat, kitten) > dot(cat, physics) + 0.1


def test_embeddings_batched_equal_single(model):
    texts = ["first input", "a second, longer input sentence", "third"]
    together = model.embed(texts)
    for text, vector in zip(texts, together):
        alone = model.embed(text)[0]
        assert max(abs(a - b) for a, b in zip(vector, alone)) < 1e-3


def test_cancel_from_another_thread_stops_within_one_token(model):
    generation = model.generate(CHAT.format("Write a very long story about dragons."), temperature=0,
                                num_predict=400)
    seen_after_cancel = []
    cancelled = threading.Event()
    for count, piece in enumerate(generation):
        if cancelled.is_set():
            seen_after_cancel.append(piece)
        if count == 5:
            threading.Thread(target=lambda: (generation.cancel(), cancelled.set())).start()
            cancelled.wait()
    assert generation.result.done_reason == "cancel"
    assert len(seen_after_cancel) <= 1
    assert generation.result.timings.eval_count <= 8


def test_truncated_model_file_is_rejected(model_path, tmp_path):
    data = model_path.read_bytes()
    for cut in (3, 100, 5000, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(InvalidModelFileError):
            mullama.Model(broken)


def test_empty_prompt_and_bad_options_are_clear_errors(model, model_path):
    with pytest.raises(BadRequestError):
        model.complete([])
    with pytest.raises(BadRequestError):
        mullama.Model(model_path, num_ctx=4)


def test_builtin_template_is_the_last_resort(model):
    prompt = model.apply_builtin_template([("system", "Be brief."), ("user", "Hi")])
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(BadRequestError):
        model.apply_builtin_template([("user", "Hi")], name="no-such-template")


def test_quantize_writes_a_loadable_model(model_path, tmp_path):
    from mullama.engine.model import quantize
    from mullama.store.gguf import read_gguf

    out = tmp_path / "q8.gguf"
    quantize(model_path, out, "q8_0", threads=1)
    assert read_gguf(out).quantization == "Q8_0"
    with mullama.Model(out, num_ctx=256, num_thread=1) as q8:
        assert "Paris" in q8.complete(CHAT.format("What is the capital of France?"), temperature=0,
                                      num_predict=16).text
    with pytest.raises(BadRequestError, match="unknown quantization"):
        quantize(model_path, tmp_path / "x.gguf", "q9_9")


def test_decoding_lets_other_python_threads_run(model):
    """llama_decode releases the GIL (only short per-token calls keep it: ffi.llama.KEEP_GIL)."""
    ctx = model.context
    prompt = model.tokenize("word " * 300)
    ctx.forget(0)
    ctx.batch.clear()
    for pos, token in enumerate(prompt):
        ctx.batch.add(token, pos, 0, pos == len(prompt) - 1)
    try:
        free_rate, decode_rate = counter_rates(lambda: ctx.decode(ctx.batch))
    finally:
        ctx.forget(0)
    # Holding the GIL through the decode leaves the counter a few percent (its switch-interval slices).
    assert decode_rate > 0.2 * free_rate


@given(st.lists(st.integers(0, 3), max_size=600), st.lists(st.integers(0, 3), max_size=600),
       st.lists(st.integers(0, 3), max_size=600))
def test_common_prefix_is_the_first_difference(shared, a_tail, b_tail):
    a, b = shared + a_tail, shared + b_tail
    expected = 0
    while expected < min(len(a), len(b)) and a[expected] == b[expected]:
        expected += 1
    assert common_prefix(a, b) == common_prefix(tuple(b), a) == expected
