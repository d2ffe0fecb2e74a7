"""A tiny vision projector for SmolLM2-135M, written on first use and cached.

No small vision model with its projector can be had here, so the tests make
one: a LLaVA-1.5 style projector (``clip.projector_type`` ``mlp``) that
llama.cpp's ``clip.cpp`` loads, with a vision tower of width 32, one block,
patch 14 on 56x56 images (16 image tokens) and a two-layer MLP out to 576,
SmolLM2-135M's width. Its weights are random (from a fixed seed), so its
answers mean nothing, but the whole path runs: images are decoded,
preprocessed, encoded and read by the text model, and two different images
steer greedy decoding differently. The projector's weights are large
(standard deviation 1 for ``mm.0``, 0.5 for ``mm.2``) so that the image is
not drowned out by the text.

``tiny_projector_path("qwen2vl")`` is a Qwen2-VL merger (2D-RoPE tower,
2x2 patches merged) for :func:`tiny_mrope_model_path`, SmolLM2-135M's
first two layers relabelled as a ``qwen2vl`` model: its images take M-RoPE
positions, an image of W x H embeddings advancing the position by max(W, H).

``tiny_projector_path("gemma3")`` is the same tower with Gemma 3's projector
(``gemma3``: patches average-pooled 2x2, an RMS norm and one projection) on
112x112 images: its images are read with non-causal attention, all of an
image in one decode, as Gemma 3's are.

The file is written with a few lines of GGUF writing rather than the
``gguf`` package, which would bring numpy into the test dependencies for
one file; ``clip.cpp`` loading it is the check that it is right.
"""

from __future__ import annotations

import array
import os
import random
import struct
from pathlib import Path

from mullama import config

#: Bump when the file's contents change, so a stale cached copy is not reused.
VERSION = 1
#: Width of the text model the projector feeds (SmolLM2-135M).
TEXT_WIDTH = 576
#: The vision tower: width, heads, feed-forward width, patch and image size.
WIDTH, HEADS, FFN, PATCH, IMAGE = 32, 2, 64, 14, 56
#: Image tokens per image: one per patch (for both kinds: Gemma 3's pools 2x2 patches of an image twice as wide).
IMAGE_TOKENS = (IMAGE // PATCH) ** 2

_F32 = 0
_UINT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 6, 7, 8, 9
_ALIGNMENT = 32


def tiny_projector_path(kind: str = "mlp") -> Path:
    """The projector GGUF of ``kind`` (``mlp`` or ``gemma3``), generated into the user cache on first use."""
    suffix = "" if kind == "mlp" else f"-{kind}"
    path = config.user_cache_dir() / "fixtures" / f"tiny-mmproj{suffix}-smollm2-v{VERSION}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(projector_bytes(kind=kind))
        partial.replace(path)
    return path


def projector_bytes(seed: int = 12, kind: str = "mlp") -> bytes:
    """The whole projector file; the same bytes for the same seed and kind."""
    if kind not in ("mlp", "gemma3", "qwen2vl"):
        raise ValueError(f"no tiny projector of kind {kind!r}")
    rng = random.Random(seed)
    image = IMAGE if kind == "mlp" else 2 * IMAGE
    patches = (image // PATCH) ** 2

    def normal(shape: tuple[int, ...], std: float) -> tuple[tuple[int, ...], array.array]:
        count = 1
        for n in shape:
            count *= n
        return shape, array.array("f", (rng.gauss(0.0, std) for _ in range(count)))

    def const(shape: tuple[int, ...], value: float) -> tuple[tuple[int, ...], array.array]:
        count = 1
        for n in shape:
            count *= n
        return shape, array.array("f", [value]) * count

    # Shapes are ggml's: the innermost dimension first.
    tensors = {"v.patch_embd.weight": normal((PATCH, PATCH, 3, WIDTH), 0.1)}
    if kind == "mlp":
        tensors["v.class_embd"] = normal((WIDTH,), 0.1)
        tensors["v.position_embd.weight"] = normal((WIDTH, patches + 1), 0.1)
    elif kind == "gemma3":
        tensors["v.position_embd.weight"] = normal((WIDTH, patches), 0.1)
    else:
        tensors["v.patch_embd.weight.1"] = normal((PATCH, PATCH, 3, WIDTH), 0.1)
    tensors["v.pre_ln.weight"] = const((WIDTH,), 1.0)
    tensors["v.pre_ln.bias"] = const((WIDTH,), 0.0)
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        tensors[f"v.blk.0.{name}.weight"] = normal((WIDTH, WIDTH), 0.1)
        tensors[f"v.blk.0.{name}.bias"] = const((WIDTH,), 0.0)
    for name in ("ln1", "ln2"):
        tensors[f"v.blk.0.{name}.weight"] = const((WIDTH,), 1.0)
        tensors[f"v.blk.0.{name}.bias"] = const((WIDTH,), 0.0)
    tensors["v.blk.0.ffn_up.weight"] = normal((WIDTH, FFN), 0.1)
    tensors["v.blk.0.ffn_up.bias"] = const((FFN,), 0.0)
    tensors["v.blk.0.ffn_down.weight"] = normal((FFN, WIDTH), 0.1)
    tensors["v.blk.0.ffn_down.bias"] = const((WIDTH,), 0.0)
    if kind == "mlp":
        tensors["mm.0.weight"] = normal((WIDTH, TEXT_WIDTH), 1.0)
        tensors["mm.0.bias"] = const((TEXT_WIDTH,), 0.0)
        tensors["mm.2.weight"] = normal((TEXT_WIDTH, TEXT_WIDTH), 0.5)
        tensors["mm.2.bias"] = const((TEXT_WIDTH,), 0.0)
    elif kind == "gemma3":
        tensors["mm.soft_emb_norm.weight"] = const((WIDTH,), 1.0)
        tensors["mm.input_projection.weight"] = normal((TEXT_WIDTH, WIDTH), 1.0)
    else:
        tensors["mm.0.weight"] = normal((4 * WIDTH, 4 * WIDTH), 0.5)
        tensors["mm.0.bias"] = const((4 * WIDTH,), 0.0)
        tensors["mm.2.weight"] = normal((4 * WIDTH, TEXT_WIDTH), 0.5)
        tensors["mm.2.bias"] = const((TEXT_WIDTH,), 0.0)

    metadata: list[tuple[str, int, object]] = [
        ("general.architecture", _STRING, "clip"),
        ("general.name", _STRING, f"mullama tiny test projector ({kind})"),
        ("clip.has_vision_encoder", _BOOL, True),
        ("clip.projector_type", _STRING, "qwen2vl_merger" if kind == "qwen2vl" else kind),
        ("clip.use_gelu", _BOOL, True),
        ("clip.vision.image_size", _UINT32, image),
        ("clip.vision.patch_size", _UINT32, PATCH),
        ("clip.vision.embedding_length", _UINT32, WIDTH),
        ("clip.vision.feed_forward_length", _UINT32, FFN),
        ("clip.vision.block_count", _UINT32, 1),
        ("clip.vision.projection_dim", _UINT32, TEXT_WIDTH),
        ("clip.vision.attention.head_count", _UINT32, HEADS),
        ("clip.vision.attention.layer_norm_epsilon", _FLOAT32, 1e-6),
        ("clip.vision.image_mean", _ARRAY, [0.5, 0.5, 0.5]),
        ("clip.vision.image_std", _ARRAY, [0.5, 0.5, 0.5]),
    ]
    if kind == "gemma3":
        metadata.append(("clip.vision.projector.scale_factor", _UINT32, 2))
    return _write_gguf(metadata, tensors)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(kind: int, value: object) -> bytes:
    if kind == _STRING:
        return _string(str(value))
    if kind == _BOOL:
        return struct.pack("<?", bool(value))
    if kind == _UINT32:
        return struct.pack("<I", int(value))  # type: ignore[call-overload]
    if kind == _FLOAT32:
        return struct.pack("<f", float(value))  # type: ignore[arg-type]
    items = list(value)  # type: ignore[call-overload]
    return struct.pack("<IQ", _FLOAT32, len(items)) + struct.pack(f"<{len(items)}f", *items)


def _write_gguf(metadata: list[tuple[str, int, object]],
                tensors: dict[str, tuple[tuple[int, ...], array.array]]) -> bytes:
    """GGUF version 3: header, metadata, tensor descriptions, then the aligned F32 data."""
    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, kind, value in metadata:
        head += [_string(key), struct.pack("<I", kind), _value(kind, value)]
    data: list[bytes] = []
    offset = 0
    for name, (shape, values) in tensors.items():
        head += [_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *shape),
                 struct.pack("<IQ", _F32, offset)]
        blob = values.tobytes()
        blob += b"\0" * (-len(blob) % _ALIGNMENT)
        data.append(blob)
        offset += len(blob)
    header = b"".join(head)
    header += b"\0" * (-len(header) % _ALIGNMENT)
    return header + b"".join(data)


def tiny_mrope_model_path(text_model: Path) -> Path:
    """SmolLM2-135M's first two layers as a ``qwen2vl`` model (M-RoPE), written into the user cache on first use.

    The tensors are the same: Qwen2-VL's text model is a Llama-like decoder
    whose rotary positions have sections (here 16, 8 and 8 of the 32 pairs)
    for time, height and width.
    """
    path = config.user_cache_dir() / "fixtures" / f"tiny-qwen2vl-smollm2-2-layers-v{VERSION}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(_relabelled(text_model.read_bytes(), layers=2))
        partial.replace(path)
    return path


#: Bytes of each GGUF value type that has a fixed size.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_string(data: bytes, at: int) -> tuple[bytes, int]:
    """The GGUF string at ``at`` in ``data``, and where what follows it starts."""
    (length,) = struct.unpack_from("<Q", data, at)
    return data[at + 8:at + 8 + length], at + 8 + length


def skip_value(data: bytes, kind: int, at: int) -> int:
    """Where the GGUF value of type ``kind`` at ``at`` in ``data`` ends."""
    if kind == _STRING:
        return read_string(data, at)[1]
    if kind == _ARRAY:
        inner, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if inner != _STRING:
            return at + count * _SIZES[inner]
        for _ in range(count):
            at = read_string(data, at)[1]
        return at
    return at + _SIZES[kind]


def read_tensor_infos(data: bytes, at: int, count: int) -> tuple[list[tuple[bytes, tuple[int, ...], int, int]], int]:
    """The ``count`` tensor infos at ``at`` in ``data`` as (name, shape, type, offset), and where they end."""
    tensors = []
    for _ in range(count):
        name, at = read_string(data, at)
        (n_dims,) = struct.unpack_from("<I", data, at)
        shape = struct.unpack_from(f"<{n_dims}Q", data, at + 4)
        kind, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        tensors.append((name, shape, kind, offset))
    return tensors, at


def _relabelled(data: bytes, layers: int) -> bytes:
    """A llama-architecture GGUF as ``qwen2vl`` with its first ``layers`` blocks, every other byte as it was."""
    at = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, at)
    at += 20

    entries = []
    for _ in range(n_kv):
        key, value_at = read_string(data, at)
        (kind,) = struct.unpack_from("<I", data, value_at)
        end = skip_value(data, kind, value_at + 4)
        raw = data[value_at:end]
        if key == b"general.architecture":
            raw = struct.pack("<I", _STRING) + _string("qwen2vl")
        elif key == b"llama.block_count":
            raw = struct.pack("<II", _UINT32, layers)
        entries.append(_string(key.replace(b"llama.", b"qwen2vl.", 1).decode()) + raw)
        at = end
    entries.append(_string("qwen2vl.rope.dimension_sections") + struct.pack("<IIQ4i", _ARRAY, 5, 4, 16, 8, 8, 0))
    alignment = _ALIGNMENT
    tensors, at = read_tensor_infos(data, at, n_tensors)
    start = at + (-at % alignment)
    offsets = sorted(offset for *_, offset in tensors) + [len(data) - start]
    head = [b"GGUF", struct.pack("<IQQ", version, 0, len(entries)), *entries]
    blobs, infos, offset = [], [], 0
    for name, shape, kind, old in tensors:
        if name.startswith(b"blk.") and int(name.split(b".")[1]) >= layers:
            continue
        blob = data[start + old:start + offsets[offsets.index(old) + 1]]
        infos.append(_string(name.decode()) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, kind, offset))
        blobs.append(blob + b"\0" * (-len(blob) % alignment))
        offset += len(blobs[-1])
    head[1] = struct.pack("<IQQ", version, len(infos), len(entries))
    header = b"".join(head + infos)
    header += b"\0" * (-len(header) % alignment)
    return header + b"".join(blobs)
