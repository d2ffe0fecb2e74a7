"""Validate a GGUF model file and read its metadata, in pure Python.

llama.cpp's and Ollama's GGUF loaders have had memory-safety bugs triggered by
hostile headers (CVE-2024-39720 and others), so every file is checked here
before native code opens it: each count, length, type and tensor extent is
compared with the file's real size, and anything out of bounds raises
:class:`~mullama.errors.InvalidModelFileError` naming the faulty item and its
byte offset.

Only the header is read, through a small sliding buffer, so a multi-gigabyte
model costs a few megabytes of I/O.  Long arrays (the tokenizer's vocabulary
and merges) are walked to validate their lengths but are kept only when
``load_arrays=True``.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeGuard

from mullama.errors import InvalidModelFileError

__all__ = ["FILE_TYPES", "GGML_TYPES", "GGUFInfo", "GGUFTensor", "SkippedArray", "read_gguf"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
#: ggml's GGML_MAX_NAME counts the terminating NUL.
_MAX_TENSOR_NAME = 63
_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1
#: Arrays nest (an array of arrays is legal); deeper than this is hostile.
_MAX_ARRAY_DEPTH = 3
#: Inner arrays cost far more to walk than scalars and no real model has
#: more than a handful (llama.cpp itself refuses them), so they get a budget
#: of their own that keeps the worst case well under a second.
_MAX_INNER_ARRAYS = 1 << 16
#: Arrays up to this length are always kept, so per-layer hyperparameters are
#: available even when the tokenizer arrays are skipped.
_SMALL_ARRAY = 1024
_CHUNK = 1 << 20
#: llama-hparams.h: LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS.
_MAX_LAYERS = 512
_MAX_EXPERTS = 1024
#: llama-model.cpp: LLAMA_ROPE_SCALING_TYPES; any other name fails an assertion.
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")

# GGUF value types (gguf.h, enum gguf_type).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)

_VALUE_TYPE_NAMES = {
    _UINT8: "uint8", _INT8: "int8", _UINT16: "uint16", _INT16: "int16",
    _UINT32: "uint32", _INT32: "int32", _FLOAT32: "float32", _BOOL: "bool",
    _STRING: "string", _ARRAY: "array", _UINT64: "uint64", _INT64: "int64",
    _FLOAT64: "float64",
}  # fmt: skip

#: struct codes of the fixed-size value types.
_SCALAR_CODES = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I",
    _INT32: "i", _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q",
    _FLOAT64: "d",
}  # fmt: skip

#: Fewest bytes one element of each type occupies in the file; a count is
#: implausible when count times this exceeds what is left of the file.
_MIN_SIZES = {t: struct.calcsize("<" + c) for t, c in _SCALAR_CODES.items()}
_MIN_SIZES[_STRING] = 8
_MIN_SIZES[_ARRAY] = 12

#: ggml tensor types: name, elements per block, bytes per block.  From
#: ggml.h's ``enum ggml_type`` and ggml.c's ``type_traits``; the numbers left
#: out were removed from ggml and never appear in a loadable file.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1),
    25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}  # fmt: skip

#: llama.cpp's ``enum llama_ftype`` (the value of ``general.file_type``),
#: named the way Ollama names quantization levels.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip
#: llama.cpp ors this flag into a file type it guessed from the tensors.
_FILE_TYPE_GUESSED = 1024

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class SkippedArray:
    """An array whose elements were validated but not kept (``load_arrays=False``)."""

    #: GGUF type name of the elements, for example ``"string"``.
    element_type: str
    length: int


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description from the header."""

    name: str
    #: Sizes from the fastest-varying dimension on, as GGUF stores them.
    shape: tuple[int, ...]
    #: The ggml type number (``enum ggml_type``).
    type: int
    #: Byte offset of the data, relative to :attr:`GGUFInfo.data_offset`.
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name, for example ``"Q4_K"``."""
        return GGML_TYPES[self.type][0]

    @property
    def n_elements(self) -> int:
        """Number of elements (weights) in the tensor."""
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass
class GGUFInfo:
    """Everything a GGUF header says, after validation."""

    version: int
    #: Key to value: int, float, bool, str, list, or :class:`SkippedArray`.
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    alignment: int
    #: Absolute byte offset where tensor data starts.
    data_offset: int
    file_size: int
    _by_name: dict[str, GGUFTensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> GGUFTensor | None:
        """The tensor called *name*, or None."""
        return self._by_name.get(name)

    @property
    def architecture(self) -> str | None:
        """``general.architecture``, for example ``"llama"``."""
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        """``general.name``, the model's human-readable name."""
        return self._str("general.name")

    @property
    def license(self) -> str | None:
        """``general.license``."""
        return self._str("general.license")

    @property
    def chat_template(self) -> str | None:
        """``tokenizer.chat_template``, the Jinja chat template shipped with the model."""
        return self._str("tokenizer.chat_template")

    @functools.cached_property
    def parameter_count(self) -> int:
        """Total number of weights across all tensors (counted once: a store shares one header between uses)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        """The file type, as Ollama names it (``"Q4_K_M"``, ``"F16"``...).

        Taken from ``general.file_type``; files without it (or with an unknown
        value) are named after the tensor type holding the most bytes.
        """
        file_type = self.metadata.get("general.file_type")
        if _is_int(file_type):
            name = FILE_TYPES.get(file_type & ~_FILE_TYPE_GUESSED)
            if name is not None:
                return name
        totals: dict[int, int] = {}
        for tensor in self.tensors:
            totals[tensor.type] = totals.get(tensor.type, 0) + tensor.nbytes
        if not totals:
            return "unknown"
        return GGML_TYPES[max(totals, key=totals.__getitem__)][0]

    @property
    def context_length(self) -> int | None:
        """``{arch}.context_length``: the context the model was trained with."""
        return self._arch_int("context_length")

    @property
    def embedding_length(self) -> int | None:
        """``{arch}.embedding_length``."""
        return self._arch_int("embedding_length")

    @property
    def block_count(self) -> int | None:
        """``{arch}.block_count``: the number of layers."""
        return self._arch_int("block_count")

    @property
    def head_count(self) -> int | None:
        """``{arch}.attention.head_count`` (the largest, when given per layer)."""
        return self._arch_int("attention.head_count")

    @property
    def head_count_kv(self) -> int | None:
        """``{arch}.attention.head_count_kv`` (the largest, when given per layer)."""
        return self._arch_int("attention.head_count_kv")

    @property
    def pooling_type(self) -> int | None:
        """``{arch}.pooling_type``: llama.cpp's ``enum llama_pooling_type``
        (0 none, 1 mean, 2 cls, 3 last, 4 rank), set by embedding models."""
        return self._arch_int("pooling_type")

    def model_info(self, *, verbose: bool = False) -> dict[str, Any]:
        """The ``model_info`` object of Ollama's ``/api/show``.

        Like Ollama: every key but ``general.name`` and
        ``tokenizer.chat_template``, plus ``general.parameter_count``, sorted;
        non-empty arrays are ``None`` unless *verbose* (and arrays skipped at
        read time stay ``None`` even then: read with ``load_arrays=True``).
        """
        info: dict[str, Any] = {}
        for key, value in self.metadata.items():
            if key in ("general.name", "tokenizer.chat_template"):
                continue
            if isinstance(value, SkippedArray) or (isinstance(value, list) and value and not verbose):
                value = None
            info[key] = value
        info["general.parameter_count"] = self.parameter_count
        return dict(sorted(info.items()))

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def _arch_int(self, suffix: str) -> int | None:
        if self.architecture is None:
            return None
        value = self.metadata.get(f"{self.architecture}.{suffix}")
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return max(value)
        return value if _is_int(value) else None


def read_gguf(
    path: str | os.PathLike[str],
    *,
    max_kv: int = 1 << 16,
    max_tensors: int = 1 << 20,
    max_string: int = 1 << 24,
    max_array: int = 1 << 23,
    load_arrays: bool = False,
) -> GGUFInfo:
    """Validate the GGUF file at *path* and return its header.

    *max_kv* and *max_tensors* cap the two counts; *max_string* caps any one
    string's length in bytes; *max_array* caps the number of array elements
    in the whole header (all arrays, nested ones included), which bounds both
    memory and time.  Arrays longer than 1024 elements are returned as
    :class:`SkippedArray` unless *load_arrays* is true.

    Raises :class:`InvalidModelFileError` for any file that is unreadable,
    truncated, inconsistent or beyond those limits, and never anything else.
    """
    label = os.path.basename(os.fspath(path))
    limits = _Limits(max_kv, max_tensors, max_string, max_array, load_arrays)
    try:
        # Opening a FIFO or a device could block or never end.
        if not os.path.isfile(path):
            raise InvalidModelFileError(f"{label}: cannot read: not a regular file")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            return _Parser(_Reader(file, size, label), limits).parse()
    except OSError as exc:
        raise InvalidModelFileError(f"{label}: cannot read: {exc.strerror or exc}") from None
    except MemoryError:
        raise InvalidModelFileError(f"{label}: not enough memory to read the header") from None


@dataclass(frozen=True)
class _Limits:
    max_kv: int
    max_tensors: int
    max_string: int
    max_array: int
    load_arrays: bool


class _Reader:
    """Little-endian reads from a sliding window over the file.

    Every read is checked against the file size first, so a hostile length
    never turns into a large allocation or a read past the end.
    """

    def __init__(self, file: BinaryIO, size: int, label: str) -> None:
        self.file = file
        self.size = size
        self.label = label
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # read position inside buf

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def fail(self, message: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.label}: {message}")

    def ensure(self, n: int, what: str) -> None:
        """Make *n* bytes available at ``buf[pos:]``, or fail naming *what*."""
        if self.pos + n <= len(self.buf):
            return
        if n > self.size - self.offset:
            raise self.fail(f"{what} at byte {self.offset} needs {n} bytes but the file ends at byte {self.size}")
        self.base += self.pos
        self.file.seek(self.base)
        self.buf = self.file.read(max(n, _CHUNK))
        self.pos = 0
        if len(self.buf) < n:
            raise self.fail(f"{what} at byte {self.offset}: the file was cut short while being read")

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.offset:
            raise self.fail(f"{what} at byte {self.offset} needs {n} bytes but the file ends at byte {self.size}")
        self.pos += n
        if self.pos > len(self.buf):
            self.base += self.pos
            self.buf, self.pos = b"", 0

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        self.ensure(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def u32(self, what: str) -> int:
        self.ensure(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.ensure(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, max_len: int, what: str) -> str:
        start = self.offset
        length = self.u64(f"length of {what}")
        if length > max_len:
            raise self.fail(f"{what} at byte {start} is {length} bytes long, more than the {max_len} allowed")
        self.ensure(length, what)
        text = self.buf[self.pos : self.pos + length].decode("utf-8", "replace")
        self.pos += length
        return text

    def strings(self, count: int, max_len: int, keep: bool, what: str) -> list[str] | None:
        """Read (or just walk over) *count* strings.

        This is the hot loop of a header (a vocabulary has 10^5 strings), so
        the common case, a string wholly inside the buffer, is inlined.
        """
        out: list[str] | None = [] if keep else None
        unpack = _U64.unpack_from
        buf, pos, end = self.buf, self.pos, len(self.buf)
        i = 0
        while i < count:
            if pos + 8 <= end:
                (length,) = unpack(buf, pos)
                stop = pos + 8 + length
                if length <= max_len and stop <= end:
                    if out is not None:
                        out.append(buf[pos + 8 : stop].decode("utf-8", "replace"))
                    pos = stop
                    i += 1
                    continue
            self.pos = pos
            text = self.string(max_len, f"element {i} of {what}")
            if out is not None:
                out.append(text)
            buf, pos, end = self.buf, self.pos, len(self.buf)
            i += 1
        self.pos = pos
        return out


class _Parser:
    """One pass over a GGUF header, in file order."""

    def __init__(self, reader: _Reader, limits: _Limits) -> None:
        self.r = reader
        self.limits = limits
        self.elements_left = limits.max_array
        self.inner_arrays_left = _MAX_INNER_ARRAYS
        self.seen_names: set[str] = set()

    def parse(self) -> GGUFInfo:
        r = self.r
        r.ensure(min(4, r.size), "magic")
        magic = r.buf[r.pos : r.pos + 4]
        if magic != _MAGIC:
            # The file's own bytes are never quoted: an error may reach a client that named a file it cannot read.
            raise r.fail("not a GGUF file (it does not start with the GGUF magic number)")
        r.pos += 4
        version = r.u32("version")
        if version & 0xFFFF == 0 and version:
            raise r.fail(f"GGUF version {version:#x} looks big-endian, which is not supported")
        if version not in _SUPPORTED_VERSIONS:
            raise r.fail(f"GGUF version {version} is not supported (only 2 and 3)")
        n_tensors = self.count("tensor count", self.limits.max_tensors)
        n_kv = self.count("key-value count", self.limits.max_kv)
        # Each key-value pair and each tensor info takes at least 14 and 24 bytes.
        if n_kv * 14 + n_tensors * 24 > r.size - r.offset:
            raise r.fail(
                f"header claims {n_kv} key-value pairs and {n_tensors} tensors "
                f"but only {r.size - r.offset} bytes follow"
            )
        metadata = self.metadata(n_kv)
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment == 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment {alignment} is not a power of two")
        tensors = [self.tensor_info(i, alignment) for i in range(n_tensors)]
        data_offset = r.offset
        if tensors:
            data_offset += -data_offset % alignment
        self.check_extents(tensors, alignment, data_offset)
        _check_hyperparameters(metadata, r.fail)
        return GGUFInfo(version, metadata, tensors, alignment, data_offset, r.size)

    def count(self, what: str, limit: int) -> int:
        start = self.r.offset
        value = self.r.u64(what)
        if value > limit:
            raise self.r.fail(f"{what} {value} at byte {start} is more than the {limit} allowed")
        return value

    def metadata(self, n_kv: int) -> dict[str, Any]:
        r = self.r
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            start = r.offset
            key = r.string(65535, f"key {i}")
            where = f'key {i} "{key}" (at byte {start})'
            if not key:
                raise r.fail(f"key {i} at byte {start} is empty")
            if key in metadata:
                raise r.fail(f"{where} is a duplicate")
            value_type = r.u32(f"type of {where}")
            if key == "general.alignment" and value_type != _UINT32:
                raise r.fail(f"{where} must be a uint32, not {_VALUE_TYPE_NAMES.get(value_type, value_type)}")
            metadata[key] = self.value(value_type, where, depth=0, keep=True)
        return metadata

    def value(self, value_type: int, where: str, *, depth: int, keep: bool) -> Any:
        r = self.r
        if value_type == _STRING:
            return r.string(self.limits.max_string, f"string value of {where}")
        if value_type == _ARRAY:
            return self.array(where, depth=depth + 1, keep=keep)
        code = _SCALAR_CODES.get(value_type)
        if code is None:
            raise r.fail(f"{where} has unknown value type {value_type}")
        (value,) = r.unpack("<" + code, f"value of {where}")
        return _shortest_float32(value) if value_type == _FLOAT32 else value

    def array(self, where: str, *, depth: int, keep: bool) -> list[Any] | SkippedArray:
        r = self.r
        if depth > _MAX_ARRAY_DEPTH:
            raise r.fail(f"{where} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        start = r.offset
        element_type = r.u32(f"array element type of {where}")
        length = r.u64(f"array length of {where}")
        type_name = _VALUE_TYPE_NAMES.get(element_type)
        if type_name is None:
            raise r.fail(f"{where} is an array of unknown value type {element_type}")
        if length > self.elements_left:
            raise r.fail(
                f"{where} is an array of {length} elements at byte {start}, "
                f"more than the {self.limits.max_array} allowed in a header"
            )
        self.elements_left -= length
        if length * _MIN_SIZES[element_type] > r.size - r.offset:
            raise r.fail(
                f"{where} is an array of {length} {type_name}s at byte {start} "
                f"but only {r.size - r.offset} bytes follow"
            )
        keep = keep and (self.limits.load_arrays or length <= _SMALL_ARRAY)
        what = f"array {where}"
        values: list[Any] | None
        if element_type == _STRING:
            values = r.strings(length, self.limits.max_string, keep, what)
        elif element_type == _ARRAY:
            if length > self.inner_arrays_left:
                raise r.fail(
                    f"{where} is an array of {length} arrays at byte {start}, "
                    f"more than the {_MAX_INNER_ARRAYS} allowed in a header"
                )
            self.inner_arrays_left -= length
            items = [self.array(f"{where}[{i}]", depth=depth + 1, keep=keep) for i in range(length)]
            values = items if keep else None
        elif keep:
            values = list(r.unpack(f"<{length}{_SCALAR_CODES[element_type]}", what))
        else:
            r.skip(length * _MIN_SIZES[element_type], what)
            values = None
        return SkippedArray(type_name, length) if values is None else values

    def tensor_info(self, index: int, alignment: int) -> GGUFTensor:
        r = self.r
        start = r.offset
        name = r.string(_MAX_TENSOR_NAME, f"name of tensor {index}")
        where = f'tensor {index} "{name}" (at byte {start})'
        if name in self.seen_names:
            raise r.fail(f"{where} is a duplicate")
        self.seen_names.add(name)
        n_dims = r.u32(f"dimension count of {where}")
        if n_dims > _MAX_DIMS:
            raise r.fail(f"{where} has {n_dims} dimensions, more than {_MAX_DIMS}")
        shape = tuple(r.u64(f"dimension {d} of {where}") for d in range(n_dims))
        n_elements = 1
        for d, size in enumerate(shape):
            if size == 0 or size > _INT64_MAX:
                raise r.fail(f"{where} has invalid size {size} in dimension {d}")
            n_elements *= size
        if n_elements > _INT64_MAX:
            raise r.fail(f"{where} has {n_elements} elements, more than ggml can index")
        ggml_type = r.u32(f"type of {where}")
        traits = GGML_TYPES.get(ggml_type)
        if traits is None:
            raise r.fail(f"{where} has unknown ggml type {ggml_type}")
        type_name, block_size, type_size = traits
        row = shape[0] if shape else 1
        if row % block_size:
            raise r.fail(f"{where} of type {type_name} has rows of {row} elements, not a multiple of {block_size}")
        offset = r.u64(f"data offset of {where}")
        if offset % alignment:
            raise r.fail(f"{where} data offset {offset} is not a multiple of the alignment {alignment}")
        return GGUFTensor(name, shape, ggml_type, offset, n_elements // block_size * type_size)

    def check_extents(self, tensors: list[GGUFTensor], alignment: int, data_offset: int) -> None:
        size = self.r.size
        if tensors and data_offset > size:
            raise self.r.fail(f"tensor data would start at byte {data_offset} but the file has {size} bytes")
        expected = 0
        for i, t in enumerate(tensors):
            # llama.cpp refuses any layout but back-to-back tensors in header order.
            if t.offset != expected:
                raise self.r.fail(f'tensor {i} "{t.name}" data offset is {t.offset}, expected {expected}')
            end = data_offset + t.offset + t.nbytes
            if end > size:
                raise self.r.fail(f'tensor {i} "{t.name}" data ends at byte {end} but the file has {size} bytes')
            expected += t.nbytes + -t.nbytes % alignment


def _check_hyperparameters(metadata: dict[str, Any], fail: Any) -> None:
    """Refuse what llama.cpp's ``load_hparams`` asserts on (llama-model.cpp), which would abort the process.

    Only keys present are checked: a missing one llama.cpp reports itself.
    Whatever is left to an architecture's own code, the daemon's test load
    in a child process (:mod:`mullama.engine.probe`) catches.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch == "clip":  # llama.cpp reads no hyperparameters for CLIP
        return

    def values(name: str) -> list[int] | None:
        """The key's value as a list (per layer, or one), or None when absent; a non-integer is refused."""
        key = f"{arch}.{name}"
        if key not in metadata:
            return None
        value = metadata[key]
        items = value if isinstance(value, list) else [value]
        if not items or not all(_is_int(v) and 0 <= v < 2**32 for v in items):
            raise fail(f"{key} must be an unsigned 32-bit integer (or one per layer), not {_shown(value)}")
        return items

    def bad(name: str, value: object, need: str) -> InvalidModelFileError:
        return fail(f"{arch}.{name} is {_shown(value)}, but llama.cpp needs {need}")

    layers = values("block_count")
    if layers is not None and not 1 <= layers[0] <= _MAX_LAYERS:
        raise bad("block_count", layers[0], f"1 to {_MAX_LAYERS} layers")
    n_layer = layers[0] if layers is not None else _MAX_LAYERS
    for name in ("context_length", "embedding_length"):
        found = values(name)
        if found is not None and found[0] == 0:
            raise bad(name, 0, "a positive value")
    nextn = values("nextn_predict_layers")
    if nextn is not None and nextn[0] > n_layer:
        raise bad("nextn_predict_layers", nextn[0], f"at most block_count ({n_layer})")
    if arch == "wavtokenizer-dec":
        for name in ("posnet.block_count", "convnext.block_count"):
            found = values(name)
            if found is not None and found[0] > n_layer:
                raise bad(name, found[0], f"at most block_count ({n_layer})")
    _check_experts(arch, values, bad)
    heads, heads_kv = values("attention.head_count"), values("attention.head_count_kv")
    if heads is not None and heads_kv is not None:
        # Attention broadcasts each key/value head over a group of query heads (ggml_mul_mat asserts it).
        for layer, (q, kv) in enumerate(zip(heads * len(heads_kv) if len(heads) == 1 else heads,
                                            heads_kv * len(heads) if len(heads_kv) == 1 else heads_kv)):
            if q and kv and q % kv:
                raise bad("attention.head_count_kv", kv, f"a divisor of attention.head_count ({q}) in layer {layer}")
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in _ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", scaling, f"one of {', '.join(_ROPE_SCALING_TYPES)}")


def _check_experts(arch: str, values: Any, bad: Any) -> None:
    """Mixture-of-experts counts, as llama.cpp's ``load_hparams`` asserts them."""
    experts = (values("expert_count") or [0])[0]
    used = max(values("expert_used_count") or [0])
    groups = (values("expert_group_count") or [0])[0]
    groups_used = (values("expert_group_used_count") or [0])[0]
    if arch in ("hunyuan-dense", "hunyuan_vl") and experts <= 1:
        return  # llama.cpp reads these as dense models, ignoring both counts
    if experts > _MAX_EXPERTS:
        raise bad("expert_count", experts, f"at most {_MAX_EXPERTS} experts")
    if used > experts:
        raise bad("expert_used_count", used, f"at most expert_count ({experts})")
    if experts == 0:
        if groups:
            raise bad("expert_group_count", groups, "0 without experts")
        return
    if used == 0:
        raise bad("expert_used_count", used, "at least 1 with experts")
    if groups >= experts:
        raise bad("expert_group_count", groups, f"less than expert_count ({experts})")
    if groups > 1:
        if experts % groups:
            raise bad("expert_group_count", groups, f"a divisor of expert_count ({experts})")
        if not 0 < groups_used < groups:
            raise bad("expert_group_used_count", groups_used, f"1 to {groups - 1} (expert_group_count - 1)")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (``1e-05``,
    not ``9.999999747378752e-06``), as Go's JSON encoder prints a float32."""
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value
