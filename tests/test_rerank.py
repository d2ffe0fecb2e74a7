"""Reranking: ``Model.rerank``, ``/v1/rerank`` (and llama-server's other paths) and ``/api/rerank``.

The reranker is the test model made into a Qwen3-Reranker (tests/rerank_model.py). Its scores are compared with
llama-server's for the same GGUF, one document per request: llama.cpp's pooled outputs for a qwen3 model move
with the other sequences sharing a decode (by up to a few hundredths for this model, in llama-server as in
Mullama), so two servers batching differently agree only document by document. The derived model's scores do
not rank documents by meaning, so no test asserts which document is relevant.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import create_model, exchange, free_port, post_json, running
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rerank_model import rerank_model_path

import mullama
from mullama.errors import BadRequestError
from mullama.http.common import rerank_request, returns_documents

QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "Bananas are a yellow fruit.", "The capital of Germany is Berlin.",
             "The Eiffel Tower stands in Paris, the French capital.", "Berlin"]
#: llama-server's paths and Mullama's.
LLAMA_SERVER_ROUTES = ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")
#: Scores are float32 from the same computation: equal but for printing.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def reranker_path() -> Path:
    return rerank_model_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, reranker_path: Path, model_path: Path) -> Iterator[Any]:
    with running(tmp_path_factory.mktemp("rerank")) as daemon:
        port = daemon.server_address[1]
        create_model(port, reranker_path, "reranker", parameters={"num_ctx": 1024, "num_thread": 2})
        create_model(port, model_path, "smol", parameters={"num_ctx": 1024, "num_thread": 2})
        yield daemon


@pytest.fixture(scope="module")
def llama_server(reranker_path: Path) -> Iterator[int]:
    """llama-server from the same llama.cpp build, reranking the same GGUF: one slot, no prompt cache."""
    from mullama.ffi import loader

    exe = loader.load().directory.parent / "bin" / "llama-server"
    if not exe.exists():
        pytest.skip("llama-server is not built (python build_native.py --with-tools)")
    port = free_port()
    process = subprocess.Popen([str(exe), "-m", str(reranker_path), "--port", str(port), "--reranking", "-np", "1",
                                "--no-cache-prompt", "-c", "1024", "-t", "2", "--no-webui"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _get_status(port, "/health") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("llama-server did not start")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        connection.close()


def _call(server: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, data = exchange(server, "POST", path, body)
    return status, json.loads(data)


def _assert_ranked(results: list[dict[str, Any]], n_documents: int, top_n: int | None = None) -> None:
    """Sorted by score, the best first, each document at most once, as many as asked."""
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < n_documents for i in indices)
    assert len(results) == (n_documents if top_n is None else min(top_n, n_documents))


# --- the same scores as llama-server -----------------------------------------------------------------------------


def test_scores_equal_llama_servers(server, llama_server):
    worst = 0.0
    for document in DOCUMENTS:
        body = {"model": "reranker", "query": QUERY, "documents": [document]}
        status, theirs = post_json(llama_server, "/v1/rerank", body)
        assert status == 200, theirs
        status, ours = _call(server, "/v1/rerank", body)
        assert status == 200, ours
        assert [r["index"] for r in ours["results"]] == [0]
        difference = abs(ours["results"][0]["relevance_score"] - theirs["results"][0]["relevance_score"])
        assert difference <= TOLERANCE, (document, ours, theirs)
        worst = max(worst, difference)
        assert ours["usage"] == theirs["usage"]
    print(f"largest difference from llama-server: {worst:g}")


def test_the_response_has_llama_servers_fields_and_order(server, llama_server):
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS}
    status, theirs = post_json(llama_server, "/v1/rerank", body)
    assert status == 200, theirs
    status, ours = _call(server, "/v1/rerank", body)
    assert status == 200, ours
    assert set(ours) == set(theirs) == {"model", "object", "usage", "results"}
    assert ours["model"] == theirs["model"] == "reranker" and ours["object"] == theirs["object"] == "list"
    assert ours["usage"] == theirs["usage"]
    for response in (ours, theirs):
        assert all(set(result) == {"index", "relevance_score"} for result in response["results"])
        _assert_ranked(response["results"], len(DOCUMENTS))
    for top_n in (0, 2):
        status, theirs_top = post_json(llama_server, "/v1/rerank", {**body, "top_n": top_n})
        status_ours, ours_top = _call(server, "/v1/rerank", {**body, "top_n": top_n})
        assert status == status_ours == 200
        assert len(ours_top["results"]) == len(theirs_top["results"]) == min(top_n, len(DOCUMENTS))
        assert ours_top["results"] == ours["results"][:top_n]
        assert ours_top["usage"] == theirs_top["usage"]


def test_a_tei_request_gets_teis_answer(server, llama_server):
    single = {"model": "reranker", "query": QUERY, "texts": [DOCUMENTS[0]], "return_text": True}
    status, theirs = post_json(llama_server, "/rerank", single)
    assert status == 200, theirs
    status, ours = _call(server, "/rerank", single)
    assert status == 200, ours
    assert [set(entry) for entry in ours] == [set(entry) for entry in theirs] == [{"index", "score", "text"}]
    assert ours[0]["text"] == theirs[0]["text"] == DOCUMENTS[0]
    assert abs(ours[0]["score"] - theirs[0]["score"]) <= TOLERANCE
    status, several = _call(server, "/v1/rerank", {"model": "reranker", "query": QUERY, "texts": DOCUMENTS,
                                                   "top_n": 2})
    assert status == 200, several
    assert [set(entry) for entry in several] == [{"index", "score"}] * 2
    assert several[0]["score"] >= several[1]["score"]
    status, answer = _call(server, "/v1/rerank", {"model": "reranker", "query": QUERY, "texts": []})
    assert status == 400 and "texts" in _openai_error(answer)


def test_scores_do_not_depend_on_the_route_or_the_document_form(server):
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS}
    _, first = _call(server, "/v1/rerank", body)
    cohere = {**body, "documents": [{"text": d} for d in DOCUMENTS], "return_documents": True, "top_n": 3}
    for route in (*LLAMA_SERVER_ROUTES, "/api/rerank"):
        status, answer = _call(server, route, cohere)
        assert status == 200, (route, answer)
        assert [(r["index"], r["relevance_score"]) for r in answer["results"]] == \
            [(r["index"], r["relevance_score"]) for r in first["results"][:3]]
        assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in answer["results"])
    status, ollama = _call(server, "/api/rerank", body)
    assert status == 200 and ollama["model"] == "reranker:latest"
    assert ollama["prompt_eval_count"] == first["usage"]["prompt_tokens"] and ollama["total_duration"] > 0


def test_a_reranker_has_the_rerank_capability(server):
    status, shown = _call(server, "/api/show", {"model": "reranker"})
    assert status == 200
    assert "rerank" in shown["capabilities"] and "completion" not in shown["capabilities"]
    assert "embedding" not in shown["capabilities"]


# --- in process --------------------------------------------------------------------------------------------------


def test_model_rerank_in_process(reranker_path, model_path):
    with mullama.Model(reranker_path, num_ctx=1024, num_thread=2) as reranker:
        ranked = reranker.rerank(QUERY, DOCUMENTS)
        assert sorted(r.index for r in ranked) == list(range(len(DOCUMENTS)))
        assert [r.relevance_score for r in ranked] == sorted((r.relevance_score for r in ranked), reverse=True)
        assert all(0.0 < r.relevance_score < 1.0 for r in ranked)  # a softmax's probability of "yes"
        assert reranker.rerank(QUERY, DOCUMENTS, top_n=2) == ranked[:2]
        assert reranker.rerank(QUERY, []) == []
        with pytest.raises(BadRequestError, match="top_n"):
            reranker.rerank(QUERY, DOCUMENTS, top_n=-1)
        with pytest.raises(BadRequestError, match="reranking model"):
            reranker.embed("a query")
        with pytest.raises(BadRequestError, match="more than the context"):
            reranker.rerank(QUERY, ["word " * 2000])
    with mullama.Model(model_path, num_ctx=256, num_thread=2) as chat_model, \
            pytest.raises(BadRequestError, match="not a reranking model"):
        chat_model.rerank(QUERY, DOCUMENTS)


# --- errors, in each API's format --------------------------------------------------------------------------------


def _openai_error(answer: Any) -> str:
    assert set(answer) == {"error"} and answer["error"]["type"] == "invalid_request_error", answer
    return answer["error"]["message"]


def _ollama_error(answer: Any) -> str:
    assert set(answer) == {"error"} and isinstance(answer["error"], str), answer
    return answer["error"]


@pytest.mark.parametrize("body, message", [
    ({"model": "reranker", "query": QUERY, "documents": []}, "documents"),
    ({"model": "reranker", "query": QUERY}, "documents"),
    ({"model": "reranker", "query": QUERY, "documents": ["a", 7]}, "documents"),
    ({"model": "reranker", "query": QUERY, "documents": [{"content": "a"}]}, "documents"),
    ({"model": "reranker", "documents": ["a"]}, "query"),
    ({"model": "reranker", "query": QUERY, "documents": ["a"], "top_n": -1}, "top_n"),
    ({"model": "reranker", "query": QUERY, "documents": ["a"], "top_n": "2"}, "top_n"),
    ({"model": "reranker", "query": QUERY, "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ({"model": "smol", "query": QUERY, "documents": ["a"]}, "not a reranking model"),
])
def test_bad_rerank_requests_are_400s_in_each_apis_format(server, body, message):
    for route in LLAMA_SERVER_ROUTES:
        status, answer = _call(server, route, body)
        assert status == 400, (route, answer)
        assert message in _openai_error(answer), (route, answer)
    status, answer = _call(server, "/api/rerank", body)
    assert status == 400, answer
    assert message in _ollama_error(answer)


def test_a_reranker_does_not_chat_generate_or_embed(server):
    for route, body, error in (
            ("/api/chat", {"model": "reranker", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
             _ollama_error),
            ("/api/generate", {"model": "reranker", "prompt": "Hi", "stream": False}, _ollama_error),
            ("/api/embed", {"model": "reranker", "input": "Hi"}, _ollama_error),
            ("/v1/chat/completions", {"model": "reranker", "messages": [{"role": "user", "content": "Hi"}]},
             _openai_error),
            ("/v1/embeddings", {"model": "reranker", "input": "Hi"}, _openai_error)):
        status, answer = _call(server, route, body)
        assert status == 400, (route, answer)
        assert "is a reranking model" in error(answer), (route, answer)


# --- the request parser ------------------------------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)
_DOCUMENT = st.text(max_size=12) | st.fixed_dictionaries({"text": st.text(max_size=12)})
_VALID = st.fixed_dictionaries({"model": st.just("reranker"), "query": st.text(max_size=12),
                                "documents": st.lists(_DOCUMENT, min_size=1, max_size=3)},
                               optional={"top_n": st.integers(0, 4), "return_documents": st.booleans()})
_ANY = st.fixed_dictionaries({"model": st.just("reranker")}, optional={
    "query": st.text(max_size=12) | _JSON,
    "documents": st.lists(_DOCUMENT, max_size=3) | _JSON,
    "texts": st.lists(st.text(max_size=12), max_size=3) | _JSON,
    "top_n": st.integers(-1, 4) | _JSON,
    "return_documents": st.booleans() | _JSON,
    "return_text": st.booleans() | _JSON,
})
#: Requests the parser accepts, and anything at all in their fields.
_BODIES = _VALID | _ANY


@given(body=_BODIES)
@settings(max_examples=200, deadline=None)
def test_the_parser_gives_a_request_or_a_400(body):
    try:
        request = rerank_request(body, "reranker", field="texts" if "texts" in body else "documents")
        returns_documents(body)
    except BadRequestError as error:
        assert error.status == 400 and error.message
        return
    assert isinstance(request.query, str) and request.documents and all(isinstance(d, str) for d in request.documents)


@given(body=_BODIES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_rerank_body_is_a_200_or_a_well_formed_400(server, body):
    status, answer = _call(server, "/v1/rerank", body)
    event(f"status {status}")
    assert status in (200, 400), answer
    if status == 400:
        assert answer["error"]["message"]
        return
    if "texts" in body:  # TEI's answer: the results alone, scores named "score"
        assert all(isinstance(entry["score"], float) for entry in answer)
        answer = {"results": [{"index": e["index"], "relevance_score": e["score"]} for e in answer]}
    _assert_ranked(answer["results"], len(body.get("texts", body.get("documents"))), body.get("top_n"))
