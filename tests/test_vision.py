"""Images through the engine: SmolLM2-135M with a tiny generated projector (tests/projector.py).

The projector's answers mean nothing, but every step is real: libmtmd
decodes the picture, the vision tower encodes it, and the batcher reads its
embeddings into the model's KV cache beside text requests.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
import zlib
from pathlib import Path

import pytest
from conftest import llama_cpp_source
from projector import IMAGE_TOKENS, tiny_mrope_model_path, tiny_projector_path

import mullama
from mullama.engine.batching import Batcher
from mullama.engine.model import Completion, LoadOptions
from mullama.engine.residency import ModelRecord, estimate_record
from mullama.engine.vision import (
    NO_VISION,
    ImageLimits,
    check_image,
    image_dimensions,
    image_format,
)
from mullama.errors import BadRequestError
from mullama.ffi import llama as L
from mullama.ffi import mtmd as M
from mullama.store.gguf import read_gguf

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GREEDY = {"temperature": 0, "num_predict": 12}
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write a haiku about rain.", "Who wrote Hamlet?",
             "Describe a cat.", "List three fruits.", "Tell me about the moon."]


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """A plain-coloured RGB PNG, made with zlib alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes(colour) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    """The test pictures that ship in the pinned llama.cpp source, and two made here."""
    mtmd = llama_cpp_source() / "tools" / "mtmd"
    return {"jpeg": (mtmd / "test-1.jpeg").read_bytes(), "png": (mtmd / "tests" / "test-1-positive.png").read_bytes(),
            "red": png(40, 30, (230, 20, 20)), "blue": png(40, 30, (20, 20, 230))}


@pytest.fixture(scope="module")
def model(model_path: Path):
    with mullama.Model(model_path, num_ctx=512, num_parallel=8, num_batch=64, num_thread=1,
                       projector=tiny_projector_path()) as loaded:
        assert loaded.projector is not None, loaded.projector_error
        yield loaded


@pytest.fixture(scope="module")
def single(model_path: Path):
    with mullama.Model(model_path, num_ctx=512, num_parallel=1, num_thread=1,
                       projector=tiny_projector_path()) as loaded:
        yield loaded


def ask(model: mullama.Model, question: str, images: list[bytes], **options: object) -> Completion:
    return model.complete(CHAT.format(question), dict(GREEDY, **options), images=images)


def test_different_images_give_different_answers_and_the_same_image_the_same(single, pictures):
    answers = {name: ask(single, "What is in this picture?", [data]).text for name, data in pictures.items()}
    assert len(set(answers.values())) == len(answers), answers
    again = ask(single, "What is in this picture?", [pictures["png"]])
    assert again.text == answers["png"]
    text_only = single.complete(CHAT.format("What is in this picture?"), GREEDY)
    assert text_only.text not in answers.values()


def test_image_tokens_are_counted_and_placed_where_the_prompt_says(single, pictures):
    text = "<|im_start|>user\nCompare [img] with [img] please.<|im_end|>\n<|im_start|>assistant\n"
    vision = single.tokenize_with_images(text, [pictures["red"], pictures["blue"]], marked=False)
    first, middle, last = text.split("[img]")
    runs = [single.tokenize(first)] + [single.tokenize(run, add_special=False) for run in (middle, last)]
    assert [image.start for image in vision.images] == [len(runs[0]), len(runs[0]) + IMAGE_TOKENS + len(runs[1])]
    assert [image.n_tokens for image in vision.images] == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert len(vision.tokens) == sum(map(len, runs)) + 2 * IMAGE_TOKENS
    vision.release()
    # A fresh sequence reads the whole prompt: its text and 16 embeddings per image.
    single.context.forget(0, 0)
    result = single.complete(text, GREEDY, images=[pictures["red"], pictures["blue"]])
    assert result.timings.prompt_eval_count == sum(map(len, runs)) + 2 * IMAGE_TOKENS
    swapped = single.complete(text, GREEDY, images=[pictures["blue"], pictures["red"]])
    assert swapped.text != result.text


def test_a_second_turn_about_the_same_image_reuses_the_cache_and_does_not_encode_again(model_path, pictures):
    with mullama.Model(model_path, num_ctx=512, num_thread=1, projector=tiny_projector_path()) as fresh:
        first_prompt = CHAT.format("[img]What is this?")
        first = fresh.complete(first_prompt, GREEDY, images=[pictures["jpeg"]])
        assert fresh.projector.encode_count == 1
        follow_up = first_prompt + first.text + "<|im_end|>\n" + CHAT.format("Tell me more.")
        second = fresh.complete(follow_up, GREEDY, images=[pictures["jpeg"]])
        assert fresh.projector.encode_count == 1
        # Only the new turn is read: the image and the first turn come from the KV cache.
        full = fresh.tokenize_with_images(follow_up, [pictures["jpeg"]], marked=False)
        assert second.timings.prompt_eval_count < len(full.tokens) - IMAGE_TOKENS - 5
        full.release()
        # Another picture in the same place is encoded and read.
        third = fresh.complete(follow_up, GREEDY, images=[pictures["png"]])
        assert fresh.projector.encode_count == 2
        assert third.timings.prompt_eval_count > IMAGE_TOKENS


def test_an_image_request_batched_with_seven_text_requests_gives_what_each_gives_alone(model, single, pictures):
    image_prompt = CHAT.format("[img]What is in this picture?")
    alone = [single.complete(image_prompt, GREEDY, images=[pictures["jpeg"]])]
    alone += [single.complete(CHAT.format(q), GREEDY) for q in QUESTIONS]
    with Batcher(model) as batcher:
        decodes = model.context.decode_count
        vision = model.tokenize_with_images(image_prompt, [pictures["jpeg"]], marked=False)
        requests = [batcher.submit(vision.tokens, GREEDY, images=vision.images)]
        requests += [batcher.submit(model.tokenize(CHAT.format(q)), GREEDY) for q in QUESTIONS]
        results = [request.wait(120) for request in requests]
        together = model.context.decode_count - decodes
    assert [r.tokens for r in results] == [a.tokens for a in alone]
    assert results[0].timings.prompt_eval_count == len(vision.tokens)
    # Run one after another, the eight would take at least one decode per token each.
    assert together < sum(len(a.tokens) for a in alone)


def test_a_prompt_cut_to_fit_the_context_drops_an_image_whole(model_path, pictures):
    with mullama.Model(model_path, num_ctx=64, num_thread=1, projector=tiny_projector_path()) as small:
        n_ctx = small.context.n_ctx_seq  # llama.cpp rounds a context up to 256 tokens
        text = "[img]" + " ".join(["word"] * n_ctx) + "[img] end"
        vision = small.tokenize_with_images(text, [pictures["red"], pictures["blue"]], marked=False)
        assert len(vision.tokens) >= n_ctx
        request = small.batcher.submit(vision.tokens, dict(GREEDY, num_keep=8), images=vision.images)
        request.wait(60)
        assert request.truncated > 0
        placeholders = [t for t in request.tokens if t < 0]
        assert len(placeholders) == IMAGE_TOKENS * len(request.images)
        for image in request.images:
            assert request.tokens[image.start:image.end] == image.placeholders
        with pytest.raises(BadRequestError, match="context holds"):
            again = small.tokenize_with_images(text, [pictures["red"], pictures["blue"]], marked=False)
            small.batcher.submit(again.tokens, GREEDY, images=again.images, truncate=False)


def test_images_that_cannot_be_read_are_bad_requests(single, pictures):
    corrupt = pictures["png"][:40] + bytes(200)
    cases = {
        b"plain text, not an image": "not in a format",
        b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(20): "WebP images are not supported",
        b"II*\x00" + bytes(20): "TIFF images are not supported",
        corrupt: "could not be decoded",
        b"\xff\xd8\xff\xe0" + bytes(40): "JPEG image is corrupt",
        b"": "empty",
    }
    for data, message in cases.items():
        with pytest.raises(BadRequestError, match=message):
            ask(single, "What is this?", [data])
    with pytest.raises(BadRequestError, match="1 places for images but 2 images"):
        single.tokenize_with_images(single.image_marker + "What?", [pictures["red"]] * 2)
    # The model still answers afterwards.
    assert ask(single, "What is this?", [pictures["red"]]).text


def test_image_limits_come_from_the_environment(monkeypatch, pictures):
    assert image_format(pictures["jpeg"]) == "JPEG" and image_format(pictures["png"]) == "PNG"
    assert image_dimensions(pictures["red"], "PNG") == (40, 30)
    width, height = image_dimensions(pictures["jpeg"], "JPEG")
    assert width > 100 and height > 100
    monkeypatch.setenv("MULLAMA_MAX_IMAGE_BYTES", "1KiB")
    monkeypatch.setenv("MULLAMA_MAX_IMAGE_PIXELS", "1000")
    limits = ImageLimits.from_environment()
    assert limits == ImageLimits(1024, 1000)
    with pytest.raises(BadRequestError, match="MULLAMA_MAX_IMAGE_BYTES"):
        check_image(pictures["jpeg"], limits)
    with pytest.raises(BadRequestError, match="40x30 pixels.*MULLAMA_MAX_IMAGE_PIXELS"):
        check_image(pictures["red"], limits)
    assert check_image(png(20, 20, (1, 2, 3)), limits) == "PNG"


def test_a_model_without_a_projector_refuses_images_with_ollamas_words(model_path, pictures, tmp_path):
    with mullama.Model(model_path, num_ctx=128, num_thread=1) as plain, pytest.raises(BadRequestError, match=NO_VISION):
        plain.complete("What is this?", GREEDY, images=[pictures["red"]])
    broken = tmp_path / "mmproj.gguf"
    broken.write_bytes(b"GGUF" + bytes(100))
    with mullama.Model(model_path, num_ctx=128, num_thread=1, projector=broken) as unlucky:
        assert unlucky.projector is None and unlucky.projector_error
        with pytest.raises(BadRequestError, match=NO_VISION + " \\("):
            unlucky.complete("What is this?", GREEDY, images=[pictures["red"]])
        assert unlucky.complete("Hello", GREEDY).text


def test_a_request_cancelled_while_its_image_is_encoded_frees_its_sequence(model_path, pictures):
    with mullama.Model(model_path, num_ctx=256, num_thread=1, projector=tiny_projector_path()) as fresh:
        with Batcher(fresh) as batcher:
            vision = fresh.tokenize_with_images(CHAT.format("[img]What?"), [pictures["blue"]], marked=False)
            request = batcher.submit(vision.tokens, dict(GREEDY, num_predict=200), images=vision.images)
            request.cancel()
            assert request.wait(30).done_reason == "cancel"
            after = batcher.submit(fresh.tokenize(CHAT.format("Hi")), GREEDY).wait(30)
            assert after.done_reason in ("stop", "length")
        assert all(image._handle is None for image in vision.images)


def test_images_read_in_several_decodes_match_one(model_path, pictures):
    """A batch smaller than the image: its embeddings go in over several decodes, with the same answer."""
    prompt = CHAT.format("[img]Describe it.")
    with mullama.Model(model_path, num_ctx=256, num_batch=5, num_thread=1, projector=tiny_projector_path()) as chunked:
        small = chunked.complete(prompt, GREEDY, images=[pictures["png"]])
    with mullama.Model(model_path, num_ctx=256, num_thread=1, projector=tiny_projector_path()) as whole:
        large = whole.complete(prompt, GREEDY, images=[pictures["png"]])
    assert small.tokens == large.tokens


def test_concurrent_requests_with_one_image_encode_it_once(model, pictures):
    prompts = [CHAT.format("[img]" + q) for q in QUESTIONS[:4]]
    before = model.projector.encode_count
    picture = png(64, 64, (10, 200, 90))
    results: list[object] = []

    def run(prompt: str) -> None:
        results.append(model.complete(prompt, GREEDY, images=[picture]))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 4
    assert model.projector.encode_count == before + 1


def test_a_projector_that_needs_non_causal_attention_reads_each_image_in_one_decode(model_path, pictures):
    """Gemma 3's kind of projector: an image's embeddings attend to each other both ways."""
    gemma = tiny_projector_path("gemma3")
    prompt = CHAT.format("[img]What is in this picture?")
    with mullama.Model(model_path, num_ctx=512, num_thread=1, projector=gemma) as alone:
        assert alone.projector.non_causal
        answers = [alone.complete(prompt, GREEDY, images=[pictures[name]]) for name in ("jpeg", "png", "jpeg")]
        texts = [CHAT.format(q) for q in QUESTIONS[:3]]
        references = [alone.complete(text, GREEDY) for text in texts]
    assert answers[0].tokens == answers[2].tokens != answers[1].tokens
    with mullama.Model(model_path, num_ctx=512, num_parallel=4, num_thread=1, projector=gemma) as shared, \
            Batcher(shared) as batcher:
        vision = shared.tokenize_with_images(prompt, [pictures["png"]], marked=False)
        requests = [batcher.submit(shared.tokenize(text), GREEDY) for text in texts[:2]]
        requests.insert(1, batcher.submit(vision.tokens, GREEDY, images=vision.images))
        requests.append(batcher.submit(shared.tokenize(texts[2]), GREEDY))
        results = [request.wait(120) for request in requests]
    assert [r.tokens for r in results] == [references[0].tokens, answers[1].tokens, *[r.tokens for r in references[1:]]]
    with mullama.Model(model_path, num_ctx=256, num_batch=8, num_thread=1, projector=gemma) as narrow, \
            pytest.raises(BadRequestError, match="raise num_batch"):
        narrow.complete(prompt, GREEDY, images=[pictures["png"]])


def test_the_memory_estimate_counts_the_projector(model_path):
    plain = estimate_record(ModelRecord("smol", "", model_path), LoadOptions())
    seeing = estimate_record(ModelRecord("smol", "", model_path, projector_path=tiny_projector_path()), LoadOptions())
    assert seeing.weights - plain.weights == sum(t.nbytes for t in read_gguf(tiny_projector_path()).tensors) > 0
    assert (seeing.kv_cache, seeing.compute) == (plain.kv_cache, plain.compute)


def helper_reading(model: mullama.Model, text: str, images: list[bytes]) -> tuple[list[float], int]:
    """llama.cpp's own reading of a prompt with images (``mtmd_helper_eval_chunks``) into sequence 0 of ``model``.

    Returns the log-probabilities of the next token and the position after the prompt.
    """
    projector, ctx = model.projector, model.context
    lib = projector.lib
    ctx.forget(0, 0)
    bitmaps = [projector._bitmap(data, i) for i, data in enumerate(images)]
    chunks = lib.mtmd_input_chunks_init()
    try:
        encoded = text.encode()
        spec = M.mtmd_input_text(encoded, len(encoded), model.add_bos, True)
        assert lib.mtmd_tokenize(projector.ctx, chunks, ctypes.byref(spec),
                                 (ctypes.c_void_p * len(bitmaps))(*bitmaps), len(bitmaps)) == 0
        after = L.llama_pos()
        assert lib.mtmd_helper_eval_chunks(projector.ctx, ctx.ptr, chunks, 0, 0, ctx.n_batch, True,
                                           ctypes.byref(after)) == 0
        logits = model.lib.llama_get_logits_ith(ctx.ptr, -1)[:model.n_vocab]
    finally:
        lib.mtmd_input_chunks_free(chunks)
        for bitmap in bitmaps:
            lib.mtmd_bitmap_free(bitmap)
        ctx.forget(0, 0)
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits], after.value


@pytest.mark.parametrize("kind", ["mlp", "gemma3", "qwen2vl"])
def test_images_are_read_as_llama_cpps_own_helper_reads_them(model_path, pictures, kind):
    """Causal (LLaVA), non-causal (Gemma 3) and M-RoPE (Qwen2-VL) images: the same next-token distribution."""
    text_model = tiny_mrope_model_path(model_path) if kind == "qwen2vl" else model_path
    prompt = CHAT.format("[img]What is this? [img]And this?")
    images = [pictures["jpeg"], pictures["blue"]]
    with mullama.Model(text_model, num_ctx=1024, num_thread=1, projector=tiny_projector_path(kind)) as model:
        assert model.projector.mrope == (kind == "qwen2vl") and model.projector.non_causal == (kind == "gemma3")
        reference, after = helper_reading(model, prompt.replace("[img]", model.image_marker), images)
        vision = model.tokenize_with_images(prompt, images, marked=False)
        result = model.complete(prompt, {"temperature": 0, "num_predict": 1, "logprobs": True, "top_logprobs": 5},
                                images=images)
        first = result.logprobs[0]
        for alternative in [first, *first.top_logprobs]:
            assert alternative.logprob == pytest.approx(reference[alternative.id], abs=2e-3)
        assert first.id == max(range(model.n_vocab), key=reference.__getitem__)
        assert model.context.position(0, len(vision.tokens)) == after
        if kind == "qwen2vl":
            assert after < len(vision.tokens)  # the images advanced the position by less than their embeddings
        vision.release()


def test_m_rope_images_keep_their_positions_through_the_cache_and_batching(model_path, pictures):
    """A Qwen2-VL-style model: prefixes reused, copied between sequences and batched keep M-RoPE positions."""
    text_model, projector = tiny_mrope_model_path(model_path), tiny_projector_path("qwen2vl")
    first = CHAT.format("[img]What is this?")
    follow_up = first + "Something.<|im_end|>\n" + CHAT.format("Tell me more.")
    with mullama.Model(text_model, num_ctx=1024, num_thread=1, projector=projector) as fresh:
        clean = fresh.complete(first, GREEDY, images=[pictures["png"]])
        reference = fresh.complete(follow_up, GREEDY, images=[pictures["jpeg"]])
        opening = fresh.complete(first, GREEDY, images=[pictures["jpeg"]])
        # The cache is cut back to before the image, then another image is read where it was.
        assert fresh.complete(first, GREEDY, images=[pictures["png"]]).tokens == clean.tokens
        texts = [fresh.complete(CHAT.format(q), GREEDY) for q in QUESTIONS[:2]]
    with mullama.Model(text_model, num_ctx=1024, num_parallel=4, num_thread=1, projector=projector) as shared, \
            Batcher(shared) as batcher:
        def submit(text: str, images: list[bytes]):
            vision = shared.tokenize_with_images(text, images, marked=False)
            return batcher.submit(vision.tokens, GREEDY, images=vision.images), len(vision.tokens)

        together = [submit(first, [pictures["jpeg"]])[0]] + [submit(CHAT.format(q), [])[0] for q in QUESTIONS[:2]]
        assert [r.wait(120).tokens for r in together] == [opening.tokens, *[t.tokens for t in texts]]
        # Two follow-ups at once: one continues the cached conversation, the other copies its prefix.
        (again, length), (other, _) = submit(follow_up, [pictures["jpeg"]]), submit(follow_up, [pictures["jpeg"]])
        results = [again.wait(120), other.wait(120)]
    assert [r.tokens for r in results] == [reference.tokens, reference.tokens]
    assert all(r.timings.prompt_eval_count < length - 300 for r in results)
