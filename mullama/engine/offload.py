"""Which of a model's layers go to which GPU, as Ollama decides it.

With ``num_gpu`` left at -1 the layers that fit are offloaded and the rest
stay on the CPU: a model larger than the GPU runs split instead of being
refused. Each GPU's room is its free memory now (capped by
``MULLAMA_GPU_MEMORY``, a per-device limit for machines whose GPU is shared,
and for tests), less ``OLLAMA_GPU_OVERHEAD`` and the compute buffers of one
batch; each layer costs its weights plus its share of the KV cache of every
slot (:func:`mullama.engine.memory.estimate`). llama.cpp offloads the last
layers first, the output layer before all, so the layers are placed in
that order.

A model that fits on one GPU goes to one (``main_gpu`` when it has room,
else the one with most free memory); otherwise, or with
``OLLAMA_SCHED_SPREAD``, its layers are spread over every GPU, and the
share each gets is passed to llama.cpp as its tensor split. An explicit
``num_gpu`` is honoured as given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mullama import config
from mullama.engine import memory
from mullama.engine.model import LoadOptions
from mullama.ffi.loader import Device
from mullama.store.gguf import GGUFInfo

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Layers per GPU and the bytes the model then holds on the GPUs."""

    #: The GPUs given layers, in the order llama.cpp fills them (the model's device list).
    devices: tuple[Device, ...]
    #: Layers each of :attr:`devices` holds; the output layer counts as one, as in llama.cpp's ``n_gpu_layers``.
    layers: tuple[int, ...]
    #: The model's repeating layers (``block_count``); all of them and the output layer make ``block_count + 1``.
    block_count: int
    #: Estimated bytes on the GPUs.
    gpu_bytes: int
    #: Estimated bytes in all.
    total_bytes: int

    @property
    def num_gpu(self) -> int:
        """Layers offloaded (llama.cpp's ``n_gpu_layers``)."""
        return sum(self.layers)

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """Each device's share of the offloaded layers; empty for one device or none."""
        return tuple(float(n) for n in self.layers) if len(self.devices) > 1 else ()

    def describe(self) -> str:
        """One line for the log: where the layers went."""
        if not self.devices:
            return f"all {self.block_count + 1} layers on the CPU"
        where = ", ".join(f"{n} on {d.name}" for d, n in zip(self.devices, self.layers))
        return (f"{self.num_gpu} of {self.block_count + 1} layers on the GPU ({where}), "
                f"{memory.describe(self.gpu_bytes)} of {memory.describe(self.total_bytes)} in GPU memory")


def spread() -> bool:
    """``OLLAMA_SCHED_SPREAD``: spread a model over every GPU even when one would hold it."""
    return config.flag("SCHED_SPREAD")


def room(device: Device) -> int:
    """Bytes of ``device`` models may plan on now: its free memory, capped by ``MULLAMA_GPU_MEMORY``."""
    limit = memory.gpu_memory_limit()
    return device.memory_free if limit is None else min(device.memory_free, limit)


def layer_costs(info: GGUFInfo, load: LoadOptions, parts: Sequence[GGUFInfo] = ()) -> tuple[list[int], int, int]:
    """(bytes of each offloadable layer in the order llama.cpp offloads them, compute bytes, total bytes).

    The output layer comes first (its weights, or the token embeddings a
    model with tied embeddings copies to the GPU as its output), then the
    repeating layers from the last; each repeating layer carries its share
    of the KV cache.
    """
    need = memory.estimate(info, load, parts=parts)
    blocks = info.block_count or 0
    weights = [0] * blocks
    named: dict[str, int] = {}
    for part in (info, *parts):
        for tensor in part.tensors:
            match = _BLOCK.match(tensor.name)
            if match and int(match.group(1)) < blocks:
                weights[int(match.group(1))] += tensor.nbytes
            else:
                named[tensor.name] = named.get(tensor.name, 0) + tensor.nbytes
    output = named.get("output.weight", named.get("token_embd.weight", 0)) + named.get("output_norm.weight", 0)
    kv_layer = math.ceil(need.kv_cache / blocks) if blocks else 0
    return [output] + [w + kv_layer for w in reversed(weights)], need.compute, need.total


def place(info: GGUFInfo, load: LoadOptions, devices: Sequence[Device],
          parts: Sequence[GGUFInfo] = ()) -> Placement:
    """Decide where ``info``'s layers go on ``devices`` (the GPUs models may use, with their free memory now)."""
    costs, compute, total = layer_costs(info, load, parts)
    blocks = info.block_count or 0
    if load.num_gpu == 0 or not devices or not blocks:
        return Placement((), (), blocks, 0, total)
    fixed = compute + memory.gpu_overhead()
    rooms = {i: max(0, room(d) - fixed) for i, d in enumerate(devices)}
    order = sorted(rooms, key=lambda i: (i != load.main_gpu, -rooms[i]))
    if load.num_gpu > 0:
        counts = _share(min(load.num_gpu, len(costs)), order if spread() else order[:1], rooms)
    elif not spread() and (single := next((i for i in order if rooms[i] >= sum(costs)), None)) is not None:
        counts = {single: len(costs)}
    else:
        counts = _fill(costs, order, rooms)
        if spread():
            counts = _share(sum(counts.values()), order, rooms)
    used = [i for i in order if counts.get(i)]
    layers = tuple(counts[i] for i in used)
    offloaded = sum(layers)
    if not offloaded:
        return Placement((), (), blocks, 0, total)
    gpu = total if offloaded == len(costs) else min(total, sum(costs[:offloaded]) + compute)
    return Placement(tuple(devices[i] for i in used), layers, blocks, gpu, total)


def _fill(costs: list[int], order: list[int], rooms: dict[int, int]) -> dict[int, int]:
    """Layers in offload order onto the devices, each filled before the next; stops at the first that fits nowhere."""
    counts: dict[int, int] = {}
    left = dict(rooms)
    device = 0
    for cost in costs:
        while device < len(order) and left[order[device]] < cost:
            device += 1
        if device == len(order):
            break
        left[order[device]] -= cost
        counts[order[device]] = counts.get(order[device], 0) + 1
    return counts


def _share(count: int, order: list[int], rooms: dict[int, int]) -> dict[int, int]:
    """``count`` layers over the devices in proportion to their room (all to the first when none has any)."""
    total = sum(rooms[i] for i in order)
    if total <= 0:
        return {order[0]: count}
    counts = {i: count * rooms[i] // total for i in order}
    counts[order[0]] += count - sum(counts.values())
    return counts
