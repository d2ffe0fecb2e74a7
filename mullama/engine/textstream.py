"""Turn generated token bytes into text the caller may see.

Two things make this less than trivial: one UTF-8 character can be split
across tokens, and a stop string can span several tokens. ``TextStream``
holds back exactly what is still undecided: incomplete UTF-8 sequences, and
a tail of text that could be the beginning of a stop string.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class TextStream:
    """Feed token bytes in, get printable text out, stop at a stop string."""

    stop: list[str] = field(default_factory=list)
    #: True once a stop string was seen; the text before it was already returned.
    stopped: bool = False
    #: The stop string that ended the stream, if any.
    stop_hit: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    _pending: str = ""

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, data: bytes) -> str:
        """Add token bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: return everything still held back (short of a stop string)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        if self.stop:
            cut = -1
            for candidate in self.stop:
                at = text.find(candidate)
                if at != -1 and (cut == -1 or at < cut):
                    cut, self.stop_hit = at, candidate
            if cut != -1:
                self.stopped = True
                self._pending = ""
                return text[:cut]
        if final or not self.stop:
            self._pending = ""
            return text
        keep = self._undecided_tail(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _undecided_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        for length in range(min(self._hold, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
