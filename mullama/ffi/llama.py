"""Hand-written ctypes declarations for the parts of ``llama.h`` Mullama uses.

Every struct and function here mirrors the pinned ``llama.h`` field for
field and argument for argument; ``tests/test_ffi_header.py`` parses the
header and fails on any difference. Opaque handles (models, contexts,
samplers, memory) are plain ``c_void_p``. A few declarations come from
``ggml.h`` and ``ggml-backend.h``, which ``llama.h`` includes: the log and
abort callback types, and device listing for the loader's report.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

llama_token = c_int32
llama_pos = c_int32
llama_seq_id = c_int32
#: Every enum in llama.h and ggml.h is an ``int`` in the C ABI.
c_enum = c_int

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_TOKEN_NULL = -1

LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
LLAMA_POOLING_TYPE_RANK = 4

LLAMA_FLASH_ATTN_TYPE_AUTO = -1
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1

LLAMA_LOAD_MODE_AUTO = -1
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
LLAMA_LOAD_MODE_MLOCK = 2
LLAMA_LOAD_MODE_MMAP_MLOCK = 3

LLAMA_TOKEN_ATTR_CONTROL = 1 << 3

GGML_LOG_LEVEL_NONE = 0
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2
GGML_BACKEND_DEVICE_TYPE_ACCEL = 3

#: ggml_type values for the KV cache types Ollama exposes (OLLAMA_KV_CACHE_TYPE).
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

# --- callback types (ggml.h, llama.h) ---------------------------------------

ggml_log_callback = CFUNCTYPE(None, c_enum, c_char_p, c_void_p)
ggml_abort_callback = CFUNCTYPE(c_bool, c_void_p)
ggml_backend_sched_eval_callback = CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)
llama_progress_callback = CFUNCTYPE(c_bool, c_float, c_void_p)


# --- structs -----------------------------------------------------------------


class llama_token_data(Structure):
    """One candidate token with its logit and probability."""

    _fields_ = [("id", llama_token), ("logit", c_float), ("p", c_float)]


class llama_token_data_array(Structure):
    """The candidates a sampler works on."""

    _fields_ = [
        ("data", POINTER(llama_token_data)),
        ("size", c_size_t),
        ("selected", c_int64),
        ("sorted", c_bool),
    ]


class llama_batch(Structure):
    """Input of ``llama_decode``: tokens with positions, sequences and output flags."""

    _fields_ = [
        ("n_tokens", c_int32),
        ("token", POINTER(llama_token)),
        ("embd", POINTER(c_float)),
        ("pos", POINTER(llama_pos)),
        ("n_seq_id", POINTER(c_int32)),
        ("seq_id", POINTER(POINTER(llama_seq_id))),
        ("logits", POINTER(c_int8)),
    ]


class llama_model_params(Structure):
    """How a model is loaded: devices, offloaded layers, mmap."""

    _fields_ = [
        ("devices", POINTER(c_void_p)),
        ("tensor_buft_overrides", c_void_p),
        ("n_gpu_layers", c_int32),
        ("split_mode", c_enum),
        ("load_mode", c_enum),
        ("lazy_mode", c_enum),
        ("main_gpu", c_int32),
        ("tensor_split", POINTER(c_float)),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", c_void_p),
        ("kv_overrides", c_void_p),
        ("vocab_only", c_bool),
        ("check_tensors", c_bool),
        ("use_extra_bufts", c_bool),
        ("no_host", c_bool),
        ("no_alloc", c_bool),
        ("load_mtp", c_bool),
    ]


class llama_context_params(Structure):
    """How a context is created: sizes, threads, KV cache, callbacks."""

    _fields_ = [
        ("n_ctx", c_uint32),
        ("n_batch", c_uint32),
        ("n_ubatch", c_uint32),
        ("n_seq_max", c_uint32),
        ("n_rs_seq", c_uint32),
        ("n_outputs_max", c_uint32),
        ("n_outputs_max_per_seq", c_uint32),
        ("n_threads", c_int32),
        ("n_threads_batch", c_int32),
        ("ctx_type", c_enum),
        ("rope_scaling_type", c_enum),
        ("pooling_type", c_enum),
        ("attention_type", c_enum),
        ("flash_attn_type", c_enum),
        ("rope_freq_base", c_float),
        ("rope_freq_scale", c_float),
        ("yarn_ext_factor", c_float),
        ("yarn_attn_factor", c_float),
        ("yarn_beta_fast", c_float),
        ("yarn_beta_slow", c_float),
        ("yarn_orig_ctx", c_uint32),
        ("defrag_thold", c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", c_void_p),
        ("type_k", c_enum),
        ("type_v", c_enum),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", c_void_p),
        ("embeddings", c_bool),
        ("offload_kqv", c_bool),
        ("no_perf", c_bool),
        ("op_offload", c_bool),
        ("swa_full", c_bool),
        ("kv_unified", c_bool),
        ("samplers", c_void_p),
        ("n_samplers", c_size_t),
        ("ctx_other", c_void_p),
    ]


class llama_model_quantize_params(Structure):
    """Options of ``llama_model_quantize`` (``/api/create`` with ``quantize``)."""

    _fields_ = [
        ("nthread", c_int32),
        ("ftype", c_enum),
        ("output_tensor_type", c_enum),
        ("token_embedding_type", c_enum),
        ("allow_requantize", c_bool),
        ("quantize_output_tensor", c_bool),
        ("only_copy", c_bool),
        ("pure", c_bool),
        ("keep_split", c_bool),
        ("dry_run", c_bool),
        ("imatrix", c_void_p),
        ("kv_overrides", c_void_p),
        ("tt_overrides", c_void_p),
        ("prune_layers", POINTER(c_int32)),
        ("max_buf_size", c_size_t),
    ]


class llama_logit_bias(Structure):
    """A bias added to one token's logit."""

    _fields_ = [("token", llama_token), ("bias", c_float)]


class llama_sampler_chain_params(Structure):
    """Options of a sampler chain."""

    _fields_ = [("no_perf", c_bool)]


# The sampler interface's slots. A sampler is passed as ``c_void_p``, as everywhere here; ``name``
# returns ``c_void_p`` so that a Python callback can return the address of a buffer it keeps alive.
llama_sampler_name_fn = CFUNCTYPE(c_void_p, c_void_p)
llama_sampler_accept_fn = CFUNCTYPE(None, c_void_p, llama_token)
llama_sampler_apply_fn = CFUNCTYPE(None, c_void_p, POINTER(llama_token_data_array))
llama_sampler_reset_fn = CFUNCTYPE(None, c_void_p)
llama_sampler_clone_fn = CFUNCTYPE(c_void_p, c_void_p)
llama_sampler_free_fn = CFUNCTYPE(None, c_void_p)
llama_sampler_backend_init_fn = CFUNCTYPE(c_bool, c_void_p, c_void_p, c_uint32)
llama_sampler_backend_accept_fn = CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, c_void_p)
llama_sampler_backend_apply_fn = CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, c_void_p)
llama_sampler_backend_set_input_fn = CFUNCTYPE(None, c_void_p)
llama_sampler_backend_reset_fn = CFUNCTYPE(None, c_void_p)
llama_sampler_copy_state_fn = CFUNCTYPE(None, c_void_p, c_void_p)


class llama_sampler_i(Structure):
    """The interface of a sampler written outside libllama; a slot left NULL is optional there."""

    _fields_ = [
        ("name", llama_sampler_name_fn),
        ("accept", llama_sampler_accept_fn),
        ("apply", llama_sampler_apply_fn),
        ("reset", llama_sampler_reset_fn),
        ("clone", llama_sampler_clone_fn),
        ("free", llama_sampler_free_fn),
        ("backend_init", llama_sampler_backend_init_fn),
        ("backend_accept", llama_sampler_backend_accept_fn),
        ("backend_apply", llama_sampler_backend_apply_fn),
        ("backend_set_input", llama_sampler_backend_set_input_fn),
        ("backend_reset", llama_sampler_backend_reset_fn),
        ("copy_state", llama_sampler_copy_state_fn),
    ]


class llama_sampler(Structure):
    """A sampler: its interface and private state. Functions still pass samplers as ``c_void_p``."""

    _fields_ = [("iface", POINTER(llama_sampler_i)), ("ctx", c_void_p)]


class llama_chat_message(Structure):
    """A message for libllama's built-in chat templates."""

    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class llama_perf_context_data(Structure):
    """Timings libllama keeps per context."""

    _fields_ = [
        ("t_start_ms", c_double),
        ("t_load_ms", c_double),
        ("t_p_eval_ms", c_double),
        ("t_eval_ms", c_double),
        ("n_p_eval", c_int32),
        ("n_eval", c_int32),
        ("n_reused", c_int32),
    ]


class llama_perf_sampler_data(Structure):
    """Timings libllama keeps per sampler chain."""

    _fields_ = [("t_sample_ms", c_double), ("n_sample", c_int32)]


STRUCTS = [
    llama_token_data, llama_token_data_array, llama_batch, llama_model_params, llama_context_params,
    llama_model_quantize_params, llama_logit_bias, llama_sampler_chain_params, llama_sampler_i, llama_sampler,
    llama_chat_message, llama_perf_context_data, llama_perf_sampler_data,
]

# --- functions ---------------------------------------------------------------

p = c_void_p  # an opaque handle: model, context, vocab, sampler, memory, adapter, device
token_p = POINTER(llama_token)

#: name -> (restype, argtypes), exactly as declared in llama.h.
FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    # library
    "llama_backend_init": (None, []),
    "llama_backend_free": (None, []),
    "llama_version": (c_char_p, []),
    "llama_time_us": (c_int64, []),
    "llama_max_devices": (c_size_t, []),
    "llama_max_parallel_sequences": (c_size_t, []),
    "llama_supports_mmap": (c_bool, []),
    "llama_supports_mlock": (c_bool, []),
    "llama_supports_gpu_offload": (c_bool, []),
    "llama_supports_rpc": (c_bool, []),
    "llama_print_system_info": (c_char_p, []),
    "llama_log_set": (None, [ggml_log_callback, c_void_p]),
    "llama_ftype_name": (c_char_p, [c_enum]),
    # model
    "llama_model_default_params": (llama_model_params, []),
    "llama_model_load_from_file": (p, [c_char_p, llama_model_params]),
    "llama_model_load_from_splits": (p, [POINTER(c_char_p), c_size_t, llama_model_params]),
    "llama_model_free": (None, [p]),
    "llama_model_get_vocab": (p, [p]),
    "llama_model_n_ctx_train": (c_int32, [p]),
    "llama_model_n_embd": (c_int32, [p]),
    "llama_model_n_embd_inp": (c_int32, [p]),
    "llama_model_n_embd_out": (c_int32, [p]),
    "llama_model_n_layer": (c_int32, [p]),
    "llama_model_n_head": (c_int32, [p]),
    "llama_model_n_head_kv": (c_int32, [p]),
    "llama_model_n_swa": (c_int32, [p]),
    "llama_model_n_cls_out": (c_uint32, [p]),
    "llama_model_desc": (c_int32, [p, c_char_p, c_size_t]),
    "llama_model_size": (c_uint64, [p]),
    "llama_model_n_params": (c_uint64, [p]),
    "llama_model_ftype": (c_enum, [p]),
    "llama_model_chat_template": (c_char_p, [p, c_char_p]),
    "llama_model_meta_val_str": (c_int32, [p, c_char_p, c_char_p, c_size_t]),
    "llama_model_meta_count": (c_int32, [p]),
    "llama_model_meta_key_by_index": (c_int32, [p, c_int32, c_char_p, c_size_t]),
    "llama_model_meta_val_str_by_index": (c_int32, [p, c_int32, c_char_p, c_size_t]),
    "llama_model_has_encoder": (c_bool, [p]),
    "llama_model_has_decoder": (c_bool, [p]),
    "llama_model_decoder_start_token": (llama_token, [p]),
    "llama_model_is_recurrent": (c_bool, [p]),
    "llama_model_is_hybrid": (c_bool, [p]),
    "llama_model_quantize_default_params": (llama_model_quantize_params, []),
    "llama_model_quantize": (c_uint32, [c_char_p, c_char_p, POINTER(llama_model_quantize_params)]),
    # context
    "llama_context_default_params": (llama_context_params, []),
    "llama_init_from_model": (p, [p, llama_context_params]),
    "llama_free": (None, [p]),
    "llama_n_ctx": (c_uint32, [p]),
    "llama_n_ctx_seq": (c_uint32, [p]),
    "llama_n_batch": (c_uint32, [p]),
    "llama_n_ubatch": (c_uint32, [p]),
    "llama_n_seq_max": (c_uint32, [p]),
    "llama_get_model": (p, [p]),
    "llama_get_memory": (p, [p]),
    "llama_pooling_type": (c_enum, [p]),
    "llama_set_n_threads": (None, [p, c_int32, c_int32]),
    "llama_n_threads": (c_int32, [p]),
    "llama_n_threads_batch": (c_int32, [p]),
    "llama_set_embeddings": (None, [p, c_bool]),
    "llama_set_causal_attn": (None, [p, c_bool]),
    "llama_set_abort_callback": (None, [p, ggml_abort_callback, c_void_p]),
    "llama_synchronize": (None, [p]),
    "llama_get_logits": (POINTER(c_float), [p]),
    "llama_get_logits_ith": (POINTER(c_float), [p, c_int32]),
    "llama_get_embeddings": (POINTER(c_float), [p]),
    "llama_get_embeddings_ith": (POINTER(c_float), [p, c_int32]),
    "llama_get_embeddings_seq": (POINTER(c_float), [p, llama_seq_id]),
    # batch and decode
    "llama_batch_init": (llama_batch, [c_int32, c_int32, c_int32]),
    "llama_batch_free": (None, [llama_batch]),
    "llama_batch_get_one": (llama_batch, [token_p, c_int32]),
    "llama_encode": (c_int32, [p, llama_batch]),
    "llama_decode": (c_int32, [p, llama_batch]),
    # memory (KV cache) per sequence
    "llama_memory_clear": (None, [p, c_bool]),
    "llama_memory_seq_rm": (c_bool, [p, llama_seq_id, llama_pos, llama_pos]),
    "llama_memory_seq_cp": (None, [p, llama_seq_id, llama_seq_id, llama_pos, llama_pos]),
    "llama_memory_seq_keep": (None, [p, llama_seq_id]),
    "llama_memory_seq_add": (None, [p, llama_seq_id, llama_pos, llama_pos, llama_pos]),
    "llama_memory_seq_pos_min": (llama_pos, [p, llama_seq_id]),
    "llama_memory_seq_pos_max": (llama_pos, [p, llama_seq_id]),
    "llama_memory_can_shift": (c_bool, [p]),
    # state save and load
    "llama_state_get_size": (c_size_t, [p]),
    "llama_state_get_data": (c_size_t, [p, POINTER(c_uint8), c_size_t]),
    "llama_state_set_data": (c_size_t, [p, POINTER(c_uint8), c_size_t]),
    "llama_state_load_file": (c_bool, [p, c_char_p, token_p, c_size_t, POINTER(c_size_t)]),
    "llama_state_save_file": (c_bool, [p, c_char_p, token_p, c_size_t]),
    "llama_state_seq_get_size": (c_size_t, [p, llama_seq_id]),
    "llama_state_seq_get_data": (c_size_t, [p, POINTER(c_uint8), c_size_t, llama_seq_id]),
    "llama_state_seq_set_data": (c_size_t, [p, POINTER(c_uint8), c_size_t, llama_seq_id]),
    # LoRA adapters
    "llama_adapter_lora_init": (p, [p, c_char_p]),
    "llama_adapter_lora_free": (None, [p]),
    "llama_set_adapters_lora": (c_int32, [p, POINTER(c_void_p), c_size_t, POINTER(c_float)]),
    # vocabulary
    "llama_vocab_type": (c_enum, [p]),
    "llama_vocab_n_tokens": (c_int32, [p]),
    "llama_vocab_get_text": (c_char_p, [p, llama_token]),
    "llama_vocab_get_attr": (c_enum, [p, llama_token]),
    "llama_vocab_is_eog": (c_bool, [p, llama_token]),
    "llama_vocab_is_control": (c_bool, [p, llama_token]),
    "llama_vocab_bos": (llama_token, [p]),
    "llama_vocab_eos": (llama_token, [p]),
    "llama_vocab_eot": (llama_token, [p]),
    "llama_vocab_sep": (llama_token, [p]),
    "llama_vocab_nl": (llama_token, [p]),
    "llama_vocab_pad": (llama_token, [p]),
    "llama_vocab_get_add_bos": (c_bool, [p]),
    "llama_vocab_get_add_eos": (c_bool, [p]),
    "llama_vocab_get_add_sep": (c_bool, [p]),
    "llama_vocab_fim_pre": (llama_token, [p]),
    "llama_vocab_fim_suf": (llama_token, [p]),
    "llama_vocab_fim_mid": (llama_token, [p]),
    "llama_tokenize": (c_int32, [p, c_char_p, c_int32, token_p, c_int32, c_bool, c_bool]),
    "llama_token_to_piece": (c_int32, [p, llama_token, c_char_p, c_int32, c_int32, c_bool]),
    "llama_detokenize": (c_int32, [p, token_p, c_int32, c_char_p, c_int32, c_bool, c_bool]),
    # chat templates
    "llama_chat_apply_template": (c_int32, [c_char_p, POINTER(llama_chat_message), c_size_t, c_bool, c_char_p, c_int32]),
    "llama_chat_builtin_templates": (c_int32, [POINTER(c_char_p), c_size_t]),
    # samplers
    "llama_sampler_init": (p, [POINTER(llama_sampler_i), c_void_p]),
    "llama_sampler_chain_default_params": (llama_sampler_chain_params, []),
    "llama_sampler_chain_init": (p, [llama_sampler_chain_params]),
    "llama_sampler_chain_add": (None, [p, p]),
    "llama_sampler_chain_get": (p, [p, c_int32]),
    "llama_sampler_chain_n": (c_int32, [p]),
    "llama_sampler_name": (c_char_p, [p]),
    "llama_sampler_accept": (None, [p, llama_token]),
    "llama_sampler_apply": (None, [p, POINTER(llama_token_data_array)]),
    "llama_sampler_reset": (None, [p]),
    "llama_sampler_clone": (p, [p]),
    "llama_sampler_free": (None, [p]),
    "llama_sampler_get_seed": (c_uint32, [p]),
    "llama_sampler_sample": (llama_token, [p, p, c_int32]),
    "llama_sampler_init_greedy": (p, []),
    "llama_sampler_init_dist": (p, [c_uint32]),
    "llama_sampler_init_top_k": (p, [c_int32]),
    "llama_sampler_init_top_p": (p, [c_float, c_size_t]),
    "llama_sampler_init_min_p": (p, [c_float, c_size_t]),
    "llama_sampler_init_typical": (p, [c_float, c_size_t]),
    "llama_sampler_init_temp": (p, [c_float]),
    "llama_sampler_init_temp_ext": (p, [c_float, c_float, c_float]),
    "llama_sampler_init_xtc": (p, [c_float, c_float, c_size_t, c_uint32]),
    "llama_sampler_init_top_n_sigma": (p, [c_float]),
    "llama_sampler_init_mirostat": (p, [c_int32, c_uint32, c_float, c_float, c_int32]),
    "llama_sampler_init_mirostat_v2": (p, [c_uint32, c_float, c_float]),
    "llama_sampler_init_grammar": (p, [p, c_char_p, c_char_p]),
    "llama_sampler_init_grammar_lazy_patterns": (
        p, [p, c_char_p, c_char_p, POINTER(c_char_p), c_size_t, token_p, c_size_t]),
    "llama_sampler_init_penalties": (p, [c_int32, c_int32, c_float, c_float, c_float]),
    "llama_sampler_init_dry": (p, [p, c_float, c_float, c_int32, c_int32, POINTER(c_char_p), c_size_t]),
    "llama_sampler_init_logit_bias": (p, [c_int32, c_int32, POINTER(llama_logit_bias)]),
    # backend sampling: a sequence's chain runs in the model's graph
    "llama_set_sampler": (c_bool, [p, llama_seq_id, p]),
    # performance counters
    "llama_perf_context": (llama_perf_context_data, [p]),
    "llama_perf_context_reset": (None, [p]),
    "llama_perf_sampler": (llama_perf_sampler_data, [p]),
    "llama_perf_sampler_reset": (None, [p]),
}

#: From ggml-backend.h (included by llama.h): enough to load backend modules and report devices.
GGML_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "ggml_backend_load": (p, [c_char_p]),
    "ggml_backend_dev_backend_reg": (p, [p]),
    "ggml_backend_reg_name": (c_char_p, [p]),
    "ggml_backend_dev_count": (c_size_t, []),
    "ggml_backend_dev_get": (p, [c_size_t]),
    "ggml_backend_dev_name": (c_char_p, [p]),
    "ggml_backend_dev_description": (c_char_p, [p]),
    "ggml_backend_dev_type": (c_enum, [p]),
    "ggml_backend_dev_memory": (None, [p, POINTER(c_size_t), POINTER(c_size_t)]),
}


#: Calls made for every token or step that return within microseconds. ctypes
#: releases the GIL around each foreign call; taking it back afterwards from the
#: HTTP threads that are busy streaming tokens costs more than these calls, so
#: they keep it. Everything that computes or does I/O (decode, tokenize, load)
#: still releases it.
KEEP_GIL = frozenset({
    "llama_get_logits_ith", "llama_get_embeddings_ith", "llama_get_embeddings_seq",
    "llama_sampler_sample", "llama_sampler_accept", "llama_sampler_apply", "llama_sampler_reset",
    "llama_token_to_piece", "llama_vocab_is_eog", "llama_vocab_get_attr", "llama_vocab_n_tokens",
    "llama_memory_seq_rm", "llama_memory_seq_cp", "llama_memory_seq_pos_max", "llama_memory_seq_pos_min",
    "llama_set_abort_callback", "llama_perf_context", "llama_n_ctx_seq",
})


#: Second bindings of KEEP_GIL functions that release the GIL, by the name they get on the
#: library: on a grammar sampler, apply and accept take as long as the grammar makes them
#: (milliseconds, or far more for a hostile one), and every other request would wait.
RELEASING_GIL = {
    "llama_sampler_apply_nogil": "llama_sampler_apply",
    "llama_sampler_accept_nogil": "llama_sampler_accept",
}


def bind(library: ctypes.CDLL, functions: dict[str, tuple[object, list[object]]]) -> None:
    """Set ``restype``/``argtypes`` on every function of ``functions`` found in ``library``.

    Functions in :data:`KEEP_GIL` are bound so that they hold the GIL, and
    those of them named in :data:`RELEASING_GIL` are bound a second time,
    under the alias, releasing it. A missing symbol means the library is not
    the pinned llama.cpp: that is reported once, by name, instead of failing
    later at the first call.
    """
    missing = [name for name in functions if not hasattr(library, name)]
    if missing:
        from mullama.errors import NativeLibraryError

        raise NativeLibraryError(
            f"{library._name} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
            "it is not the llama.cpp version Mullama is built for (run `python build_native.py`)")
    keeping = ctypes.PyDLL(library._name, handle=library._handle)
    for name, (restype, argtypes) in functions.items():
        function = getattr(keeping if name in KEEP_GIL else library, name)
        function.restype = restype
        function.argtypes = argtypes
        setattr(library, name, function)
    for alias, name in RELEASING_GIL.items():
        if name in functions:
            # A function object of the CDLL's own kind: ctypes releases the GIL around its calls.
            function = library._FuncPtr((name, library))
            function.restype, function.argtypes = functions[name]
            setattr(library, alias, function)

