"""A schema's ``pattern`` cannot freeze the daemon: costly patterns are refused, grammar calls release the GIL."""

from __future__ import annotations

import time

import pytest
from gil import counter_rates
from daemon import create_model, post_json, running
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mullama
from mullama.engine.sampling import Sampler, SamplingParams
from mullama.errors import BadRequestError
from mullama.prompt.grammar import UnsupportedSchemaError, schema_to_gbnf

PROMPT = "<|im_start|>user\nWrite a short string.<|im_end|>\n<|im_start|>assistant\n"
#: Patterns whose grammar llama.cpp would explore for seconds to hours per token.
HOSTILE = [
    "^((a?){40}){40}$",  # empty matches in every copy: exponentially many ways to skip them
    "^((a?){10}){10}$",
    "^(a*)*$",
    "(x|y?)+",
    "^((ab|a|b){1,30}){1,30}$",  # thousands of ways to split the same text, all alive at once
    "^(([a-z]{1,10}){1,10}){1,10}$",
    "^([a-z ]{1,10}[a-z]{0,10}){1,5}$",
    "^(a{100}){100}$",  # ten thousand positions
    "^.{0,5000}$",
]
#: What one grammar-constrained token may cost, CPU time of the sampling thread, over the whole vocabulary.
TOKEN_BUDGET = 0.050


@pytest.fixture(scope="module")
def model(model_path):
    with mullama.Model(model_path, num_ctx=256, num_thread=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def logits(model) -> int:
    """The output index of a decoded prompt in ``model``'s context; its logits stay for the module."""
    ctx = model.context
    tokens = model.tokenize(PROMPT)
    ctx.forget(0)
    ctx.batch.clear()
    for pos, token in enumerate(tokens):
        ctx.batch.add(token, pos, 0, pos == len(tokens) - 1)
    ctx.decode(ctx.batch)
    return len(tokens) - 1


@pytest.mark.parametrize("pattern", HOSTILE)
def test_costly_patterns_are_refused_at_once(pattern):
    started = time.thread_time()
    with pytest.raises(UnsupportedSchemaError) as caught:
        schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}})
    assert time.thread_time() - started < 2.0
    error = caught.value
    assert isinstance(error, BadRequestError) and error.status == 400 and error.param == "format"
    assert error.keyword == "pattern" and error.path == "#/properties/s" and repr(pattern) in error.message


@pytest.mark.parametrize("pattern", [
    r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$", r"^\d{4}-\d{2}-\d{2}$", r"^.{1,280}$",
    r"^[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})*$", r"^((25[0-5]|2[0-4]\d|[01]?\d?\d)\.){3}(25[0-5]|2[0-4]\d|[01]?\d?\d)$",
    r"^\+?[0-9]{1,3}[- ]?\(?[0-9]{3}\)?[- ]?[0-9]{3}[- ]?[0-9]{4}$", r"^([A-Z][a-z]{1,20}\s?){1,5}$", r"[a-z]{1,1000}",
    r"^(a?)?b$", r"^[a-z]{0,3000}$",
])
def test_real_world_patterns_are_accepted(pattern):
    assert schema_to_gbnf({"type": "string", "pattern": pattern})


def test_a_hostile_pattern_is_a_400_and_the_daemon_keeps_serving(tmp_path, model_path):
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, model_path, parameters={"num_ctx": 256, "num_predict": 4, "temperature": 0})
        hostile = {"type": "string", "pattern": "^((a?){40}){40}$"}
        status, body = post_json(port, "/api/chat", {"model": "smol", "stream": False, "format": hostile,
                                                 "messages": [{"role": "user", "content": "Say a."}]})
        assert status == 400 and "pattern" in body["error"]
        status, body = post_json(port, "/api/generate", {"model": "smol", "prompt": "Hi", "stream": False})
        assert status == 200 and body["done"]


def test_a_grammar_call_lets_other_python_threads_run(model, logits):
    """A slow grammar (written by hand: the converter refuses this one) runs with the GIL released."""
    sampler = Sampler(model.lib, model.vocab, SamplingParams(temperature=0), 'root ::= (("a"?){10}){10}')
    try:
        free_rate, grammar_rate = counter_rates(lambda: sampler.sample(model.context.ptr, logits))
    finally:
        sampler.close()
    # Holding the GIL through the call leaves the counter a few percent (its switch-interval slices).
    assert grammar_rate > 0.2 * free_rate


# Random patterns: whatever the converter accepts is cheap for the sampler.

_ATOMS = st.sampled_from(["a", "b", "ab", "[a-z]", "[ab]", ".", r"\d", r"\w", r"\s", '[^"]', "[a-z ]", r"\.", "x"])
_QUANTIFIERS = st.one_of(
    st.sampled_from(["", "", "?", "*", "+"]),
    st.integers(0, 12).map(lambda n: f"{{{n}}}"),
    st.tuples(st.integers(0, 6), st.integers(0, 12)).map(lambda t: f"{{{t[0]},{t[0] + t[1]}}}"),
    st.integers(0, 4).map(lambda n: f"{{{n},}}"),
)


def _quantified(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(inner, _QUANTIFIERS).map("".join)


_REGEX = st.recursive(
    _quantified(_ATOMS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda parts: "(" + "|".join(parts) + ")"),
        _quantified(inner.map(lambda r: f"({r})")),
    ),
    max_leaves=6,
)
_PATTERNS = st.tuples(st.sampled_from(["", "^"]), _REGEX, st.sampled_from(["", "$"])).map("".join)
_SCHEMAS = st.tuples(_PATTERNS, st.sampled_from(["string", "array", "object"])).map(
    lambda t: {"type": "string", "pattern": t[0]} if t[1] == "string"
    else {"type": "array", "items": {"type": "string", "pattern": t[0]}, "minItems": 1} if t[1] == "array"
    else {"type": "object", "properties": {"v": {"type": "string", "pattern": t[0]}}, "required": ["v"]})


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schema=_SCHEMAS, seed=st.integers(0, 2**16))
@example(schema={"type": "string", "pattern": "^((a?){10}){6}$"}, seed=1)
@example(schema={"type": "string", "pattern": "^(([a-z]{1,10}){1,10}){1,10}$"}, seed=2)
def test_every_accepted_pattern_is_cheap_per_token(model, logits, schema, seed):
    started = time.thread_time()
    try:
        grammar = schema_to_gbnf(schema)
    except UnsupportedSchemaError:
        assert time.thread_time() - started < 2.0
        return
    assert time.thread_time() - started < 2.0
    # Two runs of the same picks, token by token the cheaper: the cost is the grammar's, not a hiccup's.
    costs = [min(pair) for pair in zip(_token_costs(model, logits, grammar, seed),
                                       _token_costs(model, logits, grammar, seed))]
    assert max(costs, default=0.0) < TOKEN_BUDGET, (schema, costs)


def _token_costs(model, logits: int, grammar: str, seed: int, tokens: int = 8) -> list[float]:
    """CPU seconds of each grammar-constrained pick, up to ``tokens`` picks or the grammar's end.

    Random picks among what the grammar allows walk it far from the model's
    favourite path, and every pick goes through the costliest step: the
    grammar over the whole vocabulary.
    """
    sampler = Sampler(model.lib, model.vocab, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed), grammar)
    costs = []
    try:
        for _ in range(tokens):
            started = time.thread_time()
            token = sampler._pick(model.context.ptr, logits, constrained=True)
            if model.lib.llama_vocab_is_eog(model.vocab, token):
                break
            sampler._accept(token)
            costs.append(time.thread_time() - started)
    finally:
        sampler.close()
    return costs
