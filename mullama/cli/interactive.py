"""The ``>>>`` session of ``mullama run``: multi-line blocks, ``/set``, ``/show``, ``/load``, ``/save``, chat turns.

The lines typed are kept in the data directory's ``history`` file, as Ollama
keeps ``~/.ollama/history``; the model last used is remembered beside it for
``mullama chat``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from mullama import config
from mullama.cli.format import go_value, list_table, show_info
from mullama.cli.generate import RunOptions, chat_turn, load_model
from mullama.cli.images import attach_images
from mullama.client import APIError, Client
from mullama.errors import BadRequestError
from mullama.store.names import ModelName
from mullama.options import parse_parameter

_MULTILINE = '"""'
#: The lines a history file keeps, as Ollama's.
HISTORY_LIMIT = 100
#: What ``mullama chat`` opens when no model was named and none was used before.
DEFAULT_MODEL = "smollm2:135m"


@dataclass
class History:
    """The lines typed in the session, saved after each one while enabled (``/set nohistory`` stops it).

    Starts disabled when ``MULLAMA_NOHISTORY`` (or ``OLLAMA_NOHISTORY``) is
    set; lines typed while it is disabled are never written.
    """

    path: Path
    enabled: bool = True
    lines: list[str] = field(default_factory=list)

    @classmethod
    def open(cls) -> History:
        """The data directory's history, with the lines saved so far."""
        history = cls(config.data_dir() / "history", enabled=not config.flag("NOHISTORY"))
        try:
            text = history.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        history.lines = [line.strip() for line in text.splitlines() if line.strip()][-HISTORY_LIMIT:]
        return history

    def add(self, line: str) -> None:
        """Record one typed line, saving the file when history is on."""
        if not line.strip() or not self.enabled:
            return
        self.lines = (self.lines + [line.strip()])[-HISTORY_LIMIT:]
        self.save()

    def save(self) -> None:
        """Write the file whole, replacing the old one at once, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in self.lines))
        os.replace(partial, self.path)

    def recording(self, read: Callable[[str], str]) -> Callable[[str], str]:
        """``read`` that records each line it returns."""

        def read_line(prompt: str) -> str:
            line = read(prompt)
            self.add(line)
            return line

        return read_line


def use_readline(history: History) -> None:
    """Give ``input()`` line editing, with the saved history under the arrow keys (where readline exists)."""
    try:
        import readline
    except ImportError:
        return
    readline.clear_history()
    for line in history.lines:
        readline.add_history(line)


def _last_model_file() -> Path:
    return config.data_dir() / "last-model"


def last_model() -> str:
    """The model ``run`` or ``chat`` last used, else :data:`DEFAULT_MODEL`."""
    try:
        name = _last_model_file().read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    return name or DEFAULT_MODEL


def remember_model(name: str) -> None:
    """Note ``name`` as the model last used; a data directory that cannot be written is no error."""
    try:
        _last_model_file().parent.mkdir(parents=True, exist_ok=True)
        _last_model_file().write_text(name + "\n", encoding="utf-8")
    except OSError:
        pass


@dataclass(frozen=True)
class Command:
    """One entry of the interactive session: a ``/command`` or (``name`` empty) a message."""

    name: str
    args: tuple[str, ...] = ()
    #: The message, or the text that follows ``/set system``.
    text: str = ""


def read_entry(read: Callable[[str], str]) -> str:
    """Read one entry with ``read(prompt)``; a ``\"\"\"`` block goes on until a line ends with ``\"\"\"``.

    ``/set system \"\"\"`` opens a block too.  The lines are returned joined
    by newlines, quotes included, for :func:`parse_command`.
    """
    line = read(">>> ")
    body = _block_body(line)
    if body is None or body.endswith(_MULTILINE):
        return line
    lines = [line]
    while True:
        lines.append(read("... "))
        if lines[-1].endswith(_MULTILINE):
            return "\n".join(lines)


def _block_body(line: str) -> str | None:
    """What follows the quotes that open a block on ``line``, or ``None`` if none opens."""
    if line.startswith(_MULTILINE):
        return line[3:]
    words = line.split(None, 2)
    if len(words) == 3 and words[:2] == ["/set", "system"] and words[2].startswith(_MULTILINE):
        return words[2].rstrip()[3:]
    return None


def parse_command(entry: str) -> Command:
    """Split an entry into a command and its arguments, or a message to send."""
    if entry.startswith(_MULTILINE):
        return Command("", text=_unquote(entry))
    if not entry.startswith("/"):
        return Command("", text=entry)
    words = entry.split()
    text = ""
    if words[:2] == ["/set", "system"] and len(words) > 2:
        rest = entry.split(None, 2)[2].strip()
        text = _unquote(rest) if rest.startswith(_MULTILINE) else " ".join(rest.split())
    return Command(words[0], tuple(words[1:]), text)


def _unquote(text: str) -> str:
    text = text.removeprefix(_MULTILINE)
    return text.removesuffix(_MULTILINE)


_HELP = """\
Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.

"""
_HELP_SET = """\
Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking

"""
_HELP_SHOW = """\
Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template

"""
_HELP_PARAMETERS = """\
Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter stop <string> <string> ...   Set the stop parameters

"""
_HELP_SHORTCUTS = """\
Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit mullama (/bye)

"""


class Session:
    """The ``>>>`` loop of ``mullama run``: commands change ``opts``, messages go to ``/api/chat``."""

    def __init__(self, client: Client, opts: RunOptions, out: TextIO, err: TextIO,
                 history: History | None = None) -> None:
        self.client = client
        self.opts = opts
        self.out = out
        self.err = err
        self.history = history
        self.think_set = opts.think is not None

    def run(self, read: Callable[[str], str]) -> int:
        """Read and handle entries until ``/bye`` or end of input."""
        if self.history is not None:
            read = self.history.recording(read)
        while True:
            try:
                entry = read_entry(read)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if not self.handle(parse_command(entry)):
                return 0

    def handle(self, command: Command) -> bool:
        """Carry out one entry; ``False`` ends the session."""
        if not command.name:
            if command.text:
                try:
                    text, images = attach_images(command.text, self.err) if self.opts.vision else (command.text, [])
                except BadRequestError as exc:
                    self._say(f"Error: {exc.message}")
                    return True
                self.opts.messages.append({"role": "user", "content": text} | ({"images": images} if images else {}))
                answer = chat_turn(self.client, self.opts, self.out, self.err)
                if answer is not None:
                    self.opts.messages.append(answer)
            return True
        if command.name in ("/bye", "/exit"):
            return False
        handler = {
            "/set": self._set,
            "/show": self._show,
            "/load": self._load,
            "/save": self._save,
            "/clear": self._clear,
            "/list": self._list,
            "/?": self._help,
            "/help": self._help,
        }.get(command.name)
        if handler is None:
            self._say(f"Unknown command '{command.name}'. Type /? for help")
        else:
            handler(command)
        return True

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _help(self, command: Command) -> None:
        topic = command.args[0].removeprefix("/") if command.args else ""
        pages = {"set": _HELP_SET, "show": _HELP_SHOW, "shortcut": _HELP_SHORTCUTS, "shortcuts": _HELP_SHORTCUTS}
        self.err.write(pages.get(topic, _HELP) if topic in pages or not topic else "")
        self.err.flush()

    def _set(self, command: Command) -> None:
        opts, args = self.opts, command.args
        what = args[0] if args else ""
        if not what:
            self.err.write(_HELP_SET)
        elif what in ("history", "nohistory"):
            # Silent, as in Ollama.
            if self.history is not None:
                self.history.enabled = what == "history"
        elif what in ("wordwrap", "nowordwrap"):
            opts.wordwrap = what == "wordwrap"
            self._say(f"Set '{what}' mode.")
        elif what in ("verbose", "quiet"):
            opts.verbose = what == "verbose"
            self._say(f"Set '{what}' mode.")
        elif what == "think":
            opts.think = args[1] if len(args) > 1 else True
            self.think_set = True
            self._say(f"Set 'think' mode to '{args[1]}'." if len(args) > 1 else "Set 'think' mode.")
        elif what == "nothink":
            opts.think, self.think_set = False, True
            self._say("Set 'nothink' mode.")
        elif what == "format":
            if len(args) < 2 or args[1] != "json":
                self._say("Invalid or missing format. For 'json' mode use '/set format json'")
            else:
                opts.format = "json"
                self._say("Set format to 'json' mode.")
        elif what == "noformat":
            opts.format = None
            self._say("Disabled format.")
        elif what == "parameter":
            self._set_parameter(args[1:])
        elif what == "system":
            if not command.text:
                self.err.write(_HELP_SET)
                return
            opts.system = command.text
            message = {"role": "system", "content": command.text}
            if opts.messages and opts.messages[-1]["role"] == "system":
                opts.messages[-1] = message
            else:
                opts.messages.append(message)
            self._say("Set system message.")
        else:
            self._say(f"Unknown command '/set {what}'. Type /? for help")

    def _set_parameter(self, args: tuple[str, ...]) -> None:
        if len(args) < 2:
            self.err.write(_HELP_PARAMETERS)
            return
        name, values = args[0], args[1:]
        try:
            parsed = [parse_parameter(name, value) for value in values]
        except BadRequestError as error:
            self._say(f"Couldn't set parameter: {error.message}")
            return
        self.opts.options[name] = [item for value in parsed for item in value] if isinstance(parsed[0], list) else parsed[0]
        self._say(f"Set parameter '{name}' to '{', '.join(values)}'")

    def _show(self, command: Command) -> None:
        if not command.args:
            self.err.write(_HELP_SHOW)
            return
        body: dict[str, Any] = {"model": self.opts.model}
        if self.opts.system:
            body["system"] = self.opts.system
        if self.opts.options:
            body["options"] = self.opts.options
        info = self.client.post("/api/show", body) or {}
        what = command.args[0]
        if what == "info":
            self.err.write(show_info(info))
        elif what == "license":
            self._say(info.get("license") or "No license was specified for this model.")
        elif what == "modelfile":
            self._say(info.get("modelfile") or "")
        elif what == "parameters":
            self._say("Model defined parameters:")
            parameters = info.get("parameters") or ""
            lines = parameters.split("\n") if parameters else ["No additional parameters were specified for this model."]
            self._say("\n".join(f"  {line}" for line in lines) + "\n")
            if self.opts.options:
                self._say("User defined parameters:")
                self._say("".join(f"  {key:<30} {go_value(value)}\n" for key, value in self.opts.options.items()))
        elif what == "system":
            system = self.opts.system or info.get("system")
            self._say(f"{system}\n" if system else "No system message was specified for this model.")
        elif what == "template":
            self._say(info.get("template") or "No prompt template was specified for this model.")
        else:
            self._say(f"Unknown command '/show {what}'. Type /? for help")

    def _load(self, command: Command) -> None:
        if len(command.args) != 1:
            self._say("Usage:\n  /load <modelname>")
            return
        previous = self.opts
        self._say(f"Loading model '{command.args[0]}'")
        self.opts = replace(previous, model=command.args[0], messages=[], loaded_messages=[], options=dict(previous.options))
        try:
            info = self.client.post("/api/show", {"model": self.opts.model}) or {}
            apply_show(self.opts, info, think_set=self.think_set)
            load_model(self.client, self.opts)
            remember_model(self.opts.model)
        except APIError as error:
            if error.status != 404 and "not found" not in error.message:
                raise
            self._say(f"Couldn't find model '{command.args[0]}'")
            self.opts = previous

    def _save(self, command: Command) -> None:
        if len(command.args) != 1:
            self._say("Usage:\n  /save <modelname>")
            return
        name = command.args[0]
        try:
            ModelName.parse(name)
        except BadRequestError:
            self._say(f"error: The model name '{name}' is invalid")
            return
        opts = self.opts
        body: dict[str, Any] = {"model": name, "from": opts.parent_model or opts.model}
        if opts.system:
            body["system"] = opts.system
        if opts.options:
            body["parameters"] = opts.options
        if opts.loaded_messages or opts.messages:
            body["messages"] = opts.loaded_messages + opts.messages
        for _ in self.client.stream("/api/create", body):
            pass
        self._say(f"Created new model '{name}'")

    def _clear(self, command: Command) -> None:
        self.opts.messages = [{"role": "system", "content": self.opts.system}] if self.opts.system else []
        self._say("Cleared session context")

    def _list(self, command: Command) -> None:
        self.out.write(list_table((self.client.get("/api/tags") or {}).get("models") or [], "".join(command.args[:1])))


def apply_show(opts: RunOptions, info: dict[str, Any], *, think_set: bool) -> None:
    """Take what a model's ``/api/show`` says into the session, as Ollama does on run and /load."""
    details = info.get("details") or {}
    opts.parent_model = str(details.get("parent_model") or "")
    opts.loaded_messages = [dict(m) for m in info.get("messages") or [] if isinstance(m, dict)]
    opts.vision = "vision" in (info.get("capabilities") or [])
    if not think_set:
        opts.think = True if "thinking" in (info.get("capabilities") or []) else None
