"""Separating a reasoning model's thinking from its answer.

DeepSeek-R1, Qwen3, QwQ and similar models write their reasoning between
``<think>`` and ``</think>`` before the answer.  Some chat templates already
end the prompt with ``<think>``, so the output starts inside the reasoning
and only the closing tag appears.

As Ollama and llama-server do, thinking is recognised only at the start of
the output (after leading whitespace), whitespace right after either tag is
dropped, and everything after the closing tag is content, even another
opening tag.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["thinking", "content"]

_START, _THINK_LEAD, _THINKING, _CONTENT_LEAD, _CONTENT = range(5)


def split_thinking(
    text: str, open_tag: str = "<think>", close_tag: str = "</think>", starts_inside: bool = False
) -> tuple[str, str]:
    """Split a whole output into ``(thinking, content)``."""
    stripped = text.lstrip()
    if stripped.startswith(open_tag):
        rest = stripped[len(open_tag) :]
    elif starts_inside:
        rest = stripped
    else:
        return "", text
    thinking, _, content = rest.partition(close_tag)
    return thinking.lstrip(), content.lstrip()


def prompt_opens_thinking(prompt: str, open_tag: str = "<think>") -> bool:
    """Whether a rendered prompt ends inside thinking, so the output starts there."""
    return prompt.rstrip().endswith(open_tag)


def _overlap(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ThinkingSplitter:
    """Split streamed output into thinking and content pieces as it arrives.

    Text that could still turn out to be part of a tag is held back until
    the next :meth:`feed` or :meth:`flush` decides it, so the pieces of any
    chunking add up to :func:`split_thinking` of the whole text.
    """

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>", starts_inside: bool = False) -> None:
        if not open_tag or not close_tag:
            raise ValueError("thinking tags must not be empty")
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.starts_inside = starts_inside
        self._state = _START
        self._buffer = ""

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        """Take the next chunk of output; return the pieces it decides, in order."""
        self._buffer += text
        pieces: list[tuple[Kind, str]] = []
        while self._step(pieces):
            pass
        return pieces

    def flush(self) -> list[tuple[Kind, str]]:
        """End of output: return whatever was held back."""
        pieces: list[tuple[Kind, str]] = []
        held, self._buffer = self._buffer, ""
        if self._state == _START:
            if self.starts_inside:
                _emit(pieces, "thinking", held.lstrip())
            else:
                _emit(pieces, "content", held)
        elif self._state == _THINKING:
            _emit(pieces, "thinking", held)
        self._state = _CONTENT
        return pieces

    def _step(self, pieces: list[tuple[Kind, str]]) -> bool:
        """Advance one state on the buffer; return whether to step again."""
        buffer = self._buffer
        if self._state == _START:
            stripped = buffer.lstrip()
            if stripped.startswith(self.open_tag):
                self._buffer = stripped[len(self.open_tag) :]
                self._state = _THINK_LEAD
            elif self.open_tag.startswith(stripped):
                return False
            else:
                self._state = _THINK_LEAD if self.starts_inside else _CONTENT
            return True
        if self._state in (_THINK_LEAD, _CONTENT_LEAD):
            self._buffer = buffer.lstrip()
            if not self._buffer:
                return False
            self._state = _THINKING if self._state == _THINK_LEAD else _CONTENT
            return True
        if self._state == _THINKING:
            end = buffer.find(self.close_tag)
            if end >= 0:
                _emit(pieces, "thinking", buffer[:end])
                self._buffer = buffer[end + len(self.close_tag) :]
                self._state = _CONTENT_LEAD
                return True
            keep = _overlap(buffer, self.close_tag)
            _emit(pieces, "thinking", buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]
            return False
        _emit(pieces, "content", buffer)
        self._buffer = ""
        return False


def _emit(pieces: list[tuple[Kind, str]], kind: Kind, text: str) -> None:
    """Append a piece, merging it with the previous one of the same kind."""
    if not text:
        return
    if pieces and pieces[-1][0] == kind:
        pieces[-1] = (kind, pieces[-1][1] + text)
    else:
        pieces.append((kind, text))
