"""Images for vision models: checked, decoded and tokenized by libmtmd, encoded off the decode loop.

A model whose record names a projector (``mmproj``) loads it beside the text
model as a :class:`Projector`. A prompt is rendered with the projector's
media marker where each image goes; :meth:`Projector.tokenize` turns it into
a :class:`VisionPrompt`: token ids for the text, and for each image an
:class:`ImageChunk` spanning as many *placeholder* ids as the image has
embeddings. A placeholder is a negative number made of the image's sha256
and the embedding's index, so the batcher's prefix cache compares images by
their bytes like any token: a follow-up turn about the same picture shares
the cached prefix and the image is neither encoded nor read again.

Encoding (the vision tower, the slow part) runs on the projector's own
thread, so a big image never holds up the other sequences' decode steps;
the batcher reads the resulting embeddings into the KV cache a chunk at a
time, between text steps (see :mod:`mullama.engine.batching`). Recently
encoded images are kept, by hash, within a bound, so a request that needs
an image another request just encoded does not encode it again.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import re
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mullama import config
from mullama.engine.memory import parse_size
from mullama.errors import BadRequestError, ModelLoadError, MullamaError
from mullama.ffi import llama as L
from mullama.ffi import mtmd as M
from mullama.store.gguf import read_gguf

log = logging.getLogger("mullama.engine.vision")

#: Defaults of ``MULLAMA_MAX_IMAGE_BYTES`` (encoded size) and ``MULLAMA_MAX_IMAGE_PIXELS`` (width x height).
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 7680 * 4320
#: Encoded images kept for reuse, in bytes of embeddings.
EMBEDDING_CACHE_BYTES = 64 * 1024 * 1024
#: The error Ollama gives for images sent to a model that cannot see them (model/model.go, ErrNoVisionModel).
NO_VISION = "this model is missing data required for image input"

#: Where libmtmd's helper looks for ffmpeg: not a directory, so it finds none (see Projector._bitmap).
_NO_PROGRAMS = b"/dev/null/"

#: The formats stb_image (in libmtmd's helper) decodes, and how to read their width and height.
DECODED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
#: Formats recognised by their first bytes but not decoded by this build.
_UNDECODED = [
    (re.compile(rb"RIFF....WEBP", re.DOTALL), "WebP"),
    (re.compile(rb"II\*\x00|MM\x00\*"), "TIFF"),
    (re.compile(rb"....ftyp(heic|heix|hevc|heim|heis|mif1|msf1)", re.DOTALL), "HEIC"),
    (re.compile(rb"....ftyp(avif|avis)", re.DOTALL), "AVIF"),
    (re.compile(rb"%PDF-"), "PDF"),
    (re.compile(rb"\s*(<\?xml|<svg)", re.IGNORECASE), "SVG"),
    (re.compile(rb"\x00\x00\x01\x00"), "ICO"),
    (re.compile(rb"\xff\x0a|\x00\x00\x00\x0cJXL "), "JPEG XL"),
]


def image_format(data: bytes) -> str | None:
    """The name of the image format ``data`` starts with, decodable or not; None when unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    head = data[:32]
    for pattern, name in _UNDECODED:
        if pattern.match(head):
            return name
    return None


def image_dimensions(data: bytes, fmt: str) -> tuple[int, int]:
    """Width and height from the header of a decodable image; BadRequestError if the header is broken."""
    try:
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                raise ValueError("no IHDR chunk")
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            if struct.unpack("<I", data[14:18])[0] == 12:
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        return _jpeg_dimensions(data)
    except (struct.error, ValueError) as exc:
        raise BadRequestError(f"the {fmt} image is corrupt: its header cannot be read ({exc})",
                              param="images") from None


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """Height and width from a JPEG's first start-of-frame marker."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    raise ValueError("no frame header")


@dataclass(frozen=True)
class ImageLimits:
    """How large an image may be: encoded bytes and decoded pixels."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_environment(cls) -> ImageLimits:
        """``MULLAMA_MAX_IMAGE_BYTES`` (``"20MiB"``, bytes) and ``MULLAMA_MAX_IMAGE_PIXELS`` (a count)."""
        limits = cls()
        text = config.env("MAX_IMAGE_BYTES")
        if text:
            limits = cls(parse_size(text), limits.max_pixels)
        text = config.env("MAX_IMAGE_PIXELS")
        if text:
            try:
                pixels = int(float(text))
            except ValueError:
                raise MullamaError(f"MULLAMA_MAX_IMAGE_PIXELS={text!r} is not a number") from None
            limits = cls(limits.max_bytes, pixels)
        return limits


def check_image(data: bytes, limits: ImageLimits) -> str:
    """The format of an image Mullama can decode within ``limits``; a clear BadRequestError otherwise."""
    if not data:
        raise BadRequestError("an image is empty", param="images")
    if len(data) > limits.max_bytes:
        raise BadRequestError(f"an image is {len(data)} bytes, above the limit of {limits.max_bytes} "
                              "(MULLAMA_MAX_IMAGE_BYTES)", param="images")
    fmt = image_format(data)
    if fmt is None:
        raise BadRequestError(f"the image is not in a format Mullama reads ({', '.join(DECODED_FORMATS)}): it "
                              f"starts with bytes {data[:8].hex(' ')}", param="images")
    if fmt not in DECODED_FORMATS:
        raise BadRequestError(f"{fmt} images are not supported; send {', '.join(DECODED_FORMATS)}", param="images")
    width, height = image_dimensions(data, fmt)
    if width <= 0 or height <= 0:
        raise BadRequestError(f"the {fmt} image is corrupt: it claims {width}x{height} pixels", param="images")
    if width * height > limits.max_pixels:
        raise BadRequestError(f"the {fmt} image is {width}x{height} pixels, above the limit of "
                              f"{limits.max_pixels} (MULLAMA_MAX_IMAGE_PIXELS)", param="images")
    return fmt


def projector_problem(projector: Path) -> str:
    """Why ``projector`` cannot give its model images, as far as the file alone tells ("" when it can).

    What libmtmd checks only when it loads the projector for the model (the
    widths, the projector type's tensors) shows in :attr:`Model.projector_error`.
    """
    try:
        info = read_gguf(projector)
    except MullamaError as exc:
        return f"the projector is not a valid GGUF: {exc.message}"
    if info.architecture != "clip":
        return f"the projector's architecture is {info.architecture!r}, not clip"
    if info.metadata.get("clip.has_vision_encoder") is not True:
        return "the projector has no vision encoder"
    return ""


def placeholder(image_hash: int, index: int) -> int:
    """The token id standing for embedding ``index`` of an image: negative, and unique per image and index."""
    return -((image_hash << 24) + index + 1)


class ImageChunk:
    """One image of a prompt: where its embeddings go, and (once encoded) the embeddings.

    It owns a copy of libmtmd's chunk (the preprocessed image) until
    :meth:`release`; the embeddings are shared with the projector's cache.
    """

    def __init__(self, projector: Projector, handle: int, start: int) -> None:
        lib = projector.lib
        self.projector = projector
        #: The sha256 of the image's bytes (libmtmd's chunk id).
        self.id: str = (lib.mtmd_input_chunk_get_id(handle) or b"").decode()
        #: Index of its first embedding in the prompt.
        self.start = start
        self.n_tokens: int = lib.mtmd_input_chunk_get_n_tokens(handle)
        self.n_pos: int = lib.mtmd_input_chunk_get_n_pos(handle)
        self.placeholders = [placeholder(int(self.id[:15] or "0", 16), i) for i in range(self.n_tokens)]
        #: Set once the embeddings (or an error) are there.
        self.ready = threading.Event()
        self.embeddings: ctypes.Array[ctypes.c_float] | None = None
        self.error: BaseException | None = None
        self._handle: int | None = handle
        self._queued = False
        self._encoding = False
        self._released = False

    @property
    def end(self) -> int:
        """Index just past its last embedding."""
        return self.start + self.n_tokens

    def positions(self, pos: int, first: int, n: int) -> list[int]:
        """M-RoPE positions of embeddings ``first`` to ``first + n`` of an image placed at position ``pos``.

        Section-major, as ``llama_batch.pos`` takes them: ``n`` times, rows,
        columns, spares (libmtmd's helper lays them out so).
        """
        lib = self.projector.lib
        tokens = lib.mtmd_input_chunk_get_tokens_image(self._handle)
        places = [lib.mtmd_image_tokens_get_decoder_pos(tokens, pos, first + i) for i in range(n)]
        return [p.t for p in places] + [p.y for p in places] + [p.x for p in places] + [p.z for p in places]

    def encode(self) -> None:
        """Have the projector's thread encode it, unless that is done or under way; returns at once."""
        self.projector.schedule(self)

    def release(self) -> None:
        """Free the preprocessed image (after an encode in progress ends); safe to call twice."""
        self.projector.release(self)


@dataclass
class VisionPrompt:
    """A tokenized prompt with images: placeholder ids in ``tokens`` where each image's embeddings go."""

    tokens: list[int]
    images: list[ImageChunk] = field(default_factory=list)

    def release(self) -> None:
        """Free every image's preprocessed data."""
        for image in self.images:
            image.release()


class Projector:
    """A vision projector loaded for one text model: tokenizes prompts with images and encodes them.

    Raises :class:`ModelLoadError` when libmtmd cannot load the file for
    this model, or when it has no vision encoder.
    """

    def __init__(self, native: object, model_ptr: int, path: str, *, threads: int, use_gpu: bool,
                 flash_attention: bool | None) -> None:
        lib = getattr(native, "mtmd", None)
        if lib is None:
            raise ModelLoadError("libmtmd was not built with this libllama: run `python build_native.py`")
        self.lib = lib
        self.path = path
        #: A marker no client can type by accident or on purpose: it is where images go in a prompt.
        self.marker = f"<__mullama_image_{uuid.uuid4().hex}__>"
        self._marker_bytes = self.marker.encode()
        #: Images encoded so far (cache hits not counted).
        self.encode_count = 0
        self._cache: collections.OrderedDict[str, ctypes.Array[ctypes.c_float]] = collections.OrderedDict()
        self._cache_bytes = 0
        self._state = threading.Lock()
        self._wakeup = threading.Condition(self._state)
        self._queue: collections.deque[ImageChunk] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        params = lib.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = threads
        params.media_marker = self._marker_bytes
        params.flash_attn_type = {None: L.LLAMA_FLASH_ATTN_TYPE_AUTO, True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attention]
        self.ctx = lib.mtmd_init_from_file(path.encode(), model_ptr, params)
        if not self.ctx:
            raise ModelLoadError(f"libmtmd could not load the projector {path} for this model "
                                 "(see the log for its reason)")
        if not lib.mtmd_support_vision(self.ctx):
            self.close()
            raise ModelLoadError(f"the projector {path} has no vision encoder")
        #: Whether images take M-RoPE positions (the Qwen2-VL family): four per embedding (time, row, column and
        #: a spare), and an image advances the position by its n_pos, not by its count of embeddings.
        self.mrope: bool = bool(lib.mtmd_decode_use_mrope(self.ctx))
        #: Whether an image's embeddings must be read with non-causal attention, all in one decode (Gemma 3).
        self.non_causal: bool = bool(lib.mtmd_decode_use_non_causal(self.ctx, None))
        #: Width of one embedding, as the text model reads it.
        self.n_embd: int = native.llama.llama_model_n_embd_inp(model_ptr)  # type: ignore[attr-defined]
        self.limits = ImageLimits.from_environment()

    # --- prompts -------------------------------------------------------------

    def tokenize(self, text: str, images: Sequence[bytes], *, add_special: bool) -> VisionPrompt:
        """Tokenize ``text``, where :attr:`marker` appears once per image, in order.

        Raises :class:`BadRequestError` for an image that is not a supported
        format, is too large, or does not decode, and when the markers and
        images do not pair up.
        """
        lib = self.lib
        places = text.count(self.marker)
        if places != len(images):
            raise BadRequestError(f"the prompt has {places} places for images but {len(images)} images came with it",
                                  param="images")
        bitmaps: list[int] = []
        chunks = None
        try:
            for i, data in enumerate(images):
                bitmaps.append(self._bitmap(data, i))
            chunks = lib.mtmd_input_chunks_init()
            encoded = text.encode("utf-8", "surrogatepass")
            spec = M.mtmd_input_text(encoded, len(encoded), add_special, True)
            array = (ctypes.c_void_p * max(1, len(bitmaps)))(*bitmaps)
            code = lib.mtmd_tokenize(self.ctx, chunks, ctypes.byref(spec), array, len(bitmaps))
            if code != 0:
                raise BadRequestError("an image could not be preprocessed for this model", param="images")
            return self._prompt(chunks)
        finally:
            if chunks is not None:
                lib.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                lib.mtmd_bitmap_free(bitmap)

    def _bitmap(self, data: bytes, index: int) -> int:
        """Decode one image into an RGB bitmap whose id is the sha256 of its bytes."""
        fmt = check_image(data, self.limits)
        buffer = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        options = self.lib.mtmd_helper_init_opt_default()
        # Bytes stb_image cannot decode would go to ffprobe and ffmpeg (as a video): a "directory" that can
        # hold no programs keeps a client's corrupt or hostile upload away from them.
        options.video_params.ffmpeg_bin_dir = _NO_PROGRAMS
        wrapper = self.lib.mtmd_helper_bitmap_init_from_buf(self.ctx, buffer, len(data), False, options)
        if wrapper.video_ctx:
            self.lib.mtmd_helper_video_free(wrapper.video_ctx)
        if not wrapper.bitmap:
            raise BadRequestError(f"image {index + 1} could not be decoded: the {fmt} data is corrupt or truncated",
                                  param="images")
        bitmap = wrapper.bitmap
        pixels = self.lib.mtmd_bitmap_get_nx(bitmap) * self.lib.mtmd_bitmap_get_ny(bitmap)
        if pixels > self.limits.max_pixels:
            self.lib.mtmd_bitmap_free(bitmap)
            raise BadRequestError(f"image {index + 1} has {pixels} pixels, above the limit of "
                                  f"{self.limits.max_pixels} (MULLAMA_MAX_IMAGE_PIXELS)", param="images")
        # The id keys the prefix cache and the encodings kept: it must be the image's hash, whatever the helper set.
        self.lib.mtmd_bitmap_set_id(bitmap, hashlib.sha256(data).hexdigest().encode())
        return bitmap

    def _prompt(self, chunks: int) -> VisionPrompt:
        lib = self.lib
        prompt = VisionPrompt(tokens=[])
        try:
            for i in range(lib.mtmd_input_chunks_size(chunks)):
                chunk = lib.mtmd_input_chunks_get(chunks, i)
                kind = lib.mtmd_input_chunk_get_type(chunk)
                if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    ids = lib.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    prompt.tokens.extend(ids[:count.value])
                elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    image = ImageChunk(self, lib.mtmd_input_chunk_copy(chunk), len(prompt.tokens))
                    prompt.images.append(image)
                    prompt.tokens.extend(image.placeholders)
                else:
                    raise BadRequestError("only images are supported as media input", param="images")
        except BaseException:
            prompt.release()
            raise
        return prompt

    # --- encoding --------------------------------------------------------------

    def schedule(self, image: ImageChunk) -> None:
        """Queue ``image`` for the encoder thread; a cached encoding makes it ready at once."""
        with self._state:
            if image.ready.is_set() or image._queued or image._released:
                return
            cached = self._cache.get(image.id)
            if cached is not None:
                self._cache.move_to_end(image.id)
                image.embeddings = cached
                image.ready.set()
                return
            if self._closing:
                image.error = MullamaError("the model is shutting down")
                image.ready.set()
                return
            image._queued = True
            self._queue.append(image)
            if self._thread is None:
                self._thread = threading.Thread(target=self._encode_loop, name="mullama-vision", daemon=True)
                self._thread.start()
            self._wakeup.notify()

    def release(self, image: ImageChunk) -> None:
        """Free ``image``'s chunk now, or when its encode ends."""
        with self._state:
            if image._released:
                return
            image._released = True
            if image._encoding:
                return  # the encoder frees it
            self._free(image)

    def _free(self, image: ImageChunk) -> None:
        """Free the chunk of a released image (called with the state lock held)."""
        try:
            self._queue.remove(image)
        except ValueError:
            pass
        if image._handle is not None:
            self.lib.mtmd_input_chunk_free(image._handle)
            image._handle = None

    def _encode_loop(self) -> None:
        while True:
            with self._state:
                while not (self._queue or self._closing):
                    self._wakeup.wait()
                if self._closing:
                    return
                image = self._queue.popleft()
                cached = self._cache.get(image.id)
                if cached is None:
                    image._encoding = True
            if cached is not None:
                image.embeddings = cached
            else:
                self._encode(image)
            image.ready.set()

    def _encode(self, image: ImageChunk) -> None:
        """Run the vision tower on ``image`` (outside the lock: it takes long) and keep the result."""
        try:
            if self.lib.mtmd_encode_chunk(self.ctx, image._handle) != 0:
                raise MullamaError("libmtmd could not encode the image (see the log for its reason)")
            count = image.n_tokens * self.n_embd
            embeddings = (ctypes.c_float * count)()
            ctypes.memmove(embeddings, self.lib.mtmd_get_output_embd(self.ctx), count * ctypes.sizeof(ctypes.c_float))
            image.embeddings = embeddings
        except Exception as exc:  # noqa: BLE001 - the request that needs the image fails, not the thread
            log.warning("encoding an image failed: %s", exc)
            image.error = exc
        with self._state:
            image._encoding = False
            self.encode_count += 1
            if image.embeddings is not None:
                self._remember(image.id, image.embeddings)
            if image._released:
                self._free(image)

    def _remember(self, key: str, embeddings: ctypes.Array[ctypes.c_float]) -> None:
        """Keep an encoding for reuse, dropping the least recently used past the bound (lock held)."""
        size = ctypes.sizeof(embeddings)
        if key in self._cache:
            return
        self._cache[key] = embeddings
        self._cache_bytes += size
        while self._cache_bytes > EMBEDDING_CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= ctypes.sizeof(dropped)

    def close(self) -> None:
        """Stop the encoder thread and free the projector; images not yet encoded fail."""
        with self._state:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for image in pending:
            image.error = MullamaError("the model is shutting down")
            image.ready.set()
        with self._state:
            for image in pending:
                image._queued = False
            self._cache.clear()
            self._cache_bytes = 0
        if self.ctx:
            self.lib.mtmd_free(self.ctx)
            self.ctx = None


def place_images(text: str, count: int, marker: str) -> str:
    """``text`` with ``marker`` where each of its ``count`` images goes, as Ollama places them.

    ``[img-N]`` tags (Ollama's raw prompts) and then ``[img]`` tags are
    replaced in order; images left over go before the text.
    """
    placed = 0
    for i in range(count):
        tag = f"[img-{i}]"
        if tag in text:
            text = text.replace(tag, marker, 1)
            placed += 1
    while placed < count and "[img]" in text:
        text = text.replace("[img]", marker, 1)
        placed += 1
    return marker * (count - placed) + text
