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
    if kind not in ("mlp", "gemma3"):
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
    else:
        tensors["v.position_embd.weight"] = normal((WIDTH, patches), 0.1)
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
    else:
        tensors["mm.soft_emb_norm.weight"] = const((WIDTH,), 1.0)
        tensors["mm.input_projection.weight"] = normal((TEXT_WIDTH, WIDTH), 1.0)

    metadata: list[tuple[str, int, object]] = [
        ("general.architecture", _STRING, "clip"),
        ("general.name", _STRING, f"mullama tiny test projector ({kind})"),
        ("clip.has_vision_encoder", _BOOL, True),
        ("clip.projector_type", _STRING, kind),
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
