"""Hand-written ctypes declarations for the parts of ``mtmd.h`` and ``mtmd-helper.h`` Mullama uses.

libmtmd turns images (and audio) into embeddings a multimodal model reads,
through a projector file (``mmproj``). Its helper, in the same library,
decodes encoded images (stb_image). As with ``llama.py``, the test suite
checks every declaration against the pinned headers: :data:`MTMD_FUNCTIONS`
against ``mtmd.h``, :data:`HELPER_FUNCTIONS` against ``mtmd-helper.h``.
"""

from __future__ import annotations

from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t,
                    c_uint32, c_ubyte, c_void_p)

from mullama.ffi.llama import c_enum, ggml_backend_sched_eval_callback, llama_pos, llama_seq_id, llama_token

MTMD_INPUT_CHUNK_TYPE_TEXT = 0
MTMD_INPUT_CHUNK_TYPE_IMAGE = 1
MTMD_INPUT_CHUNK_TYPE_AUDIO = 2

mtmd_progress_callback = CFUNCTYPE(c_bool, c_float, c_void_p)


class mtmd_context_params(Structure):
    """How a projector is loaded."""

    _fields_ = [
        ("use_gpu", c_bool),
        ("device", c_void_p),
        ("print_timings", c_bool),
        ("n_threads", c_int),
        ("image_marker", c_char_p),
        ("media_marker", c_char_p),
        ("flash_attn_type", c_enum),
        ("warmup", c_bool),
        ("image_min_tokens", c_int),
        ("image_max_tokens", c_int),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", c_void_p),
        ("batch_max_tokens", c_int32),
        ("progress_callback", mtmd_progress_callback),
        ("progress_callback_user_data", c_void_p),
    ]


class mtmd_input_text(Structure):
    """A prompt with media markers where the bitmaps go."""

    _fields_ = [
        ("text", c_char_p),
        ("text_len", c_size_t),
        ("add_special", c_bool),
        ("parse_special", c_bool),
    ]


class mtmd_decoder_pos(Structure):
    """Where one image token sits for M-RoPE: time, column and row."""

    _fields_ = [("t", c_uint32), ("x", c_uint32), ("y", c_uint32), ("z", c_uint32)]


class mtmd_helper_video_init_params(Structure):
    """Video decoding settings (unused: Mullama sends images only)."""

    _fields_ = [
        ("fps_target", c_float),
        ("ffmpeg_bin_dir", c_char_p),
        ("timestamp_interval_ms", c_int64),
    ]


class mtmd_helper_init_opt(Structure):
    """Options of the helper's bitmap loaders."""

    _fields_ = [("video_params", mtmd_helper_video_init_params)]


class mtmd_helper_bitmap_wrapper(Structure):
    """A decoded bitmap, and a video context when the input was a video."""

    _fields_ = [("bitmap", c_void_p), ("video_ctx", c_void_p)]


STRUCTS = [mtmd_context_params, mtmd_input_text, mtmd_decoder_pos, mtmd_helper_video_init_params,
           mtmd_helper_init_opt, mtmd_helper_bitmap_wrapper]

p = c_void_p

MTMD_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "mtmd_default_marker": (c_char_p, []),
    "mtmd_context_params_default": (mtmd_context_params, []),
    "mtmd_init_from_file": (p, [c_char_p, p, mtmd_context_params]),
    "mtmd_free": (None, [p]),
    "mtmd_support_vision": (c_bool, [p]),
    "mtmd_support_audio": (c_bool, [p]),
    "mtmd_decode_use_non_causal": (c_bool, [p, p]),
    "mtmd_decode_use_mrope": (c_bool, [p]),
    "mtmd_bitmap_init": (p, [c_uint32, c_uint32, POINTER(c_ubyte)]),
    "mtmd_bitmap_free": (None, [p]),
    "mtmd_bitmap_set_id": (None, [p, c_char_p]),
    "mtmd_bitmap_get_id": (c_char_p, [p]),
    "mtmd_bitmap_get_nx": (c_uint32, [p]),
    "mtmd_bitmap_get_ny": (c_uint32, [p]),
    "mtmd_input_chunks_init": (p, []),
    "mtmd_input_chunks_size": (c_size_t, [p]),
    "mtmd_input_chunks_get": (p, [p, c_size_t]),
    "mtmd_input_chunks_free": (None, [p]),
    "mtmd_input_chunk_get_type": (c_enum, [p]),
    "mtmd_input_chunk_get_tokens_text": (POINTER(llama_token), [p, POINTER(c_size_t)]),
    "mtmd_input_chunk_get_n_tokens": (c_size_t, [p]),
    "mtmd_input_chunk_get_n_pos": (llama_pos, [p]),
    "mtmd_input_chunk_get_id": (c_char_p, [p]),
    "mtmd_input_chunk_get_tokens_image": (p, [p]),
    "mtmd_input_chunk_copy": (p, [p]),
    "mtmd_input_chunk_free": (None, [p]),
    "mtmd_image_tokens_get_decoder_pos": (mtmd_decoder_pos, [p, llama_pos, c_size_t]),
    "mtmd_tokenize": (c_int32, [p, p, POINTER(mtmd_input_text), POINTER(c_void_p), c_size_t]),
    "mtmd_encode_chunk": (c_int32, [p, p]),
    "mtmd_get_output_embd": (POINTER(c_float), [p]),
}

HELPER_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "mtmd_helper_init_opt_default": (mtmd_helper_init_opt, []),
    "mtmd_helper_bitmap_init_from_buf": (mtmd_helper_bitmap_wrapper, [p, POINTER(c_ubyte), c_size_t, c_bool,
                                                                      mtmd_helper_init_opt]),
    "mtmd_helper_video_free": (None, [p]),
    # llama.cpp's own way of reading a prompt's chunks into a context: the reference the tests hold Mullama to.
    "mtmd_helper_eval_chunks": (c_int32, [p, p, p, llama_pos, llama_seq_id, c_int32, c_bool, POINTER(llama_pos)]),
}

#: Everything bound on libmtmd.
FUNCTIONS = {**MTMD_FUNCTIONS, **HELPER_FUNCTIONS}
