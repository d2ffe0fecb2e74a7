"""The ``mullama`` command line: its pure parts, then every verb against a live daemon."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from daemon import cli, environment, free_port, serve
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mullama import __version__

from mullama.store import modelfile
from mullama.cli import main
from mullama.cli.create import create_request
from mullama.cli.format import (
    format_table,
    go_duration,
    go_float,
    human_bytes,
    human_duration,
    human_number,
    human_time,
    list_table,
    parse_time,
    ps_table,
    show_info,
    timing_summary,
)
from mullama.cli.generate import Display, RunOptions
from mullama.cli.interactive import Command, Session, parse_command, read_entry
from mullama.cli.progress import Progress
from mullama.client import DEFAULT_PORT, Host, file_digest, parse_host

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


# Host parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "url"),
    [
        (None, Host("http", "127.0.0.1", DEFAULT_PORT), "http://127.0.0.1:11434"),
        ("", Host("http", "127.0.0.1", DEFAULT_PORT), "http://127.0.0.1:11434"),
        ("example.com", Host("http", "example.com", DEFAULT_PORT), "http://example.com:11434"),
        ("example.com:8080", Host("http", "example.com", 8080), "http://example.com:8080"),
        (":8080", Host("http", "127.0.0.1", 8080), "http://127.0.0.1:8080"),
        ("0.0.0.0", Host("http", "0.0.0.0", DEFAULT_PORT), "http://127.0.0.1:11434"),
        ("http://box", Host("http", "box", 80), "http://box:80"),
        ("https://box", Host("https", "box", 443), "https://box:443"),
        ("http://box:9/prefix/", Host("http", "box", 9, "/prefix"), "http://box:9/prefix"),
        ("[::1]:99", Host("http", "::1", 99), "http://[::1]:99"),
        ("::1", Host("http", "::1", DEFAULT_PORT), "http://[::1]:11434"),
        ("[::]:7", Host("http", "::", 7), "http://[::1]:7"),
        ("box:notaport", Host("http", "box", DEFAULT_PORT), "http://box:11434"),
        ("box:70000", Host("http", "box", DEFAULT_PORT), "http://box:11434"),
        ("  box:5  ", Host("http", "box", 5), "http://box:5"),
    ],
)
def test_parse_host(text, expected, url):
    host = parse_host(text)
    assert host == expected
    assert host.url == url


@pytest.mark.parametrize(("text", "local"), [("127.0.0.1", True), ("localhost", True), ("0.0.0.0", True), ("::1", True), ("10.0.0.2", False), ("example.com", False)])
def test_host_is_local(text, local):
    assert parse_host(text).is_local is local


_HOSTNAME = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)


@settings(max_examples=200)
@given(_HOSTNAME, st.integers(0, 65535), st.sampled_from(["", "http://", "https://"]))
def test_parse_host_round_trip(name, port, scheme):
    host = parse_host(f"{scheme}{name}:{port}")
    assert (host.scheme, host.host, host.port) == ((scheme[:-3] or "http"), name, port)


@settings(max_examples=300)
@given(st.text())
def test_parse_host_never_fails(text):
    host = parse_host(text)
    assert 0 <= host.port <= 65535
    assert host.host


# Human formats ------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"), (98_000_000, "98 MB"), (1_300_000_000, "1.3 GB"), (2_000_000_000, "2 GB"), (12_345_678_901_234, "12 TB")],
)
def test_human_bytes(size, text):
    assert human_bytes(size) == text


@settings(max_examples=300)
@given(st.integers(1000, 10**16))
def test_human_bytes_is_close(size):
    text = human_bytes(size)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9])?) (KB|MB|GB|TB)", text)
    assert match, text
    value = float(match[1]) * {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[match[2]]
    assert abs(value - size) / size < 0.1


@pytest.mark.parametrize(("count", "text"), [(999, "999"), (8_000, "8K"), (134_515_008, "134.52M"), (7_000_000_000, "7B"), (1_500_000_000, "1.5B")])
def test_human_number(count, text):
    assert human_number(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (150, "2 minutes"),
        (3599, "59 minutes"),
        (3600, "About an hour"),
        (5 * 3600, "5 hours"),
        (3 * 86400, "3 days"),
        (20 * 86400, "2 weeks"),
        (90 * 86400, "3 months"),
        (3 * 365 * 86400, "3 years"),
    ],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_human_time():
    assert human_time(NOW - timedelta(minutes=2), "Never", NOW) == "2 minutes ago"
    assert human_time(NOW + timedelta(minutes=4, seconds=30), "Never", NOW) == "4 minutes from now"
    assert human_time(NOW + timedelta(days=365 * 300), "Never", NOW) == "Forever"
    assert human_time(None, "Never", NOW) == "Never"


@settings(max_examples=200)
@given(st.integers(-(10**16), 10**16))
def test_human_time_direction(microseconds):
    text = human_time(NOW - timedelta(microseconds=microseconds), "Never", NOW)
    assert text.endswith(" ago") if microseconds >= 0 else (text.endswith(" from now") or text == "Forever")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-01T11:58:00.123456789Z", datetime(2025, 6, 1, 11, 58, 0, 123456, tzinfo=timezone.utc)),
        ("2025-06-01T13:58:00+02:00", datetime(2025, 6, 1, 11, 58, tzinfo=timezone.utc)),
        ("0001-01-01T00:00:00Z", None),
        ("yesterday", None),
        (None, None),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("nanoseconds", "text"),
    [(0, "0s"), (1, "1ns"), (1500, "1.5µs"), (250_000_000, "250ms"), (1_234_567_891, "1.234567891s"), (61_500_000_000, "1m1.5s"), (3600 * 10**9, "1h0m0s"), (-2 * 10**9, "-2s")],
)
def test_go_duration(nanoseconds, text):
    assert go_duration(nanoseconds) == text


def _parse_go_duration(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    scale = {"h": 3600 * 10**9, "m": 60 * 10**9, "s": 10**9, "ms": 10**6, "µs": 10**3, "ns": 1}
    total = 0
    for number, unit in re.findall(r"([0-9.]+)(h|ms|µs|ns|m|s)", text):
        whole, _, fraction = number.partition(".")
        digits = len(str(scale[unit])) - 1
        total += int(whole) * scale[unit] + (int(fraction.ljust(digits, "0")) if fraction else 0)
    return sign * total


@settings(max_examples=300)
@given(st.integers(-(10**15), 10**15))
def test_go_duration_round_trip(nanoseconds):
    assert _parse_go_duration(go_duration(nanoseconds)) == nanoseconds


@pytest.mark.parametrize(("value", "text"), [(131072, "131072"), (1e6, "1e+06"), (0.5, "0.5"), (1e-05, "1e-05"), (500000.0, "500000"), (1.5e7, "1.5e+07"), (0, "0")])
def test_go_float(value, text):
    assert go_float(value) == text


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_go_float_round_trip(value):
    assert float(go_float(value)) == value


# Tables and sections ------------------------------------------------------


def test_format_table_aligns_columns():
    text = format_table([["a", "bb", "c"], ["dddd", "e", "ffffff"]], ["NAME", "ID", "SIZE"])
    assert text == "NAME    ID    SIZE\na       bb    c\ndddd    e     ffffff\n"


@settings(max_examples=100)
@given(st.lists(st.lists(st.text("abcxyz09 .:-", min_size=1, max_size=8).map(str.strip).filter(bool), min_size=3, max_size=3), min_size=1, max_size=6))
def test_format_table_columns_start_together(rows):
    assume(all(" " not in cell for row in rows for cell in row))
    lines = format_table(rows, ["A", "B", "C"]).splitlines()
    starts = {tuple(m.start() for m in re.finditer(r"(?<=    )\S", line)) for line in lines}
    assert len(starts) == 1


def test_list_table():
    models = [
        {"name": "smol:latest", "digest": "b6273be170e6" + "0" * 52, "size": 98_000_000, "modified_at": (NOW - timedelta(minutes=2)).isoformat()},
        {"name": "Other:7b", "digest": "1234567890abcdef", "size": 4_100_000_000, "modified_at": "0001-01-01T00:00:00Z"},
    ]
    lines = list_table(models, now=NOW).splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert lines[1].split()[:4] == ["smol:latest", "b6273be170e6", "98", "MB"]
    assert lines[1].endswith("2 minutes ago")
    assert lines[2].split() == ["Other:7b", "1234567890ab", "4.1", "GB", "Never"]
    assert len(list_table(models, "oth", NOW).splitlines()) == 2


def test_ps_table():
    models = [
        {"name": "a:latest", "digest": "a" * 64, "size": 2000, "size_vram": 0, "context_length": 4096, "expires_at": (NOW + timedelta(minutes=4, seconds=30)).isoformat()},
        {"name": "b:latest", "digest": "b" * 64, "size": 2000, "size_vram": 2000, "context_length": 8192, "expires_at": (NOW - timedelta(seconds=1)).isoformat()},
        {"name": "c:latest", "digest": "c" * 64, "size": 1000, "size_vram": 250, "context_length": 2048, "expires_at": "0001-01-01T00:00:00Z"},
    ]
    lines = ps_table(models, now=NOW).splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert "100% CPU" in lines[1] and lines[1].endswith("4 minutes from now") and "4096" in lines[1]
    assert "100% GPU" in lines[2] and lines[2].endswith("Stopping...")
    assert "75%/25% CPU/GPU" in lines[3] and lines[3].endswith("Never")


SHOW = {
    "details": {"parameter_size": "134.52M", "quantization_level": "Q4_1", "family": "llama"},
    "model_info": {"general.architecture": "llama", "llama.context_length": 8192, "llama.embedding_length": 576, "tokenizer.ggml.tokens": ["<a>", "<b>", "<c>", "<d>"], "llama.rope.freq_base": 1e6},
    "capabilities": ["completion", "tools"],
    "parameters": 'temperature                    0.2\nstop                           "<|im_end|>"',
    "system": "line one\nline two\nline three",
    "license": "apache-2.0",
}


def test_show_info():
    assert show_info(SHOW) == (
        "  Model\n"
        "    architecture        llama\n"
        "    parameters          134.52M\n"
        "    context length      8192\n"
        "    embedding length    576\n"
        "    quantization        Q4_1\n"
        "\n"
        "  Capabilities\n"
        "    completion\n"
        "    tools\n"
        "\n"
        "  Parameters\n"
        "    temperature    0.2\n"
        '    stop           "<|im_end|>"\n'
        "\n"
        "  System\n"
        "    line one\n"
        "    line two\n"
        "    ...\n"
        "\n"
        "  License\n"
        "    apache-2.0\n"
        "\n"
    )


def test_show_info_verbose_metadata():
    text = show_info(SHOW, verbose=True)
    assert "  Metadata\n" in text
    assert re.search(r"llama\.rope\.freq_base\s+1e\+06\n", text)
    assert re.search(r"tokenizer\.ggml\.tokens\s+\[<a> <b> \.\.\.\+2 more\]\n", text)


def test_timing_summary():
    text = timing_summary({"total_duration": 1_500_000_000, "load_duration": 250_000_000, "prompt_eval_count": 10, "prompt_eval_duration": 500_000_000, "eval_count": 20, "eval_duration": 1_000_000_000})
    assert text == (
        "total duration:       1.5s\n"
        "load duration:        250ms\n"
        "prompt eval count:    10 token(s)\n"
        "prompt eval duration: 500ms\n"
        "prompt eval rate:     20.00 tokens/s\n"
        "eval count:           20 token(s)\n"
        "eval duration:        1s\n"
        "eval rate:            20.00 tokens/s\n"
    )
    assert timing_summary({"eval_count": "x"}) == ""


# Progress -----------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines():
    out = io.StringIO()
    progress = Progress(out)
    events = [
        {"status": "pulling manifest"},
        {"status": "pulling abc", "digest": "sha256:" + "ab" * 32, "total": 2_000_000, "completed": 0},
        {"status": "pulling abc", "digest": "sha256:" + "ab" * 32, "total": 2_000_000, "completed": 1_000_000},
        {"status": "pulling abc", "digest": "sha256:" + "ab" * 32, "total": 2_000_000, "completed": 2_000_000},
        {"status": "verifying sha256 digest"},
        {"status": "success"},
    ]
    for event in events:
        progress.update(event)
    progress.close()
    assert out.getvalue() == "pulling manifest\npulling abababababab: 2 MB\nverifying sha256 digest\nsuccess\n"


def test_progress_bar_on_a_terminal():
    out = _Terminal()
    progress = Progress(out)
    digest = "sha256:" + "cd" * 32
    progress.update({"status": "pulling manifest"})
    progress.update({"digest": digest, "total": 4_000_000_000, "completed": 1_000_000_000})
    progress.close()
    last_frame = out.getvalue().split("\r")[-1]
    assert "pulling manifest" in last_frame
    assert re.search(r"pulling cdcdcdcdcdcd:\s+25% ▕█+ +▏\s+1\.0 GB/4\.0 GB|pulling cdcdcdcdcdcd:\s+25% ▕█+ +▏\s+1 GB/\s*4 GB", last_frame)
    assert out.getvalue().endswith("\n")


# The interactive session --------------------------------------------------


def _reader(lines: list[str]):
    prompts: list[str] = []
    feed = iter(lines)

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read, prompts


def test_read_entry_single_and_multi_line():
    read, prompts = _reader(['"""first', "second", 'third"""', "after"])
    assert read_entry(read) == '"""first\nsecond\nthird"""'
    assert prompts == [">>> ", "... ", "... "]
    assert read_entry(read) == "after"
    read, _ = _reader(['"""one line"""'])
    assert parse_command(read_entry(read)) == Command("", text="one line")
    read, _ = _reader(['/set system """You are', 'a pirate."""'])
    assert parse_command(read_entry(read)) == Command("/set", ("system", '"""You', "are", 'a', 'pirate."""'), "You are\na pirate.")


_LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20).filter(lambda line: not line.endswith('"'))


@settings(max_examples=300)
@given(st.lists(_LINE, min_size=1, max_size=6))
def test_multi_line_round_trip(lines):
    typed = ['"""' + lines[0], *lines[1:-1], lines[-1] + '"""'] if len(lines) > 1 else ['"""' + lines[0], '"""']
    read, _ = _reader(typed)
    expected = "\n".join(lines) if len(lines) > 1 else lines[0] + "\n"
    assert parse_command(read_entry(read)) == Command("", text=expected)


@pytest.mark.parametrize(
    ("entry", "command"),
    [
        ("hello there", Command("", text="hello there")),
        ("", Command("", text="")),
        ("/bye", Command("/bye")),
        ("/set parameter temperature 0.5", Command("/set", ("parameter", "temperature", "0.5"))),
        ("/set   system   Be   brief.", Command("/set", ("system", "Be", "brief."), "Be brief.")),
        ("/show info", Command("/show", ("info",))),
        ("/", Command("/")),
        ('"""', Command("", text="")),
    ],
)
def test_parse_command(entry, command):
    assert parse_command(entry) == command


@settings(max_examples=500)
@given(st.text())
def test_parse_command_never_fails(entry):
    command = parse_command(entry)
    assert command.name == "" or command.name.startswith("/")


class _FakeClient:
    """Records requests; answers ``/api/show`` and streams a two-piece chat answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        return {"system": "model system", "parameters": "num_ctx 1024", "template": "{{ .Prompt }}"}

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.calls.append((path, json.loads(json.dumps(body))))
        yield {"message": {"role": "assistant", "thinking": "hmm"}, "done": False}
        yield {"message": {"role": "assistant", "content": "Ahoy"}, "done": False}
        yield {"message": {"role": "assistant", "content": "!"}, "done": True, "eval_count": 2, "eval_duration": 10**9}


def _session() -> tuple[Session, _FakeClient, io.StringIO, io.StringIO]:
    client, out, err = _FakeClient(), io.StringIO(), io.StringIO()
    return Session(client, RunOptions(model="smol"), out, err), client, out, err  # type: ignore[arg-type]


def test_session_settings():
    session, client, out, _ = _session()
    for line in [
        "/set parameter temperature 0.5",
        "/set parameter stop <a> <b>",
        "/set parameter temperature hot",
        "/set parameter nonsense 1",
        "/set system Be brief.",
        "/set system Be briefer.",
        "/set format json",
        "/set format xml",
        "/set think high",
        "/set verbose",
        "/set nowordwrap",
        "/set bogus",
        "/frobnicate",
    ]:
        assert session.handle(parse_command(line))
    opts = session.opts
    assert opts.options == {"temperature": 0.5, "stop": ["<a>", "<b>"]}
    assert opts.messages == [{"role": "system", "content": "Be briefer."}]
    assert (opts.system, opts.format, opts.think, opts.verbose, opts.wordwrap) == ("Be briefer.", "json", "high", True, False)
    said = out.getvalue().splitlines()
    assert said[:2] == ["Set parameter 'temperature' to '0.5'", "Set parameter 'stop' to '<a>, <b>'"]
    assert said[2].startswith("Couldn't set parameter:") and said[3].startswith("Couldn't set parameter:")
    assert "Invalid or missing format. For 'json' mode use '/set format json'" in said
    assert "Set 'think' mode to 'high'." in said
    assert said[-2:] == ["Unknown command '/set bogus'. Type /? for help", "Unknown command '/frobnicate'. Type /? for help"]
    assert client.calls == []
    assert not session.handle(parse_command("/bye"))


def test_session_chat_keeps_the_conversation():
    session, client, out, err = _session()
    session.handle(parse_command("/set system Be a pirate."))
    session.handle(parse_command("/set parameter num_predict 4"))
    session.handle(parse_command("/set verbose"))
    session.handle(parse_command("Hello"))
    path, body = client.calls[-1]
    assert path == "/api/chat"
    assert body["messages"] == [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hello"}]
    assert body["options"] == {"num_predict": 4}
    assert session.opts.messages[-1] == {"role": "assistant", "content": "Ahoy!", "thinking": "hmm"}
    grey, bold, reset = "\x1b[90m", "\x1b[1m", "\x1b[0m"
    thought = f"{grey}{bold}Thinking...\n{reset}{grey}hmm\n{grey}{bold}...done thinking.\n\n{reset}"
    assert out.getvalue().endswith(f"Set 'verbose' mode.\n{thought}Ahoy!\n\n")
    assert "eval count:           2 token(s)" in err.getvalue()
    session.handle(parse_command("/clear"))
    assert session.opts.messages == [{"role": "system", "content": "Be a pirate."}]


def test_session_show_and_save():
    session, client, out, _ = _session()
    session.handle(parse_command("/show system"))
    session.handle(parse_command("/show template"))
    assert out.getvalue() == "model system\n\n{{ .Prompt }}\n"
    session.handle(parse_command("/set parameter seed 7"))
    session.handle(parse_command("/save my-pirate"))
    path, body = client.calls[-1]
    assert (path, body) == ("/api/create", {"model": "my-pirate", "from": "smol", "parameters": {"seed": 7}})
    session.handle(parse_command("/save bad/name/with/too/many"))
    assert out.getvalue().endswith("error: The model name 'bad/name/with/too/many' is invalid\n")


# Word wrap ----------------------------------------------------------------


def _screen(text: str) -> list[str]:
    """Apply the few terminal codes Display writes (cursor left, erase to end of line)."""
    lines, column = [""], 0
    for piece in re.split(r"(\x1b\[[0-9]*[DK]|\n)", text):
        if piece == "\n":
            lines.append("")
            column = 0
        elif piece.endswith("D") and piece.startswith("\x1b"):
            column -= int(piece[2:-1])
        elif piece == "\x1b[K":
            lines[-1] = lines[-1][:column]
        elif piece:
            lines[-1] = lines[-1][:column] + piece + lines[-1][column + len(piece) :]
            column += len(piece)
    return lines


@settings(max_examples=200)
@given(st.lists(st.text("abcdefghij", min_size=1, max_size=12), min_size=1, max_size=40), st.integers(1, 7), st.integers(20, 60))
def test_word_wrap(words, chunk, width):
    text = " ".join(words)
    out = io.StringIO()
    display = Display(out, width=width)
    for start in range(0, len(text), chunk):
        display.show("", text[start : start + chunk])
    lines = _screen(out.getvalue())
    assert all(len(line) <= width - 5 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert all(len(word) > width - 10 or word in " ".join(lines).split() for word in words)


def test_no_wrap_without_width():
    out = io.StringIO()
    Display(out).show("", "x" * 500)
    assert out.getvalue() == "x" * 500


# create -------------------------------------------------------------------


def test_create_request(tmp_path):
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"GGUF fake weights")
    (tmp_path / "lora").mkdir()
    adapter = tmp_path / "lora" / "adapter.gguf"
    adapter.write_bytes(b"GGUF fake adapter")
    recipe = modelfile.parse(
        "FROM ./weights.gguf\nADAPTER lora/adapter.gguf\nPARAMETER temperature 0.2\nPARAMETER stop <a>\nPARAMETER stop <b>\n"
        'TEMPLATE "{{ .Prompt }}"\nSYSTEM Be brief.\nLICENSE MIT\nMESSAGE user Hi\nMESSAGE assistant Hello\n'
    )
    plan = create_request(recipe, tmp_path)
    weights_digest, adapter_digest = file_digest(weights), file_digest(adapter)
    assert plan.request == {
        "files": {"weights.gguf": weights_digest},
        "adapters": {"adapter.gguf": adapter_digest},
        "template": "{{ .Prompt }}",
        "system": "Be brief.",
        "parameters": {"temperature": 0.2, "stop": ["<a>", "<b>"]},
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "license": ["MIT"],
    }
    assert plan.uploads == {weights_digest: weights, adapter_digest: adapter}


def test_create_request_from_a_model_name(tmp_path):
    plan = create_request(modelfile.parse("FROM llama3.2:1b\nSYSTEM hi\n"), tmp_path)
    assert plan.request == {"from": "llama3.2:1b", "system": "hi"}
    assert plan.uploads == {}


def test_create_request_missing_adapter(tmp_path):
    from mullama.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no such file"):
        create_request(modelfile.parse("FROM x\nADAPTER ./missing.gguf\n"), tmp_path)


# Arguments and errors without a server ------------------------------------


def test_usage_errors_are_one_line(capsys):
    assert main(["run"]) == 1
    assert main(["show", "m", "--license", "--system"]) == 1
    assert main(["frobnicate"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("Error: ") for line in lines)


def test_bad_flag_values(capsys, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOST", "127.0.0.1:1")
    assert main(["run", "m", "--think=maybe", "hi"]) == 1
    assert main(["run", "m", "--keepalive", "soon", "hi"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        'Error: invalid value for --think: "maybe" (must be true, false, high, medium, low, or max)',
        'Error: time: invalid duration "soon"',
    ]


def test_remote_host_that_does_not_answer(capsys, monkeypatch):
    monkeypatch.setenv("MULLAMA_HOST", "http://192.0.2.1:9")
    monkeypatch.setattr("mullama.client.Client.heartbeat", lambda self, timeout=2.0: False)
    assert main(["list"]) == 1
    assert capsys.readouterr().err.startswith("Error: could not connect to a Mullama server at http://192.0.2.1:9")


# Against a live daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A ``mullama serve`` of its own; yields the environment that points the CLI at it."""
    serving = serve(tmp_path_factory.mktemp("daemon"))
    yield serving.env
    serving.stop(signal.SIGINT)


@pytest.fixture(scope="module")
def smol(daemon, model_path, tmp_path_factory) -> str:
    """A model created from the test GGUF with ``mullama create``, answering in a few tokens."""
    recipe = tmp_path_factory.mktemp("recipe") / "Modelfile"
    recipe.write_text(f"FROM {model_path}\nPARAMETER num_predict 6\nPARAMETER temperature 0\nPARAMETER num_ctx 512\nSYSTEM You are terse.\n")
    result = cli(daemon, "create", "smol", "-f", str(recipe))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "copying file sha256:" in result.stderr and result.stderr.rstrip().endswith("success")
    return "smol"


def test_list(daemon, smol):
    result = cli(daemon, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(line for line in rows if line.startswith("smol:latest "))
    assert re.fullmatch(r"smol:latest\s+[0-9a-f]{12}\s+[0-9.]+ MB\s+(Less than a second|[0-9]+ seconds?) ago", row)
    filtered = cli(daemon, "ls", "SMO").stdout.splitlines()
    assert filtered[0] == header and [line.split()[:2] for line in filtered[1:]] == [row.split()[:2]]


def test_show(daemon, smol, model_path):
    info = cli(daemon, "show", smol)
    assert info.returncode == 0, info.stderr
    assert re.search(r"^  Model\n    architecture\s+llama\n", info.stdout)
    assert re.search(r"\n  Parameters\n(    .*\n)*    num_predict\s+6\n", info.stdout)
    assert "\n  System\n    You are terse.\n" in info.stdout
    assert "FROM " in cli(daemon, "show", smol, "--modelfile").stdout
    assert re.search(r"^num_predict\s+6$", cli(daemon, "show", smol, "--parameters").stdout, re.MULTILINE)
    assert cli(daemon, "show", smol, "--system").stdout == "You are terse."
    assert "  Metadata\n" in cli(daemon, "show", smol, "-v").stdout


def test_run_one_shot(daemon, smol):
    result = cli(daemon, "run", smol, "Say", "hello", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n\n")
    assert re.search(r"^eval count:\s+[0-9]+ token\(s\)$", result.stderr, re.MULTILINE)
    assert re.search(r"^total duration:\s+[0-9.]+(ms|s)$", result.stderr, re.MULTILINE)


def test_run_reads_piped_stdin(daemon, smol):
    result = cli(daemon, "run", smol, "--nowordwrap", stdin="Repeat after me: blue")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_ps_and_stop(daemon, smol):
    # No prompt and nothing piped: Ollama's way of only loading the model.
    assert cli(daemon, "run", smol, "--keepalive", "10m").returncode == 0
    loaded = cli(daemon, "ps")
    assert loaded.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert re.search(r"^smol:latest\s+[0-9a-f]{12}\s+.*\s(9|10) minutes from now$", loaded.stdout, re.MULTILINE)
    assert cli(daemon, "stop", smol).returncode == 0
    deadline = time.monotonic() + 10
    while "smol:latest" in cli(daemon, "ps").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_cp_and_rm(daemon, smol):
    copied = cli(daemon, "cp", smol, "smol-copy")
    assert (copied.returncode, copied.stdout) == (0, "copied 'smol' to 'smol-copy'\n")
    assert "smol-copy:latest" in cli(daemon, "list").stdout
    removed = cli(daemon, "rm", "smol-copy")
    assert (removed.returncode, removed.stdout) == (0, "deleted 'smol-copy'\n")
    assert "smol-copy" not in cli(daemon, "list").stdout


def test_errors(daemon, smol):
    missing = cli(daemon, "show", "no-such-model")
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: ") and missing.stderr.count("\n") == 1
    stop = cli(daemon, "stop", "no-such-model")
    assert (stop.returncode, stop.stderr) == (1, 'Error: couldn\'t find model "no-such-model" to stop\n')
    bad = cli(daemon, "create", "x", "-f", "/nonexistent/Modelfile")
    assert bad.returncode == 1 and bad.stderr.startswith("Error: specified Modelfile wasn't found")


def test_version(daemon):
    result = cli(daemon, "--version")
    assert (result.returncode, result.stdout) == (0, f"mullama version is {__version__}\n")


def wait_until_reading(pid: int, timeout: float = 60) -> None:
    """Return once process ``pid`` sleeps in select()/poll() (readline waiting for a key)."""
    wchan = Path(f"/proc/{pid}/wchan")
    if not wchan.exists():
        time.sleep(0.5)  # no /proc: the best a test can do is let readline settle
        return
    deadline = time.monotonic() + timeout
    while not wchan.read_text().startswith(("poll_schedule_timeout", "do_select", "do_sys_poll")):
        assert time.monotonic() < deadline, f"the session never waited for input (wchan {wchan.read_text()!r})"
        time.sleep(0.01)


def test_interactive_session(daemon, smol):
    master, slave = pty.openpty()

    def own_terminal() -> None:
        # The pty becomes the child's controlling terminal, so Ctrl-C typed there sends SIGINT.
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "mullama", "run", smol], env=daemon, stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal
    )
    os.close(slave)
    seen = b""

    def expect(text: str, timeout: float = 60) -> str:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            assert ready, f"no {text!r} in {seen[-400:]!r}"
            seen += os.read(master, 4096)
        before, _, seen = seen.partition(text.encode())
        return before.decode(errors="replace")

    def send(line: str) -> None:
        os.write(master, line.encode() + b"\r")

    try:
        expect(">>> ")
        send("/set parameter num_predict 3")
        assert "Set parameter 'num_predict' to '3'" in expect(">>> ")
        send("/set system You are a pirate.")
        assert "Set system message." in expect(">>> ")
        send('"""')
        expect("... ")
        send("Hello")
        expect("... ")
        send('there"""')
        answer = expect(">>> ")
        assert answer.replace("\r", "").rstrip("\n").strip()
        send("/show system")
        assert "You are a pirate." in expect(">>> ")
        send("/set verbose")
        expect(">>> ")
        send("Hi")
        assert "eval count:" in expect(">>> ")
        # CPython's readline takes a SIGINT only while blocked in select(): one that lands
        # after the prompt is drawn but before select() is held until the next keystroke.
        # So Ctrl-C goes once the session is waiting for input, however loaded the machine.
        wait_until_reading(process.pid)
        os.write(master, b"\x03")
        assert "Use Ctrl + d or /bye to exit." in expect(">>> ")
        send("/nonsense")
        assert "Unknown command '/nonsense'. Type /? for help" in expect(">>> ")
        send("/bye")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)


def _daemon_pids(home: Path) -> list[int]:
    """Processes of ours whose environment names ``home``: the daemon a CLI started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MULLAMA_HOME={home}".encode() in environ.split(b"\0") and b"serve" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the started daemon through /proc")
def test_starts_a_daemon_when_none_answers(tmp_path):
    env = environment(tmp_path, free_port())
    try:
        result = cli(env, "list", timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
        assert (tmp_path / "home" / "logs" / "server.log").stat().st_size > 0
        assert cli(env, "--version").stdout == f"mullama version is {__version__}\n"
    finally:
        for pid in _daemon_pids(tmp_path / "home"):
            os.kill(pid, signal.SIGTERM)
