"""A pure-Python check of whisper.cpp's ggml model files, before libwhisper opens one.

whisper.cpp's loader trusts the file: a dimension count above four writes
past a stack array, a negative name length allocates without bound, a
truncated file yields uninitialised weights, and a vocabulary-only file (as
the test stubs in its source tree are) "loads" with no weights at all. Here
the header, the mel filters, the vocabulary and every tensor record are
walked with seeks (nothing large is read) and any inconsistency is an
:class:`InvalidModelFileError` naming it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from mullama.errors import InvalidModelFileError

GGML_MAGIC = 0x67676D6C
#: ggml type id -> (elements per block, bytes per block), for the types whisper.cpp files use.
GGML_TYPE_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
                   10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}
#: ``ftype`` in the header is the file's weight type plus 1000 times the quantization version.
GGML_QNT_VERSION_FACTOR = 1000
FTYPES = {0, 1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15, 32}
#: The weight type a header's ``ftype`` names, as GGUF files name their quantization.
FTYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K",
               12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 32: "BF16"}
HPARAMS = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
           "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")


@dataclass(frozen=True)
class WhisperFile:
    """What a valid whisper.cpp model file declares."""

    path: Path
    size: int
    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_mels: int
    ftype: int
    n_tensors: int
    #: Weights in all the tensors.
    parameters: int = 0

    @property
    def multilingual(self) -> bool:
        """English-only models have 51,864 tokens; multilingual ones 51,865 or more."""
        return self.n_vocab >= 51865

    @property
    def quantization(self) -> str:
        """The weight type (``F16``, ``Q5_1``...)."""
        return FTYPE_NAMES.get(self.ftype % GGML_QNT_VERSION_FACTOR, "unknown")

    def model_info(self) -> dict[str, object]:
        """The hyperparameters as ``/api/show``'s ``model_info`` gives a GGUF's metadata."""
        info: dict[str, object] = {"general.architecture": "whisper", "general.parameter_count": self.parameters,
                                   "general.file_type": self.ftype % GGML_QNT_VERSION_FACTOR,
                                   "whisper.multilingual": self.multilingual}
        info.update({f"whisper.{name}": getattr(self, name) for name in HPARAMS if name != "ftype"})
        return info


def is_whisper_file(path: str | Path) -> bool:
    """Whether ``path`` starts as a whisper.cpp model file does (its magic; nothing else is checked)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError:
        return False
    return len(magic) == 4 and struct.unpack("<I", magic)[0] == GGML_MAGIC


class _Reader:
    def __init__(self, handle, path: Path, size: int) -> None:
        self.handle, self.path, self.size = handle, path, size

    def ints(self, count: int, what: str) -> tuple[int, ...]:
        data = self.handle.read(4 * count)
        if len(data) != 4 * count:
            raise InvalidModelFileError(f"{self.path}: truncated in the {what}")
        return struct.unpack(f"<{count}i", data)

    def skip(self, count: int, what: str) -> None:
        if count < 0 or self.handle.tell() + count > self.size:
            raise InvalidModelFileError(f"{self.path}: truncated in the {what}")
        self.handle.seek(count, 1)


def _check_hparams(path: Path, h: dict[str, int]) -> None:
    limits = {"n_vocab": 1 << 20, "n_audio_ctx": 1 << 16, "n_audio_state": 1 << 14, "n_audio_head": 256,
              "n_audio_layer": 256, "n_text_ctx": 1 << 16, "n_text_state": 1 << 14, "n_text_head": 256,
              "n_text_layer": 256, "n_mels": 1024}
    for name, top in limits.items():
        if not 1 <= h[name] <= top:
            raise InvalidModelFileError(f"{path}: {name} = {h[name]} is out of range")
    if h["n_audio_state"] != h["n_text_state"]:
        raise InvalidModelFileError(f"{path}: n_audio_state and n_text_state differ")
    if h["ftype"] % GGML_QNT_VERSION_FACTOR not in FTYPES:
        raise InvalidModelFileError(f"{path}: unknown weight type (ftype {h['ftype']})")


def _walk_tensors(reader: _Reader) -> tuple[int, int]:
    """The number of tensors and of their elements."""
    names: set[str] = set()
    parameters = 0
    while reader.handle.tell() < reader.size:
        n_dims, length, ttype = reader.ints(3, "tensor records")
        if not 1 <= n_dims <= 3:
            raise InvalidModelFileError(f"{reader.path}: a tensor with {n_dims} dimensions")
        if not 1 <= length <= 256:
            raise InvalidModelFileError(f"{reader.path}: a tensor name of {length} bytes")
        if ttype not in GGML_TYPE_SIZES:
            raise InvalidModelFileError(f"{reader.path}: tensor type {ttype} is not one whisper.cpp reads")
        dims = reader.ints(n_dims, "tensor records")
        if any(d < 1 for d in dims):
            raise InvalidModelFileError(f"{reader.path}: a tensor dimension of {min(dims)}")
        name = reader.handle.read(length).decode("utf-8", "replace")
        if name in names:
            raise InvalidModelFileError(f"{reader.path}: tensor {name!r} appears twice")
        names.add(name)
        elements = 1
        for d in dims:
            elements *= d
        parameters += elements
        block, block_bytes = GGML_TYPE_SIZES[ttype]
        if dims[0] % block:
            raise InvalidModelFileError(f"{reader.path}: tensor {name!r} rows do not fill whole blocks")
        reader.skip(elements // block * block_bytes, f"data of tensor {name!r}")
    return len(names), parameters


def read_whisper_file(path: str | Path) -> WhisperFile:
    """Validate a whisper.cpp ggml model file end to end; return its hyperparameters."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InvalidModelFileError(f"{path}: {exc.strerror or exc}") from exc
    with handle:
        size = path.stat().st_size
        reader = _Reader(handle, path, size)
        magic = handle.read(4)
        if magic == b"GGUF":
            raise InvalidModelFileError(f"{path}: a GGUF file (a text model?), not a whisper.cpp speech model")
        if len(magic) < 4 or struct.unpack("<I", magic)[0] != GGML_MAGIC:
            raise InvalidModelFileError(f"{path}: not a whisper.cpp model file (bad magic)")
        h = dict(zip(HPARAMS, reader.ints(len(HPARAMS), "header")))
        _check_hparams(path, h)
        n_mel, n_fft = reader.ints(2, "mel filters")
        if not (1 <= n_mel <= 1024 and 1 <= n_fft <= 4096):
            raise InvalidModelFileError(f"{path}: mel filters of {n_mel} x {n_fft}")
        reader.skip(4 * n_mel * n_fft, "mel filters")
        (n_tokens,) = reader.ints(1, "vocabulary")
        if not 0 <= n_tokens <= h["n_vocab"]:
            raise InvalidModelFileError(f"{path}: {n_tokens} vocabulary entries for n_vocab {h['n_vocab']}")
        for _ in range(n_tokens):
            (length,) = reader.ints(1, "vocabulary")
            if not 0 <= length <= 1024:
                raise InvalidModelFileError(f"{path}: a vocabulary entry of {length} bytes")
            reader.skip(length, "vocabulary")
        n_tensors, parameters = _walk_tensors(reader)
    expected = 11 + 15 * h["n_audio_layer"] + 24 * h["n_text_layer"]
    if n_tensors == 0:
        raise InvalidModelFileError(f"{path}: a vocabulary-only file, with no weights")
    if n_tensors != expected:
        raise InvalidModelFileError(f"{path}: {n_tensors} tensors, a model of this shape has {expected}")
    return WhisperFile(path=path, size=size, n_tensors=n_tensors, parameters=parameters, **h)
