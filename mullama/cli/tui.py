"""``mullama tui``: the daemon in a terminal — chat, models, running models, statistics.

Standard-library ``curses`` over the daemon's public HTTP API (through
:class:`mullama.client.Client`), so it works against any daemon the CLI can
reach.  One thread draws and reads keys; requests that stream (a chat
answer, a pull) run in a worker thread that hands each update to the
drawing thread through a queue, since curses is not thread-safe.
"""

from __future__ import annotations

import curses
import queue
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mullama.cli.format import human_bytes, human_time, parse_time, text_width
from mullama.cli.stats import human_latency
from mullama.client import Client
from mullama.errors import MullamaError

VIEWS = ("Chat", "Models", "Running", "Stats")
#: Seconds between refreshes of /api/ps while the Running or Stats view shows.
REFRESH_SECONDS = 2.0
_CTRL_C, _CTRL_N, _ESC = "\x03", "\x0e", "\x1b"
_ENTER = ("\n", "\r", curses.KEY_ENTER)
_BACKSPACE = ("\x7f", "\b", curses.KEY_BACKSPACE)

HELP = """\
Keys                                   (any key closes this help)

  Tab / Shift-Tab    next / previous view (1-4 outside Chat)
  ?  or  F1          this help (in Chat: ? with an empty line)
  Ctrl-C             stop the answer or the pull; else quit
  q                  quit (outside Chat)

Chat      type, Enter sends; F2 next model; Ctrl-N new chat;
          PgUp / PgDn scroll
Models    Up/Down select; Enter chat with it; p pull; x cancel
          the pull; c copy; d delete; r refresh
Running   Up/Down select; u unload; r refresh
Stats     loaded models, slots, queue and memory; speed of the
          last answer; requests, tokens and latency per hour
          over the last 24 hours (the daemon's /api/stats)"""


@dataclass
class Message:
    """One turn of the chat as shown."""

    role: str
    content: str = ""
    thinking: str = ""
    note: str = ""


@dataclass
class Prompt:
    """A question on the input line: text to type, or (``confirm``) a y/n answer."""

    label: str
    on_answer: Callable[[str], None]
    text: str = ""
    confirm: bool = False


@dataclass
class Job:
    """A streaming request in a worker thread; ``cancel`` asks it to stop."""

    kind: str
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Transfer:
    """A pull's progress: bytes and recent samples for speed and time left."""

    status: str = ""
    total: int = 0
    completed: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def update(self, event: dict[str, Any]) -> None:
        """Take one event of /api/pull's stream."""
        self.status = str(event.get("status") or "")
        if event.get("total"):
            self.total, self.completed = int(event["total"]), int(event.get("completed") or 0)
            now = time.monotonic()
            self.samples = [(t, v) for t, v in self.samples if now - t <= 5.0] + [(now, self.completed)]

    def line(self, width: int) -> str:
        """``status 42% [####    ] 41 MB/98 MB 12 MB/s 5s left`` fitted to ``width``."""
        if not self.total:
            return self.status
        (start, first), (end, last) = self.samples[0], self.samples[-1]
        rate = (last - first) / (end - start) if end - start >= 0.5 else 0.0
        tail = f" {human_bytes(self.completed)}/{human_bytes(self.total)}"
        if rate > 0:
            tail += f" {human_bytes(int(rate))}/s {int((self.total - self.completed) / rate)}s left"
        percent = self.completed / self.total
        head = f"{self.status} {percent:4.0%} "
        room = max(width - len(head) - len(tail) - 2, 0)
        return f"{head}[{'#' * int(room * percent):<{room}}]{tail}"


class Tui:
    """The application: state, key handling and drawing."""

    def __init__(self, client: Client, model: str = "") -> None:
        self.client = client
        self.view = 0
        self.models: list[dict[str, Any]] = []
        self.chat_models: list[str] = []
        self.model = model
        self.selected = 0
        self.running: list[dict[str, Any]] = []
        self.running_selected = 0
        self.running_at = 0.0
        self.messages: list[Message] = []
        self.input = ""
        self.scroll = 0
        self.status = ""
        self.help = False
        self.prompt: Prompt | None = None
        self.job: Job | None = None
        self.transfer: Transfer | None = None
        self.last_speed = ""
        #: The last ``/api/stats?since=24h&by=hour`` answer, or why it could not be read.
        self.hourly: dict[str, Any] = {}
        self.hourly_error = ""
        self.quit = False
        self._updates: queue.Queue[Callable[[], None]] = queue.Queue()

    # --- the loop -----------------------------------------------------------

    def run(self, screen: Any) -> None:
        """Draw and read keys until quit."""
        curses.raw()
        screen.timeout(100)
        try:
            curses.curs_set(1)
        except curses.error:
            pass
        self.refresh_models()
        while not self.quit:
            self._apply_updates()
            if VIEWS[self.view] in ("Running", "Stats") and time.monotonic() - self.running_at > REFRESH_SECONDS:
                self.refresh_running()
                if VIEWS[self.view] == "Stats":
                    self.refresh_hourly()
            self.draw(screen)
            try:
                key = screen.get_wch()
            except curses.error:
                continue
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                continue
            self.on_key(key)

    def post(self, update: Callable[[], None]) -> None:
        """Run ``update`` on the drawing thread (from a worker)."""
        self._updates.put(update)

    def _apply_updates(self) -> None:
        while True:
            try:
                self._updates.get_nowait()()
            except queue.Empty:
                return

    def start(self, kind: str, work: Callable[[Job], None]) -> None:
        """Run ``work`` in a worker thread as the one job under way."""
        job = Job(kind)
        self.job = job

        def body() -> None:
            try:
                work(job)
            except MullamaError as error:
                self.post(lambda message=error.message: self._failed(message))
            finally:
                self.post(lambda: setattr(self, "job", None))

        threading.Thread(target=body, daemon=True).start()

    def _failed(self, message: str) -> None:
        self.transfer = None
        self.status = f"Error: {message}"

    # --- daemon calls -------------------------------------------------------

    def call(self, action: Callable[[], Any]) -> Any:
        """Run a quick request; an error goes to the status line."""
        try:
            return action()
        except MullamaError as error:
            self.status = f"Error: {error.message}"
            return None

    def attempt(self, action: Callable[[], Any], done: str) -> bool:
        """Run a quick request whose answer is not needed; say ``done`` or the error on the status line."""
        try:
            action()
        except MullamaError as error:
            self.status = f"Error: {error.message}"
            return False
        self.status = done
        return True

    def refresh_models(self) -> None:
        """Read /api/tags and each model's capabilities."""
        answer = self.call(lambda: self.client.get("/api/tags"))
        if answer is None:
            return
        models = answer.get("models") or []
        for model in models:
            shown = self.call(lambda: self.client.post("/api/show", {"model": model["name"]})) or {}
            model["capabilities"] = shown.get("capabilities") or []
        self.models = models
        self.chat_models = [m["name"] for m in models if "completion" in m["capabilities"]]
        self.selected = min(self.selected, max(len(models) - 1, 0))
        if f"{self.model}:latest" in self.chat_models:
            self.model += ":latest"
        elif not self.model:
            self.model = self.chat_models[0] if self.chat_models else ""

    def refresh_running(self) -> None:
        """Read /api/ps."""
        self.running_at = time.monotonic()
        answer = self.call(lambda: self.client.get("/api/ps"))
        if answer is not None:
            self.running = answer.get("models") or []
            self.running_selected = min(self.running_selected, max(len(self.running) - 1, 0))

    def refresh_hourly(self) -> None:
        """Read the last 24 hours of statistics, per hour; a refusal (no scope, statistics off) is shown in the view."""
        try:
            self.hourly = self.client.get("/api/stats?since=24h&by=hour") or {}
            self.hourly_error = ""
        except MullamaError as error:
            self.hourly, self.hourly_error = {}, error.message

    # --- keys ---------------------------------------------------------------

    def on_key(self, key: str | int) -> None:
        """Handle one key."""
        if self.help:
            self.help = False
            return
        if key == _CTRL_C:
            if self.job is not None:
                self.job.cancel.set()
                self.status = "Stopping…"
            elif self.prompt is not None:
                self.prompt = None
            else:
                self.quit = True
            return
        if self.prompt is not None:
            self._prompt_key(key)
        elif key == "\t":
            self.view = (self.view + 1) % len(VIEWS)
        elif key == curses.KEY_BTAB:
            self.view = (self.view - 1) % len(VIEWS)
        elif key == curses.KEY_F1 or (key == "?" and not (VIEWS[self.view] == "Chat" and self.input)):
            self.help = True
        elif VIEWS[self.view] == "Chat":
            self._chat_key(key)
        elif key == "q":
            self.quit = True
        elif isinstance(key, str) and key in "1234":
            self.view = int(key) - 1
        elif VIEWS[self.view] == "Models":
            self._models_key(key)
        elif VIEWS[self.view] == "Running":
            self._running_key(key)
        if VIEWS[self.view] == "Running" and key in ("\t", curses.KEY_BTAB, "3"):
            self.refresh_running()

    def _prompt_key(self, key: str | int) -> None:
        prompt = self.prompt
        assert prompt is not None
        if prompt.confirm:
            self.prompt = None
            if key in ("y", "Y"):
                prompt.on_answer("y")
        elif key in _ENTER:
            self.prompt = None
            if prompt.text.strip():
                prompt.on_answer(prompt.text.strip())
        elif key == _ESC:
            self.prompt = None
        elif key in _BACKSPACE:
            prompt.text = prompt.text[:-1]
        elif isinstance(key, str) and key.isprintable():
            prompt.text += key

    def _chat_key(self, key: str | int) -> None:
        if key in _ENTER:
            self.send()
        elif key in _BACKSPACE:
            self.input = self.input[:-1]
        elif key == curses.KEY_F2 and self.chat_models and self.job is None:
            index = self.chat_models.index(self.model) + 1 if self.model in self.chat_models else 0
            self.model = self.chat_models[index % len(self.chat_models)]
        elif key == _CTRL_N and self.job is None:
            self.messages, self.scroll, self.status = [], 0, ""
        elif key == curses.KEY_PPAGE:
            self.scroll += 5
        elif key == curses.KEY_NPAGE:
            self.scroll = max(self.scroll - 5, 0)
        elif isinstance(key, str) and key.isprintable():
            self.input += key

    def _models_key(self, key: str | int) -> None:
        if key == curses.KEY_UP:
            self.selected = max(self.selected - 1, 0)
        elif key == curses.KEY_DOWN:
            self.selected = min(self.selected + 1, max(len(self.models) - 1, 0))
        elif key == "r":
            self.refresh_models()
        elif key == "p" and self.job is None:
            self.prompt = Prompt("Pull model: ", self.pull)
        elif key == "x" and self.job is not None and self.job.kind == "pull":
            self.job.cancel.set()
        elif self.models and key in _ENTER:
            name = self.models[self.selected]["name"]
            if name in self.chat_models and self.job is None:
                self.model, self.messages, self.view = name, [], 0
        elif self.models and key == "c":
            name = self.models[self.selected]["name"]
            self.prompt = Prompt(f"Copy {name} to: ", lambda new: self._copy(name, new))
        elif self.models and key == "d":
            name = self.models[self.selected]["name"]
            self.prompt = Prompt(f"Delete {name}? (y/n) ", lambda _: self._delete(name), confirm=True)

    def _running_key(self, key: str | int) -> None:
        if key == curses.KEY_UP:
            self.running_selected = max(self.running_selected - 1, 0)
        elif key == curses.KEY_DOWN:
            self.running_selected = min(self.running_selected + 1, max(len(self.running) - 1, 0))
        elif key == "r":
            self.refresh_running()
        elif key == "u" and self.running:
            name = self.running[self.running_selected]["name"]
            # Ollama's way to unload: a generate request with keep_alive 0.
            self.attempt(lambda: self.client.post("/api/generate", {"model": name, "keep_alive": 0}),
                         f"Unloaded {name}.")
            self.refresh_running()

    # --- actions --------------------------------------------------------------

    def _copy(self, source: str, destination: str) -> None:
        if self.attempt(lambda: self.client.post("/api/copy", {"source": source, "destination": destination}),
                        f"Copied {source} to {destination}."):
            self.refresh_models()

    def _delete(self, name: str) -> None:
        if self.attempt(lambda: self.client.delete("/api/delete", {"model": name}), f"Deleted {name}."):
            self.refresh_models()

    def send(self) -> None:
        """Send the input line as the next question and stream the answer."""
        text = self.input.strip()
        if not text or self.job is not None:
            return
        if not self.model:
            self.status = "No model can chat: pull one in the Models view."
            return
        self.input, self.scroll, self.status = "", 0, ""
        self.messages.append(Message("user", text))
        history = [{"role": m.role, "content": m.content} for m in self.messages]
        answer = Message("assistant")
        self.messages.append(answer)
        body = {"model": self.model, "messages": history, "stream": True}

        def work(job: Job) -> None:
            events = self.client.stream("/api/chat", body)
            try:
                for event in events:
                    if job.cancel.is_set():
                        break
                    delta = event.get("message") or {}
                    self.post(lambda d=delta: self._grow(answer, d))
                    if event.get("done"):
                        self.post(lambda e=event: self._finish(answer, e))
            finally:
                events.close()
            if job.cancel.is_set():
                self.post(lambda: self._stopped(answer))

        self.start("chat", work)

    def _grow(self, answer: Message, delta: dict[str, Any]) -> None:
        answer.content += str(delta.get("content") or "")
        answer.thinking += str(delta.get("thinking") or "")
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            answer.content += f"\n[tool call {function.get('name')}({function.get('arguments')})]"

    def _finish(self, answer: Message, event: dict[str, Any]) -> None:
        count, nanoseconds = int(event.get("eval_count") or 0), int(event.get("eval_duration") or 0)
        speed = f"{count / (nanoseconds / 1e9):.1f} tokens/s" if count and nanoseconds else ""
        answer.note = " · ".join(filter(None, [f"{count} tokens" if count else "", speed]))
        self.last_speed = f"{answer.note} ({self.model})"

    def _stopped(self, answer: Message) -> None:
        answer.note = "[stopped]"
        self.status = "Stopped."

    def pull(self, name: str) -> None:
        """Pull ``name`` with a progress line; ``x`` or Ctrl-C cancels."""
        self.transfer = Transfer(f"pulling {name}")

        def work(job: Job) -> None:
            events = self.client.stream("/api/pull", {"model": name, "stream": True})
            try:
                for event in events:
                    if job.cancel.is_set():
                        break
                    self.post(lambda e=event: self.transfer.update(e) if self.transfer else None)
            finally:
                events.close()
            outcome = "Pull cancelled." if job.cancel.is_set() else f"Pulled {name}."
            self.post(lambda: self._pulled(outcome))

        self.start("pull", work)
        self.status = ""

    def _pulled(self, outcome: str) -> None:
        self.transfer = None
        self.status = outcome
        self.refresh_models()

    # --- drawing --------------------------------------------------------------

    def draw(self, screen: Any) -> None:
        """Draw the whole screen."""
        height, width = screen.getmaxyx()
        screen.erase()
        if height < 5 or width < 20:
            _put(screen, 0, 0, "Terminal too small", width)
            screen.refresh()
            return
        x = 0
        for index, name in enumerate(VIEWS):
            label = f" {index + 1} {name} "
            _put(screen, 0, x, label, width - x, curses.A_REVERSE if index == self.view else curses.A_BOLD)
            x += len(label) + 1
        _put(screen, 0, x + 1, self.client.host.url, width - x - 1, curses.A_DIM)
        body = (height - 3, width)
        if self.help:
            for row, line in enumerate(HELP.splitlines()[: body[0]]):
                _put(screen, row + 1, 1, line, width - 1)
        else:
            {"Chat": self._draw_chat, "Models": self._draw_models, "Running": self._draw_running,
             "Stats": self._draw_stats}[VIEWS[self.view]](screen, *body)
        _put(screen, height - 1, 0, self._status_line(width).ljust(width - 1), width - 1, curses.A_REVERSE)
        label, text = self._input_line()
        line = label + text
        visible = line[-(width - 2):] if text_width(line) >= width - 1 else line
        _put(screen, height - 2, 0, visible, width - 1, curses.A_BOLD if self.prompt else 0)
        try:
            screen.move(height - 2, min(text_width(visible), width - 2))
        except curses.error:
            pass
        screen.refresh()

    def _input_line(self) -> tuple[str, str]:
        if self.prompt is not None:
            return self.prompt.label, self.prompt.text
        if VIEWS[self.view] == "Chat":
            return "> ", self.input
        return "", ""

    def _status_line(self, width: int) -> str:
        if self.transfer is not None:
            return self.transfer.line(width - 1)
        if self.job is not None and self.job.kind == "chat":
            return "answering… Ctrl-C stops"
        hints = {"Chat": "Enter send · F2 model · Ctrl-N new · Tab views · ? help · Ctrl-C quit",
                 "Models": "p pull · c copy · d delete · Enter chat · Tab views · ? help · q quit",
                 "Running": "u unload · r refresh · Tab views · ? help · q quit",
                 "Stats": "Tab views · ? help · q quit"}
        return self.status or hints[VIEWS[self.view]]

    def _draw_chat(self, screen: Any, rows: int, width: int) -> None:
        model = self.model or "no model can chat: pull one (Models view)"
        _put(screen, 1, 0, f"Model: {model}", width - 1, curses.A_BOLD)
        lines: list[tuple[str, int]] = []
        wrap = width - 3
        for message in self.messages:
            lines.append(("You" if message.role == "user" else self.model, curses.A_BOLD))
            for text in message.thinking.splitlines():
                lines += [(f"  │ {part}", curses.A_DIM) for part in textwrap.wrap(text, wrap - 4) or [""]]
            for text in message.content.splitlines() or ([""] if not message.note else []):
                lines += [(f"  {part}", 0) for part in textwrap.wrap(text, wrap, drop_whitespace=False) or [""]]
            if message.note:
                lines.append((f"  {message.note}", curses.A_DIM))
        space = rows - 1
        self.scroll = min(self.scroll, max(len(lines) - space, 0))
        end = len(lines) - self.scroll
        for row, (text, attribute) in enumerate(lines[max(end - space, 0):end]):
            _put(screen, row + 2, 0, text, width - 1, attribute)

    def _draw_models(self, screen: Any, rows: int, width: int) -> None:
        _put(screen, 1, 0, f"{'NAME':<30} {'SIZE':>7} {'FAMILY':<8} {'PARAMS':<8} {'QUANT':<7} CAPABILITIES", width - 1,
             curses.A_BOLD)
        if not self.models:
            _put(screen, 2, 0, "No models yet: press p to pull one.", width - 1)
        for index, model in enumerate(self.models[: rows - 1]):
            details = model.get("details") or {}
            line = (f"{model['name'][:30]:<30} {human_bytes(int(model.get('size') or 0)):>7} "
                    f"{str(details.get('family') or '')[:8]:<8} {str(details.get('parameter_size') or '')[:8]:<8} "
                    f"{str(details.get('quantization_level') or '')[:7]:<7} {','.join(model['capabilities'])}")
            _put(screen, index + 2, 0, line, width - 1, curses.A_REVERSE if index == self.selected else 0)

    def _draw_running(self, screen: Any, rows: int, width: int) -> None:
        _put(screen, 1, 0, f"{'NAME':<28} {'SIZE':>7} {'CONTEXT':>7} {'SLOTS':>6} {'QUEUED':>6}  UNTIL", width - 1,
             curses.A_BOLD)
        if not self.running:
            _put(screen, 2, 0, "No model is loaded.", width - 1)
        now = datetime.now(timezone.utc)
        for index, model in enumerate(self.running[: rows - 1]):
            slots = f"{model.get('active', 0)}/{model.get('num_parallel', 1)}"
            until = human_time(parse_time(model.get("expires_at")), "Never", now)
            line = (f"{model['name'][:28]:<28} {human_bytes(int(model.get('size') or 0)):>7} "
                    f"{model.get('context_length', ''):>7} {slots:>6} {model.get('queued', 0):>6}  {until}")
            _put(screen, index + 2, 0, line, width - 1, curses.A_REVERSE if index == self.running_selected else 0)

    def _draw_stats(self, screen: Any, rows: int, width: int) -> None:
        memory = sum(int(m.get("size") or 0) for m in self.running)
        lines = [
            ("Now", curses.A_BOLD),
            (f"  loaded models   {len(self.running)}", 0),
            (f"  memory          {human_bytes(memory)}", 0),
            (f"  slots in use    {sum(int(m.get('active') or 0) for m in self.running)}", 0),
            (f"  queued          {sum(int(m.get('queued') or 0) for m in self.running)}", 0),
            (f"  last answer     {self.last_speed or '-'}", 0),
            ("", 0),
            *self._hourly_lines(),
        ]
        for row, (text, attribute) in enumerate(lines[:rows]):
            _put(screen, row + 1, 0, text, width - 1, attribute)

    def _hourly_lines(self) -> list[tuple[str, int]]:
        """The last 24 hours: totals, then one line per hour that had requests, newest first."""
        if self.hourly_error:
            return [("Last 24 hours", curses.A_BOLD), (f"  {self.hourly_error}", 0)]
        total = self.hourly.get("total") or {}
        latency = total.get("latency_seconds") or {}
        requests = int(total.get("requests") or 0)
        lines = [(f"Last 24 hours: {requests} request{'' if requests == 1 else 's'}, {total.get('errors', 0)} failed, "
                  f"p50 {human_latency(latency.get('p50'))}", curses.A_BOLD),
                 (f"  {'HOUR':<12} {'REQUESTS':>8} {'FAILED':>6} {'PROMPT':>7} {'GENERATED':>9} {'P50':>6} {'P99':>6}",
                  curses.A_DIM)]
        for row in reversed(self.hourly.get("stats") or []):
            when = parse_time(row.get("hour"))
            hour = when.astimezone().strftime("%b %d %H:00") if when else "?"
            latency = row.get("latency_seconds") or {}
            lines.append((f"  {hour:<12} {row.get('requests', 0):>8} {row.get('errors', 0):>6} "
                          f"{row.get('prompt_tokens', 0):>7} {row.get('generated_tokens', 0):>9} "
                          f"{human_latency(latency.get('p50')):>6} {human_latency(latency.get('p99')):>6}", 0))
        if len(lines) == 2:
            lines.append(("  No requests yet.", 0))
        return lines


def _put(screen: Any, row: int, column: int, text: str, room: int, attribute: int = 0) -> None:
    """Write ``text`` cut to ``room`` columns; curses raises on the last cell, which is harmless here."""
    if room <= 0:
        return
    try:
        screen.addnstr(row, column, text, room, attribute)
    except curses.error:
        pass


def run(client: Client, model: str = "") -> int:
    """Run the TUI on this terminal until the user quits; the exit status."""
    app = Tui(client, model)
    curses.wrapper(app.run)
    return 0
