"""Tests of the GGUF validator and metadata reader (mullama.store.gguf)."""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mullama.errors import InvalidModelFileError
from mullama.store.gguf import GGML_TYPES, GGUFInfo, SkippedArray, read_gguf

# GGUF value types, as numbered in gguf.h.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


# --- a tiny GGUF writer ------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _payload(value_type: int, value: Any) -> bytes:
    """Encode a value of *value_type*; an array is given as (element_type, items)."""
    if value_type == STRING:
        return _str(value)
    if value_type == ARRAY:
        element_type, items = value
        body = b"".join(_payload(element_type, item) for item in items)
        return struct.pack("<IQ", element_type, len(items)) + body
    return struct.pack("<" + _CODES[value_type], value)


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    _, block, size = GGML_TYPES.get(ggml_type, ("unknown", 1, 0))
    count = 1
    for n in shape:
        count *= n
    return count // block * size


def build_gguf(
    kv: Sequence[tuple[str, int, Any]] = (),
    tensors: Sequence[tuple[str, tuple[int, ...], int]] = (),
    *,
    version: int = 3,
    alignment: int = 32,
    offsets: list[int] | None = None,
    data_size: int | None = None,
) -> bytes:
    """A GGUF file: *kv* as (key, type, value), *tensors* as (name, shape, ggml type).

    Tensor data is zeros, laid out contiguously at *alignment* unless
    *offsets* says otherwise; *data_size* overrides the data section's length.
    """
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv)))
    for key, value_type, value in kv:
        out += _str(key) + struct.pack("<I", value_type) + _payload(value_type, value)
    layout, end = [], 0
    for _, shape, ggml_type in tensors:
        layout.append(end)
        end += -(-_nbytes(shape, ggml_type) // alignment) * alignment
    for i, (name, shape, ggml_type) in enumerate(tensors):
        offset = offsets[i] if offsets else layout[i]
        out += _str(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)
    if tensors:
        out += bytes(-len(out) % alignment)
    return bytes(out + bytes(end if data_size is None else data_size))


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path


def rejects(tmp_path: Path, data: bytes, match: str, **limits: int) -> None:
    with pytest.raises(InvalidModelFileError, match=match) as caught:
        read_gguf(write(tmp_path, data), **limits)
    assert caught.value.message.startswith("model.gguf: ")
    assert "\n" not in caught.value.message


ARCH = [("general.architecture", STRING, "llama")]
WEIGHT = [("w", (64, 2), 0)]


def assert_within_bounds(info: GGUFInfo) -> None:
    """What acceptance promises: every region the header describes lies in the file."""
    assert info.alignment > 0 and info.alignment & (info.alignment - 1) == 0
    assert info.data_offset <= info.file_size
    assert len({t.name for t in info.tensors}) == len(info.tensors)
    expected_offset = 0
    for t in info.tensors:
        _, block, size = GGML_TYPES[t.type]
        assert len(t.shape) <= 4 and all(n > 0 for n in t.shape)
        assert t.nbytes == t.n_elements // block * size
        assert t.offset == expected_offset and t.offset % info.alignment == 0
        assert info.data_offset + t.offset + t.nbytes <= info.file_size
        expected_offset += -(-t.nbytes // info.alignment) * info.alignment


# --- the real model ----------------------------------------------------------


@pytest.fixture(scope="module")
def real(model_path: Path) -> GGUFInfo:
    return read_gguf(model_path)


def test_real_model_metadata(real: GGUFInfo, model_path: Path) -> None:
    assert real.version == 3
    assert real.architecture == "llama"
    assert real.quantization == "Q4_1"
    assert real.context_length == 8192
    assert real.embedding_length == 576
    assert real.block_count == 30
    assert real.head_count == 9
    assert real.head_count_kv == 3
    assert real.pooling_type is None
    assert real.license == "apache-2.0"
    assert real.name and "Smollm2" in real.name
    assert "<|im_start|>" in real.chat_template
    assert 134_000_000 < real.parameter_count < 135_000_000
    assert real.file_size == model_path.stat().st_size
    assert real.data_offset % real.alignment == 0
    assert_within_bounds(real)
    # The tensors tile the data section exactly up to the end of the file.
    last = max(real.tensors, key=lambda t: t.offset)
    assert real.data_offset + last.offset + last.nbytes == real.file_size
    embed = real.tensor("token_embd.weight")
    assert embed is not None and embed.shape == (576, 49152) and embed.type_name == "Q8_0"
    assert embed.nbytes == 576 * 49152 // 32 * 34


def test_real_model_arrays_skipped_unless_asked(real: GGUFInfo, model_path: Path) -> None:
    assert real.metadata["tokenizer.ggml.tokens"] == SkippedArray("string", 49152)
    assert real.metadata["tokenizer.ggml.merges"] == SkippedArray("string", 48900)
    assert real.metadata["general.languages"] == ["en"]
    full = read_gguf(model_path, load_arrays=True)
    tokens = full.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and tokens[1] == "<|im_start|>"
    assert len(full.metadata["tokenizer.ggml.token_type"]) == 49152
    assert full.metadata["tokenizer.ggml.merges"][0].count(" ") == 1


def test_real_model_info_like_ollama(real: GGUFInfo, model_path: Path) -> None:
    info = real.model_info()
    assert list(info) == sorted(info)
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["general.parameter_count"] == real.parameter_count
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 8192
    assert info["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # float32 printed shortest
    assert info["tokenizer.ggml.tokens"] is None
    assert info["general.languages"] is None  # Ollama nulls every non-empty array
    verbose = read_gguf(model_path, load_arrays=True).model_info(verbose=True)
    assert len(verbose["tokenizer.ggml.tokens"]) == 49152
    assert verbose["general.languages"] == ["en"]


def test_real_model_header_is_fast(model_path: Path) -> None:
    read_gguf(model_path)  # warm the page cache
    start = time.perf_counter()
    read_gguf(model_path)
    assert time.perf_counter() - start < 0.25
    start = time.perf_counter()
    read_gguf(model_path, load_arrays=True)
    assert time.perf_counter() - start < 0.5


def test_real_model_truncated_anywhere_is_rejected(real: GGUFInfo, model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.gguf"
    shutil.copyfile(model_path, copy)
    header = real.data_offset
    cuts = set(range(2048)) | set(range(2048, header, 4999)) | {header - 1, header}
    cuts |= set(range(header + 1, real.file_size, real.file_size // 37)) | {real.file_size - 1}
    with open(copy, "r+b") as file:
        for cut in sorted(cuts, reverse=True):
            file.truncate(cut)
            file.flush()
            with pytest.raises(InvalidModelFileError):
                read_gguf(copy)


def _patched(model_path: Path, tmp_path: Path, patches: dict[int, bytes]) -> Path:
    """A sparse copy of the real model's header with bytes replaced, padded to its full size."""
    info = read_gguf(model_path)
    with open(model_path, "rb") as file:
        data = bytearray(file.read(info.data_offset))
    for at, raw in patches.items():
        data[at : at + len(raw)] = raw
    path = tmp_path / "model.gguf"
    with open(path, "wb") as file:
        file.write(data)
        file.truncate(info.file_size)
    return path


def _after_key(model_path: Path, key: bytes) -> int:
    with open(model_path, "rb") as file:
        head = file.read(1 << 21)
    return head.index(_str(key)) + 8 + len(key)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({0: b"GGML"}, "not a GGUF file"),
        ({4: struct.pack("<I", 1)}, "version 1 is not supported"),
        ({8: struct.pack("<Q", 2**63)}, "tensor count 9223372036854775808 at byte 8"),
        ({16: struct.pack("<Q", 2**63)}, "key-value count"),
        ({16: struct.pack("<Q", 60_000)}, "key 34 at byte 1769538 is 13835058055282163712 bytes long"),
        ({24: struct.pack("<Q", 2**64 - 1)}, "key 0 at byte 24 is 18446744073709551615 bytes long"),
    ],
)
def test_real_model_corrupted_header_fields(
    model_path: Path, tmp_path: Path, patch: dict[int, bytes], match: str
) -> None:
    with pytest.raises(InvalidModelFileError, match=match):
        read_gguf(_patched(model_path, tmp_path, patch))


def test_real_model_huge_token_count(model_path: Path, tmp_path: Path) -> None:
    at = _after_key(model_path, b"tokenizer.ggml.tokens")
    with open(model_path, "rb") as file:
        file.seek(at)
        assert struct.unpack("<IIQ", file.read(16)) == (ARRAY, STRING, 49152)
    cases = [
        (2**63, "array of 9223372036854775808 elements at byte 1095, more than the 1073741824 allowed"),
        (13_000_000, "array of 13000000 strings at byte 1095 but only 98361325 bytes follow"),
        # One string too many swallows the next key, whose length is then absurd.
        (49153, "key 25 at byte 763526 is 21474836489 bytes long"),
    ]
    for count, match in cases:
        with pytest.raises(InvalidModelFileError, match=match):
            read_gguf(_patched(model_path, tmp_path, {at + 8: struct.pack("<Q", count)}), max_array=1 << 30)


def test_real_model_unknown_tensor_type(real: GGUFInfo, model_path: Path, tmp_path: Path) -> None:
    name = real.tensors[5].name.encode()
    # Tensor info: name, n_dims, dims..., type, offset; patch the type.
    at = _after_key(model_path, name) + 4 + 8 * len(real.tensors[5].shape)
    with pytest.raises(InvalidModelFileError, match=f'tensor 5 "{name.decode()}" .* unknown ggml type 99'):
        read_gguf(_patched(model_path, tmp_path, {at: struct.pack("<I", 99)}))


def test_real_model_tensor_past_end(real: GGUFInfo, model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.gguf"
    shutil.copyfile(model_path, copy)
    with open(copy, "r+b") as file:
        file.truncate(real.file_size - 1)
    last = len(real.tensors) - 1
    message = (
        f'model.gguf: tensor {last} "{real.tensors[last].name}" data ends at byte {real.file_size} '
        f"but the file has {real.file_size - 1} bytes"
    )
    with pytest.raises(InvalidModelFileError) as caught:
        read_gguf(copy)
    assert caught.value.message == message


@pytest.fixture(scope="module")
def header_copy(model_path: Path, real: GGUFInfo) -> tuple[bytes, int]:
    with open(model_path, "rb") as file:
        return file.read(real.data_offset), real.file_size


_HUGE = st.sampled_from([2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 2**31, 98362432, 1 << 30, 0, 1, 5])


@settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    flips=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=8),
    splices=st.lists(st.tuples(st.integers(0, 4095), _HUGE), max_size=3),
)
def test_mutated_real_header_is_rejected_or_in_bounds(
    tmp_path: Path, header_copy: tuple[bytes, int], data: st.DataObject, flips: list, splices: list
) -> None:
    header, size = header_copy
    mutated = bytearray(header)
    for at, byte in flips:
        mutated[at] = byte
    for at, value in splices:
        mutated[at : at + 8] = struct.pack("<Q", value)
    # Anywhere in the header, including the tensor infos near its end.
    at = data.draw(st.integers(0, len(header) - 8))
    mutated[at : at + 8] = struct.pack("<Q", data.draw(_HUGE))
    path = tmp_path / "mutated.gguf"
    with open(path, "wb") as file:
        file.write(mutated)
        file.truncate(size)
    try:
        info = read_gguf(path)
    except InvalidModelFileError:
        return
    assert_within_bounds(info)


# --- hand-built files ----------------------------------------------------------


def test_minimal_file_round_trip(tmp_path: Path) -> None:
    kv = [
        ("general.architecture", STRING, "bert"),
        ("general.name", STRING, "tiny"),
        ("general.file_type", U32, 15),
        ("bert.context_length", U64, 512),
        ("bert.pooling_type", U32, 2),
        ("bert.attention.head_count", ARRAY, (U32, [4, 8, 4])),
        ("bert.attention.layer_norm_epsilon", F32, 1e-12),
        ("flag", BOOL, True),
        ("neg", I8, -3),
        ("nested", ARRAY, (ARRAY, [(STRING, ["a", "é"]), (F64, [0.5])])),
        ("empty", ARRAY, (I64, [])),
        ("general.parameter_count", U64, 1),
    ]
    tensors = [("a", (256, 3), 12), ("b", (8,), 0), ("c", (32, 2, 2, 2), 2)]
    data = build_gguf(kv, tensors)
    info = read_gguf(write(tmp_path, data))
    assert info.version == 3 and info.file_size == len(data)
    assert info.architecture == "bert" and info.name == "tiny"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 512 and info.pooling_type == 2 and info.head_count == 8
    assert info.head_count_kv is None and info.chat_template is None and info.license is None
    assert info.metadata["bert.attention.layer_norm_epsilon"] == 1e-12
    assert info.metadata["nested"] == [["a", "é"], [0.5]]
    assert info.metadata["flag"] is True and info.metadata["neg"] == -3
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in info.tensors] == [
        ("a", (256, 3), "Q4_K", 3 * 144),
        ("b", (8,), "F32", 32),
        ("c", (32, 2, 2, 2), "Q4_0", 8 * 18),
    ]
    assert [t.offset for t in info.tensors] == [0, 448, 480]
    assert info.parameter_count == 256 * 3 + 8 + 256
    assert_within_bounds(info)
    model_info = info.model_info()
    assert model_info["empty"] == [] and model_info["nested"] is None
    assert model_info["general.parameter_count"] == info.parameter_count


def test_file_without_tensors(tmp_path: Path) -> None:
    data = build_gguf(ARCH)
    info = read_gguf(write(tmp_path, data))
    assert info.tensors == [] and info.data_offset == len(data)
    assert info.parameter_count == 0 and info.quantization == "unknown"


@pytest.mark.parametrize("version", [2, 3])
def test_supported_versions(tmp_path: Path, version: int) -> None:
    assert read_gguf(write(tmp_path, build_gguf(ARCH, WEIGHT, version=version))).version == version


@pytest.mark.parametrize(
    "ggml_type, shape, nbytes",
    [(t, (traits[1] * 2, 3), traits[2] * 6) for t, traits in GGML_TYPES.items()],
)
def test_every_ggml_type_size(tmp_path: Path, ggml_type: int, shape: tuple[int, int], nbytes: int) -> None:
    info = read_gguf(write(tmp_path, build_gguf(ARCH, [("t", shape, ggml_type)])))
    assert info.tensors[0].nbytes == nbytes


def test_quantization_names(tmp_path: Path) -> None:
    def quant(kv: list, tensors: list) -> str:
        return read_gguf(write(tmp_path, build_gguf(kv, tensors))).quantization

    assert quant([("general.file_type", U32, 0)], WEIGHT) == "F32"
    assert quant([("general.file_type", U32, 1024 | 18)], WEIGHT) == "Q6_K"
    # Without a known file type the tensor type holding the most bytes wins.
    mixed = [("big", (256, 8), 14), ("small", (256,), 0)]
    assert quant([("general.file_type", U32, 999)], mixed) == "Q6_K"
    assert quant([("general.file_type", STRING, "Q4_0")], mixed) == "Q6_K"
    assert quant([], mixed) == "Q6_K"


def test_load_arrays_threshold(tmp_path: Path) -> None:
    kv = [("short", ARRAY, (I32, list(range(1024)))), ("long", ARRAY, (U8, [1] * 1025))]
    path = write(tmp_path, build_gguf(kv))
    info = read_gguf(path)
    assert info.metadata["short"] == list(range(1024))
    assert info.metadata["long"] == SkippedArray("uint8", 1025)
    assert read_gguf(path, load_arrays=True).metadata["long"] == [1] * 1025


@pytest.mark.parametrize(
    "data, match",
    [
        (b"GGML" + bytes(20), r"not a GGUF file \(it does not start with the GGUF magic number\)$"),
        (b"GG", r"not a GGUF file \(it does not start with the GGUF magic number\)$"),
        (b"", "not a GGUF file"),
        (b"GGUF\x01\x00", "version at byte 4 needs 4 bytes but the file ends at byte 6"),
        (build_gguf(ARCH, version=1), "version 1 is not supported"),
        (build_gguf(ARCH, version=4), "version 4 is not supported"),
        (build_gguf(ARCH, version=0), "version 0 is not supported"),
        (build_gguf(ARCH, version=0x03000000), "big-endian"),
    ],
)
def test_bad_magic_and_version(tmp_path: Path, data: bytes, match: str) -> None:
    rejects(tmp_path, data, match)


def test_huge_string_length(tmp_path: Path) -> None:
    data = bytearray(build_gguf([("general.name", STRING, "x")]))
    at = 24 + 8 + len("general.name") + 4
    data[at : at + 8] = struct.pack("<Q", 2**64 - 1)
    rejects(
        tmp_path, bytes(data), r'string value of key 0 "general.name" \(at byte 24\) at byte 48 is 18446744073709551615'
    )
    data[at : at + 8] = struct.pack("<Q", 100)
    rejects(tmp_path, bytes(data), "needs 100 bytes but the file ends at byte 57")
    rejects(
        tmp_path, build_gguf([("general.name", STRING, "x" * 100)]), "100 bytes long, more than the 99", max_string=99
    )
    rejects(tmp_path, build_gguf([("k" * 70000, U8, 1)]), "key 0 at byte 24 is 70000 bytes long")


def test_nested_arrays_depth(tmp_path: Path) -> None:
    def nest(depth: int) -> tuple[int, Any]:
        value: tuple[int, Any] = (U8, [7])
        for _ in range(depth - 1):
            value = (ARRAY, [value])
        return value

    ok = read_gguf(write(tmp_path, build_gguf([("n", ARRAY, nest(3))])))
    assert ok.metadata["n"] == [[[7]]]
    rejects(tmp_path, build_gguf([("n", ARRAY, nest(4))]), r'key 0 "n" .*\[0\]\[0\] nests arrays more than 3 deep')
    # Inner arrays are slow to walk, so their number is capped separately.
    many = build_gguf([("n", ARRAY, (ARRAY, [(U8, [])] * 65536))])
    assert read_gguf(write(tmp_path, many)).metadata["n"] == SkippedArray("array", 65536)
    rejects(tmp_path, build_gguf([("n", ARRAY, (ARRAY, [(U8, [])] * 65537))]), "array of 65537 arrays at byte 37")


def test_array_limits(tmp_path: Path) -> None:
    kv = [("a", ARRAY, (U16, [1] * 10)), ("b", ARRAY, (STRING, ["x"] * 10))]
    data = build_gguf(kv)
    assert read_gguf(write(tmp_path, data), max_array=20).metadata["a"] == [1] * 10
    rejects(tmp_path, data, r'key 1 "b" .* array of 10 elements at byte \d+, more than the 19 allowed', max_array=19)
    huge = bytearray(data)
    at = data.index(_str("a")) + 9 + 4 + 4
    huge[at : at + 8] = struct.pack("<Q", 2**62)
    rejects(tmp_path, bytes(huge), "array of 4611686018427387904 elements")
    huge[at : at + 8] = struct.pack("<Q", 1000)
    rejects(tmp_path, bytes(huge), "array of 1000 uint16s at byte .* but only")
    rejects(tmp_path, build_gguf([("a", ARRAY, (13, []))]), "array of unknown value type 13")


def test_bad_keys(tmp_path: Path) -> None:
    rejects(tmp_path, build_gguf([("k", U8, 1), ("k", U8, 2)]), r'key 1 "k" \(at byte 38\) is a duplicate')
    rejects(tmp_path, build_gguf([("", U8, 1), ("pad", STRING, "x" * 20)]), "key 0 at byte 24 is empty")
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") + struct.pack("<I", 13) + bytes(16)
    rejects(tmp_path, data, 'key 0 "k" .* unknown value type 13')


def test_implausible_counts(tmp_path: Path) -> None:
    data = bytearray(build_gguf(ARCH, WEIGHT))
    data[16:24] = struct.pack("<Q", 1000)
    rejects(tmp_path, bytes(data), "header claims 1000 key-value pairs and 1 tensors but only")
    rejects(tmp_path, build_gguf(ARCH), "key-value count 1 at byte 16 is more than the 0 allowed", max_kv=0)
    rejects(tmp_path, build_gguf(ARCH, WEIGHT), "tensor count 1 at byte 8 is more than the 0 allowed", max_tensors=0)


@pytest.mark.parametrize(
    "tensors, extra, match",
    [
        ([("w", (64,), 0), ("w", (64,), 0)], {}, r'tensor 1 "w" \(at byte \d+\) is a duplicate'),
        ([("t" * 64, (64,), 0)], {}, "name of tensor 0 at byte .* is 64 bytes long, more than the 63"),
        ([("w", (1, 1, 1, 1, 1), 0)], {}, 'tensor 0 "w" .* has 5 dimensions, more than 4'),
        ([("w", (64, 0), 0)], {}, "invalid size 0 in dimension 1"),
        ([("w", (2**63, 1), 0)], {"data_size": 0}, "invalid size 9223372036854775808 in dimension 0"),
        ([("w", (2**62, 4), 0)], {"data_size": 0}, "18446744073709551616 elements, more than ggml can index"),
        ([("w", (64,), 99)], {}, "unknown ggml type 99"),
        ([("w", (64,), 4)], {}, "unknown ggml type 4"),
        ([("w", (64,), 43)], {}, "unknown ggml type 43"),
        ([("w", (48,), 12)], {"offsets": [0]}, "type Q4_K has rows of 48 elements, not a multiple of 256"),
        ([("w", (64,), 0)], {"offsets": [16]}, "data offset 16 is not a multiple of the alignment 32"),
        ([("w", (64,), 0)], {"data_size": 255}, 'tensor 0 "w" data ends at byte 320 but the file has 319 bytes'),
        (
            [("a", (8,), 0), ("b", (8,), 0)],
            {"offsets": [0, 2**64 - 32]},
            'tensor 1 "b" data offset is 1844\\d+, expected 32',
        ),
        ([("a", (8,), 0), ("b", (8,), 0)], {"offsets": [0, 64]}, 'tensor 1 "b" data offset is 64, expected 32'),
        ([("a", (8,), 0), ("b", (8,), 0)], {"offsets": [32, 0]}, 'tensor 0 "a" data offset is 32, expected 0'),
    ],
)
def test_bad_tensor_infos(tmp_path: Path, tensors: list, extra: dict, match: str) -> None:
    rejects(tmp_path, build_gguf([], tensors, **extra), match)


def test_alignment(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, build_gguf([("general.alignment", U32, 64)], WEIGHT, alignment=64)))
    assert info.alignment == 64 and info.data_offset % 64 == 0
    rejects(
        tmp_path, build_gguf([("general.alignment", U32, 48)], WEIGHT), "general.alignment 48 is not a power of two"
    )
    rejects(tmp_path, build_gguf([("general.alignment", U32, 0)], WEIGHT), "general.alignment 0 is not a power of two")
    rejects(tmp_path, build_gguf([("general.alignment", U64, 32)], WEIGHT), "must be a uint32, not uint64")
    # A huge alignment pushes the data section past the end of the file.
    rejects(
        tmp_path, build_gguf([("general.alignment", U32, 2**31)], WEIGHT), "tensor data would start at byte 2147483648"
    )


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match=r"^missing\.gguf: cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(InvalidModelFileError, match="not a regular file"):
        read_gguf(tmp_path)
    # Opening a FIFO would block until a writer appears.
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(InvalidModelFileError, match="not a regular file"):
        read_gguf(tmp_path / "pipe.gguf")


_VALUE = st.one_of(
    st.tuples(st.just(STRING), st.text(max_size=20)),
    st.tuples(st.just(U32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(I64), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just(BOOL), st.booleans()),
    st.tuples(st.just(F64), st.floats(allow_nan=False)),
    st.tuples(st.just(ARRAY), st.tuples(st.just(STRING), st.lists(st.text(max_size=5), max_size=5))),
    st.tuples(st.just(ARRAY), st.tuples(st.just(I16), st.lists(st.integers(-(2**15), 2**15 - 1), max_size=5))),
)


@settings(max_examples=100, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=20), _VALUE, max_size=8))
def test_metadata_round_trips(tmp_path: Path, entries: dict[str, tuple[int, Any]]) -> None:
    kv = [(key, value_type, value) for key, (value_type, value) in entries.items()]
    info = read_gguf(write(tmp_path, build_gguf(kv)))
    expected = {key: list(value[1]) if value_type == ARRAY else value for key, value_type, value in kv}
    assert info.metadata == expected


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from([2, 3]))
def test_arbitrary_bytes_after_a_valid_preamble(tmp_path: Path, body: bytes, version: int) -> None:
    path = write(tmp_path, b"GGUF" + struct.pack("<I", version) + body)
    try:
        info = read_gguf(path)
    except InvalidModelFileError:
        return
    assert_within_bounds(info)


@settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_minimal_file(tmp_path: Path, data: st.DataObject) -> None:
    kv = [*ARCH, ("tokens", ARRAY, (STRING, ["a", "bb", "ccc"] * 500)), ("n", ARRAY, (ARRAY, [(U8, [1, 2])]))]
    original = build_gguf(kv, [("w", (64, 2), 0), ("q", (256,), 12)])
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(original) - 1))
        raw = data.draw(st.one_of(st.binary(min_size=1, max_size=1), _HUGE.map(lambda v: struct.pack("<Q", v))))
        mutated[at : at + len(raw)] = raw
    cut = data.draw(st.integers(0, len(mutated)))
    path = write(tmp_path, bytes(mutated[: cut or len(mutated)]))
    try:
        info = read_gguf(path)
    except InvalidModelFileError:
        return
    assert_within_bounds(info)
