"""The fast stand-in model (tests/fast_model.py): the test model's vocabulary with few of its layers."""

from __future__ import annotations

import hashlib

import pytest
from fast_model import f16_model_path, fast_model_path, write_pruned

import mullama
from mullama.store import gguf

TEXT = "Hello, wörld! <|im_start|>user\nWrite code: def f(x): return x ** 2<|im_end|>"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(model_path):
    with mullama.Model(model_path, num_ctx=256, num_thread=1) as full, \
            mullama.Model(fast_model_path(), num_ctx=256, num_thread=1) as fast:
        yield full, fast


def test_it_keeps_the_first_layers_and_every_other_tensor(model_path):
    full, fast = gguf.read_gguf(model_path), gguf.read_gguf(fast_model_path())
    assert (full.block_count, fast.block_count) == (30, 2)
    kept = {(t.name, t.shape, t.type) for t in full.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2}
    assert {(t.name, t.shape, t.type) for t in fast.tensors} == kept
    for name in ("token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"):
        assert tensor_bytes(fast_model_path(), fast, name) == tensor_bytes(model_path, full, name)


def tensor_bytes(path, info, name):
    tensor = next(t for t in info.tensors if t.name == name)
    with open(path, "rb") as handle:
        handle.seek(info.data_offset + tensor.offset)
        return handle.read(tensor.nbytes)


def test_it_tokenizes_and_detokenizes_as_the_test_model(models):
    full, fast = models
    assert fast.n_vocab == full.n_vocab == 49152
    tokens = full.tokenize(TEXT)
    assert fast.tokenize(TEXT) == tokens
    assert [fast.token_bytes(t) for t in range(0, full.n_vocab, 97)] == \
        [full.token_bytes(t) for t in range(0, full.n_vocab, 97)]
    assert fast.detokenize(tokens) == full.detokenize(tokens)


def test_it_generates_with_a_fraction_of_the_weights(models):
    full, fast = models
    result = fast.complete("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", temperature=0,
                           num_predict=16, repeat_penalty=1.0)
    assert result.timings.eval_count == 16 or result.done_reason == "stop"
    assert fast.n_params < full.n_params / 3


def test_it_is_written_byte_for_byte_the_same(model_path, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_pruned(model_path, first, 2)
    write_pruned(model_path, second, 2)
    assert sha256(first) == sha256(second) == sha256(fast_model_path())
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("layers", [0, 30, -1])
def test_it_refuses_a_layer_count_that_leaves_no_model_or_prunes_nothing(model_path, tmp_path, layers):
    with pytest.raises(ValueError, match="between 1 and 29"):
        write_pruned(model_path, tmp_path / "x.gguf", layers)
    assert not list(tmp_path.iterdir())


def test_the_f16_target_is_the_test_model_at_f16(model_path):
    full, target = gguf.read_gguf(model_path), gguf.read_gguf(f16_model_path())
    assert target.metadata["general.file_type"] == 1 and target.block_count == full.block_count
    assert {t.name: t.shape for t in target.tensors} == {t.name: t.shape for t in full.tensors}
    # Every matrix F16 (type 1); the norms stay F32 (type 0), as llama.cpp's quantize keeps them.
    assert {t.type for t in target.tensors if len(t.shape) == 2} == {1}
