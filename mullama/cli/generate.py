"""One generation from the command line: what is sent with it, and its answer streamed to the terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from mullama.cli.format import char_width, terminal_width, text_width, timing_summary
from mullama.cli.images import attach_images
from mullama.client import Client

_GREY, _BOLD, _RESET = "\x1b[90m", "\x1b[1m", "\x1b[0m"


class Display:
    """Writes a streamed answer: the thinking block first, words wrapped at the terminal's edge.

    ``width`` 0 turns wrapping off.  A word that would cross the edge is
    erased and written again on the next line, as Ollama does, since the
    text arrives a few characters at a time.
    """

    def __init__(self, out: TextIO, *, width: int = 0, color: bool = False, hide_thinking: bool = False) -> None:
        self.out = out
        self.width = width
        self.color = color
        self.hide_thinking = hide_thinking
        self.column = 0
        self.word = ""
        self.in_thinking = False
        self.thinking_newline = True

    def show(self, thinking: str, content: str) -> None:
        """Write the next pieces of thinking and of the answer."""
        if thinking and not self.hide_thinking:
            if not self.in_thinking:
                self.out.write(self._styled("Thinking...\n", after=_GREY))
                self.in_thinking = True
            self.write(thinking)
            self.thinking_newline = thinking.endswith("\n")
        if content and self.in_thinking:
            self.out.write(("" if self.thinking_newline else "\n") + self._styled("...done thinking.\n\n"))
            self.in_thinking = False
            self.column, self.word = 0, ""
        self.write(content)
        self.out.flush()

    def finish(self) -> None:
        """Restore the colour if the answer ended inside the thinking block."""
        if self.in_thinking and self.color:
            self.out.write(_RESET)

    def write(self, text: str) -> None:
        """Write ``text``, wrapping words when a width is set."""
        if self.width < 10:
            self.out.write(text)
            return
        for char in text:
            if char in "\r\n":
                self.out.write(char)
                self.column, self.word = 0, ""
                continue
            columns = char_width(char)
            if self.column + columns > self.width - 5:
                if char in " \t":
                    self.out.write("\n")
                    self.column, self.word = 0, ""
                    continue
                word_width = text_width(self.word)
                if 0 < word_width <= self.width - 10:
                    self.out.write(f"\x1b[{word_width}D\x1b[K\n{self.word}")
                    self.column = word_width
                else:
                    self.out.write("\n")
                    self.column, self.word = 0, ""
            self.out.write(char)
            self.column += columns
            self.word = "" if char in " \t" or columns > 1 else self.word + char

    def _styled(self, text: str, after: str = "") -> str:
        return f"{_GREY}{_BOLD}{text}{_RESET}{after}" if self.color else text


@dataclass
class RunOptions:
    """What ``run`` and the interactive session send with each request."""

    model: str
    prompt: str = ""
    system: str = ""
    format: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: str | None = None
    think: bool | str | None = None
    hide_thinking: bool = False
    wordwrap: bool = True
    verbose: bool = False
    #: The conversation of the interactive session (Ollama message objects).
    messages: list[dict[str, Any]] = field(default_factory=list)
    #: The model's own MESSAGE history, kept apart so ``/save`` can write both.
    loaded_messages: list[dict[str, Any]] = field(default_factory=list)
    parent_model: str = ""
    #: Whether the model sees images: then image paths in a prompt are sent as images (mullama.cli.images).
    vision: bool = False

    def common(self) -> dict[str, Any]:
        """The request fields shared by ``/api/generate`` and ``/api/chat``."""
        body: dict[str, Any] = {"model": self.model}
        for key, value in (("format", self.format), ("keep_alive", self.keep_alive), ("think", self.think)):
            if value is not None:
                body[key] = value
        if self.options:
            body["options"] = dict(self.options)
        return body


def _display(opts: RunOptions, out: TextIO, *, color: bool) -> Display:
    width = terminal_width(out) if opts.wordwrap and out.isatty() else 0
    return Display(out, width=width, color=color, hide_thinking=opts.hide_thinking)


def generate_once(client: Client, opts: RunOptions, out: TextIO, err: TextIO) -> None:
    """A one-shot prompt through ``/api/generate``, streamed to ``out``."""
    prompt, images = attach_images(opts.prompt, err) if opts.vision else (opts.prompt, [])
    body = opts.common() | {"prompt": prompt} | ({"images": images} if images else {})
    if opts.system:
        body["system"] = opts.system
    display = _display(opts, out, color=out.isatty())
    last: dict[str, Any] = {}
    for event in client.stream("/api/generate", body):
        last = event
        display.show(str(event.get("thinking") or ""), str(event.get("response") or ""))
    display.finish()
    if opts.prompt:
        out.write("\n\n")
    out.flush()
    if opts.verbose and last.get("done"):
        err.write(timing_summary(last))


def chat_turn(client: Client, opts: RunOptions, out: TextIO, err: TextIO) -> dict[str, Any] | None:
    """Send the conversation to ``/api/chat``, stream the answer; ``None`` when Ctrl-C cut it short."""
    body = opts.common() | {"messages": opts.messages}
    display = _display(opts, out, color=True)
    last: dict[str, Any] = {}
    thinking, content, role = [], [], "assistant"
    events = client.stream("/api/chat", body)
    try:
        for event in events:
            last = event
            message = event.get("message") or {}
            role = message.get("role") or role
            thinking.append(str(message.get("thinking") or ""))
            content.append(str(message.get("content") or ""))
            display.show(thinking[-1], content[-1])
    except KeyboardInterrupt:
        events.close()
        display.finish()
        out.write("\n")
        return None
    display.finish()
    out.write("\n\n")
    out.flush()
    if opts.verbose and last.get("done"):
        err.write(timing_summary(last))
    answer = {"role": role, "content": "".join(content)}
    if any(thinking):
        answer["thinking"] = "".join(thinking)
    return answer


def load_model(client: Client, opts: RunOptions) -> None:
    """Load (or, with ``keep_alive`` 0, unload) a model: a generate request with no prompt."""
    for _ in client.stream("/api/generate", opts.common()):
        pass
