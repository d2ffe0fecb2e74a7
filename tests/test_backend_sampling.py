"""``backend_sampling``: llama.cpp samples inside the model's graph, and the tokens are the host's.

With the option, a request's sampler chain is handed to llama.cpp
(``llama_set_sampler``) when it gets its sequence; the graph then picks the
token, and the logits need not leave the device. The reference is
test_sampling_outputs.py's plain loop, which samples on the host: greedy
outputs, with or without penalties, and seeded ones whose ``top_k`` bounds
the candidates (Ollama's default 40) must be those, token for token. A
seeded draw over the whole vocabulary (``top_k`` 0) sums its probabilities
in another order in the graph, so it may part from the host's after a while:
it must be reproducible. What llama.cpp cannot run in a graph (mirostat,
typical sampling, a grammar) or what needs the logits on the host
(logprobs, a draft's verification) samples on the host as before.
"""

from __future__ import annotations

import ollama
import pytest
from daemon import create_model, openai_client, running
from test_sampling_outputs import CASES, CHAT, N_CTX, N_PREDICT, QUESTIONS, reference, shared, single  # noqa: F401
from test_speculative import forget_all

import mullama
from mullama.engine.batching import Batcher

#: The cases whose every stage has a graph version in llama.cpp (not mirostat, not typical sampling).
IN_GRAPH = [c for c in CASES if not c.get("mirostat") and not 0 < c.get("typical_p", 1.0) < 1]
#: Those whose draw is over a bounded number of candidates, or greedy: the host's tokens exactly.
EXACT = [c for c in IN_GRAPH if c.get("temperature", 0.8) <= 0 or c.get("top_k", 40) > 0]


def run_together(model, prompts, cases):
    """Submit every (prompt, options) to one batcher at once; return the finished requests."""
    forget_all(model)
    with Batcher(model) as batcher:
        requests = [batcher.submit(model.tokenize(p), dict(o, num_predict=N_PREDICT)) for p, o in zip(prompts, cases)]
        for request in requests:
            request.wait(300)
    return requests


def test_the_cases_cover_greedy_penalties_and_seeded_sampling():
    assert {"temperature": 0} in EXACT and any("repeat_penalty" in c for c in EXACT)
    assert any("seed" in c and c.get("temperature", 0.8) > 0 for c in EXACT)
    assert len(EXACT) < len(IN_GRAPH) < len(CASES)


@pytest.mark.parametrize("options", EXACT, ids=[str(sorted(c.items())) for c in EXACT])
def test_sampling_in_the_graph_gives_the_host_s_tokens(single, options):
    prompt = CHAT.format(QUESTIONS[1])
    tokens, text = reference(single, prompt, options)
    assert len(set(tokens)) > 5, "a degenerate output would prove little"
    generation = single.generate(prompt, dict(options, num_predict=N_PREDICT, backend_sampling=True))
    assert "".join(generation) == text
    assert generation.request.sampled_in_graph
    assert generation.result.tokens == tokens


@pytest.mark.parametrize("options", [c for c in IN_GRAPH if c not in EXACT])
def test_a_seeded_draw_over_the_whole_vocabulary_is_reproducible(single, options):
    prompt = CHAT.format(QUESTIONS[1])
    runs = []
    for seed in (options["seed"], options["seed"], options["seed"] + 1):
        generation = single.generate(prompt, dict(options, seed=seed, num_predict=N_PREDICT, backend_sampling=True))
        runs.append("".join(generation))
        assert generation.request.sampled_in_graph
    assert runs[0] == runs[1] != runs[2]
    assert len(set(runs[0].split())) > 5, "a degenerate output would prove little"


def test_a_batch_mixing_graph_and_host_sampling_gives_each_its_own_output(single, shared):
    """Three sequences sampled in the graph share every step with one sampled on the host."""
    prompts = [CHAT.format(q) for q in QUESTIONS]
    cases = EXACT[:4]
    expected = [reference(single, p, o) for p, o in zip(prompts, cases)]
    flags = [True, True, False, True]
    requests = run_together(shared, prompts, [dict(o, backend_sampling=f) for o, f in zip(cases, flags)])
    assert [(r.result.tokens, r.result.text) for r in requests] == expected
    assert [r.sampled_in_graph for r in requests] == flags
    # The sequences are free for the next requests, which sample on the host unless they ask.
    again = run_together(shared, prompts, cases)
    assert [(r.result.tokens, r.result.text) for r in again] == expected
    assert not any(r.sampled_in_graph for r in again)


def test_a_sequence_s_next_request_that_samples_alike_takes_its_chain_over(model_path, single):
    """Attaching a chain re-plans the graph: while requests queue, one that samples alike reuses it, reset."""
    prompt = CHAT.format(QUESTIONS[1])
    seeded, greedy = {"seed": 42}, {"temperature": 0}
    expected = [reference(single, prompt, o) for o in (seeded, seeded, greedy)]
    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=1, num_thread=1) as model:
        with Batcher(model, thread=False) as batcher:
            requests = [batcher.submit(model.tokenize(prompt), dict(o, num_predict=N_PREDICT, backend_sampling=True))
                        for o in (seeded, seeded, greedy)]
            for request in requests:
                request.wait(300)
            # Idle again: the context samples on the host for whoever decodes next.
            assert batcher._graph_samplers == [None]
        assert reference(model, prompt, greedy) == expected[2]
    assert [(r.result.tokens, r.result.text) for r in requests] == expected
    assert all(r.sampled_in_graph for r in requests)
    first, second, third = (r._sampler for r in requests)
    assert second is first and third is not first


def test_what_the_graph_cannot_sample_is_sampled_on_the_host(single):
    prompt = CHAT.format(QUESTIONS[2])
    for options in [c for c in CASES if c not in IN_GRAPH]:
        generation = single.generate(prompt, dict(options, num_predict=N_PREDICT, backend_sampling=True))
        assert "".join(generation) == reference(single, prompt, options)[1]
        assert not generation.request.sampled_in_graph, options
    with_logprobs = single.generate(prompt, {"temperature": 0, "num_predict": 8, "backend_sampling": True},
                                    logprobs=True, top_logprobs=2)
    "".join(with_logprobs)
    assert not with_logprobs.request.sampled_in_graph
    assert len(with_logprobs.result.logprobs) == 8 and all(len(lp.top_logprobs) == 2
                                                          for lp in with_logprobs.result.logprobs)
    constrained = single.generate(prompt, {"temperature": 0, "num_predict": 8, "backend_sampling": True},
                                  grammar='root ::= "yes" | "no"')
    assert "".join(constrained) in ("yes", "no")
    assert not constrained.request.sampled_in_graph


def test_the_apis_take_the_option(tmp_path, model_path):
    """Ollama's ``options``, a Modelfile ``PARAMETER``, and the OpenAI SDK's ``extra_body``."""
    options = {"temperature": 0, "num_predict": 24, "num_thread": 1, "num_ctx": N_CTX}
    prompt = CHAT.format(QUESTIONS[0])
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, "smol")
        create_model(port, model_path, "smol-graph", parameters={"backend_sampling": True})
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        plain = client.generate(model="smol", prompt=prompt, raw=True, options=options).response
        assert client.generate(model="smol", prompt=prompt, raw=True,
                               options={**options, "backend_sampling": True}).response == plain
        assert "backend_sampling" in client.show("smol-graph").parameters
        assert client.generate(model="smol-graph", prompt=prompt, raw=True, options=options).response == plain
        oai = openai_client(server)
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        chat = {"model": "smol", "messages": messages, "temperature": 0, "max_tokens": 24}
        alone = oai.chat.completions.create(**chat).choices[0].message.content
        in_graph = oai.chat.completions.create(**chat, extra_body={"backend_sampling": True})
        assert in_graph.choices[0].message.content == alone
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="smol", prompt=prompt, options={**options, "backend_sampling": "sometimes"})
        assert refused.value.status_code == 400 and "backend_sampling" in refused.value.error
