"""``mullama chat``, the session's history file, and ``run`` of embedding models (``--truncate``, ``--dimensions``)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import cli, serve
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import wait_until_reading

from mullama.cli import main
from mullama.cli.interactive import DEFAULT_MODEL, HISTORY_LIMIT, History, last_model, remember_model
from mullama.cli.verbs import float32_json

# The history file ----------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path))
    for name in ("MULLAMA_NOHISTORY", "OLLAMA_NOHISTORY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_history_is_saved_line_by_line_in_the_data_directory(home):
    history = History.open()
    assert (history.path, history.enabled, history.lines) == (home / "history", True, [])
    history.add("why is the sky blue?")
    history.add("   ")
    history.add("/set verbose ")
    assert (home / "history").read_text() == "why is the sky blue?\n/set verbose\n"
    assert (home / "history").stat().st_mode & 0o777 == 0o600
    assert History.open().lines == ["why is the sky blue?", "/set verbose"]


def test_history_keeps_the_last_hundred_lines(home):
    (home / "history").write_text("".join(f"line {i}\n\n" for i in range(150)))
    history = History.open()
    assert history.lines == [f"line {i}" for i in range(50, 150)]
    history.add("one more")
    assert (home / "history").read_text().splitlines() == [f"line {i}" for i in range(51, 150)] + ["one more"]
    assert len(History.open().lines) == HISTORY_LIMIT


def test_lines_typed_with_history_off_are_never_written(home):
    history = History.open()
    history.add("kept")
    history.enabled = False
    history.add("secret")
    history.enabled = True
    history.add("kept too")
    assert (home / "history").read_text() == "kept\nkept too\n"


@pytest.mark.parametrize(("variable", "value", "enabled"), [
    ("OLLAMA_NOHISTORY", "1", False), ("MULLAMA_NOHISTORY", "true", False), ("OLLAMA_NOHISTORY", "yes", False),
    ("OLLAMA_NOHISTORY", "0", True), ("MULLAMA_NOHISTORY", "false", True), ("OLLAMA_NOHISTORY", "", True),
    ("OLLAMA_NOHISTORY", "'F'", True),
])
def test_nohistory_is_read_as_ollama_reads_it(home, monkeypatch, variable, value, enabled):
    monkeypatch.setenv(variable, value)
    history = History.open()
    assert history.enabled is enabled
    history.add("hello")
    assert (home / "history").exists() is enabled


def test_mullama_nohistory_comes_before_ollamas(home, monkeypatch):
    monkeypatch.setenv("OLLAMA_NOHISTORY", "1")
    monkeypatch.setenv("MULLAMA_NOHISTORY", "0")
    assert History.open().enabled


def test_the_last_model_is_remembered_else_the_default(home):
    assert last_model() == DEFAULT_MODEL == "smollm2:135m"
    remember_model("qwen2.5:0.5b")
    assert last_model() == "qwen2.5:0.5b"
    assert (home / "last-model").read_text() == "qwen2.5:0.5b\n"


# Embedding output ------------------------------------------------------------


# What Go's json.Marshal writes for these float32 values.
@pytest.mark.parametrize(("value", "text"), [
    (0.0, "0"), (-0.0, "-0"), (1.0, "1"), (0.1, "0.1"), (-0.012345678918063641, "-0.012345679"), (1e-7, "1e-7"),
    (2.5e-7, "2.5e-7"), (1e-6, "0.000001"), (1.5e-5, "0.000015"), (123456.789, "123456.79"), (1e20, "100000000000000000000"),
    (1e21, "1e+21"), (3.4028234663852886e38, "3.4028235e+38"), (16777217.0, "16777216"),
])
def test_vectors_print_as_go_prints_float32(value, text):
    assert float32_json([value]) == f"[{text}]"


def _single(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


@settings(max_examples=500)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_a_printed_float32_reads_back_with_no_digit_to_spare(value):
    (parsed,) = json.loads(float32_json([value]), parse_float=str, parse_int=str)
    assert _single(float(parsed)) == value
    digits = parsed.lstrip("-").split("e")[0].replace(".", "").strip("0")
    if len(digits) > 1:
        assert _single(float(f"{value:.{len(digits) - 2}e}")) != value


@pytest.mark.parametrize(("args", "error"), [
    (["--dimensions", "abc"], 'invalid argument "abc" for "--dimensions" flag: strconv.ParseInt: parsing "abc": invalid syntax'),
    (["--truncate=maybe"], 'invalid argument "maybe" for "--truncate" flag: strconv.ParseBool: parsing "maybe": invalid syntax'),
])
def test_bad_embedding_flags(capsys, monkeypatch, args, error):
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:1")
    assert main(["run", "m", *args, "hello"]) == 1
    assert capsys.readouterr().err == f"Error: {error}\n"


def test_chat_takes_no_prompt(capsys, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:1")
    assert main(["chat", "m", "hello"]) == 1
    assert capsys.readouterr().err == "Error: unrecognized arguments: hello\n"


# Against a live daemon ---------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[dict[str, str]]:
    serving = serve(tmp_path_factory.mktemp("daemon"))
    yield serving.env
    serving.stop(signal.SIGINT)


def _create(env: dict[str, str], name: str, modelfile: str, directory: Path, *flags: str) -> None:
    recipe = directory / "Modelfile"
    recipe.write_text(modelfile)
    result = cli(env, "create", name, "-f", str(recipe), *flags)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def default_model(daemon, model_path, tmp_path_factory) -> str:
    """The test GGUF under the default model's name, so ``chat`` finds it without a download."""
    _create(daemon, DEFAULT_MODEL, f"FROM {model_path}\nPARAMETER num_predict 4\nPARAMETER temperature 0\n"
            "PARAMETER num_ctx 512\nSYSTEM You are the default.\n", tmp_path_factory.mktemp("default"))
    return DEFAULT_MODEL


@pytest.fixture(scope="module")
def other_model(daemon, model_path, tmp_path_factory) -> str:
    _create(daemon, "other", f"FROM {model_path}\nPARAMETER num_predict 4\nPARAMETER temperature 0\n"
            "PARAMETER num_ctx 512\nSYSTEM You are the other one.\n", tmp_path_factory.mktemp("other"))
    return "other"


class Terminal:
    """``mullama ARGS`` on a pseudo-terminal of its own, typed at like a person would."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        master, slave = pty.openpty()

        def own_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen([sys.executable, "-m", "mullama", *args], env=env, stdin=slave, stdout=slave,
                                        stderr=slave, preexec_fn=own_terminal)
        os.close(slave)
        self.master = master
        self.seen = b""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait for ``text``; return what came before it."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
            assert ready, f"no {text!r} in {self.seen[-400:]!r}"
            self.seen += os.read(self.master, 4096)
        before, _, self.seen = self.seen.partition(text.encode())
        return before.decode(errors="replace")

    def send(self, keys: str) -> None:
        """Type ``keys`` and Enter once the session waits for input."""
        wait_until_reading(self.process.pid)
        os.write(self.master, keys.encode() + b"\r")

    def close(self) -> int:
        """End the session with /bye; its exit status."""
        try:
            self.send("/bye")
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.master)


def _env(daemon: dict[str, str], home: Path, **extra: str) -> dict[str, str]:
    """The daemon's environment with a CLI data directory of the test's own."""
    return daemon | {"MULLAMA_HOME": str(home)} | extra


def test_chat_opens_the_default_model_then_the_last_one_used(daemon, default_model, other_model, tmp_path):
    env = _env(daemon, tmp_path)
    session = Terminal(env, "chat")
    session.expect(">>> ")
    session.send("/show system")
    assert "You are the default." in session.expect(">>> ")
    session.send(f"/load {other_model}")
    assert f"Loading model '{other_model}'" in session.expect(">>> ")
    assert session.close() == 0
    assert (tmp_path / "last-model").read_text() == "other\n"

    session = Terminal(env, "chat")
    session.expect(">>> ")
    session.send("/show system")
    assert "You are the other one." in session.expect(">>> ")
    assert session.close() == 0

    assert cli(env, "run", default_model, "Hi").returncode == 0
    assert (tmp_path / "last-model").read_text() == f"{default_model}\n"
    session = Terminal(env, "chat", other_model)
    session.expect(">>> ")
    session.send("/show system")
    assert "You are the other one." in session.expect(">>> ")
    assert session.close() == 0


def test_chat_of_a_missing_model_says_so(daemon, tmp_path):
    (tmp_path / "last-model").write_text("no-such-model\n")
    result = cli(_env(daemon, tmp_path), "chat")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith('Error: model "no-such-model:latest" is not in')


def test_the_session_keeps_its_history_and_recalls_it(daemon, default_model, tmp_path):
    env = _env(daemon, tmp_path)
    session = Terminal(env, "chat", default_model)
    session.expect(">>> ")
    session.send("/set system You are a parrot.")
    session.expect(">>> ")
    session.send("/set nohistory")
    session.expect(">>> ")
    session.send("/show license")
    session.expect(">>> ")
    session.send("/set history")
    session.expect(">>> ")
    session.send("/show system")
    assert "You are a parrot." in session.expect(">>> ")
    assert session.close() == 0
    assert (tmp_path / "history").read_text() == "/set system You are a parrot.\n/set nohistory\n/show system\n/bye\n"

    # A new session finds the lines under the arrow keys: two up is "/show system".
    session = Terminal(env, "chat", default_model)
    session.expect(">>> ")
    session.send("/set system You are a robot.")
    session.expect(">>> ")
    session.send("\x1b[A\x1b[A\x1b[A")
    assert "You are a robot." in session.expect(">>> ")
    assert session.close() == 0
    assert (tmp_path / "history").read_text().splitlines()[-3:] == ["/set system You are a robot.", "/show system", "/bye"]


@pytest.mark.parametrize("variable", ["OLLAMA_NOHISTORY", "MULLAMA_NOHISTORY"])
def test_nohistory_keeps_the_file_as_it_was(daemon, default_model, tmp_path, variable):
    (tmp_path / "history").write_text("/show system\n")
    session = Terminal(_env(daemon, tmp_path, **{variable: "1"}), "chat", default_model)
    session.expect(">>> ")
    session.send("/show license")
    session.expect(">>> ")
    session.send("\x1b[A\x1b[A")
    assert "You are the default." in session.expect(">>> ")
    assert session.close() == 0
    assert (tmp_path / "history").read_text() == "/show system\n"


# Embedding models ----------------------------------------------------------------


def _with_pooling(source: Path, target: Path) -> None:
    """Copy a llama GGUF, adding ``llama.pooling_type`` = mean, which makes it an embedding model."""
    data = source.read_bytes()
    pos = 24
    (kv_count,) = struct.unpack_from("<Q", data, 16)
    (tensor_count,) = struct.unpack_from("<Q", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(at: int) -> int:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]

    def value(at: int, kind: int) -> int:
        if kind == 8:
            return string(at)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            for _ in range(count):
                at = value(at, item)
            return at
        return at + sizes[kind]

    for _ in range(kv_count):
        at = string(pos)
        pos = value(at + 4, struct.unpack_from("<I", data, at)[0])
    kv_end = tensors = pos
    for _ in range(tensor_count):
        at = string(tensors)
        (dims,) = struct.unpack_from("<I", data, at)
        tensors = at + 4 + 8 * dims + 4 + 8
    data_start = -(-tensors // 32) * 32
    key = b"llama.pooling_type"
    header = data[:16] + struct.pack("<Q", kv_count + 1) + data[24:kv_end]
    header += struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 1) + data[kv_end:tensors]
    target.write_bytes(header + b"\0" * (-len(header) % 32) + data[data_start:])


@pytest.fixture(scope="module")
def embedder(daemon, model_path, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("embedder")
    _with_pooling(model_path, directory / "embedder.gguf")
    _create(daemon, "embedder", f"FROM {directory / 'embedder.gguf'}\nPARAMETER num_ctx 64\n", directory)
    return "embedder"


def _vector(result: subprocess.CompletedProcess[str]) -> list[float]:
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("[")
    return json.loads(result.stdout)


def test_run_prints_an_embedding(daemon, embedder):
    vector = _vector(cli(daemon, "run", embedder, "The sky is blue"))
    assert len(vector) == 576
    assert math.isclose(sum(x * x for x in vector), 1, rel_tol=1e-4)
    assert cli(daemon, "run", embedder, "The", "sky", "is", "blue").stdout == cli(daemon, "run", embedder, stdin="The sky is blue").stdout


def test_run_dimensions_keeps_the_first_ones_renormalised(daemon, embedder):
    full = _vector(cli(daemon, "run", embedder, "The sky is blue"))
    short = _vector(cli(daemon, "run", embedder, "--dimensions", "8", "The sky is blue"))
    assert len(short) == 8
    assert math.isclose(sum(x * x for x in short), 1, rel_tol=1e-4)
    scale = math.sqrt(sum(x * x for x in full[:8]))
    assert all(math.isclose(a, b / scale, rel_tol=1e-3, abs_tol=1e-6) for a, b in zip(short, full))
    assert len(_vector(cli(daemon, "run", embedder, "--dimensions=0", "The sky is blue"))) == 576


def test_run_truncate_false_refuses_a_long_input(daemon, embedder):
    long = " ".join(["word"] * 200)
    assert len(_vector(cli(daemon, "run", embedder, long))) == 576
    assert len(_vector(cli(daemon, "run", embedder, "--truncate", long))) == 576
    refused = cli(daemon, "run", embedder, "--truncate=false", long)
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: ") and refused.stderr.count("\n") == 1
    assert "context" in refused.stderr


def test_embedding_models_need_input(daemon, embedder):
    result = cli(daemon, "run", embedder)
    assert (result.returncode, result.stderr) == (
        1, f'Error: embedding models require input text. Usage: mullama run {embedder} "your text here"\n')
