"""Runtime options: names, types and defaults as Ollama has them."""

from __future__ import annotations

import logging
import math
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama.errors import BadRequestError
from mullama.options import (
    IGNORED_OPTIONS,
    PARAMETER_TYPES,
    Options,
    parse_options,
    parse_parameter,
)


def test_defaults_are_ollamas():
    options = Options()
    assert (options.num_predict, options.num_keep, options.seed) == (-1, 4, -1)
    assert (options.temperature, options.top_k, options.top_p, options.typical_p) == (0.8, 40, 0.9, 1.0)
    assert (options.repeat_last_n, options.repeat_penalty) == (64, 1.0)
    assert (options.num_batch, options.num_gpu, options.num_thread) == (512, -1, 0)
    assert options.use_mmap is None and options.flash_attention is None
    assert options.stop == ()


def test_every_field_has_a_parameter_type():
    assert set(PARAMETER_TYPES) == {f.name for f in fields(Options)}
    assert PARAMETER_TYPES["stop"] is list
    assert PARAMETER_TYPES["num_ctx"] is int and PARAMETER_TYPES["temperature"] is float
    assert PARAMETER_TYPES["use_mmap"] is bool and PARAMETER_TYPES["kv_cache_type"] is str


def test_parse_options_converts_json_numbers():
    parsed = parse_options({"num_ctx": 8192.0, "temperature": 1, "stop": ["a", "b"], "use_mmap": False})
    assert parsed == {"num_ctx": 8192, "temperature": 1.0, "stop": ["a", "b"], "use_mmap": False}
    assert type(parsed["num_ctx"]) is int and type(parsed["temperature"]) is float


def test_parse_options_skips_none_and_retired_options():
    assert parse_options({"seed": None, "mirostat_tau": None, "numa": True, "penalize_newline": False}) == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_ctx": math.inf}, 'option "num_ctx" must be of type integer'),
        ({"num_ctx": "4096"}, 'option "num_ctx" must be of type integer'),
        ({"seed": True}, 'option "seed" must be of type integer'),
        ({"temperature": "hot"}, 'option "temperature" must be of type number'),
        ({"temperature": False}, 'option "temperature" must be of type number'),
        ({"temperature": math.nan}, 'option "temperature" must be a finite number'),
        ({"temperature": 10**400}, 'option "temperature" must be a finite number'),
        ({"stop": "\n"}, 'option "stop" must be of type array of strings'),
        ({"stop": ["a", 1]}, 'option "stop" must be of type array of strings'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
        ({"kv_cache_type": "q5_1"}, 'option "kv_cache_type" must be one of f16, q8_0, q4_0'),
        ({"num_ctx": 2.0**70}, 'option "num_ctx" is out of range'),
    ],
)
def test_parse_options_names_the_bad_option(values, message):
    with pytest.raises(BadRequestError) as caught:
        parse_options(values)
    assert caught.value.message == message
    assert caught.value.param == next(iter(values))


def test_unknown_options_are_logged_and_ignored(caplog):
    # As Ollama's Options.FromMap: slog.Warn("invalid option provided"), then carry on.
    with caplog.at_level(logging.WARNING, logger="mullama.options"):
        parsed = parse_options({"tempreature": 0.5, "top_k": 3, "mirostat_mode": "x"})
    assert parsed == {"top_k": 3}
    assert "invalid option provided" in caplog.text
    assert "'tempreature'" in caplog.text and "'mirostat_mode'" in caplog.text


def test_one_warning_names_a_bounded_number_of_unknown_options(caplog):
    with caplog.at_level(logging.WARNING, logger="mullama.options"):
        assert parse_options({f"bogus{i}" + "x" * 10_000: i for i in range(1000)}) == {}
    assert len(caplog.records) == 1 and "and 992 more" in caplog.text and len(caplog.text) < 2_000


@pytest.mark.parametrize(("value", "expected"), [(1.5, 1), (4096.9, 4096), (-1.9, -1), (8192.0, 8192)])
def test_numbers_for_integer_options_are_cut_towards_zero(value, expected):
    # Ollama reads every JSON number as a float64 and sets an int option with int64(t).
    parsed = parse_options({"num_ctx" if value > 0 else "num_predict": value})
    assert list(parsed.values()) == [expected] and type(expected) is int


def test_parse_options_needs_an_object():
    with pytest.raises(BadRequestError, match="options must be an object"):
        parse_options(["temperature"])  # type: ignore[arg-type]


def test_merged_applies_layers_in_order_without_changing_the_original():
    base = Options()
    merged = base.merged({"temperature": 0.1, "stop": ["x"]}, {"temperature": 0.2, "stop": ["y", "z"]})
    assert merged.temperature == 0.2 and merged.stop == ("y", "z")
    assert base.temperature == 0.8 and base.stop == ()


def test_merged_rejects_unknown_names():
    # Internal layers are parsed already, so an unknown name there is a bug, not a client's typo.
    with pytest.raises(BadRequestError, match='unknown option "bogus"'):
        Options().merged({"bogus": 1})


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("num_ctx", "+8192", 8192),
        ("seed", "-1", -1),
        ("temperature", "0.7", 0.7),
        ("temperature", ".5", 0.5),
        ("temperature", "1e-3", 0.001),
        ("temperature", "2", 2.0),
        ("use_mmap", "T", True),
        ("use_mmap", "FALSE", False),
        ("use_mmap", "0", False),
        ("kv_cache_type", "q8_0", "q8_0"),
        ("stop", "<|im_end|>", ["<|im_end|>"]),
    ],
)
def test_parse_parameter(name, text, value):
    assert parse_parameter(name, text) == value


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("num_ctx", "4096.0"),
        ("num_ctx", "9" * 5000),
        ("num_ctx", "9223372036854775808"),
        ("temperature", "1e999"),
        ("num_ctx", "1_000"),
        ("num_ctx", "\u0661\u0662"),
        ("num_ctx", ""),
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("temperature", "0x1p-2"),
        ("use_mmap", "yes"),
        ("kv_cache_type", "f32"),
        ("unknown", "1"),
    ],
)
def test_parse_parameter_rejects(name, text):
    with pytest.raises(BadRequestError):
        parse_parameter(name, text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
_names = st.sampled_from(sorted(PARAMETER_TYPES) + sorted(IGNORED_OPTIONS)) | st.text(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, _json, max_size=6))
def test_parse_options_accepts_only_typed_values(values):
    try:
        parsed = parse_options(values)
    except BadRequestError:
        return
    for name, value in parsed.items():
        expected = PARAMETER_TYPES[name]
        assert isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    assert isinstance(Options().merged(parsed), Options)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(PARAMETER_TYPES)), st.text(max_size=12))
def test_parse_parameter_raises_only_bad_request(name, text):
    try:
        value = parse_parameter(name, text)
    except BadRequestError:
        return
    assert isinstance(value, PARAMETER_TYPES[name])


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 3.4028234663852886e38), st.integers(-(2**63) + 1, 2**63 - 1))
def test_parse_parameter_reads_what_python_writes(number, integer):
    assert parse_parameter("temperature", repr(number)) == number
    assert parse_parameter("seed", str(integer)) == integer


@pytest.mark.parametrize(("name", "value"), [("num_ctx", 2**31), ("num_ctx", 0), ("num_batch", 10**9),
                                             ("num_parallel", 0), ("num_thread", 100_000), ("mirostat", 3)])
def test_sizes_beyond_sense_are_refused(name, value):
    with pytest.raises(BadRequestError, match=name):
        parse_options({name: value})


# Bounds: every accepted value means something, and nothing allocates without bound.

_FLT_MAX = 3.4028234663852886e38
#: What each numeric option can mean, written out independently of mullama.options.
_MEANINGFUL = {
    "num_ctx": (1, 2**21), "num_batch": (1, 2**16), "num_thread": (0, 1024), "num_parallel": (1, 256),
    "num_gpu": (-1, 100_000), "main_gpu": (0, 1024), "draft_num_predict": (0, 1024), "num_keep": (-1, 2**21),
    "num_predict": (-2, 2**31 - 1), "top_k": (-1, 2**31 - 1), "repeat_last_n": (-1, 2**21),
    "seed": (-(2**63) + 1, 2**63 - 1), "mirostat": (0, 2),
    "temperature": (0.0, _FLT_MAX), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "draft_p_min": (0.0, 1.0),
    "draft_ngram": (0, 1024),
    "typical_p": (0.0, 1.0), "repeat_penalty": (0.0, _FLT_MAX), "presence_penalty": (-_FLT_MAX, _FLT_MAX),
    "frequency_penalty": (-_FLT_MAX, _FLT_MAX), "mirostat_tau": (0.0, _FLT_MAX), "mirostat_eta": (0.0, _FLT_MAX),
}


def test_every_numeric_option_is_bounded():
    numeric = {name for name, kind in PARAMETER_TYPES.items() if kind in (int, float)}
    assert numeric == set(_MEANINGFUL)


@pytest.mark.parametrize(("name", "value"), [
    ("repeat_last_n", 2**31 - 1), ("repeat_last_n", -2), ("num_keep", 2**40), ("num_predict", 2**40),
    ("num_predict", -3), ("top_k", 2**31), ("draft_num_predict", 10**9), ("seed", -(2**63)),
    ("temperature", -0.5), ("temperature", 1e39), ("top_p", 1.5), ("min_p", -0.1), ("draft_p_min", 1.01),
    ("typical_p", 2.0), ("draft_ngram", 1025),
    ("repeat_penalty", -1.0), ("frequency_penalty", 1e300), ("presence_penalty", -1e300),
    ("mirostat_tau", -1.0), ("mirostat_eta", 1e40),
])
def test_values_beyond_meaning_are_refused_by_name(name, value):
    with pytest.raises(BadRequestError) as caught:
        parse_options({name: value})
    assert caught.value.param == name and f'"{name}"' in caught.value.message
    with pytest.raises(BadRequestError, match=name):
        parse_parameter(name, str(value))


_numbers = (st.integers() | st.floats() | st.sampled_from([2**31 - 1, 2**31, 2**63, -(2**63), 2**21 + 1, -2, -3])
            | st.floats(-4e38, 4e38))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(PARAMETER_TYPES)), _numbers | _json, max_size=8))
def test_accepted_options_are_within_their_meaning(values):
    try:
        parsed = parse_options(values)
    except BadRequestError as exc:
        assert exc.param in values
        return
    for name, value in parsed.items():
        if name in _MEANINGFUL:
            low, high = _MEANINGFUL[name]
            assert low <= value <= high and math.isfinite(value), (name, value)
    assert isinstance(Options().merged(parsed), Options)


def test_the_penalty_window_is_bounded_by_the_context():
    from mullama.engine.sampling import SamplingParams, penalty_window

    assert penalty_window(SamplingParams(repeat_last_n=2**31 - 1, num_ctx=512)) == 512
    assert penalty_window(SamplingParams(repeat_last_n=-1, num_ctx=512)) == 512  # Ollama's -1: num_ctx
    assert penalty_window(SamplingParams(repeat_last_n=64, num_ctx=512)) == 64
    assert penalty_window(SamplingParams(repeat_last_n=-1, num_ctx=2**40)) == 2**21
    assert penalty_window(SamplingParams.from_options({"repeat_last_n": -1, "num_ctx": 2048})) == 2048


_GO_KINDS = {int: "int", float: "float32", bool: "bool", str: "string", list: "slice"}


def _ollama_from_map(values: dict) -> dict | None:
    """Ollama's ``Options.FromMap`` (api/types.go), written out on its own: the values set, or None for an error."""
    out = {}
    for key, value in values.items():
        if key not in PARAMETER_TYPES or value is None:
            continue  # unknown: slog.Warn and continue; nil: continue
        kind = _GO_KINDS[PARAMETER_TYPES[key]]
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON cannot carry it to Ollama; Mullama refuses it too
        if kind == "int" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = int(value)  # int64(float64): towards zero
        elif kind == "float32" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif kind == "bool" and isinstance(value, bool) or kind == "string" and isinstance(value, str):
            out[key] = value
        elif kind == "slice" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = value
        else:
            return None
    return out


_any_name = st.sampled_from(sorted(PARAMETER_TYPES)) | st.text(max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_any_name, _json | _numbers, max_size=8))
def test_parse_options_is_as_lenient_as_ollama(values):
    ollama = _ollama_from_map({k: v for k, v in values.items() if k not in IGNORED_OPTIONS})
    try:
        parsed = parse_options(values)
    except BadRequestError as exc:
        # Only a known option refuses; a type error is one Ollama makes too (Mullama adds range checks).
        assert exc.param in PARAMETER_TYPES and values[exc.param] is not None
        assert ollama is None or "must be of type" not in exc.message
        return
    assert ollama is not None
    assert set(parsed) == set(ollama)
    for name, value in parsed.items():
        assert value == ollama[name] or math.isclose(value, ollama[name]), name
