"""A reranking model for the tests, made from the test model as Qwen3-Reranker is made from Qwen3.

No reranker GGUF can be had here, so :func:`rerank_model_path` writes one:
SmolLM2-135M relabelled as a ``qwen3`` model with pooling type rank, the
recipe of llama.cpp's converter for Qwen3-Reranker (``conversion/qwen.py``):

- ``cls.output.weight`` is the language-model head's rows of the tokens
  "yes" and "no" (SmolLM2 ties its head to ``token_embd``, Q8_0, which is
  dequantized here to F32), with ``classifier.output_labels`` ["yes",
  "no"]; llama.cpp applies a softmax over the two for a qwen3 model, so
  the score is the probability of "yes" at the prompt's last token;
- ``tokenizer.chat_template.rerank`` is Qwen3-Reranker's prompt with
  ``{query}`` and ``{document}``, which llama-server fills in;
- Qwen3's blocks normalise queries and keys per head (``attn_q_norm``,
  ``attn_k_norm``), which SmolLM2 does not: given weights of
  :data:`NORM_WEIGHT`, the model stays a valid qwen3 model but no longer
  the test model (its text is nonsense, and its scores do not rank
  documents by meaning); and Qwen3 rotates positions in halves
  (NEOX) where llama.cpp's llama rotates pairs, so the rows of ``attn_q``
  and ``attn_k`` are put back in the order Hugging Face gives them (the
  llama converter interleaved them), each row moved whole, quantized.

Everything else (tokenizer, weights, the default chat template) is the test
model's, byte for byte. The file is deterministic and cached beside the
test model.

    python tests/rerank_model.py      # prints the path, making the file if needed
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import SMOLLM2_SHA256, smollm2_path  # noqa: E402
from fast_model import _partial  # noqa: E402
from projector import read_string, read_tensor_infos, skip_value  # noqa: E402

from mullama.store import gguf  # noqa: E402

#: Bump when the file's contents change, so a stale cached copy is not reused.
VERSION = 1
#: Qwen3-Reranker's prompt, as llama.cpp's converter writes it into the GGUF.
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
#: The query and key norms' weights: with ones, every score is within a hundredth of 0.69, so two documents'
#: order could hang on rounding; three spreads them from about 0.05 to 0.5.
NORM_WEIGHT = 3.0
#: The classes, in the order of ``cls.output``'s rows: the score llama-server reports is the first's.
LABELS = ("yes", "no")

_UINT32, _STRING, _ARRAY = 4, 8, 9
_F32, _Q8_0 = 0, 8
_POOLING_RANK = 4


def rerank_model_path() -> Path:
    """The reranker made from the test model, written on first use and cached beside it."""
    source = smollm2_path()
    dest = source.parent / f"smollm2-135m-q4_1-{SMOLLM2_SHA256[:12]}-qwen3-reranker-v{VERSION}.gguf"
    if not dest.exists():
        with _partial(dest) as partial:
            partial.write_bytes(reranker_bytes(source.read_bytes()))
    return dest


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def token_id(data: bytes, text: str) -> int:
    """The id of the vocabulary token spelled exactly ``text`` in the GGUF ``data``."""
    at = 24
    _, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    for _ in range(n_kv):
        key, value_at = read_string(data, at)
        (kind,) = struct.unpack_from("<I", data, value_at)
        if key == b"tokenizer.ggml.tokens":
            (count,) = struct.unpack_from("<Q", data, value_at + 8)
            wanted = text.encode()
            cursor = value_at + 4 + 12
            for index in range(count):
                token, cursor = read_string(data, cursor)
                if token == wanted:
                    return index
            break
        at = skip_value(data, kind, value_at + 4)
    raise ValueError(f"the vocabulary has no token {text!r}")


def _dequantize_q8_0(row: bytes) -> list[float]:
    """One row of Q8_0 blocks (an F16 scale and 32 signed bytes each) as floats."""
    values: list[float] = []
    for at in range(0, len(row), 34):
        (scale,) = struct.unpack_from("<e", row, at)
        values += [scale * q for q in struct.unpack_from("<32b", row, at + 2)]
    return values


def _neox_rows(blob: bytes, rows: int, head_dim: int) -> bytes:
    """The rows of a Q or K projection in Hugging Face's order, undoing the llama converter's interleaving.

    The converter put row ``h * head_dim + half * head_dim / 2 + i`` at
    ``h * head_dim + 2 * i + half``; each row is quantized on its own, so it
    moves as a whole.
    """
    size = len(blob) // rows
    order = [h * head_dim + 2 * i + half for h in range(rows // head_dim)
             for half in (0, 1) for i in range(head_dim // 2)]
    return b"".join(blob[r * size:(r + 1) * size] for r in order)


def reranker_bytes(data: bytes, norm: float = NORM_WEIGHT) -> bytes:
    """The reranker GGUF made from the llama-architecture GGUF ``data``; the same bytes for the same input.

    ``norm`` is every weight of the query and key norms.
    """
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    at = 24
    entries: list[bytes] = []
    metadata: dict[bytes, int] = {}
    for _ in range(n_kv):
        key, value_at = read_string(data, at)
        (kind,) = struct.unpack_from("<I", data, value_at)
        end = skip_value(data, kind, value_at + 4)
        raw = data[value_at:end]
        if kind == _UINT32:
            metadata[key] = struct.unpack_from("<I", raw, 4)[0]
        if key == b"general.architecture":
            raw = struct.pack("<I", _STRING) + _string("qwen3")
        elif key == b"general.name":
            raw = struct.pack("<I", _STRING) + _string("SmolLM2 135M as a Qwen3 reranker (Mullama's tests)")
        entries.append(_string(key.replace(b"llama.", b"qwen3.", 1)) + raw)
        at = end
    entries.append(_string("qwen3.pooling_type") + struct.pack("<II", _UINT32, _POOLING_RANK))
    entries.append(_string("qwen3.classifier.output_labels") + struct.pack("<IIQ", _ARRAY, _STRING, len(LABELS))
                   + b"".join(_string(label) for label in LABELS))
    entries.append(_string("tokenizer.chat_template.rerank") + struct.pack("<I", _STRING) + _string(RERANK_TEMPLATE))
    entries.append(_string("tokenizer.chat_templates") + struct.pack("<IIQ", _ARRAY, _STRING, 1) + _string("rerank"))

    n_embd = metadata[b"llama.embedding_length"]
    head_dim = n_embd // metadata[b"llama.attention.head_count"]
    tensors, at = read_tensor_infos(data, at, n_tensors)
    alignment = 32
    start = at + (-at % alignment)
    ends = sorted(offset for *_, offset in tensors) + [len(data) - start]

    def blob_of(offset: int) -> bytes:
        return data[start + offset:start + ends[ends.index(offset) + 1]]

    out: list[tuple[bytes, tuple[int, ...], int, bytes]] = []
    for name, shape, kind, offset in tensors:
        blob = blob_of(offset)
        if name.endswith((b".attn_q.weight", b".attn_k.weight")):
            rows = shape[1]
            _, block_elements, block_bytes = gguf.GGML_TYPES[kind]
            blob = _neox_rows(blob[:rows * shape[0] // block_elements * block_bytes], rows, head_dim)
        out.append((name, shape, kind, blob))
        if name.endswith(b".attn_norm.weight"):
            block = name[:-len(b"attn_norm.weight")]
            weights = struct.pack(f"<{head_dim}f", *([norm] * head_dim))
            out.append((block + b"attn_q_norm.weight", (head_dim,), _F32, weights))
            out.append((block + b"attn_k_norm.weight", (head_dim,), _F32, weights))
    embd = next(t for t in tensors if t[0] == b"token_embd.weight")
    if embd[2] != _Q8_0:
        raise ValueError(f"token_embd is of ggml type {embd[2]}, not Q8_0")
    row_size = embd[1][0] // 32 * 34
    table = blob_of(embd[3])
    head = []
    for label in LABELS:
        index = token_id(data, label)
        head += _dequantize_q8_0(table[index * row_size:(index + 1) * row_size])
    out.append((b"cls.output.weight", (n_embd, len(LABELS)), _F32, struct.pack(f"<{len(head)}f", *head)))

    infos, blobs, offset = [], [], 0
    for name, shape, kind, blob in out:
        infos.append(_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, kind, offset))
        padded = blob + b"\0" * (-len(blob) % alignment)
        blobs.append(padded)
        offset += len(padded)
    header = b"".join([b"GGUF", struct.pack("<IQQ", version, len(out), len(entries)), *entries, *infos])
    header += b"\0" * (-len(header) % alignment)
    return header + b"".join(blobs)


def main() -> int:
    print(rerank_model_path())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
