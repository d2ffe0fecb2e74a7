"""A GGUF that would abort llama.cpp never reaches the daemon's own llama.cpp.

Files here are the real test model with its header rewritten; the tensor
data is left sparse (zeros) unless a test loads the model for real.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from daemon import create_model, post_json, running

from mullama.engine import probe
from mullama.errors import InvalidModelFileError
from mullama.store.gguf import read_gguf

UINT32, STRING, ARRAY = 4, 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(data: bytes, at: int, value_type: int) -> int:
    if value_type == STRING:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]
    if value_type == ARRAY:
        element_type, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if element_type in _SCALAR_SIZES:
            return at + count * _SCALAR_SIZES[element_type]
        for _ in range(count):
            at = _skip_value(data, at, element_type)
        return at
    return at + _SCALAR_SIZES[value_type]


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def rewrite(source: Path, dest: Path, changes: dict[str, tuple[int, bytes]], *, sparse: bool = True) -> Path:
    """A copy of ``source`` whose key-values are replaced or added by ``changes`` (key: (type, payload)).

    The tensor data follows the new header at the alignment; it is copied, or
    left as a hole of the same size when ``sparse``.
    """
    info = read_gguf(source)
    with open(source, "rb") as file:
        head = file.read(info.data_offset)
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
    at, entries = 24, {}
    for _ in range(n_kv):
        start = at
        key_length = struct.unpack_from("<Q", head, at)[0]
        key = head[at + 8 : at + 8 + key_length].decode()
        at += 8 + key_length
        value_type = struct.unpack_from("<I", head, at)[0]
        at = _skip_value(head, at + 4, value_type)
        entries[key] = head[start:at]
    kv_end = at
    for _ in range(n_tensors):
        at += 8 + struct.unpack_from("<Q", head, at)[0]
        n_dims = struct.unpack_from("<I", head, at)[0]
        at += 4 + 8 * n_dims + 4 + 8
    tensor_infos = head[kv_end:at]
    for key, (value_type, payload) in changes.items():
        entries[key] = _string(key) + struct.pack("<I", value_type) + payload
    header = head[:8] + struct.pack("<QQ", n_tensors, len(entries)) + b"".join(entries.values()) + tensor_infos
    header += b"\0" * (-len(header) % info.alignment)
    with open(dest, "wb") as out:
        out.write(header)
        if sparse:
            out.truncate(len(header) + info.file_size - info.data_offset)
        else:
            with open(source, "rb") as file:
                file.seek(info.data_offset)
                while chunk := file.read(1 << 24):
                    out.write(chunk)
    return dest


def u32(value: int) -> tuple[int, bytes]:
    return UINT32, struct.pack("<I", value)


def text(value: str) -> tuple[int, bytes]:
    return STRING, _string(value)


def test_a_rewritten_header_is_still_the_model(model_path, tmp_path):
    copy = read_gguf(rewrite(model_path, tmp_path / "same.gguf", {}))
    assert copy.metadata == read_gguf(model_path).metadata and copy.block_count == 30


#: Header values llama.cpp asserts on (llama-model.cpp load_hparams), each with what the error names.
HOSTILE = {
    "no layers": ({"llama.block_count": u32(0)}, "llama.block_count is 0, but llama.cpp needs 1 to 512 layers"),
    "too many layers": ({"llama.block_count": u32(513)}, "llama.block_count is 513"),
    "too many experts": ({"llama.expert_count": u32(100_000), "llama.expert_used_count": u32(2)},
                         "llama.expert_count is 100000, but llama.cpp needs at most 1024 experts"),
    "more used than there are": ({"llama.expert_count": u32(8), "llama.expert_used_count": u32(9)},
                                 "llama.expert_used_count is 9, but llama.cpp needs at most expert_count"),
    "experts none used": ({"llama.expert_count": u32(8)}, "llama.expert_used_count is 0"),
    "used without experts": ({"llama.expert_used_count": u32(2)}, "llama.expert_used_count is 2"),
    "groups": ({"llama.expert_count": u32(8), "llama.expert_used_count": u32(2), "llama.expert_group_count": u32(3)},
               "llama.expert_group_count is 3, but llama.cpp needs a divisor of expert_count"),
    "next-token layers": ({"llama.nextn_predict_layers": u32(31)}, "llama.nextn_predict_layers is 31"),
    "no context": ({"llama.context_length": u32(0)}, "llama.context_length is 0"),
    "kv heads": ({"llama.attention.head_count_kv": u32(4)},
                 "llama.attention.head_count_kv is 4, but llama.cpp needs a divisor of attention.head_count (9)"),
    "rope scaling": ({"llama.rope.scaling.type": text("sideways")}, "llama.rope.scaling.type is 'sideways'"),
    "block count type": ({"llama.block_count": text("30")}, "llama.block_count must be an unsigned 32-bit integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hyperparameters_llama_cpp_asserts_on_are_refused(case, model_path, tmp_path):
    changes, message = HOSTILE[case]
    with pytest.raises(InvalidModelFileError) as caught:
        read_gguf(rewrite(model_path, tmp_path / "hostile.gguf", changes))
    assert message in caught.value.message


@pytest.mark.parametrize("changes", [
    {"llama.block_count": u32(0)},
    {"llama.expert_count": u32(100_000), "llama.expert_used_count": u32(2)},
])
def test_those_hyperparameters_do_abort_llama_cpp(changes, model_path, tmp_path):
    """What the validator refuses, llama.cpp would die of (shown in a child, the probe's)."""
    path = rewrite(model_path, tmp_path / "hostile.gguf", changes)
    ok, message = probe._probe([path])
    assert ok is False and "SIGABRT" in message and "GGML_ASSERT" in message


def duplicate_token(model_path: Path, dest: Path) -> Path:
    """The model with one token's text made that of the one before it: the validator passes it, llama.cpp aborts."""
    info = read_gguf(model_path)
    with open(model_path, "rb") as file:
        head = bytearray(file.read(info.data_offset))
    key = b"tokenizer.ggml.tokens"
    at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 12
    previous = None
    while True:
        length = struct.unpack_from("<Q", head, at)[0]
        if previous is not None and previous[1] == length:
            head[at + 8 : at + 8 + length] = head[previous[0] + 8 : previous[0] + 8 + length]
            break
        previous, at = (at, length), at + 8 + length
    with open(dest, "wb") as out:
        out.write(head)
        out.truncate(info.file_size)
    return dest


def test_a_file_that_aborts_llama_cpp_is_refused_and_the_daemon_keeps_serving(model_path, tmp_path):
    hostile = duplicate_token(model_path, tmp_path / "duplicate.gguf")
    read_gguf(hostile)  # the validator cannot see it
    with running(tmp_path) as server:
        port = server.server_address[1]
        create_model(port, hostile, "hostile", parameters={"num_ctx": 256})
        create_model(port, model_path, "smol", parameters={"num_ctx": 256, "num_predict": 4, "temperature": 0})
        for _ in range(2):  # the second answer comes from the cached verdict
            status, body = post_json(port, "/api/generate", {"model": "hostile", "prompt": "Hi", "stream": False})
            assert status == 400 and "crashes llama.cpp" in body["error"] and "GGML_ASSERT" in body["error"]
        status, body = post_json(port, "/api/generate", {"model": "smol", "prompt": "Hi", "stream": False})
        assert status == 200 and body["done"]


def test_a_verdict_is_kept_per_model(model_path, tmp_path):
    copy = rewrite(model_path, tmp_path / "copy.gguf", {}, sparse=True)
    probe.verify([copy], "")
    key = probe._key([copy.absolute()], "")
    assert json.loads((probe._cache_dir() / f"{key}.json").read_text()) == {"ok": True, "message": ""}
    copy.touch()  # a file outside the store that changed since is tested again
    assert probe._key([copy.absolute()], "") != key
    # A model in the store is its digest, wherever its blobs lie.
    assert probe._key([copy], "sha256:" + "0" * 64) == probe._key([model_path], "sha256:" + "0" * 64)
