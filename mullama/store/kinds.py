"""What a model file holds: a GGUF (text, embedding or projector) or a whisper.cpp speech model.

Both kinds live in the store the same way, as ``model`` layers; what a file
is comes from its first bytes, and each kind is validated by its own reader
before anything native opens it.
"""

from __future__ import annotations

from pathlib import Path

from mullama.speech.model_file import is_whisper_file, read_whisper_file
from mullama.store import gguf

GGUF = "gguf"
#: whisper.cpp's own ggml format (``ggml-*.bin``), speech to text.
WHISPER = "whisper"


def file_kind(path: str | Path) -> str:
    """:data:`WHISPER` for a whisper.cpp model file, else :data:`GGUF` (whose reader judges the rest)."""
    return WHISPER if is_whisper_file(path) else GGUF


def validate(path: str | Path) -> str:
    """Check a model file with the reader of its kind and return the kind; raises InvalidModelFileError."""
    kind = file_kind(path)
    if kind == WHISPER:
        read_whisper_file(path)
    else:
        gguf.read_gguf(Path(path))
    return kind
