"""Speculative decoding gives exactly the output the model gives alone, and counts what the draft got right.

The target is the Q4_1 test model: its logits for a token decoded in a
batch of several (the verification of proposals) equal those of a token
decoded alone, bit for bit, on this CPU and in test_sampling_outputs.py's
reference. The F16 re-quantization, bench/spec.py's target, is not used
here: its batched and single-token logits may differ in the last bits on
some CPUs, which could flip a near tie and make a byte-identity test flaky.
Two drafts cover both ways a proposal goes: the 2-layer cut of the test
model (tests/fast_model.py), which mostly disagrees with the target, and
the test model itself, which always agrees (every proposal kept, and the
target's bonus token after them).
"""

from __future__ import annotations

import math

import ollama
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from daemon import create_model, file_digest, running
from fast_model import fast_model_path
from test_sampling_outputs import CHAT, N_CTX, N_PREDICT, QUESTIONS, reference

import mullama
from mullama.engine.batching import Batcher
from mullama.engine.speculative import ngram_proposal
from mullama.errors import BadRequestError, ModelLoadError

DRAFTS = {"pruned": lambda target: fast_model_path(2), "self": lambda target: target}
GREEDY = {"temperature": 0}
#: Greedy with a penalty, and seeded sampling: any sampler gives the same tokens, drafted or not.
OTHERS = [{"temperature": 0, "repeat_penalty": 1.3}, {"seed": 42}, {"seed": 7, "top_k": 5}]


@pytest.fixture(scope="module", params=sorted(DRAFTS))
def pair(request, model_path):
    """The test model with a draft, four sequences."""
    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=4, num_thread=1,
                       draft=DRAFTS[request.param](model_path)) as loaded:
        yield request.param, loaded


@pytest.fixture(scope="module")
def single(model_path):
    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=1, num_thread=1) as loaded:
        yield loaded


def forget_all(model):
    for seq in range(model.context.n_seq):
        model.context.forget(seq)


@pytest.mark.parametrize("question", QUESTIONS[:3])
def test_greedy_output_with_a_draft_is_the_model_s_own(pair, single, question):
    name, model = pair
    prompt = CHAT.format(question)
    tokens, text = reference(single, prompt, GREEDY)
    forget_all(model)
    result = model.complete(prompt, dict(GREEDY, num_predict=N_PREDICT))
    assert (result.tokens, result.text) == (tokens, text)
    timings = result.timings
    assert 0 <= timings.draft_accepted <= timings.draft_proposed
    assert timings.draft_proposed > 0
    if name == "self":
        # Each step keeps all it drafted and adds the target's own token: far fewer steps than tokens.
        assert timings.draft_accepted == timings.draft_proposed
        assert timings.draft_accepted >= len(tokens) // 2


def test_requests_sharing_a_batch_with_and_without_drafts_give_their_own_outputs(pair, single):
    name, model = pair
    prompts = [CHAT.format(q) for q in QUESTIONS]
    cases = [GREEDY, *OTHERS]
    expected = [reference(single, p, o) for p, o in zip(prompts, cases)]
    forget_all(model)
    with Batcher(model) as batcher:
        # The second request does not draft: it shares every step with three that do.
        requests = [batcher.submit(model.tokenize(p), dict(o, num_predict=N_PREDICT, draft=i != 1))
                    for i, (p, o) in enumerate(zip(prompts, cases))]
        results = [r.wait(300) for r in requests]
    assert [(r.tokens, r.text) for r in results] == expected
    assert results[1].timings.draft_proposed == 0
    assert all(r.timings.draft_proposed > 0 for i, r in enumerate(results) if i != 1)
    if name == "self":
        assert results[0].timings.draft_accepted == results[0].timings.draft_proposed > 0


def test_the_kv_caches_hold_what_was_kept(pair):
    """After a drafted generation, the target caches exactly its prompt and output, and a follow-up reuses it."""
    _, model = pair
    forget_all(model)
    prompt = model.tokenize(CHAT.format(QUESTIONS[1]))
    first = model.complete(prompt, temperature=0, num_predict=12)
    assert model.context.cached[0] == (prompt + first.tokens)[:len(model.context.cached[0])]
    assert len(model.context.cached[0]) >= len(prompt) + len(first.tokens) - 1
    follow = first.context + model.tokenize("\nAnd then?", add_special=False)
    second = model.complete(follow, temperature=0, num_predict=12)
    assert second.timings.prompt_eval_count < len(follow) // 2
    plain = model.complete(follow, temperature=0, num_predict=12, draft=False)
    assert second.tokens == plain.tokens


def test_grammar_and_logprobs_requests_do_not_draft(pair):
    _, model = pair
    prompt = CHAT.format(QUESTIONS[1])
    with_logprobs = model.complete(prompt, temperature=0, num_predict=8, logprobs=True)
    assert with_logprobs.timings.draft_proposed == 0 and len(with_logprobs.logprobs) > 0
    constrained = model.complete(prompt, temperature=0, num_predict=8, grammar='root ::= "yes" | "no"')
    assert constrained.timings.draft_proposed == 0 and constrained.text in {"yes", "no"}
    plain = model.complete(prompt, temperature=0, num_predict=8, draft_num_predict=0)
    assert plain.timings.draft_proposed == 0



def test_a_modelfile_draft_loads_with_its_model_in_the_daemon(tmp_path, model_path):
    draft = fast_model_path(2)
    stat = draft.stat()
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, draft, "the-draft")  # uploads the draft's blob
        create_model(port, model_path, "smol-spec", draft_files={draft.name: file_digest(draft, stat.st_size,
                                                                                         stat.st_mtime_ns)})
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert "DRAFT" in client.show("smol-spec").modelfile
        prompt = CHAT.format(QUESTIONS[0])
        options = {"temperature": 0, "num_predict": 24, "num_thread": 1, "num_ctx": N_CTX}
        drafted = client.generate(model="smol-spec", prompt=prompt, raw=True, options=options)
        [loaded] = server.app.manager.running()
        assert loaded.model.draft is not None
        weights = [sum(t.nbytes for t in loaded.record.read_header(path).tensors)
                   for path in (loaded.record.model_path, loaded.record.draft_path)]
        assert loaded.estimate.weights == sum(weights)
        plain = client.generate(model="smol-spec", prompt=prompt, raw=True, options={**options, "draft": False})
        create_model(port, model_path, "smol")
        alone = client.generate(model="smol", prompt=prompt, raw=True, options=options)
        assert drafted.response == plain.response == alone.response
        assert drafted.eval_count == alone.eval_count


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, model_path):
    """The 2-layer draft with one token's text changed (" Paris" to " Qaris", same length, in place)."""
    data = bytearray(fast_model_path(2).read_bytes())
    token = "\u0120Paris".encode()
    at = data.index(len(token).to_bytes(8, "little") + token) + 8
    data[at:at + len(token)] = "\u0120Qaris".encode()
    other = tmp_path / "other-vocabulary.gguf"
    other.write_bytes(data)
    with pytest.raises(ModelLoadError, match="does not share the vocabulary"):
        mullama.Model(model_path, num_ctx=64, num_thread=1, draft=other)


def test_a_prompt_longer_than_a_batch_is_read_by_the_draft_over_several_steps(model_path, single):
    prompt = CHAT.format(" ".join(QUESTIONS) + " Answer the first.")
    tokens, text = reference(single, prompt, GREEDY)
    with mullama.Model(model_path, num_ctx=N_CTX, num_batch=8, num_thread=1, draft=model_path) as model:
        assert len(model.tokenize(prompt)) > 4 * 8
        result = model.complete(prompt, temperature=0, num_predict=N_PREDICT)
    assert (result.tokens, result.text) == (tokens, text)
    assert result.timings.draft_accepted > 0


def test_a_draft_unsure_of_its_next_token_stops_proposing(pair, single):
    """``draft_p_min``: fewer proposals the surer the draft must be, and the output stays the model's own."""
    _, model = pair
    prompt = CHAT.format(QUESTIONS[0])
    expected = reference(single, prompt, GREEDY)
    proposed = []
    for p_min in (0.0, 0.5, 0.9, 1.0):
        forget_all(model)
        result = model.complete(prompt, dict(GREEDY, num_predict=N_PREDICT, draft_p_min=p_min))
        assert (result.tokens, result.text) == expected
        proposed.append(result.timings.draft_proposed)
    assert proposed == sorted(proposed, reverse=True)
    assert proposed[0] > proposed[2]
    # No token is certain among ten with finite logits.
    assert proposed[-1] == 0


def test_the_draft_s_confidence_is_its_likeliest_token_s_probability_among_its_ten_likeliest(model_path):
    from mullama.engine.speculative import Draft, Proposal

    with mullama.Model(model_path, num_ctx=N_CTX, num_parallel=1, num_thread=1) as target:
        draft = Draft(target, fast_model_path(2))
        try:
            tokens = target.tokenize(CHAT.format(QUESTIONS[2]))
            proposal = Proposal(0, tokens, limit=1, p_min=1e-9)
            draft.propose([proposal])
            logits = draft.model.lib.llama_get_logits_ith(draft.ctx.ptr, -1)
            values = sorted((logits[i] for i in range(draft.model.n_vocab)), reverse=True)
            top = values[:10]
            assert proposal.drafted and logits[proposal.drafted[0]] == top[0]
            assert draft._top_p == pytest.approx(1 / sum(math.exp(v - top[0]) for v in top), rel=1e-9)
        finally:
            draft.close()


def test_draft_p_min_out_of_range_is_a_bad_request(pair):
    _, model = pair
    with pytest.raises(BadRequestError, match="draft_p_min"):
        model.complete(CHAT.format(QUESTIONS[0]), temperature=0, num_predict=2, draft_p_min=1.5)


def _ngram_reference(tokens: list[int], sampled: int, n: int, m: int) -> list[int]:
    """llama.cpp's ``common_ngram_simple_draft`` (common/ngram-map.cpp), line for line."""
    cur_len = len(tokens)
    if cur_len <= n + m + 1:
        return []
    pattern = tokens[cur_len - n + 1:] + [sampled]
    match_pos = 0
    for j in range(cur_len - n - 1, 0, -1):
        if all(tokens[j + k] == pattern[k] for k in range(len(pattern))):
            match_pos = j
            break
    if match_pos == 0:
        return []
    copy_max = min(m, cur_len - (match_pos + n))
    if copy_max < n:
        return []
    return tokens[match_pos + n:match_pos + n + copy_max]


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 300).flatmap(lambda vocab: st.tuples(
    st.lists(st.integers(0, vocab), max_size=80), st.integers(0, vocab))), st.integers(1, 6), st.integers(1, 16))
def test_an_ngram_proposal_is_llama_server_s(history_and_pending, n, m):
    history, pending = history_and_pending
    assert ngram_proposal(history, pending, n, m) == _ngram_reference(history, pending, n, m)


#: A prompt whose answer repeats its own text: what n-gram drafting is for.
REPEAT = CHAT.format("Repeat this text exactly, word for word:\n\nThe quick brown fox jumps over the lazy dog. "
                     "A journey of a thousand miles begins with a single step. All that glitters is not gold.")


def test_drafting_from_the_text_itself_gives_the_model_s_own_output(single):
    """``draft_ngram``: no draft model; proposals found in the prompt are kept, the output is unchanged."""
    cases = [GREEDY, *OTHERS]
    expected = [reference(single, REPEAT, o) for o in cases]
    with mullama.Model(single.path, num_ctx=N_CTX, num_parallel=4, num_thread=1) as model:
        assert model.draft is None
        with Batcher(model) as batcher:
            # The last request does not draft: it shares every step with three that do.
            requests = [batcher.submit(model.tokenize(REPEAT), dict(o, num_predict=N_PREDICT, draft_num_predict=8,
                                                                    draft_ngram=3 if i < 3 else 0))
                        for i, o in enumerate(cases)]
            results = [r.wait(300) for r in requests]
    assert [(r.tokens, r.text) for r in results] == expected
    assert results[0].timings.draft_accepted > len(results[0].tokens) // 3
    assert results[3].timings.draft_proposed == 0
