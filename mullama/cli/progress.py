"""The progress display of ``pull``, ``push`` and ``create``: status lines and a bar per layer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from mullama.cli.format import go_duration, human_bytes, json_int, terminal_width


@dataclass
class _Bar:
    """One layer's transfer; ``samples`` keeps recent (time, bytes) points for the rate."""

    label: str
    total: int
    completed: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def update(self, completed: int, now: float) -> None:
        self.completed = min(completed, self.total) if self.total > 0 else completed
        self.samples = [(t, v) for t, v in self.samples if now - t <= 10.0] + [(now, self.completed)]

    @property
    def done(self) -> bool:
        return self.total > 0 and self.completed >= self.total

    def rate(self) -> float:
        (start, first), (end, last) = self.samples[0], self.samples[-1]
        return (last - first) / (end - start) if end - start >= 0.5 else 0.0

    def render(self, width: int) -> str:
        """Ollama's bar: label, percent, ``▕███  ▏``, sizes, speed and time left."""
        percent = 100 * self.completed / self.total if self.total > 0 else 0.0
        head = f"{self.label} {percent:3.0f}%"
        rate = 0.0 if self.done else self.rate()
        if self.done:
            tail = f"{human_bytes(self.total):>6}" + " " * 7
        else:
            tail = f"{human_bytes(self.completed):>6}/{human_bytes(self.total):>6}"
        if rate > 0:
            left = (self.total - self.completed) / rate
            tail += f"  {human_bytes(int(rate)):>6}/s  {_eta(left):>6}"
        else:
            tail += " " * 18
        room = max(width - len(head) - len(tail) - 5, 0)
        filled = int(room * percent / 100)
        return f"{head} ▕{'█' * filled}{' ' * (room - filled)}▏ {tail}"

    def plain(self) -> str:
        return f"{self.label} {human_bytes(self.total)}"


def _eta(seconds: float) -> str:
    if seconds >= 100 * 3600:
        return "99h+"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds // 60) % 60}m"
    return go_duration(round(seconds) * 10**9)


class Progress:
    """Status lines and bars of a pull, push or create, written to ``stream``.

    On a terminal the lines are redrawn in place (at most ten times a
    second); otherwise each status, and each finished layer, is printed
    once as a plain line, which suits logs and pipes.
    """

    def __init__(self, stream: TextIO, *, verb: str = "pulling") -> None:
        self.stream = stream
        self.verb = verb
        self.live = stream.isatty()
        self.lines: dict[str, _Bar | str] = {}
        self.drawn = 0
        self.last_draw = 0.0
        self.printed: set[str] = set()

    def status(self, text: str, key: str = "") -> None:
        """Show a status line (``pulling manifest``, ``success``); ``key`` names a line to rewrite."""
        key = key or text
        if text and self.lines.get(key) != text:
            self.lines[key] = text
            self.printed.discard(key)
            self._refresh(force=True)

    def update(self, event: dict[str, Any]) -> None:
        """Show one progress object of an Ollama stream."""
        digest = event.get("digest")
        if not digest:
            self.status(str(event.get("status") or ""))
            return
        total, completed = json_int(event.get("total")), json_int(event.get("completed"))
        bar = self.lines.get(digest)
        if not isinstance(bar, _Bar):
            if completed == 0:
                # The server announces every layer before downloading; a row of 0% bars says nothing.
                return
            hexdigits = digest.removeprefix("sha256:").strip()[:12]
            if self.verb == "pulling":
                label = f"pulling {hexdigits}:"
            else:
                label = str(event.get("status") or f"{self.verb} {hexdigits}...")
            bar = self.lines[digest] = _Bar(label, total)
        bar.total = max(bar.total, total)
        bar.update(completed, time.monotonic())
        self._refresh(force=bar.done)

    def close(self) -> None:
        """Draw the final state and leave the cursor on a fresh line."""
        self._refresh(force=True)
        if self.live and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = 0

    def _refresh(self, *, force: bool) -> None:
        if not self.live:
            for key, line in self.lines.items():
                if key not in self.printed and (isinstance(line, str) or line.done):
                    self.printed.add(key)
                    self.stream.write((line if isinstance(line, str) else line.plain()) + "\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        width = terminal_width(self.stream)
        text = [line if isinstance(line, str) else line.render(width) for line in self.lines.values()]
        up = f"\x1b[{self.drawn - 1}A" if self.drawn > 1 else ""
        self.stream.write(up + "\r" + "\n".join(f"{line[:width - 1]}\x1b[K" for line in text))
        self.stream.flush()
        self.drawn = len(text)


def follow(events: Iterator[dict[str, Any]], progress: Progress) -> None:
    """Show every event of an Ollama progress stream, then close the display."""
    try:
        for event in events:
            progress.update(event)
    finally:
        progress.close()
