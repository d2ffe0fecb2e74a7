"""The ctypes declarations must match the pinned headers exactly.

The header is parsed here (a small C declaration reader, enough for
``llama.h`` and ``mtmd.h``), each C type is mapped to the ctypes type it
must be, and every declared struct field and function signature is
compared. A C compiler, when present, also checks struct sizes and field
offsets against ``sizeof``/``offsetof``.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import llama_cpp_source

from mullama.ffi import llama as L
from mullama.ffi import mtmd as M
from mullama.ffi import rpc as R


def _source_root() -> Path:
    return llama_cpp_source()


def _strip(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r"^\s*#.*$", " ", text, flags=re.M)


def _normalise(ctype: str) -> str:
    ctype = re.sub(r"\b(const|struct|enum)\b", " ", ctype)
    ctype = ctype.replace("*", " * ")
    return " ".join(ctype.split())


def parse_functions(text: str, api: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, [argument types]) for every ``API`` function."""
    text = _strip(text)
    text = re.sub(r"DEPRECATED\((.*?),\s*\"[^\"]*\"\s*\)", r"\1", text, flags=re.S)
    functions = {}
    pattern = re.compile(api + r"\s+([^;{}()]*?)\b(\w+)\s*\(([^;{}]*?)\)\s*;", re.S)
    for match in pattern.finditer(text):
        restype, name, args = match.group(1), match.group(2), match.group(3)
        arg_types = []
        for arg in [a.strip() for a in args.split(",")]:
            if arg in ("", "void"):
                continue
            arg = re.sub(r"\[\s*\w*\s*\]$", "*", arg)
            # Drop the parameter name: the last identifier, unless the type is all there is.
            parts = re.match(r"(.*?[\s*])(\w+)$", arg)
            arg_types.append(_normalise(parts.group(1) if parts and parts.group(1).strip() else arg))
        functions[name] = (_normalise(restype), arg_types)
    return functions


def parse_structs(text: str) -> dict[str, list[tuple[str, str]]]:
    """struct name -> [(field name, field type)] for every struct with a body."""
    text = _strip(text)
    structs = {}
    for match in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\}\s*\w*\s*;", text, re.S):
        fields = []
        for decl in match.group(2).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            if "(" in decl:  # a function pointer field (or C++ code, which no declared struct has)
                pointer = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl)
                fields.append((pointer.group(1), "fnptr") if pointer else ("?", decl))
                continue
            array = re.match(r"(.*?)(\w+)\s*\[(\w+)\]$", decl)
            if array:
                fields.append((array.group(2), _normalise(array.group(1)) + f"[{array.group(3)}]"))
                continue
            plain = re.match(r"(.*?[\s*])(\w+)$", decl)
            fields.append((plain.group(2), _normalise(plain.group(1))) if plain else ("?", decl))
        structs[match.group(1)] = fields
    return structs


# C type (normalised) -> the ctypes type the declaration must use.
SCALARS = {
    "void": None, "bool": ctypes.c_bool, "char": ctypes.c_char, "float": ctypes.c_float, "double": ctypes.c_double,
    "int": ctypes.c_int, "int8_t": ctypes.c_int8, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
    "uint8_t": ctypes.c_uint8, "uint32_t": ctypes.c_uint32, "uint64_t": ctypes.c_uint64, "size_t": ctypes.c_size_t,
    "unsigned char": ctypes.c_ubyte, "llama_token": ctypes.c_int32, "llama_pos": ctypes.c_int32,
    "llama_seq_id": ctypes.c_int32, "llama_state_seq_flags": ctypes.c_uint32,
}
ENUMS = {"llama_vocab_type", "llama_rope_type", "llama_token_type", "llama_token_attr", "llama_ftype",
         "llama_rope_scaling_type", "llama_pooling_type", "llama_attention_type", "llama_flash_attn_type",
         "llama_split_mode", "llama_load_mode", "llama_lazy_mode", "llama_context_type", "ggml_type",
         "ggml_numa_strategy", "ggml_log_level", "ggml_backend_dev_type", "mtmd_input_chunk_type",
         "llama_model_meta_key", "llama_process_type"}
CALLBACKS = {
    "ggml_log_callback": L.ggml_log_callback,
    "ggml_abort_callback": L.ggml_abort_callback,
    "ggml_backend_sched_eval_callback": L.ggml_backend_sched_eval_callback,
    "llama_progress_callback": L.llama_progress_callback,
    "mtmd_progress_callback": M.mtmd_progress_callback,
    "ggml_abort_callback_t": R.ggml_abort_callback_t,
}
#: Types that are pointers in C although their name has no ``*``.
HANDLES = {"llama_memory_t", "ggml_backend_dev_t", "ggml_backend_reg_t", "ggml_threadpool_t",
           "ggml_backend_buffer_type_t", "llama_sampler_context_t"}
#: Structs declared for writing one in Python, whose pointers functions still pass as ``c_void_p``.
OPAQUE_POINTEES = {"llama_sampler"}
STRUCTS = {cls.__name__: cls for cls in L.STRUCTS + M.STRUCTS}


def expected_ctype(ctype: str) -> object:
    """What ctypes type a normalised C type must be declared as."""
    if ctype in CALLBACKS:
        return CALLBACKS[ctype]
    if ctype in HANDLES:
        return ctypes.c_void_p
    if ctype in ENUMS:
        return ctypes.c_int
    if ctype in SCALARS:
        return SCALARS[ctype]
    if ctype in STRUCTS:
        return STRUCTS[ctype]
    if ctype.endswith("*"):
        base = ctype[:-1].strip()
        if base == "char":
            return ctypes.c_char_p
        if base == "void" or base in OPAQUE_POINTEES:
            return ctypes.c_void_p
        if base in SCALARS or base in STRUCTS or base in HANDLES or base in ENUMS or base.endswith("*"):
            return ctypes.POINTER(expected_ctype(base))
        return ctypes.c_void_p  # a pointer to an opaque struct (llama_model, mtmd_context, ...)
    raise AssertionError(f"no ctypes mapping for C type {ctype!r}")


def _same(declared: object, expected: object) -> bool:
    if declared is expected:
        return True
    # ctypes caches POINTER(T), so equal pointer types are the same object; c_char_p
    # is the declared form of a writable char buffer as well.
    return expected is ctypes.POINTER(ctypes.c_char) and declared is ctypes.c_char_p


def _check_functions(header: Path, api: str, declared: dict, expected_ctype=expected_ctype) -> list[str]:
    """The differences between ``declared`` and the ``api`` functions of ``header``, as ``expected_ctype`` maps C types."""
    parsed = parse_functions(header.read_text(), api)
    problems = []
    for name, (restype, argtypes) in declared.items():
        if name not in parsed:
            problems.append(f"{name}: not declared in {header.name}")
            continue
        c_res, c_args = parsed[name]
        if not _same(restype, expected_ctype(c_res)):
            problems.append(f"{name}: returns {c_res!r} in C, declared {restype}")
        if len(c_args) != len(argtypes):
            problems.append(f"{name}: {len(c_args)} arguments in C, {len(argtypes)} declared")
            continue
        for i, (c_arg, mine) in enumerate(zip(c_args, argtypes)):
            if not _same(mine, expected_ctype(c_arg)):
                problems.append(f"{name}: argument {i} is {c_arg!r} in C, declared {mine}")
    return problems


def _check_structs(headers: list[Path], classes: list[type]) -> list[str]:
    parsed: dict[str, list[tuple[str, str]]] = {}
    for header in headers:
        parsed.update(parse_structs(header.read_text()))
    problems = []
    for cls in classes:
        c_fields = parsed.get(cls.__name__)
        if c_fields is None:
            problems.append(f"struct {cls.__name__}: not found in the headers")
            continue
        mine = cls._fields_
        if [n for n, _ in c_fields] != [n for n, _ in mine]:
            problems.append(f"struct {cls.__name__}: fields {[n for n, _ in c_fields]} in C, "
                            f"declared {[n for n, _ in mine]}")
            continue
        for (name, c_type), (_, declared) in zip(c_fields, mine):
            if c_type == "fnptr":
                continue  # checked by size and offset below
            if not _same(declared, expected_ctype(c_type)):
                problems.append(f"struct {cls.__name__}.{name}: {c_type!r} in C, declared {declared}")
    return problems


def test_llama_functions_match_header():
    root = _source_root()
    headers = [root / "include" / "llama.h"]
    problems = _check_functions(headers[0], "LLAMA_API", L.FUNCTIONS)
    problems += _check_functions(root / "ggml" / "include" / "ggml-backend.h", "GGML_API", L.GGML_FUNCTIONS)
    assert problems == []


def test_rpc_functions_match_headers():
    """The RPC layer's declarations: registry calls, the abort callback, and ggml-rpc.h reached by proc address."""
    include = _source_root() / "ggml" / "include"
    problems = _check_functions(include / "ggml-backend.h", "GGML_API", R.BACKEND_FUNCTIONS)
    problems += _check_functions(include / "ggml.h", "GGML_API", R.GGML_FUNCTIONS)
    problems += _check_functions(_source_root() / "include" / "llama.h", "LLAMA_API", R.LLAMA_FUNCTIONS)
    problems += _check_functions(include / "ggml-rpc.h", "GGML_BACKEND_API", R.RPC_FUNCTIONS)
    assert problems == []
    rpc_header = (include / "ggml-rpc.h").read_text()
    assert f"#define RPC_PROTO_MAJOR_VERSION    {R.RPC_PROTO_MAJOR_VERSION}\n" in rpc_header


def test_functions_that_keep_the_gil_are_declared_and_short():
    assert L.KEEP_GIL <= set(L.FUNCTIONS)
    # Anything that computes or reads files must let other threads run meanwhile.
    assert not {name for name in L.KEEP_GIL if re.search(r"decode|encode|tokenize|load|init|free|save", name)}


def test_mtmd_functions_match_header():
    mtmd = _source_root() / "tools" / "mtmd"
    problems = _check_functions(mtmd / "mtmd.h", "MTMD_API", M.MTMD_FUNCTIONS)
    problems += _check_functions(mtmd / "mtmd-helper.h", "MTMD_API", M.HELPER_FUNCTIONS)
    assert problems == []
    assert M.FUNCTIONS == {**M.MTMD_FUNCTIONS, **M.HELPER_FUNCTIONS}


def test_structs_match_header():
    root = _source_root()
    mtmd = root / "tools" / "mtmd"
    headers = [root / "include" / "llama.h", mtmd / "mtmd.h", mtmd / "mtmd-helper.h"]
    assert _check_structs(headers, L.STRUCTS + M.STRUCTS) == []


def test_the_checker_catches_a_wrong_declaration():
    """A deliberately wrong signature and struct must be reported."""
    root = _source_root()
    wrong = {"llama_vocab_n_tokens": (ctypes.c_int64, [ctypes.c_void_p]),
             "llama_tokenize": (ctypes.c_int32, [ctypes.c_void_p] * 6)}
    problems = _check_functions(root / "include" / "llama.h", "LLAMA_API", wrong)
    assert len(problems) == 2

    class llama_logit_bias(ctypes.Structure):
        _fields_ = [("token", ctypes.c_int32), ("bias", ctypes.c_double)]

    assert len(_check_structs([root / "include" / "llama.h"], [llama_logit_bias])) == 1


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler to measure the C layout with")
def test_struct_sizes_and_offsets_match_the_compiler(tmp_path):
    root = _source_root()
    lines = ['#include "llama.h"', '#include "mtmd.h"', '#include "mtmd-helper.h"', "#include <stdio.h>",
             "#include <stddef.h>",
             "int main(void) {"]
    for cls in L.STRUCTS + M.STRUCTS:
        lines.append(f'printf("{cls.__name__} %zu\\n", sizeof(struct {cls.__name__}));')
        for name, _ in cls._fields_:
            lines.append(f'printf("{cls.__name__}.{name} %zu\\n", offsetof(struct {cls.__name__}, {name}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    includes = ["include", "ggml/include", "tools/mtmd"]
    subprocess.run(["cc", "-o", str(exe), str(source), *[f"-I{root / i}" for i in includes]], check=True)
    measured = dict(line.rsplit(" ", 1) for line in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())
    for cls in L.STRUCTS + M.STRUCTS:
        assert int(measured[cls.__name__]) == ctypes.sizeof(cls), cls.__name__
        for name, _ in cls._fields_:
            assert int(measured[f"{cls.__name__}.{name}"]) == getattr(cls, name).offset, f"{cls.__name__}.{name}"


def test_grammar_calls_have_bindings_that_release_the_gil():
    from mullama.ffi import loader

    lib = loader.load().llama
    assert set(L.RELEASING_GIL.values()) <= L.KEEP_GIL
    for alias, name in L.RELEASING_GIL.items():
        assert getattr(lib, name)._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # the per-token binding keeps it
        assert not getattr(lib, alias)._flags_ & ctypes._FUNCFLAG_PYTHONAPI
        assert (getattr(lib, alias).restype, getattr(lib, alias).argtypes) == L.FUNCTIONS[name]
