"""``mullama tui`` in a real terminal: tmux runs it detached, ``send-keys`` types, ``capture-pane`` reads the screen.

The daemon is a real in-process one with the test model; each test starts
the TUI in its own tmux server (its own socket, no user configuration).
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import create_model, environment
from ui_daemon import MODEL, PULL_NAME, UIDaemon, ui_daemon

#: Seconds a screen condition may take: answers on a shared two-core machine are slow.
WAIT = 120.0


@pytest.fixture(scope="module")
def daemon(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIDaemon]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is missing: apt-get install tmux (.ci/run does)")
    with ui_daemon(model_path, tmp_path_factory.mktemp("tui")) as started:
        create_model(started.port, model_path, "long", parameters={"num_thread": 1, "num_predict": 4000})
        yield started


class Terminal:
    """``mullama tui ARGS`` in a detached tmux session of ``width`` x ``height``."""

    def __init__(self, daemon: UIDaemon, tmp: Path, *args: str, width: int = 80, height: int = 24) -> None:
        self.socket = f"mullama-tui-{tmp.name}"
        self.env = environment(tmp, daemon.port)
        self.errors = tmp / "tui.err"
        command = " ".join(shlex.quote(part) for part in (sys.executable, "-m", "mullama", "tui", *args))
        self.tmux("new-session", "-d", "-s", "tui", "-x", str(width), "-y", str(height),
                  f"{command} 2>{shlex.quote(str(self.errors))}")

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a tmux command on this terminal's server."""
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], env=self.env,
                              capture_output=True, text=True, timeout=30, check=False)

    def screen(self) -> str:
        """The visible screen as text."""
        return self.tmux("capture-pane", "-p", "-t", "tui").stdout

    def keys(self, *keys: str) -> None:
        """Press tmux key names (``Enter``, ``Tab``, ``C-c``, ``Down``...)."""
        self.tmux("send-keys", "-t", "tui", *keys)

    def type(self, text: str) -> None:
        """Type ``text`` literally."""
        self.tmux("send-keys", "-t", "tui", "-l", text)

    def wait(self, condition: str | Callable[[str], Any]) -> str:
        """Wait until the screen shows ``condition`` (text, or a predicate on the screen); return the screen."""
        test = condition if callable(condition) else (lambda screen: condition in screen)
        deadline = time.monotonic() + WAIT
        while True:
            screen = self.screen()
            if test(screen):
                return screen
            if time.monotonic() > deadline:
                errors = self.errors.read_text() if self.errors.exists() else ""
                pytest.fail(f"the screen never showed {condition!r}:\n{screen}\n{errors}")
            time.sleep(0.05)

    def alive(self) -> bool:
        """Whether the TUI still runs (its session ends when it exits)."""
        return self.tmux("has-session", "-t", "tui").returncode == 0

    def close(self) -> None:
        """End the tmux server."""
        self.tmux("kill-server")


@pytest.fixture
def terminal(daemon: UIDaemon, tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(*args: str, **size: int) -> Terminal:
        started.append(Terminal(daemon, tmp_path, *args, **size))
        return started[-1]

    yield start
    for term in started:
        term.close()


def api(daemon: UIDaemon, method: str, path: str, body: Any = None) -> Any:
    """A JSON call that must succeed."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body))
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    assert response.status == 200, data
    return json.loads(data) if data.strip() else None


def answer_after(screen: str, model: str) -> str:
    """The first line of the answer under the ``model`` heading, or ''."""
    lines = screen.splitlines()
    return lines[lines.index(model) + 1].strip() if model in lines[:-1] else ""


def test_chat_streams_an_answer_with_its_speed(daemon: UIDaemon, terminal: Callable[..., Terminal]) -> None:
    term = terminal(MODEL)
    term.wait("Model: smol:latest")
    term.type("Say hello.")
    term.keys("Enter")
    screen = term.wait(re.compile(r"\d+ tokens · [\d.]+ tokens/s").search)
    lines = screen.splitlines()
    assert lines[lines.index("You") + 1].strip() == "Say hello." and answer_after(screen, "smol:latest")
    assert lines[-2] == ">"  # the input line, emptied once sent
    term.keys("Tab", "Tab", "Tab")
    term.wait(re.compile(r"last answer\s+\d+ tokens · [\d.]+ tokens/s \(smol:latest\)").search)
    # The hourly statistics catch up with the daemon's (which count a request just after its answer ends).
    screen = term.wait(lambda text: hourly_matches(text, api(daemon, "GET", "/api/stats?since=24h")["total"]))
    assert "HOUR" in screen and "No requests yet." not in screen


HOUR_ROW = re.compile(r"^  \w{3} \d\d \d\d:00\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\S+$", re.MULTILINE)


def hourly_matches(screen: str, total: dict[str, Any]) -> bool:
    """Whether the Stats view shows ``total`` (a ``/api/stats`` total) and hour rows adding up to it."""
    rows = [tuple(map(int, match)) for match in HOUR_ROW.findall(screen)]
    sums = tuple(sum(column) for column in zip(*rows)) if rows else (0, 0, 0, 0)
    expected = (total["requests"], total["errors"], total["prompt_tokens"], total["generated_tokens"])
    return (total["requests"] > 0 and sums == expected
            and re.search(rf"Last 24 hours: {total['requests']} requests?, {total['errors']} failed", screen) is not None)


def test_ctrl_c_stops_the_answer_then_quits(daemon: UIDaemon, terminal: Callable[..., Terminal]) -> None:
    term = terminal("long")
    term.wait("Model: long:latest")
    term.type("Tell me a very long story about a lighthouse keeper.")
    term.keys("Enter")
    term.wait("answering… Ctrl-C stops")
    term.wait(lambda screen: answer_after(screen, "long:latest"))
    term.keys("C-c")
    term.wait("[stopped]")
    deadline = time.monotonic() + 60
    while any(model["active"] for model in api(daemon, "GET", "/api/ps")["models"]):
        assert time.monotonic() < deadline, "the daemon kept generating after Ctrl-C"
        time.sleep(0.1)
    assert term.alive()
    term.keys("C-c")
    deadline = time.monotonic() + 30
    while term.alive():
        assert time.monotonic() < deadline, "a second Ctrl-C did not quit"
        time.sleep(0.05)


def test_models_view_lists_copies_deletes_and_pulls(daemon: UIDaemon, terminal: Callable[..., Terminal]) -> None:
    term = terminal(MODEL)
    term.wait("Model: smol:latest")
    term.keys("Tab")
    term.wait(re.compile(r"smol:latest\s+98 MB llama\s+134.52M\s+Q4_1\s+completion").search)
    term.keys("?")
    term.wait("any key closes this help")
    term.keys("Space")
    term.wait("p pull · c copy")

    names = [model["name"] for model in api(daemon, "GET", "/api/tags")["models"]]
    term.keys(*["Down"] * names.index("smol:latest"), "c")
    term.wait("Copy smol:latest to:")
    term.type("tui-copy")
    term.keys("Enter")
    term.wait("Copied smol:latest to tui-copy.")
    names = [model["name"] for model in api(daemon, "GET", "/api/tags")["models"]]
    assert "tui-copy:latest" in names and "tui-copy:latest" in term.screen()
    term.keys(*["Up"] * len(names), *["Down"] * names.index("tui-copy:latest"), "d")
    term.wait("Delete tui-copy:latest? (y/n)")
    term.keys("y")
    term.wait("Deleted tui-copy:latest.")
    assert "tui-copy" not in "\n".join(term.screen().splitlines()[:-1])
    assert "tui-copy:latest" not in [model["name"] for model in api(daemon, "GET", "/api/tags")["models"]]

    daemon.hub.state.delay = 0.02
    try:
        term.keys("p")
        term.type(PULL_NAME)
        term.keys("Enter")
        term.wait(re.compile(r"\d+% \[#*\s*\] [\d.]+ MB/98 MB [\d.]+ [KM]B/s \d+s left").search)
        term.keys("x")
        term.wait("Pull cancelled.")
    finally:
        daemon.hub.state.delay = 0.0
    term.keys("p")
    term.type(PULL_NAME)
    term.keys("Enter")
    term.wait(f"Pulled {PULL_NAME}.")
    assert PULL_NAME in term.screen()
    api(daemon, "DELETE", "/api/delete", {"model": PULL_NAME})


def test_running_view_shows_the_loaded_model_and_unloads_it(daemon: UIDaemon,
                                                            terminal: Callable[..., Terminal]) -> None:
    for loaded in api(daemon, "GET", "/api/ps")["models"]:
        api(daemon, "POST", "/api/generate", {"model": loaded["name"], "keep_alive": 0})
    api(daemon, "POST", "/api/generate", {"model": MODEL, "keep_alive": "10m"})
    term = terminal(MODEL)
    term.wait("Model: smol:latest")
    term.keys("Tab", "Tab")
    term.wait(re.compile(r"smol:latest\s+\d+ MB\s+\d+\s+0/1\s+0\s+(10|9) minutes from now").search)
    term.keys("u")
    term.wait("No model is loaded.")
    term.wait("Unloaded smol:latest.")
    assert api(daemon, "GET", "/api/ps")["models"] == []


def test_resizing_redraws_the_screen(terminal: Callable[..., Terminal]) -> None:
    term = terminal(MODEL)
    term.wait("Model: smol:latest")
    term.tmux("resize-window", "-t", "tui", "-x", "100", "-y", "30")
    screen = term.wait(lambda text: len(text.splitlines()) == 30 and "Ctrl-C quit" in text.splitlines()[-1])
    assert screen.splitlines()[0].startswith(" 1 Chat")
    term.tmux("resize-window", "-t", "tui", "-x", "40", "-y", "10")
    term.wait(lambda text: len(text.splitlines()) == 10 and text.splitlines()[-1].startswith("Enter send"))
