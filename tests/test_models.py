"""Model residency: memory estimates, the budget, and the manager's loading and eviction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.store import gguf

from mullama.engine import memory

from mullama.engine import residency
from mullama.engine.model import LoadOptions
from mullama.errors import ModelLoadError, ModelNotFoundError, MullamaError, OverloadedError
from mullama.engine.residency import ModelManager
from mullama.store.records import find_model
from mullama.store.names import ModelName
from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store

NAMES = ("alpha", "beta", "gamma")
#: Small contexts and one thread keep each load and generation quick on two busy cores.
SMALL = {"num_ctx": 512, "num_thread": 1, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def store(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store where every name of NAMES is the same GGUF."""
    store = Store(tmp_path_factory.mktemp("store") / "models")
    digest = store.add_blob_from_file(model_path, sharing="link")
    config_data = b'{"model_format": "gguf"}'
    config = Layer(CONFIG_MEDIA_TYPE, store.add_blob_bytes(config_data), len(config_data))
    layer = Layer(MEDIA_TYPES["model"], digest, model_path.stat().st_size)
    for name in NAMES:
        store.write_manifest(ModelName.parse(name), Manifest(config, (layer,)))
    return store


@pytest.fixture(scope="module")
def one_model(model_path: Path) -> int:
    """Estimated bytes of one test model loaded with SMALL."""
    return memory.estimate(gguf.read_gguf(model_path), LoadOptions.from_options(SMALL)).total


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    for name in ("MAX_MEMORY", "MAX_LOADED_MODELS", "MAX_CONTEXT", "NUM_PARALLEL", "LOAD_TIMEOUT", "KEEP_ALIVE"):
        monkeypatch.delenv(f"MULLAMA_{name}", raising=False)
        monkeypatch.delenv(f"OLLAMA_{name}", raising=False)


@pytest.fixture
def make_manager(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Build managers over the shared store and close them after the test."""
    made: list[ModelManager] = []

    def make(max_memory: int | None = None, **kwargs: object) -> ModelManager:
        if max_memory is not None:
            monkeypatch.setenv("MULLAMA_MAX_MEMORY", str(max_memory))
        manager = ModelManager(store, **kwargs)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def loaded_names(manager: ModelManager) -> set[str]:
    return {m.record.name.split(":")[0] for m in manager.running()}


def touch(manager: ModelManager, name: str, keep_alive: object = None) -> None:
    with manager.use(name, SMALL, keep_alive):
        pass


# --- memory.py ----------------------------------------------------------------


UNITS = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
         "tib": 1024**4, "KB": 1000, "MB": 1000**2, "gb": 1000**3, "B": 1}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(sorted(UNITS)), st.booleans())
def test_parse_size_reads_units(number: int, unit: str, space: bool) -> None:
    assert memory.parse_size(f"{number}{' ' if space else ''}{unit}") == number * UNITS[unit]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12) | st.from_regex(r"[0-9. ]{0,400}[kmgtKMGT]?i?[bB]?", fullmatch=True))
def test_parse_size_accepts_a_size_or_raises_value_error(text: str) -> None:
    try:
        size = memory.parse_size(text)
    except ValueError:
        return
    assert isinstance(size, int) and size >= 0


def test_parse_size_fractions_and_junk() -> None:
    assert memory.parse_size("1.5GiB") == 3 * 1024**3 // 2
    assert memory.parse_size(" 512MB ") == 512_000_000
    for bad in ("", "GiB", "-1G", "8 GiBs", "iB", "1e9", "12 34", "9" * 400 + "T"):
        with pytest.raises(ValueError):
            memory.parse_size(bad)


def test_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULLAMA_MAX_MEMORY", "8GiB")
    assert memory.budget() == 8 * 1024**3
    monkeypatch.setenv("MULLAMA_MAX_MEMORY", "lots")
    with pytest.raises(MullamaError, match="MULLAMA_MAX_MEMORY"):
        memory.budget()


def test_budget_without_the_environment_is_the_available_ram() -> None:
    total, available = memory.system_memory()
    cpu = LoadOptions(num_gpu=0)
    assert 0 < available <= total
    assert memory.budget(cpu) <= total
    # What our own models hold counts as room, up to physical memory.
    assert memory.budget(cpu, in_use=10**6) >= memory.budget(cpu)
    assert memory.budget(cpu, in_use=10**15) == total


def test_estimate_of_the_real_model(model_path: Path) -> None:
    info = gguf.read_gguf(model_path)
    est = memory.estimate(info, LoadOptions(num_ctx=4096))
    size = model_path.stat().st_size
    assert 0.9 * size < est.weights <= size
    # 30 layers x 4096 cells x (K + V) x 3 KV heads x 64 dims x 2 bytes (f16).
    assert est.kv_cache == 30 * 4096 * 2 * 3 * 64 * 2
    # llama.cpp reports a 98 MiB compute buffer for this model at num_batch 512.
    assert 90 * 2**20 < est.compute < 110 * 2**20
    assert est.total == est.weights + est.kv_cache + est.compute
    assert memory.estimate(info, LoadOptions(num_ctx=4096, num_parallel=4)).kv_cache == 4 * est.kv_cache
    assert memory.estimate(info, LoadOptions(num_ctx=4096, kv_cache_type="q8_0")).kv_cache == est.kv_cache * 34 // 64
    assert memory.estimate(info, LoadOptions(num_ctx=4096, kv_cache_type="q4_0")).kv_cache == est.kv_cache * 18 // 64
    assert memory.estimate(info, LoadOptions(num_ctx=4096), parts=[info]).weights == 2 * est.weights


# --- records --------------------------------------------------------------------


def test_a_split_model_keeps_every_part_in_order(store: Store, model_path: Path) -> None:
    parts = [store.add_blob_bytes(f"part {i}".encode()) for i in range(3)]
    config = store.read_manifest(ModelName.parse("alpha")).config
    layers = tuple(Layer(MEDIA_TYPES["model"], digest, 6) for digest in parts)
    store.write_manifest(ModelName.parse("split"), Manifest(config, layers))
    record = find_model(store, "split")
    assert record.model_paths == [store.blob_path(d) for d in parts]
    assert record.model_path == record.model_paths[0]
    assert find_model(store, "alpha").model_paths == [find_model(store, "alpha").model_path]
    store.delete(ModelName.parse("split"))


# --- the manager ------------------------------------------------------------------


def test_idle_models_are_evicted_least_recently_used_first(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=int(one_model * 2.5))
    touch(manager, "alpha")
    touch(manager, "beta")
    touch(manager, "alpha")
    touch(manager, "gamma")
    assert loaded_names(manager) == {"alpha", "gamma"}
    assert [m.record.name.split(":")[0] for m in manager.running()] == ["gamma", "alpha"]
    touch(manager, "beta")
    assert loaded_names(manager) == {"gamma", "beta"}


def test_max_loaded_models_evicts_too(make_manager) -> None:
    manager = make_manager(max_loaded=1)
    touch(manager, "alpha")
    touch(manager, "beta")
    assert loaded_names(manager) == {"beta"}


def test_a_model_too_large_for_the_machine_fails_fast(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=one_model // 2, load_timeout=30)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"needs .* at most .*num_ctx"):
        touch(manager, "alpha")
    assert time.monotonic() - started < 5
    assert manager.running() == []


def test_a_model_in_use_is_never_evicted(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=int(one_model * 2.5), load_timeout=0.5)
    with manager.use("alpha", SMALL):
        touch(manager, "beta")
        touch(manager, "gamma")  # alpha is the least recently used, but busy: beta goes
        assert loaded_names(manager) == {"alpha", "gamma"}
        with manager.use("gamma", SMALL):
            with pytest.raises(OverloadedError, match=r"no room to load beta.*models busy: .*alpha"):
                touch(manager, "beta")
        assert loaded_names(manager) == {"alpha", "gamma"}


def test_a_generating_model_is_never_evicted(make_manager, one_model: int) -> None:
    """A generation still running after its request let go of the model keeps it loaded."""
    manager = make_manager(max_memory=int(one_model * 1.5), load_timeout=0.3)
    # Counting fills a 2048-token context: seconds of work, far more than the checks take.
    long = {**SMALL, "num_ctx": 2048, "num_predict": -1}
    with manager.use("alpha", long) as alpha:
        tokens = alpha.model.tokenize("1, 2, 3, 4, 5, 6, 7, 8,")
        request = alpha.batcher.submit(tokens, long)
    pieces = iter(request)
    next(pieces)
    assert alpha.in_use == 0 and alpha.batcher.busy
    with pytest.raises(OverloadedError, match="no room to load beta"):
        touch(manager, "beta")
    assert loaded_names(manager) == {"alpha"} and not request.done
    request.cancel()
    touch(manager, "beta")
    assert loaded_names(manager) == {"beta"}


def test_a_load_waits_for_a_busy_model_to_finish(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=int(one_model * 1.5), load_timeout=30)
    held = threading.Event()

    def hold_alpha() -> None:
        with manager.use("alpha", SMALL):
            held.set()
            time.sleep(1.0)

    thread = threading.Thread(target=hold_alpha)
    thread.start()
    held.wait(30)
    started = time.monotonic()
    touch(manager, "beta")
    assert time.monotonic() - started >= 0.5
    thread.join()
    assert loaded_names(manager) == {"beta"}


def test_keep_alive_minus_one_pins(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=int(one_model * 2.5))
    touch(manager, "alpha", keep_alive=-1)
    touch(manager, "beta")
    touch(manager, "gamma")
    assert loaded_names(manager) == {"alpha", "gamma"}
    assert next(m for m in manager.running() if m.record.name.startswith("alpha")).pinned


def test_pinned_models_that_leave_no_room_fail_fast(make_manager, one_model: int) -> None:
    manager = make_manager(max_memory=int(one_model * 1.5), load_timeout=30)
    touch(manager, "alpha", keep_alive="-1m")
    started = time.monotonic()
    with pytest.raises(OverloadedError, match=r"pinned by keep_alive -1.*alpha"):
        touch(manager, "beta")
    assert time.monotonic() - started < 5
    assert manager.unload("alpha")
    touch(manager, "beta")
    assert loaded_names(manager) == {"beta"}


def test_keep_alive_zero_unloads_after_release(make_manager) -> None:
    manager = make_manager()
    with manager.use("alpha", SMALL, 0):
        assert loaded_names(manager) == {"alpha"}
    assert manager.running() == []


def test_keep_alive_expiry_unloads(make_manager) -> None:
    manager = make_manager()
    touch(manager, "alpha", keep_alive="1s")
    deadline = time.monotonic() + 10
    while manager.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manager.running() == []


def test_loaded_model_reports_its_size(make_manager, one_model: int) -> None:
    manager = make_manager()
    with manager.use("alpha", {**SMALL, "num_parallel": 2}) as loaded:
        assert loaded.size == loaded.estimate.total > one_model
        assert loaded.context_length == 512 and loaded.num_parallel == 2
        assert loaded.size_vram in (0, loaded.size)


def test_a_request_resolves_once_to_a_shared_record_and_merged_options(make_manager) -> None:
    manager = make_manager()
    resolution = manager.resolve("alpha", {"num_ctx": 300, "top_k": 5, "think": True})
    assert resolution.record is manager.resolve("ALPHA:latest").record
    assert resolution.record.name == "alpha:latest"
    assert resolution.options.num_ctx == resolution.load_options.num_ctx == 300
    assert resolution.options.top_k == 5 and resolution.think is True
    assert manager.resolve("alpha").think is None  # neither the request nor the Modelfile says
    with pytest.raises(ModelNotFoundError):
        manager.resolve("absent")


def test_max_context_caps_num_ctx(make_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULLAMA_MAX_CONTEXT", "256")
    manager = make_manager()
    assert manager.resolve("alpha", {"num_ctx": 8192}).options.num_ctx == 256
    assert manager.resolve("alpha", {"num_ctx": 128}).load_options.num_ctx == 128
    with manager.use("alpha", SMALL) as loaded:
        assert loaded.context_length == 256
        assert loaded.model.context.n_ctx_seq == 256


def test_bad_settings_are_reported(monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    for name, value in (("MAX_LOADED_MODELS", "-1"), ("MAX_CONTEXT", "big"), ("LOAD_TIMEOUT", "soon")):
        with monkeypatch.context() as patch:
            patch.setenv(f"MULLAMA_{name}", value)
            with pytest.raises(MullamaError, match=f"MULLAMA_{name}"):
                ModelManager(store)


def test_other_load_options_reload_the_model(make_manager) -> None:
    manager = make_manager()
    with manager.use("alpha", SMALL) as first:
        pass
    with manager.use("alpha", {**SMALL, "num_ctx": 256}) as second:
        assert second is not first and second.context_length == 256
    assert [m.context_length for m in manager.running()] == [256]


def test_concurrent_first_use_loads_once(make_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path] = []
    real_model = residency.Model

    def counting_model(path: Path, options: LoadOptions, **kwargs: Any) -> residency.Model:
        loads.append(path)
        time.sleep(0.2)  # widen the window in which a second load could start
        return real_model(path, options, **kwargs)

    monkeypatch.setattr(residency, "Model", counting_model)
    manager = make_manager()
    barrier = threading.Barrier(4)
    seen: list[object] = []

    def first_use() -> None:
        barrier.wait()
        with manager.use("alpha", SMALL) as loaded:
            seen.append(loaded)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert len(seen) == 4 and all(m is seen[0] for m in seen)


def test_a_load_does_not_block_other_models(make_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = make_manager()
    touch(manager, "alpha")
    release = threading.Event()
    loading = threading.Event()
    real_model = residency.Model

    def slow_model(path: Path, options: LoadOptions, **kwargs: Any) -> residency.Model:
        loading.set()
        release.wait(30)
        return real_model(path, options, **kwargs)

    monkeypatch.setattr(residency, "Model", slow_model)
    thread = threading.Thread(target=touch, args=(manager, "beta"))
    thread.start()
    try:
        assert loading.wait(30)
        started = time.monotonic()
        with manager.use("alpha", SMALL) as alpha:
            request = alpha.batcher.submit(alpha.model.tokenize("Hi"), {**SMALL, "num_predict": 2})
            request.wait(30)
        assert loaded_names(manager) == {"alpha"}
        assert time.monotonic() - started < 10
    finally:
        release.set()
        thread.join()
    assert loaded_names(manager) == {"alpha", "beta"}
