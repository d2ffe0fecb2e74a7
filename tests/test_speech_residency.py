"""Speech models in the ModelManager: loaded, kept, evicted and stopped like text models, under one budget."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import pytest
from speech_helpers import harvard_recording, spoken_sentence
from test_models import environment, make_manager  # noqa: F401 - fixtures: the managers as test_models makes them
from whisper_weights import whisper_tiny_en_path

from mullama.engine import memory
from mullama.engine.model import LoadOptions
from mullama.engine.residency import ModelManager, estimate_record
from mullama.errors import CancelledError, OverloadedError
from mullama.speech import SpeechModel, load_audio
from mullama.speech.model_file import read_whisper_file
from mullama.store.blobs import MEDIA_TYPES, Layer, Manifest, Store
from mullama.store.names import ModelName

SMALL = {"num_ctx": 256, "num_thread": 2}
TEXT, SPEECH = "smol:latest", "whisper:tiny.en"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Store:
    """A store holding the text test model and Whisper tiny.en."""
    store = Store(tmp_path_factory.mktemp("speech-residency"))
    config = Layer("application/vnd.docker.container.image.v1+json", store.add_blob_bytes(b"{}"), 2)
    for name, path in ((TEXT, model_path), (SPEECH, whisper_tiny_en_path())):
        layer = Layer(MEDIA_TYPES["model"], store.add_blob_from_file(path), path.stat().st_size)
        store.write_manifest(ModelName.parse(name), Manifest(config, (layer,)))
    return store


def sizes(store: Store) -> tuple[int, int]:
    """The estimates of the text model (with SMALL) and of the speech model."""
    manager_free = ModelManager(store)
    try:
        text = estimate_record(manager_free.resolve(TEXT, SMALL).record, LoadOptions.from_options(SMALL)).total
        speech = estimate_record(manager_free.resolve(SPEECH).record, LoadOptions()).total
    finally:
        manager_free.close()
    return text, speech


def names(manager: ModelManager) -> set[str]:
    return {loaded.record.name for loaded in manager.running()}


def test_the_estimate_matches_what_whisper_cpp_allocates(caplog: pytest.LogCaptureFixture) -> None:
    """The caches exactly, the compute buffers within a factor of two, of whisper.cpp's own log lines."""
    caplog.set_level(logging.DEBUG, logger="mullama.native")
    with SpeechModel(whisper_tiny_en_path(), num_thread=2) as model:
        model.transcribe(load_audio(spoken_sentence(2)))
    log = "\n".join(record.getMessage() for record in caplog.records)
    megabytes = lambda pattern: sum(float(x) for x in re.findall(pattern + r"\s*=\s*([0-9.]+) MB", log))
    caches = megabytes(r"kv self size") + megabytes(r"kv cross size") + megabytes(r"kv pad\s+size")
    compute = megabytes(r"compute buffer \((?:conv|encode|cross|decode)\)\s*")
    need = memory.estimate_speech(read_whisper_file(whisper_tiny_en_path()), LoadOptions())
    assert caches > 0 and compute > 0
    assert need.kv_cache / 1e6 == pytest.approx(caches, abs=0.05)
    assert compute / 2 <= need.compute / 1e6 <= compute * 2
    assert need.weights == whisper_tiny_en_path().stat().st_size


def test_a_speech_model_loads_once_is_listed_and_transcribes(make_manager) -> None:
    manager = make_manager()
    audio = load_audio(spoken_sentence(4))
    with manager.use(SPEECH) as first, manager.use(SPEECH) as second:
        assert first is second and isinstance(first.model, SpeechModel) and first.batcher is None
        assert first.busy and first.queued_count == 0
        assert "bowls" in first.model.transcribe(audio).text.lower()
    (loaded,) = manager.running()
    assert loaded.record.name == SPEECH and not loaded.busy and loaded.active_count == 0
    assert loaded.size == estimate_record(loaded.record, loaded.load_options).total


def test_keep_alive_zero_unloads_a_speech_model_after_use(make_manager) -> None:
    manager = make_manager()
    with manager.use(SPEECH, keep_alive=0):
        assert names(manager) == {SPEECH}
    assert names(manager) == set()


def test_text_and_speech_share_one_budget(make_manager, store: Store) -> None:
    text, speech = sizes(store)
    both = make_manager(max_memory=text + speech + (1 << 20))
    with both.use(TEXT, SMALL):
        pass
    with both.use(SPEECH):
        pass
    assert names(both) == {TEXT, SPEECH}
    one = make_manager(max_memory=max(text, speech) + (1 << 20))
    with one.use(TEXT, SMALL):
        pass
    with one.use(SPEECH):
        assert names(one) == {SPEECH}, "the idle text model made room"
    with one.use(TEXT, SMALL):
        assert names(one) == {TEXT}, "and the idle speech model in turn"


def test_a_busy_speech_model_is_not_evicted(make_manager, store: Store) -> None:
    text, speech = sizes(store)
    manager = make_manager(max_memory=max(text, speech) + (1 << 20), load_timeout=0.5)
    with manager.use(SPEECH):
        with pytest.raises(OverloadedError, match="no room to load"):
            with manager.use(TEXT, SMALL):
                pass
        assert names(manager) == {SPEECH}


def test_stop_cancels_a_running_transcription_and_unloads(make_manager) -> None:
    manager = make_manager()
    audio = load_audio(harvard_recording())
    started, outcome = threading.Event(), []

    def transcribe() -> None:
        try:
            with manager.use(SPEECH) as loaded:
                loaded.model.transcribe(audio, on_segment=lambda _segment: started.set())
            outcome.append("finished")
        except CancelledError:
            outcome.append("cancelled")

    worker = threading.Thread(target=transcribe)
    worker.start()
    assert started.wait(300)
    assert manager.stop(SPEECH)
    worker.join(300)
    assert outcome == ["cancelled"] and names(manager) == set()
