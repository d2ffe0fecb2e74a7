"""Grammar-constrained sampling on the real model (SmolLM2-135M-Instruct Q4_1).

The sampler checks the chain's pick against the grammar and applies the
grammar to the whole vocabulary only on a rejection. The reference here is
the straightforward way: the grammar as the first stage of one chain.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mullama
from mullama.errors import BadRequestError, MullamaError
from mullama.prompt.grammar import schema_to_gbnf, validate
from mullama.engine.sampling import Sampler, SamplingParams, _stages
from mullama.engine import batching
from mullama.engine.batching import Batcher

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPT = CHAT.format("Describe a person as JSON.")
SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
]
#: The model never starts its answer with "zzz": every first pick is rejected.
ZZZ = 'root ::= "zzz" [a-z]*'


class GrammarFirst:
    """The reference: one chain whose first stage is the grammar, sampled by libllama."""

    def __init__(self, lib, vocab, params, grammar=None):
        self._lib = lib
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if grammar:
            lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root"))
        for stage in _stages(lib, vocab, params):
            lib.llama_sampler_chain_add(self._chain, stage)

    def sample(self, ctx, index):
        return self._lib.llama_sampler_sample(self._chain, ctx, index)

    def close(self):
        self._lib.llama_sampler_free(self._chain)


@pytest.fixture(scope="module")
def model(model_path):
    with mullama.Model(model_path, num_ctx=1024, num_parallel=2, num_thread=1) as loaded:
        yield loaded


def reference(model, monkeypatch, prompt, options, grammar):
    with monkeypatch.context() as patch:
        # Every generation, Model.complete included, makes its sampler in batching.submit.
        patch.setattr(batching, "Sampler", GrammarFirst)
        return model.complete(prompt, options, grammar=grammar)


def valid_json(text, schema):
    return validate(json.loads(text), schema) == []


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_output_is_the_grammar_first_output(model, monkeypatch, schema, penalty):
    grammar = schema_to_gbnf(schema)
    options = {"temperature": 0, "num_predict": 96, "repeat_penalty": penalty}
    fast = model.complete(PROMPT, options, grammar=grammar)
    assert fast.text == reference(model, monkeypatch, PROMPT, options, grammar).text
    assert fast.done_reason == "stop"
    assert valid_json(fast.text, schema)


def test_a_rejected_first_pick_is_resampled_under_the_grammar(model, monkeypatch):
    options = {"temperature": 0, "num_predict": 8}
    assert not model.complete(PROMPT, options).text.startswith("z")
    fast = model.complete(PROMPT, options, grammar=ZZZ)
    assert fast.text.startswith("zzz") and fast.text.isalpha() and fast.text.islower()
    assert fast.text == reference(model, monkeypatch, PROMPT, options, ZZZ).text


def test_a_finished_grammar_leaves_only_the_end_of_generation(model):
    result = model.complete(CHAT.format("Is water wet?"), {"temperature": 0.7, "seed": 1, "num_predict": 32},
                            grammar='root ::= "yes" | "no"')
    assert (result.text, result.done_reason) in [("yes", "stop"), ("no", "stop")]


@settings(max_examples=6, deadline=None)
@given(schema=st.sampled_from(SCHEMAS), temperature=st.sampled_from([0.3, 0.8, 1.5]),
       seed=st.integers(0, 2**31 - 1))
def test_sampled_outputs_satisfy_the_schema(model, schema, temperature, seed):
    options = {"temperature": temperature, "seed": seed, "num_predict": 96}
    result = model.complete(PROMPT, options, grammar=schema_to_gbnf(schema))
    assert result.done_reason == "stop"
    assert valid_json(result.text, schema)


@pytest.mark.parametrize("options", [
    {"temperature": 0.9, "seed": 42},
    {"temperature": 1.2, "seed": 7, "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"temperature": 0.8, "seed": 3, "mirostat": 2},
])
def test_same_seed_same_output(model, options):
    grammar = schema_to_gbnf(SCHEMAS[1])
    options = dict(options, num_predict=96)
    first = model.complete(PROMPT, options, grammar=grammar)
    assert first.text == model.complete(PROMPT, options, grammar=grammar).text
    assert valid_json(first.text, SCHEMAS[1])


def test_the_scheduler_samples_concurrent_grammars(model, monkeypatch):
    requests = [(CHAT.format("Describe a person as JSON."), SCHEMAS[1]), (CHAT.format("Pick colours."), SCHEMAS[2])]
    options = {"temperature": 0, "num_predict": 96, "repeat_penalty": 1.3}
    with Batcher(model) as batcher:
        running = [batcher.submit(model.tokenize(p), options, grammar=schema_to_gbnf(s)) for p, s in requests]
        results = [r.wait(120) for r in running]
    for (prompt, schema), result in zip(requests, results):
        assert result.text == reference(model, monkeypatch, prompt, options, schema_to_gbnf(schema)).text
        assert valid_json(result.text, schema)


def test_a_bad_grammar_is_a_bad_request(model):
    with pytest.raises(BadRequestError, match="grammar"):
        Sampler(model.lib, model.vocab, SamplingParams(), 'root ::= "a" undefined')


def test_close_is_idempotent(model):
    sampler = Sampler(model.lib, model.vocab, SamplingParams(temperature=0), ZZZ)
    sampler.close()
    sampler.close()


def test_a_grammar_no_token_can_satisfy_fails_the_request_not_the_process(model):
    # libllama matches token text as C strings: nothing ever produces a NUL.
    with pytest.raises(MullamaError, match="grammar"):
        model.complete(PROMPT, {"temperature": 0, "num_predict": 4}, grammar="root ::= [\\x00]")
    assert model.complete(PROMPT, {"temperature": 0, "num_predict": 4}, grammar=ZZZ).text.startswith("zzz")


def test_accepting_a_token_the_grammar_forbids_is_refused(model):
    sampler = Sampler(model.lib, model.vocab, SamplingParams(temperature=0), ZZZ)
    try:
        z = model.tokenize("z")[-1]
        sampler.accept(z)
        with pytest.raises(BadRequestError, match="grammar"):
            sampler.accept(model.tokenize("7")[-1])
    finally:
        sampler.close()
