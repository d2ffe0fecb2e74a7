"""Hand-written ctypes declarations for the parts of ``whisper.h`` Mullama uses.

libwhisper is whisper.cpp's speech-to-text library, built by
``build_native.py --with-whisper`` against the very ggml libraries libllama
uses, so the two share one ggml in one process. As with ``llama.py``, every
struct and function here mirrors the pinned header field for field and
argument for argument; ``tests/test_ffi_whisper_header.py`` parses the
header (and, with a C compiler, measures the structs) and fails on any
difference. Contexts, states and VAD handles are plain ``c_void_p``.
"""

from __future__ import annotations

from ctypes import CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p

from mullama.ffi.llama import c_enum, ggml_abort_callback, ggml_log_callback

whisper_token = c_int32

WHISPER_SAMPLE_RATE = 16000
WHISPER_SAMPLING_GREEDY = 0
WHISPER_SAMPLING_BEAM_SEARCH = 1

# --- callback types ------------------------------------------------------------

whisper_new_segment_callback = CFUNCTYPE(None, c_void_p, c_void_p, c_int, c_void_p)
whisper_progress_callback = CFUNCTYPE(None, c_void_p, c_void_p, c_int, c_void_p)
whisper_encoder_begin_callback = CFUNCTYPE(c_bool, c_void_p, c_void_p, c_void_p)


# --- structs -------------------------------------------------------------------


class whisper_ahead(Structure):
    """One alignment head (text layer, head) for DTW token timestamps."""

    _fields_ = [("n_text_layer", c_int), ("n_head", c_int)]


class whisper_aheads(Structure):
    """A list of alignment heads."""

    _fields_ = [("n_heads", c_size_t), ("heads", POINTER(whisper_ahead))]


class whisper_context_params(Structure):
    """How a model is loaded: GPU use and device, flash attention, DTW timestamps."""

    _fields_ = [
        ("use_gpu", c_bool),
        ("flash_attn", c_bool),
        ("gpu_device", c_int),
        ("dtw_token_timestamps", c_bool),
        ("dtw_aheads_preset", c_enum),
        ("dtw_n_top", c_int),
        ("dtw_aheads", whisper_aheads),
        ("dtw_mem_size", c_size_t),
    ]


class whisper_token_data(Structure):
    """One decoded token: id, probabilities and timestamps (centiseconds)."""

    _fields_ = [
        ("id", whisper_token),
        ("tid", whisper_token),
        ("p", c_float),
        ("plog", c_float),
        ("pt", c_float),
        ("ptsum", c_float),
        ("t0", c_int64),
        ("t1", c_int64),
        ("t_dtw", c_int64),
        ("vlen", c_float),
    ]


class whisper_vad_params(Structure):
    """How speech probabilities become segments: threshold, minimum durations, padding."""

    _fields_ = [
        ("threshold", c_float),
        ("min_speech_duration_ms", c_int),
        ("min_silence_duration_ms", c_int),
        ("max_speech_duration_s", c_float),
        ("speech_pad_ms", c_int),
        ("samples_overlap", c_float),
    ]


class whisper_vad_context_params(Structure):
    """How the VAD model is loaded."""

    _fields_ = [("n_threads", c_int), ("use_gpu", c_bool), ("gpu_device", c_int)]


whisper_logits_filter_callback = CFUNCTYPE(
    None, c_void_p, c_void_p, POINTER(whisper_token_data), c_int, POINTER(c_float), c_void_p)


class whisper_full_params_greedy(Structure):
    """``whisper_full_params.greedy`` (an anonymous struct in C)."""

    _fields_ = [("best_of", c_int)]


class whisper_full_params_beam_search(Structure):
    """``whisper_full_params.beam_search`` (an anonymous struct in C)."""

    _fields_ = [("beam_size", c_int), ("patience", c_float)]


class whisper_full_params(Structure):
    """Everything one ``whisper_full`` run is told: threads, language, task, decoding, callbacks."""

    _fields_ = [
        ("strategy", c_enum),
        ("n_threads", c_int),
        ("n_max_text_ctx", c_int),
        ("offset_ms", c_int),
        ("duration_ms", c_int),
        ("translate", c_bool),
        ("no_context", c_bool),
        ("no_timestamps", c_bool),
        ("single_segment", c_bool),
        ("print_special", c_bool),
        ("print_progress", c_bool),
        ("print_realtime", c_bool),
        ("print_timestamps", c_bool),
        ("token_timestamps", c_bool),
        ("thold_pt", c_float),
        ("thold_ptsum", c_float),
        ("max_len", c_int),
        ("split_on_word", c_bool),
        ("max_tokens", c_int),
        ("debug_mode", c_bool),
        ("audio_ctx", c_int),
        ("tdrz_enable", c_bool),
        ("suppress_regex", c_char_p),
        ("initial_prompt", c_char_p),
        ("carry_initial_prompt", c_bool),
        ("prompt_tokens", POINTER(whisper_token)),
        ("prompt_n_tokens", c_int),
        ("language", c_char_p),
        ("detect_language", c_bool),
        ("suppress_blank", c_bool),
        ("suppress_nst", c_bool),
        ("temperature", c_float),
        ("max_initial_ts", c_float),
        ("length_penalty", c_float),
        ("temperature_inc", c_float),
        ("entropy_thold", c_float),
        ("logprob_thold", c_float),
        ("no_speech_thold", c_float),
        ("greedy", whisper_full_params_greedy),
        ("beam_search", whisper_full_params_beam_search),
        ("new_segment_callback", whisper_new_segment_callback),
        ("new_segment_callback_user_data", c_void_p),
        ("progress_callback", whisper_progress_callback),
        ("progress_callback_user_data", c_void_p),
        ("encoder_begin_callback", whisper_encoder_begin_callback),
        ("encoder_begin_callback_user_data", c_void_p),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_user_data", c_void_p),
        ("logits_filter_callback", whisper_logits_filter_callback),
        ("logits_filter_callback_user_data", c_void_p),
        ("grammar_rules", POINTER(c_void_p)),
        ("n_grammar_rules", c_size_t),
        ("i_start_rule", c_size_t),
        ("grammar_penalty", c_float),
        ("vad", c_bool),
        ("vad_model_path", c_char_p),
        ("vad_params", whisper_vad_params),
    ]


STRUCTS = [whisper_ahead, whisper_aheads, whisper_context_params, whisper_token_data, whisper_vad_params,
           whisper_vad_context_params, whisper_full_params]

p = c_void_p

FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    "whisper_version": (c_char_p, []),
    "whisper_print_system_info": (c_char_p, []),
    "whisper_log_set": (None, [ggml_log_callback, p]),
    "whisper_context_default_params": (whisper_context_params, []),
    "whisper_init_from_file_with_params_no_state": (p, [c_char_p, whisper_context_params]),
    "whisper_init_state": (p, [p]),
    "whisper_free": (None, [p]),
    "whisper_free_state": (None, [p]),
    "whisper_is_multilingual": (c_int, [p]),
    "whisper_model_type_readable": (c_char_p, [p]),
    "whisper_lang_id": (c_int, [c_char_p]),
    "whisper_lang_str": (c_char_p, [c_int]),
    "whisper_lang_str_full": (c_char_p, [c_int]),
    "whisper_token_to_str": (c_char_p, [p, whisper_token]),
    "whisper_token_eot": (whisper_token, [p]),
    "whisper_full_default_params": (whisper_full_params, [c_enum]),
    "whisper_full_with_state": (c_int, [p, p, whisper_full_params, POINTER(c_float), c_int]),
    "whisper_full_n_segments_from_state": (c_int, [p]),
    "whisper_full_lang_id_from_state": (c_int, [p]),
    "whisper_full_get_segment_t0_from_state": (c_int64, [p, c_int]),
    "whisper_full_get_segment_t1_from_state": (c_int64, [p, c_int]),
    "whisper_full_get_segment_text_from_state": (c_char_p, [p, c_int]),
    "whisper_full_get_segment_no_speech_prob_from_state": (c_float, [p, c_int]),
    "whisper_full_n_tokens_from_state": (c_int, [p, c_int]),
    "whisper_full_get_token_data_from_state": (whisper_token_data, [p, c_int, c_int]),
    "whisper_vad_default_params": (whisper_vad_params, []),
    "whisper_vad_default_context_params": (whisper_vad_context_params, []),
    "whisper_vad_init_from_file_with_params": (p, [c_char_p, whisper_vad_context_params]),
    "whisper_vad_segments_from_samples": (p, [p, whisper_vad_params, POINTER(c_float), c_int]),
    "whisper_vad_segments_n_segments": (c_int, [p]),
    "whisper_vad_segments_get_segment_t0": (c_float, [p, c_int]),
    "whisper_vad_segments_get_segment_t1": (c_float, [p, c_int]),
    "whisper_vad_free_segments": (None, [p]),
    "whisper_vad_free": (None, [p]),
}
