"""The engine's work per token: readers are woken once per step, after every sequence of the step is sampled.

Speed itself lives in bench/ (bench/engine.py, bench/serve.py with
``--model fast``); these tests check the behaviour that makes it.
"""

from __future__ import annotations

import queue

import pytest
from fast_model import fast_model_path

import mullama
from mullama.engine import batching
from mullama.engine.batching import Batcher
from mullama.engine.sampling import Sampler

PROMPTS = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n"]


class RecordingQueue(queue.Queue):
    """A request's output queue that logs each hand-over to its reader."""

    def __init__(self, log, name):
        super().__init__()
        self._log, self._name = log, name

    def put(self, item, block=True, timeout=None):
        self._log.append(("put" if isinstance(item, tuple) else "end", self._name))
        super().put(item, block, timeout)


@pytest.fixture(scope="module")
def model():
    with mullama.Model(fast_model_path(), num_ctx=256, num_parallel=len(PROMPTS), num_thread=1) as loaded:
        yield loaded


def test_readers_are_woken_once_per_step_after_all_sampling(model, monkeypatch):
    log = []

    class LoggingSampler(Sampler):
        def sample(self, ctx, index):
            log.append(("sample", self.name))
            return super().sample(ctx, index)

    monkeypatch.setattr(batching, "Sampler", LoggingSampler)
    options = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}
    with Batcher(model, thread=False) as batcher:
        requests = []
        for name, prompt in enumerate(PROMPTS):
            request = batcher.submit(model.tokenize(prompt), options)
            request._sampler.name = name
            request._output = RecordingQueue(log, name)
            requests.append(request)
        steps = 0
        while not all(r.done for r in requests):
            log.append(("step", None))
            batcher._turn()
            steps += 1
    texts = []
    for request in requests:
        text = ""
        while not request._output.empty():
            item = request._output.get()
            if isinstance(item, tuple):
                text += item[0]
        texts.append(text)
    assert texts == [r.result.text for r in requests] and all(texts)
    turns = [[]]
    for entry in log[1:]:
        if entry[0] == "step":
            turns.append([])
        else:
            turns[-1].append(entry)
    assert len(turns) == steps
    sampled_together = 0
    for turn in turns:
        kinds = [kind for kind, _ in turn]
        # Every sample of the step comes before any reader is woken ...
        assert kinds == sorted(kinds, key=lambda kind: kind != "sample"), turn
        # ... and a reader gets one piece per step, and at its end perhaps the text held back.
        ends = {name for kind, name in turn if kind == "end"}
        puts = [name for kind, name in turn if kind == "put"]
        assert all(puts.count(name) <= (2 if name in ends else 1) for name in puts), turn
        sampled_together += kinds.count("sample") == len(PROMPTS)
    assert sampled_together >= 5
