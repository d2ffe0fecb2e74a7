"""Concurrent embedding calls share decodes (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import math
import threading

import pytest

import mullama
from mullama.errors import BadRequestError, OverloadedError
from mullama.engine.batching import EmbeddingBatcher, Batcher

TEXTS = [f"{subject} {verb} the {thing}." for subject in ("The cat", "A physicist", "My neighbour", "The river")
         for verb in ("likes", "studies") for thing in ("moon", "garden", "train", "sea")]


@pytest.fixture(scope="module")
def model(model_path):
    # llama.cpp's CPU flash attention takes an f16 path once a decode holds more than
    # 64 tokens, which moves vectors by up to ~1e-2 whoever packs the inputs (one
    # Model.embed call of many inputs as well); without it they move far less.
    with mullama.Model(model_path, num_ctx=512, num_thread=1, flash_attention=False) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def alone(model):
    return {text: model.embed(text)[0] for text in TEXTS}


def run_threads(n: int, work) -> list:
    results: list = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


def assert_close(a: list[float], b: list[float]) -> None:
    # Packed with other sequences, a few inputs come out up to 3e-3 away from their
    # vector alone (llama.cpp's arithmetic, seen with one Model.embed call as well);
    # vectors of two different TEXTS are at least 2e-2 apart.
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 5e-3


def test_concurrent_calls_get_their_own_vectors_in_fewer_decodes(model, alone):
    with Batcher(model) as batcher:
        batcher.embed(TEXTS[0])
        ctx = model.embedding_context
        before = ctx.decode_count
        # Eight threads, four calls each of one input.
        results = run_threads(8, lambda i: [batcher.embed(TEXTS[i * 4 + k])[0] for k in range(4)])
        decodes = ctx.decode_count - before
    for i, vectors in enumerate(results):
        for k, vector in enumerate(vectors):
            assert_close(vector, alone[TEXTS[i * 4 + k]])
    assert decodes < len(TEXTS)


def test_calls_of_several_inputs_keep_their_order(model, alone):
    batcher = EmbeddingBatcher(model, window=0.05)
    try:
        groups = [TEXTS[i::5] for i in range(5)]
        results = run_threads(5, lambda i: batcher.embed(groups[i]))
    finally:
        batcher.close()
    for group, vectors in zip(groups, results):
        assert len(vectors) == len(group)
        for text, vector in zip(group, vectors):
            assert_close(vector, alone[text])


def test_unnormalised_vectors_match_model_embed(model):
    with Batcher(model) as batcher:
        got = batcher.embed(TEXTS[:3], normalize=False)
    expected = model.embed(TEXTS[:3], normalize=False)
    for a, b in zip(got, expected):
        assert_close(a, b)
        assert abs(math.sqrt(sum(x * x for x in a)) - 1) > 1e-2


def test_a_bad_input_fails_its_own_call_only(model, alone):
    long_text = "word " * 2000
    batcher = EmbeddingBatcher(model, window=0.05)

    def work(i: int):
        if i == 0:
            with pytest.raises(BadRequestError, match="exceeds the context length"):
                batcher.embed(long_text, truncate=False)
            with pytest.raises(BadRequestError, match="empty"):
                batcher.embed(["fine", ""])
            return None
        return batcher.embed(TEXTS[i])[0]

    try:
        results = run_threads(4, work)
        truncated = batcher.embed(long_text)
    finally:
        batcher.close()
    for i in range(1, 4):
        assert_close(results[i], alone[TEXTS[i]])
    assert len(truncated[0]) == model.n_embd


def test_closed_batcher_refuses_and_empty_calls_are_free(model):
    batcher = EmbeddingBatcher(model)
    assert batcher.embed([]) == []
    batcher.close()
    batcher.close()
    with pytest.raises(OverloadedError):
        batcher.embed("late")
