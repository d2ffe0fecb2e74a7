"""Speech test data made here: espeak-ng speaks known sentences, sox places them in silence and noise.

Also the pinned whisper.cpp source (for its header and its test stubs), and
word error rate. The model itself comes from ``whisper_weights``.
"""

from __future__ import annotations

import json
import re
import shutil
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mullama import config

ROOT = Path(__file__).resolve().parent.parent

#: Harvard sentences (IEEE 1969, lists 1 and 2): phonetically balanced, public domain.
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
]


def whisper_cpp_source() -> Path:
    """The whisper.cpp tree libwhisper was built from (``build_native.py --with-whisper`` extracts it)."""
    from mullama.ffi import loader

    recorded = loader.load_whisper().manifest.get("source_path")
    if recorded and Path(recorded, "include", "whisper.h").exists():
        return Path(recorded)
    pin = json.loads((ROOT / "native" / "whisper.json").read_text())
    tree = config.user_cache_dir() / "sources" / f"whisper.cpp-{pin['sha256'][:16]}"
    if not (tree / "include" / "whisper.h").exists():
        pytest.fail(f"the pinned whisper.cpp source is not at {tree}: run `python build_native.py --with-whisper`")
    return tree


def require(tool: str) -> str:
    """The path of a Debian tool the speech tests need (``.ci/run`` installs them)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: `apt-get install espeak-ng sox` (as .ci/run does)")
    return path


def cache_dir() -> Path:
    directory = config.user_cache_dir() / "fixtures" / "speech"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def speak(text: str, dest: Path, voice: str = "en-us", words_per_minute: int = 160) -> Path:
    """espeak-ng's reading of ``text`` as a WAV (22,050 Hz mono, 16-bit)."""
    subprocess.run([require("espeak-ng"), "-v", voice, "-s", str(words_per_minute), "-w", str(dest), text],
                   check=True, capture_output=True)
    return dest


def sox(*args: str | Path) -> None:
    """Run sox quietly, with its fixed random sequence (-R: the same noise and dither every run)."""
    subprocess.run([require("sox"), "-q", "-R", *map(str, args)], check=True, capture_output=True)


def spoken_sentence(index: int, rate: int = 16000) -> Path:
    """Sentence ``index`` spoken, resampled by sox to ``rate`` Hz mono (cached)."""
    dest = cache_dir() / f"sentence-{index:02d}-{rate}.wav"
    if not dest.exists():
        raw = speak(SENTENCES[index], cache_dir() / f"sentence-{index:02d}-raw.wav")
        sox(raw, "-r", str(rate), "-c", "1", "-b", "16", dest)
    return dest


def harvard_recording(pause_s: float = 0.7) -> Path:
    """All the sentences, ``pause_s`` apart, as one 16 kHz recording (about 66 s; cached)."""
    dest = cache_dir() / f"harvard-{len(SENTENCES)}-{pause_s}.wav"
    if not dest.exists():
        pause = cache_dir() / f"pause-{pause_s}.wav"
        sox("-n", "-r", "16000", "-c", "1", "-b", "16", pause, "trim", "0", str(pause_s))
        parts: list[Path] = []
        for index in range(len(SENTENCES)):
            parts += [spoken_sentence(index), pause]
        sox(*parts, dest)
    return dest


def duration(path: Path) -> float:
    """A WAV file's length in seconds, as sox reads it."""
    result = subprocess.run([require("sox"), "--i", "-D", str(path)], check=True, capture_output=True, text=True)
    return float(result.stdout)


#: Numbers Whisper may write as digits, spelled as the sentences spell them.
NUMBERS = {"4": "four", "50": "fifty"}


def words(text: str) -> list[str]:
    """Lowercase words without punctuation, numbers spelled out."""
    found = re.findall(r"[a-z0-9']+", text.lower().replace("’", "'"))
    return [NUMBERS.get(w, w) for w in found]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): Levenshtein over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1], len(ref)


@contextlib.contextmanager
def speech_daemon(tmp: Path, chat_model: Path) -> Iterator[object]:
    """A daemon with Whisper tiny.en as ``whisper:tiny.en`` and ``chat_model`` as ``smol``."""
    from daemon import create_model, running
    from whisper_weights import whisper_tiny_en_path

    with running(tmp) as server:
        create_model(server.server_address[1], whisper_tiny_en_path(), "whisper:tiny.en")
        create_model(server.server_address[1], chat_model, "smol")
        yield server
