"""Greedy and seeded outputs stay what they are, whatever the engine does to sample faster.

The reference is the plainest generation loop there is: one sequence, the
prompt decoded in one batch, then one token per decode, each picked by
``llama_sampler_sample`` with one libllama chain built here from Ollama's
options in llama.cpp's common order (penalties; top_k, typical, top_p,
min_p, temperature, a seeded dist; greedy at temperature 0; mirostat in
place of the truncation samplers). This is what Mullama's outputs were
when the engine's sampling was last changed: the engine's own path
(batching, sampler reuse, incremental text) must give the same tokens and
text, alone and in a shared batch.
"""

from __future__ import annotations

import pytest

import mullama
from mullama.engine.batching import Batcher
from mullama.ffi import llama as L

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["Write a short story about a dragon.", "What is the capital of France?",
             "Write a haiku about rain.", "Explain recursion."]
#: The engine's defaults (mullama.options), spelled out: the reference does not read them from the engine.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0, "repeat_last_n": 64,
            "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
            "mirostat_tau": 5.0, "mirostat_eta": 0.1, "seed": -1}
CASES = [
    {"temperature": 0},
    {"temperature": 0, "repeat_penalty": 1.1},
    {"temperature": 0, "repeat_penalty": 1.5, "repeat_last_n": -1, "presence_penalty": 0.4},
    {"seed": 42},
    {"seed": 7, "temperature": 1.3, "top_k": 0, "top_p": 1.0},
    {"seed": 3, "top_k": 5, "top_p": 0.5, "min_p": 0.05, "typical_p": 0.7},
    {"seed": 11, "repeat_penalty": 1.0, "frequency_penalty": 0.8, "min_p": 0.1},
    {"seed": 5, "mirostat": 1, "mirostat_tau": 4.0},
    {"seed": 9, "mirostat": 2, "temperature": 1.0},
]
N_PREDICT = 48
N_CTX = 512


def reference_chain(lib, vocab, options):
    """The sampler chain for ``options`` (Ollama's names), in llama.cpp's common order."""
    o = {**DEFAULTS, **options}
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    seed = L.LLAMA_DEFAULT_SEED if o["seed"] < 0 else o["seed"]
    stages = []
    if o["repeat_last_n"] != 0 and (o["repeat_penalty"] != 1.0 or o["presence_penalty"] or o["frequency_penalty"]):
        window = N_CTX if o["repeat_last_n"] < 0 else o["repeat_last_n"]
        stages.append(lib.llama_sampler_init_penalties(n_vocab, window, o["repeat_penalty"], o["frequency_penalty"],
                                                       o["presence_penalty"]))
    if o["temperature"] <= 0:
        stages.append(lib.llama_sampler_init_greedy())
    elif o["mirostat"] == 1:
        stages += [lib.llama_sampler_init_temp(o["temperature"]),
                   lib.llama_sampler_init_mirostat(n_vocab, seed, o["mirostat_tau"], o["mirostat_eta"], 100)]
    elif o["mirostat"] == 2:
        stages += [lib.llama_sampler_init_temp(o["temperature"]),
                   lib.llama_sampler_init_mirostat_v2(seed, o["mirostat_tau"], o["mirostat_eta"])]
    else:
        if o["top_k"] > 0:
            stages.append(lib.llama_sampler_init_top_k(o["top_k"]))
        if 0 < o["typical_p"] < 1:
            stages.append(lib.llama_sampler_init_typical(o["typical_p"], 1))
        if 0 < o["top_p"] < 1:
            stages.append(lib.llama_sampler_init_top_p(o["top_p"], 1))
        if o["min_p"] > 0:
            stages.append(lib.llama_sampler_init_min_p(o["min_p"], 1))
        stages += [lib.llama_sampler_init_temp(o["temperature"]), lib.llama_sampler_init_dist(seed)]
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    for stage in stages:
        lib.llama_sampler_chain_add(chain, stage)
    return chain


def reference(model, prompt, options):
    """(tokens, text) of the plain loop, on sequence 0 of ``model``'s context with nothing cached."""
    lib, ctx = model.lib, model.context
    ctx.forget(0)
    chain = reference_chain(lib, model.vocab, options)
    try:
        tokens = model.tokenize(prompt)
        batch = ctx.batch
        batch.clear()
        for i, token in enumerate(tokens):
            batch.add(token, i, 0, i == len(tokens) - 1)
        ctx.decode(batch)
        out, index = [], len(tokens) - 1
        while len(out) < N_PREDICT:
            token = lib.llama_sampler_sample(chain, ctx.ptr, index)
            if model.is_end_of_generation(token):
                break
            out.append(token)
            batch.clear()
            batch.add(token, len(tokens) + len(out) - 1, 0, True)
            ctx.decode(batch)
            index = 0
    finally:
        lib.llama_sampler_free(chain)
        ctx.forget(0)
    return out, b"".join(model.token_bytes(t) for t in out).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def single(model_path):
    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=1, num_thread=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def shared(model_path):
    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=4, num_thread=1) as loaded:
        yield loaded


@pytest.mark.parametrize("options", CASES, ids=[str(sorted(c.items())) for c in CASES])
def test_the_engine_gives_the_reference_output(single, options):
    prompt = CHAT.format(QUESTIONS[0])
    tokens, text = reference(single, prompt, options)
    assert len(set(tokens)) > 5, "a degenerate output would prove little"
    single.context.forget(0)
    result = single.complete(prompt, dict(options, num_predict=N_PREDICT))
    assert result.tokens == tokens
    assert result.text == text
    assert result.done_reason == ("length" if len(tokens) == N_PREDICT else "stop")


@pytest.mark.parametrize("cases", [CASES[:4], CASES[4:8]], ids=["greedy-and-seeded", "seeded"])
def test_requests_sharing_a_batch_give_the_reference_outputs(single, shared, cases):
    prompts = [CHAT.format(q) for q in QUESTIONS]
    expected = [reference(single, p, o) for p, o in zip(prompts, cases)]
    for seq in range(shared.context.n_seq):
        shared.context.forget(seq)
    with Batcher(shared) as batcher:
        requests = [batcher.submit(shared.tokenize(p), dict(o, num_predict=N_PREDICT)) for p, o in zip(prompts, cases)]
        results = [r.wait(120) for r in requests]
    assert [(r.tokens, r.text) for r in results] == expected
