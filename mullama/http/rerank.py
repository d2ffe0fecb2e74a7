"""llama-server's rerank API: ``POST /v1/rerank`` and ``/rerank`` (and ``/v1/reranking``, ``/reranking``).

The request is Jina's and Cohere's, as llama-server reads it: ``model``,
``query``, ``documents`` (strings, or Cohere's ``{"text": ...}`` objects),
``top_n`` (how many of the best to return, all by default) and
``return_documents`` (each result then carries ``{"document": {"text":
...}}``, as Jina and Cohere return it). The response is llama-server's
(``format_response_rerank``): ``model``, ``object: "list"``, ``usage``
(the tokens of every query-document pair) and ``results``, the most
relevant first, each with the document's ``index`` in the request and its
``relevance_score``. Errors have OpenAI's body, as llama-server's do.

A body with ``texts`` instead of ``documents`` is Hugging Face TEI's
request, which llama-server also takes: the answer is then TEI's, a bare
list of ``{"index", "score"}`` (with ``"text"`` when ``return_text`` is
true).

Ollama has no rerank route; Mullama's ``/api/rerank`` (in
:mod:`mullama.http.ollama`) reads the same body through :func:`parse`.
"""

from __future__ import annotations

from typing import Any

from mullama import service
from mullama.errors import BadRequestError
from mullama.http import openai
from mullama.http.common import keep_alive, model_name, typed
from mullama.http.server import Request, Router
from mullama.types import RerankRequest

#: llama-server's paths; the ``reranking`` ones are its aliases.
ROUTES = ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")


def register(router: Router) -> None:
    """Add llama-server's rerank routes; those outside ``/v1/`` also answer errors in OpenAI's body."""
    for path in ROUTES:
        router.add("POST", path, rerank)
    router.add_error_format("/rerank", openai.error_body)


def parse(body: dict[str, Any], name: str, options: dict[str, Any] | None = None, *,
          field: str = "documents") -> RerankRequest:
    """The request body's query and documents (under ``field``), for the model ``name``; a 400 for anything else."""
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequestError('"query" must be a string', param="query")
    documents = body.get(field)
    if not isinstance(documents, list) or not documents:
        raise BadRequestError(f'"{field}" must be a non-empty list of strings', param=field)
    texts = []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise BadRequestError(f'"{field}" must hold strings, or objects with a "text" string', param=field)
        texts.append(text)
    return RerankRequest(model=name, query=query, documents=texts, top_n=typed(body, "top_n", int),
                         options=options or {}, keep_alive=keep_alive(body))


def returns_documents(body: dict[str, Any]) -> bool:
    """The request's ``return_documents`` (false when absent)."""
    return typed(body, "return_documents", bool, False)


def results_json(reranking: service.Reranking, documents: list[str], with_text: bool) -> list[dict[str, Any]]:
    """The ``results`` list, with each document's text when ``with_text``."""
    results = []
    for ranked in reranking.results:
        result: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.relevance_score}
        if with_text:
            result["document"] = {"text": documents[ranked.index]}
        results.append(result)
    return results


def rerank(request: Request) -> None:
    """``POST /v1/rerank`` (and its aliases): llama-server's response, or TEI's to a TEI request."""
    body = request.json()
    if "texts" in body:
        _rerank_tei(request, body)
        return
    req = parse(body, model_name(body))
    with_text = returns_documents(body)
    result = service.rerank(request.handler.app.manager, req, context=request.context)
    request.handler.send_json(200, {"model": req.model, "object": "list",
                                    "usage": {"prompt_tokens": result.prompt_tokens,
                                              "total_tokens": result.prompt_tokens},
                                    "results": results_json(result, req.documents, with_text)})


def _rerank_tei(request: Request, body: dict[str, Any]) -> None:
    """TEI's request (``texts``, ``return_text``) and answer, as llama-server gives them."""
    req = parse(body, model_name(body), field="texts")
    with_text = typed(body, "return_text", bool, False)
    result = service.rerank(request.handler.app.manager, req, context=request.context)
    answer = []
    for ranked in result.results:
        entry: dict[str, Any] = {"index": ranked.index, "score": ranked.relevance_score}
        if with_text:
            entry["text"] = req.documents[ranked.index]
        answer.append(entry)
    request.handler.send_json(200, answer)
