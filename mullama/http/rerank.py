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
:mod:`mullama.http.ollama`) reads the same body: both parse it with
:func:`mullama.http.common.rerank_request`, so that neither API family's
module imports the other's.
"""

from __future__ import annotations

from typing import Any

from mullama import service
from mullama.http import openai
from mullama.http.common import model_name, rerank_request, rerank_results, returns_documents, typed
from mullama.http.server import Request, Router

#: llama-server's paths; the ``reranking`` ones are its aliases.
ROUTES = ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")


def register(router: Router) -> None:
    """Add llama-server's rerank routes; those outside ``/v1/`` also answer errors in OpenAI's body."""
    for path in ROUTES:
        router.add("POST", path, rerank)
    router.add_error_format("/rerank", openai.error_body)


def rerank(request: Request) -> None:
    """``POST /v1/rerank`` (and its aliases): llama-server's response, or TEI's to a TEI request."""
    body = request.json()
    if "texts" in body:
        _rerank_tei(request, body)
        return
    req = rerank_request(body, model_name(body))
    with_text = returns_documents(body)
    result = service.rerank(request.handler.app.manager, req, context=request.context)
    request.handler.send_json(200, {"model": req.model, "object": "list",
                                    "usage": {"prompt_tokens": result.prompt_tokens,
                                              "total_tokens": result.prompt_tokens},
                                    "results": rerank_results(result, req.documents, with_text)})


def _rerank_tei(request: Request, body: dict[str, Any]) -> None:
    """TEI's request (``texts``, ``return_text``) and answer, as llama-server gives them."""
    req = rerank_request(body, model_name(body), field="texts")
    with_text = typed(body, "return_text", bool, False)
    result = service.rerank(request.handler.app.manager, req, context=request.context)
    answer = []
    for ranked in result.results:
        entry: dict[str, Any] = {"index": ranked.index, "score": ranked.relevance_score}
        if with_text:
            entry["text"] = req.documents[ranked.index]
        answer.append(entry)
    request.handler.send_json(200, answer)
