"""Per-model limits: the file, the environment under it, patterns, reloads, and clear errors for anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.ops.limits import Limits, LimitsError, ModelLimits, load_limits, parse_limits

EXAMPLE = {
    "defaults": {"max_queue": 64},
    "models": {
        "llama3.2:*": {"max_parallel": 4, "max_context": 8192, "keep_alive": "30m"},
        "qwen2.5:7b": {"max_memory": "6GiB", "pinned": True, "keys": ["ci", "alice"]},
        "qwen*": {"max_queue": 8, "max_parallel": 2},
        "smollm2": {"keep_alive": -1},
    },
}


def test_a_model_gets_defaults_then_patterns_then_its_name() -> None:
    limits = parse_limits(EXAMPLE, env={})
    assert limits.for_model("llama3.2:1b") == ModelLimits(max_parallel=4, max_queue=64, max_context=8192,
                                                          keep_alive=1800.0)
    # The exact name beats the pattern listed after it.
    assert limits.for_model("qwen2.5:7b") == ModelLimits(max_parallel=2, max_queue=8, max_memory=6 * 1024**3,
                                                         pinned=True, keys=("ci", "alice"))
    assert limits.for_model("qwen2.5:0.5b") == ModelLimits(max_parallel=2, max_queue=8)
    # A name without a tag stands for every tag.
    assert limits.for_model("smollm2:135m").keep_alive == -1.0
    assert limits.for_model("smollm2-big:1b") == ModelLimits(max_queue=64)
    assert limits.for_model("mistral:7b") == ModelLimits(max_queue=64)


def test_allowed_keys() -> None:
    limits = parse_limits(EXAMPLE, env={}).for_model("qwen2.5:7b")
    assert limits.allows_key("ci") and limits.allows_key("alice")
    assert not limits.allows_key("bob") and not limits.allows_key("")
    assert ModelLimits().allows_key("") and ModelLimits().allows_key("anyone")
    assert limits.as_dict() == {"max_parallel": 2, "max_queue": 8, "max_memory": 6 * 1024**3, "pinned": True,
                                "keys": ["ci", "alice"]}


def test_the_environment_gives_defaults_under_the_file() -> None:
    env = {"MULLAMA_MAX_QUEUE": "100", "OLLAMA_MAX_CONTEXT": "4096", "MULLAMA_KEEP_ALIVE": "10m"}
    limits = parse_limits(EXAMPLE, env=env)
    assert limits.for_model("mistral:7b") == ModelLimits(max_queue=64, max_context=4096, keep_alive=600.0)
    assert parse_limits(None, env=env).for_model("x:1b") == ModelLimits(max_queue=100, max_context=4096,
                                                                        keep_alive=600.0)
    with pytest.raises(LimitsError, match="MULLAMA_MAX_QUEUE"):
        parse_limits(None, env={"MULLAMA_MAX_QUEUE": "lots"})
    with pytest.raises(LimitsError, match="MULLAMA_KEEP_ALIVE"):
        parse_limits(None, env={"MULLAMA_KEEP_ALIVE": "soon"})


@pytest.mark.parametrize("data, message", [
    ([], "expected an object"),
    ({"model": {}}, "unknown section 'model'"),
    ({"defaults": []}, "defaults: expected an object of limits"),
    ({"models": []}, "models: expected an object"),
    ({"models": {"": {}}}, "must not be empty"),
    ({"models": {"a": {"max_slots": 2}}}, 'models."a": unknown limit \'max_slots\''),
    ({"models": {"a": {"max_parallel": 0}}}, 'models."a".max_parallel: expected an integer of at least 1'),
    ({"models": {"a": {"max_queue": -1}}}, "at least 0"),
    ({"models": {"a": {"max_queue": 2.5}}}, "integer"),
    ({"models": {"a": {"max_queue": True}}}, "integer"),
    ({"models": {"a": {"max_memory": "lots"}}}, "max_memory"),
    ({"models": {"a": {"max_memory": 0}}}, "positive"),
    ({"models": {"a": {"keep_alive": "soon"}}}, "keep_alive"),
    ({"models": {"a": {"pinned": "yes"}}}, "true or false"),
    ({"models": {"a": {"keys": "ci"}}}, "list of key names"),
])
def test_errors_name_the_place_and_the_value(data: object, message: str) -> None:
    with pytest.raises(LimitsError) as caught:
        parse_limits(data, "limits.json", env={})
    assert message in caught.value.message and caught.value.message.startswith("limits.json")


def test_file_reading_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix in ("MULLAMA_", "OLLAMA_"):
        for name in ("MAX_QUEUE", "MAX_CONTEXT", "KEEP_ALIVE"):
            monkeypatch.delenv(prefix + name, raising=False)
    path = tmp_path / "limits.json"
    limits = Limits(path)  # no file: only the environment
    assert limits.for_model("smollm2:135m").max_parallel is None
    path.write_text(json.dumps({"models": {"smollm2": {"max_parallel": 2}}}))
    assert limits.for_model("smollm2:135m").max_parallel is None  # read on reload only (SIGHUP)
    limits.reload()
    assert limits.for_model("smollm2:135m").max_parallel == 2
    for bad, message in (('{"models": {"smollm2": {"max_parallel": 0}}}', "at least 1"),
                         ("{not json", "is not JSON"), ('{"defaults": {"max_queue": NaN}}', "is not JSON"),
                         ("[" * 100_000, "is not JSON")):
        path.write_text(bad)
        with pytest.raises(LimitsError, match=message):
            limits.reload()
        assert limits.for_model("smollm2:135m").max_parallel == 2  # the old limits stay
        with pytest.raises(LimitsError):
            load_limits(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(LimitsError, match="cannot read"):
        limits.reload()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_limit_names = st.sampled_from(["max_parallel", "max_queue", "max_context", "max_memory", "keep_alive", "pinned",
                                "keys", "other"])
_near_valid = st.fixed_dictionaries({}, optional={
    "defaults": st.dictionaries(_limit_names, _json, max_size=3),
    "models": st.dictionaries(st.text(max_size=8), st.dictionaries(_limit_names, _json, max_size=3) | _json,
                              max_size=3),
})


@settings(max_examples=400, deadline=None)
@given(st.one_of(_json, _near_valid), st.text(max_size=12))
def test_the_parser_raises_only_its_own_error(data: object, model: str) -> None:
    try:
        limits = parse_limits(data, env={})
    except LimitsError as error:
        assert error.message
        return
    resolved = limits.for_model(model)
    assert isinstance(resolved, ModelLimits)
    resolved.as_dict()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_file_bytes_give_limits_or_a_limits_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("limits") / "limits.json"
    path.write_bytes(raw)
    try:
        load_limits(path)
    except LimitsError:
        pass
