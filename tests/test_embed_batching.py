"""Concurrent embedding calls share decodes (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import http.client
import json
import math
import shutil
import struct
import threading
from pathlib import Path

import pytest
from daemon import create_model, running

import mullama
from mullama.errors import BadRequestError, OverloadedError
from mullama.engine.batching import EmbeddingBatcher, Batcher
from mullama.ffi import llama as L
from mullama.store.gguf import read_gguf

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


def with_rank_pooling(model_path: Path, dest: Path) -> Path:
    """A copy of the real model whose metadata says ``llama.pooling_type = rank``, as a reranker's does.

    Two key-value pairs go in front of the others: the pooling type, and a
    string that pads the header by a multiple of the alignment, so that the
    tensor data, addressed from its aligned start, moves whole.
    """
    def pair(key: str, value_type: int, payload: bytes) -> bytes:
        name = key.encode()
        return struct.pack("<Q", len(name)) + name + struct.pack("<I", value_type) + payload

    uint32, string = 4, 8
    pooling = pair("llama.pooling_type", uint32, struct.pack("<I", L.LLAMA_POOLING_TYPE_RANK))
    fill = -(len(pooling) + len(pair("mullama.padding", string, struct.pack("<Q", 0)))) % read_gguf(model_path).alignment
    padding = pair("mullama.padding", string, struct.pack("<Q", fill) + b" " * fill)
    with open(model_path, "rb") as source, open(dest, "wb") as out:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", source.read(24))
        out.write(struct.pack("<4sIQQ", magic, version, n_tensors, n_kv + 2) + pooling + padding)
        shutil.copyfileobj(source, out, 1 << 20)
    return dest


def test_a_reranker_is_refused_on_the_embedding_routes(model_path, tmp_path):
    # llama.cpp pools a rank model into n_cls_out scores per input (1 here), not n_embd floats:
    # reading an embedding's length from them ran past the end of llama.cpp's buffer.
    path = with_rank_pooling(model_path, tmp_path / "reranker.gguf")
    assert read_gguf(path).pooling_type == L.LLAMA_POOLING_TYPE_RANK
    with mullama.Model(path, num_ctx=256, num_thread=1) as reranker, Batcher(reranker) as batcher:
        for embed in (reranker.embed, batcher.embed):
            with pytest.raises(BadRequestError, match="reranking model"):
                embed(["a query", "a document"])
    with running(tmp_path / "daemon") as server:
        port = server.server_address[1]
        create_model(port, path, "reranker", parameters={"num_ctx": 256, "num_thread": 1})
        for route, body in (("/api/embed", {"model": "reranker", "input": ["a query"]}),
                            ("/v1/embeddings", {"model": "reranker", "input": "a query"})):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
            finally:
                connection.close()
            assert response.status == 400, (route, answer)
            assert "reranking model" in json.dumps(answer), (route, answer)
