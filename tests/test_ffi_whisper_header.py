"""The ctypes declarations of ``mullama/ffi/whisper.py`` must match the pinned ``whisper.h`` exactly.

The header is read with the same small C declaration reader as ``llama.h``
(``test_ffi_header.py``), extended for the anonymous structs nested in
``whisper_full_params``; each C type is mapped to the ctypes type it must be,
and every struct field and function signature is compared. A C compiler,
when present, also checks struct sizes and field offsets, nested ones too.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from speech_helpers import whisper_cpp_source
from test_ffi_header import SCALARS, _check_functions, _normalise, _same, _strip

from mullama.ffi import llama as L
from mullama.ffi import whisper as W

ENUMS = {"whisper_sampling_strategy", "whisper_alignment_heads_preset", "whisper_gretype", "ggml_log_level"}
CALLBACKS = {
    "ggml_log_callback": L.ggml_log_callback,
    "ggml_abort_callback": L.ggml_abort_callback,
    "whisper_new_segment_callback": W.whisper_new_segment_callback,
    "whisper_progress_callback": W.whisper_progress_callback,
    "whisper_encoder_begin_callback": W.whisper_encoder_begin_callback,
    "whisper_logits_filter_callback": W.whisper_logits_filter_callback,
}
WHISPER_SCALARS = {**SCALARS, "whisper_token": ctypes.c_int32, "whisper_pos": ctypes.c_int32,
                   "whisper_seq_id": ctypes.c_int32}
STRUCTS = {cls.__name__: cls for cls in W.STRUCTS}
#: The anonymous structs nested in a declared struct, by "<outer>.<field>".
NESTED = {"whisper_full_params.greedy": W.whisper_full_params_greedy,
          "whisper_full_params.beam_search": W.whisper_full_params_beam_search}


def _header() -> Path:
    return whisper_cpp_source() / "include" / "whisper.h"


def expected_ctype(ctype: str) -> object:
    """What ctypes type a normalised C type of ``whisper.h`` must be declared as."""
    if ctype in CALLBACKS:
        return CALLBACKS[ctype]
    if ctype in ENUMS:
        return ctypes.c_int
    if ctype in WHISPER_SCALARS:
        return WHISPER_SCALARS[ctype]
    if ctype in STRUCTS:
        return STRUCTS[ctype]
    if ctype.endswith("*"):
        base = ctype[:-1].strip()
        if base == "char":
            return ctypes.c_char_p
        if base in WHISPER_SCALARS or base in STRUCTS or base.endswith("*"):
            return ctypes.POINTER(expected_ctype(base))
        return ctypes.c_void_p  # an opaque struct (whisper_context, whisper_state, ...) or void
    raise AssertionError(f"no ctypes mapping for C type {ctype!r}")


def _fields(body: str) -> list[tuple[str, str]]:
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        pointer = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl)
        if pointer:
            fields.append((pointer.group(1), "fnptr"))
            continue
        plain = re.match(r"(.*?[\s*])(\w+)$", decl)
        fields.append((plain.group(2), _normalise(plain.group(1))) if plain else ("?", decl))
    return fields


def parse_structs(text: str) -> dict[str, list[tuple[str, str]]]:
    """struct name -> [(field, C type)]; a nested anonymous struct becomes a type named ``<outer>.<field>``."""
    text = _strip(text)
    structs = {}
    for match in re.finditer(r"struct\s+(\w+)\s*\{", text):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[match.end():i - 1]
        outer = match.group(1)
        for nested in re.finditer(r"struct\s*\{([^{}]*)\}\s*(\w+)\s*;", body):
            structs[f"{outer}.{nested.group(2)}"] = _fields(nested.group(1))
        body = re.sub(r"struct\s*\{[^{}]*\}\s*(\w+)\s*;", lambda m: f"@{outer}.{m.group(1)} {m.group(1)};", body)
        structs[outer] = [(name, ctype.replace("@", "").replace(" . ", ".")) for name, ctype in _fields(body)]
    return structs


def check_structs(header: Path, classes: dict[str, type]) -> list[str]:
    parsed = parse_structs(header.read_text())
    problems = []
    for name, cls in classes.items():
        c_fields = parsed.get(name)
        if c_fields is None:
            problems.append(f"struct {name}: not found in {header.name}")
            continue
        if [n for n, _ in c_fields] != [n for n, _ in cls._fields_]:
            problems.append(f"struct {name}: fields {[n for n, _ in c_fields]} in C, "
                            f"declared {[n for n, _ in cls._fields_]}")
            continue
        for (field, c_type), (_, declared) in zip(c_fields, cls._fields_):
            if c_type == "fnptr":
                continue  # checked by size and offset below
            expected = classes.get(c_type) or expected_ctype(c_type)
            if not _same(declared, expected):
                problems.append(f"struct {name}.{field}: {c_type!r} in C, declared {declared}")
    return problems


def check_functions(header: Path, declared: dict) -> list[str]:
    """The differences between ``declared`` and ``whisper.h``'s functions, with whisper.h's own type mapping."""
    return _check_functions(header, "WHISPER_API", declared, expected_ctype)


def test_whisper_functions_match_header():
    assert check_functions(_header(), W.FUNCTIONS) == []


def test_whisper_structs_match_header():
    assert check_structs(_header(), {**STRUCTS, **NESTED}) == []


def test_the_checker_catches_a_wrong_declaration():
    """A wrong signature, a missing field and a wrong nested field are each reported."""
    wrong = {"whisper_full_n_segments_from_state": (ctypes.c_int64, [ctypes.c_void_p]),
             "whisper_vad_segments_from_samples": (ctypes.c_void_p, [ctypes.c_void_p] * 3)}
    assert len(check_functions(_header(), wrong)) == 2

    class whisper_vad_context_params(ctypes.Structure):
        _fields_ = [("n_threads", ctypes.c_int), ("use_gpu", ctypes.c_bool)]

    class beam_search(ctypes.Structure):
        _fields_ = [("beam_size", ctypes.c_int), ("patience", ctypes.c_double)]

    problems = check_structs(_header(), {"whisper_vad_context_params": whisper_vad_context_params,
                                         "whisper_full_params.beam_search": beam_search})
    assert len(problems) == 2


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler to measure the C layout with")
def test_struct_sizes_and_offsets_match_the_compiler(tmp_path):
    from conftest import llama_cpp_source

    lines = ['#include "whisper.h"', "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for cls in W.STRUCTS:
        name = cls.__name__
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for path, cls in NESTED.items():
        outer, field = path.split(".")
        lines.append(f'printf("{path}# %zu\\n", sizeof(((struct {outer} *)0)->{field}));')
        for inner, _ in cls._fields_:
            lines.append(f'printf("{path}.{inner} %zu\\n", offsetof(struct {outer}, {field}.{inner}) '
                         f'- offsetof(struct {outer}, {field}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    includes = [whisper_cpp_source() / "include", llama_cpp_source() / "ggml" / "include"]
    subprocess.run(["cc", "-o", str(exe), str(source), *[f"-I{i}" for i in includes]], check=True)
    measured = dict(line.rsplit(" ", 1) for line in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())
    for cls in W.STRUCTS:
        name = cls.__name__
        assert int(measured[name]) == ctypes.sizeof(cls), name
        for field, _ in cls._fields_:
            assert int(measured[f"{name}.{field}"]) == getattr(cls, field).offset, f"{name}.{field}"
    for path, cls in NESTED.items():
        assert int(measured[f"{path}#"]) == ctypes.sizeof(cls), path
        for inner, _ in cls._fields_:
            assert int(measured[f"{path}.{inner}"]) == getattr(cls, inner).offset, f"{path}.{inner}"
