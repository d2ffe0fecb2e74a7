"""Where a model's layers go: all on a GPU that holds them, split with the CPU when it does not.

The placement is computed from the real test model's header and GPUs
described by their free memory (what ggml reports of a device); that the
placement then runs on a real device is tested in ``test_vulkan.py``.
"""

from __future__ import annotations

import pytest

from mullama.engine import memory, offload
from mullama.engine.model import LoadOptions
from mullama.errors import MullamaError, NativeLibraryError
from mullama.ffi import backends
from mullama.ffi.loader import Device
from mullama.store.gguf import read_gguf

MIB = 1 << 20


def gpu(name: str, free: int) -> Device:
    return Device(name=name, description=name, kind="gpu", memory_total=free, memory_free=free, backend="Vulkan")


@pytest.fixture(scope="module")
def info(model_path):
    return read_gguf(model_path)


@pytest.fixture(autouse=True)
def _no_gpu_settings(monkeypatch):
    for name in ("GPU_MEMORY", "GPU_OVERHEAD", "SCHED_SPREAD", "BACKENDS"):
        monkeypatch.delenv("MULLAMA_" + name, raising=False)
        monkeypatch.delenv("OLLAMA_" + name, raising=False)
    monkeypatch.delenv("OLLAMA_LLM_LIBRARY", raising=False)


def test_no_gpu_keeps_every_layer_on_the_cpu(info):
    placement = offload.place(info, LoadOptions(), [])
    assert (placement.num_gpu, placement.gpu_bytes, placement.devices) == (0, 0, ())
    assert placement.total_bytes == memory.estimate(info, LoadOptions()).total


def test_num_gpu_0_keeps_every_layer_on_the_cpu(info):
    assert offload.place(info, LoadOptions(num_gpu=0), [gpu("big", 1 << 40)]).num_gpu == 0


def test_a_gpu_that_holds_the_model_gets_every_layer_and_the_output(info):
    placement = offload.place(info, LoadOptions(), [gpu("big", 1 << 40)])
    assert placement.num_gpu == info.block_count + 1
    assert placement.gpu_bytes == placement.total_bytes
    assert placement.tensor_split == ()


def test_a_small_gpu_gets_the_layers_that_fit_and_the_rest_stays_on_the_cpu(info):
    load = LoadOptions(num_ctx=2048)
    costs, compute, total = offload.layer_costs(info, load)
    room = compute + sum(costs) // 2
    placement = offload.place(info, load, [gpu("small", room)])
    assert 0 < placement.num_gpu < info.block_count + 1
    # As many layers as fit, in llama.cpp's order (output first), and not one more.
    assert sum(costs[:placement.num_gpu]) + compute <= room < sum(costs[:placement.num_gpu + 1]) + compute
    assert placement.gpu_bytes == sum(costs[:placement.num_gpu]) + compute < total


def test_the_memory_limit_caps_what_a_gpu_reports(info, monkeypatch):
    costs, compute, _ = offload.layer_costs(info, LoadOptions())
    whole = offload.place(info, LoadOptions(), [gpu("big", 1 << 40)])
    limit = compute + sum(costs) // 2
    monkeypatch.setenv("MULLAMA_GPU_MEMORY", f"{limit // MIB}MiB")
    limited = offload.place(info, LoadOptions(), [gpu("big", 1 << 40)])
    assert 0 < limited.num_gpu < whole.num_gpu
    assert limited.gpu_bytes <= limit


def test_the_gpu_overhead_leaves_room_unused(info, monkeypatch):
    costs, compute, _ = offload.layer_costs(info, LoadOptions())
    devices = [gpu("small", compute + sum(costs) // 2)]
    plain = offload.place(info, LoadOptions(), devices)
    monkeypatch.setenv("OLLAMA_GPU_OVERHEAD", str(sum(costs[1:]) // 4))
    assert 0 < offload.place(info, LoadOptions(), devices).num_gpu < plain.num_gpu


def test_a_model_that_fits_on_one_of_two_gpus_goes_to_one(info):
    placement = offload.place(info, LoadOptions(), [gpu("a", 1 << 40), gpu("b", 1 << 40)])
    assert [d.name for d in placement.devices] == ["a"]
    placement = offload.place(info, LoadOptions(main_gpu=1), [gpu("a", 1 << 40), gpu("b", 1 << 40)])
    assert [d.name for d in placement.devices] == ["b"]


def test_main_gpu_without_room_gives_way_to_one_with_room(info):
    placement = offload.place(info, LoadOptions(main_gpu=1), [gpu("a", 1 << 40), gpu("b", 1 * MIB)])
    assert [d.name for d in placement.devices] == ["a"]


def test_sched_spread_splits_over_every_gpu_in_proportion(info, monkeypatch):
    monkeypatch.setenv("OLLAMA_SCHED_SPREAD", "1")
    placement = offload.place(info, LoadOptions(), [gpu("a", 1 << 40), gpu("b", 1 << 40)])
    assert [d.name for d in placement.devices] == ["a", "b"]
    assert placement.num_gpu == info.block_count + 1
    assert abs(placement.layers[0] - placement.layers[1]) <= 1
    assert placement.tensor_split == tuple(float(n) for n in placement.layers)


def test_a_model_too_big_for_either_gpu_fills_both_then_the_cpu(info):
    load = LoadOptions(num_ctx=2048)
    costs, compute, _ = offload.layer_costs(info, load)
    third = compute + sum(costs) // 3
    placement = offload.place(info, load, [gpu("a", third), gpu("b", third)])
    assert len(placement.devices) == 2
    assert sum(costs) // 2 < sum(costs[:placement.num_gpu]) < sum(costs)
    assert placement.num_gpu < len(costs)


def test_an_explicit_num_gpu_is_honoured(info):
    placement = offload.place(info, LoadOptions(num_gpu=7), [gpu("small", 1 * MIB)])
    assert placement.num_gpu == 7
    assert offload.place(info, LoadOptions(num_gpu=500), [gpu("big", 1 << 40)]).num_gpu == info.block_count + 1


def test_the_output_layer_is_costed_with_the_tied_embeddings(info):
    costs, _, _ = offload.layer_costs(info, LoadOptions())
    names = {t.name: t.nbytes for t in info.tensors}
    assert "output.weight" not in names  # SmolLM2 ties its output to the token embeddings
    assert costs[0] == names["token_embd.weight"] + names["output_norm.weight"]
    assert len(costs) == info.block_count + 1


def test_a_bad_memory_setting_is_a_clear_error(info, monkeypatch):
    monkeypatch.setenv("MULLAMA_GPU_MEMORY", "lots")
    with pytest.raises(MullamaError, match="MULLAMA_GPU_MEMORY"):
        offload.place(info, LoadOptions(), [gpu("big", 1 << 40)])


def test_the_budget_counts_ram_and_the_gpus_for_an_offloaded_model(monkeypatch):
    monkeypatch.delenv("MULLAMA_MAX_MEMORY", raising=False)
    total, _ = memory.system_memory()
    # With the daemon's own models holding all RAM, the RAM part is exactly the physical memory.
    assert memory.budget(LoadOptions(num_gpu=0), in_use=total) == total
    assert memory.budget(LoadOptions(), in_use=total) == total + memory.gpu_memory()


@pytest.mark.parametrize(("text", "modules"), [
    ("cpu", {"cpu"}), ("vulkan", {"vulkan", "cpu"}), ("Vulkan, CUDA", {"vulkan", "cuda", "cpu"}),
    ("rocm", {"hip", "cpu"}), ("cpu_avx2", {"cpu"}), ("cuda_v12", {"cuda", "cpu"}),
])
def test_backend_selection_reads_mullama_and_ollama_names(monkeypatch, text, modules):
    monkeypatch.setenv("MULLAMA_BACKENDS", text)
    assert backends.selection().modules == modules
    monkeypatch.delenv("MULLAMA_BACKENDS")
    monkeypatch.setenv("OLLAMA_LLM_LIBRARY", text)
    assert backends.selection().modules == modules


def test_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MULLAMA_BACKENDS", "cuda,warp-drive")
    with pytest.raises(NativeLibraryError, match="'warp-drive' is not a backend"):
        backends.selection()


def test_a_selection_allows_the_cpu_always_and_only_the_named_gpus(monkeypatch):
    monkeypatch.setenv("MULLAMA_BACKENDS", "cpu")
    chosen = backends.selection()
    assert chosen.allows("CPU") and not chosen.allows("Vulkan") and not chosen.allows("CUDA")
    monkeypatch.setenv("MULLAMA_BACKENDS", "rocm")
    assert backends.selection().allows("ROCm")
    assert backends.Selection(None).allows("Vulkan")


def test_module_files_are_found_only_by_their_names(tmp_path):
    for name in ("libggml-cpu.so", "libggml-cpu-haswell.so", "libggml-base.so", "libggml-cpu.so.bak",
                 "libggml-vulkan.so", "libggml-cpuextra.so"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in backends.module_files(tmp_path, "cpu")] == ["libggml-cpu-haswell.so", "libggml-cpu.so"]
    # A file that is not a loadable module scores nothing and is not chosen.
    assert backends.best_modules(tmp_path, backends.Selection(None)) == []
