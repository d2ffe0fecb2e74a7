"""``mullama serve`` as systemd runs it: readiness over NOTIFY_SOCKET, SIGHUP, JSON logs, statistics across restarts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
from daemon import Serving, cli, environment, free_port, openai_client, serve
from test_ops_daemon import HELLO, SHORT, bearer, call
from test_ops_metrics import poll

from mullama.ops.keys import create_key

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or not hasattr(signal, "SIGHUP"),
                                reason="systemd supervision is for Unix")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's, and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        yield sock, str(path)


def create(daemon: Serving, model_path: Path, *, key: str | None = None) -> None:
    """Create ``smol`` from the test GGUF where it lies (no copy: the daemon needs its MULLAMA_ALLOWED_DIRS)."""
    status, _, body = call(daemon.port, "POST", "/api/create",
                           {"model": "smol", "from": str(model_path), "in_place": True, "stream": False,
                            "parameters": {"num_thread": 1}}, **(bearer(key) if key else {}))
    assert status == 200, body


def client(daemon: Serving, key: str | None = None) -> ollama.Client:
    """The official ``ollama`` SDK on ``daemon``."""
    return ollama.Client(host=f"http://127.0.0.1:{daemon.port}", timeout=120, headers=bearer(key) if key else None)


def stats(daemon: Serving, query: str = "", key: str | None = None) -> dict:
    """``/api/stats?QUERY`` of ``daemon``."""
    status, _, body = call(daemon.port, "GET", "/api/stats?" + query, **(bearer(key) if key else {}))
    assert status == 200, body
    return json.loads(body)


def test_readiness_reload_and_stopping_under_a_notify_socket(model_path: Path, tmp_path: Path,
                                                             notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    keys = tmp_path / "home" / "keys.json"
    admin = create_key(keys, "admin", ["admin"])
    user = create_key(keys, "user", ["inference"])
    daemon = serve(tmp_path, NOTIFY_SOCKET=address, MULLAMA_LOG_FORMAT="json",
                   MULLAMA_ALLOWED_DIRS=str(model_path.parent))
    try:
        # serve() returned once the daemon answered: it said it was ready before that.
        assert sock.recv(4096) == f"READY=1\nSTATUS=listening on 127.0.0.1:{daemon.port}".encode()
        create(daemon, model_path, key=admin)
        stream = client(daemon, user).chat(model="smol", messages=HELLO, stream=True,
                                           options={"num_predict": 16, "temperature": 0})
        try:
            assert not next(stream).done
            # A new rule while the stream is in flight: the model is the administrator's alone.
            (tmp_path / "home" / "limits.json").write_text(json.dumps({"models": {"smol": {"keys": ["admin"]}}}))
            daemon.process.send_signal(signal.SIGHUP)
            reloading = sock.recv(4096).decode().split("\n")
            assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
            assert sock.recv(4096) == f"READY=1\nSTATUS=listening on 127.0.0.1:{daemon.port}".encode()
            with pytest.raises(ollama.ResponseError) as refused:
                client(daemon, user).chat(model="smol", messages=HELLO, options=SHORT)
            assert refused.value.status_code == 403 and 'may not use the model "smol:latest"' in refused.value.error
            # The stream begun under the old rules ends as it would have.
            last = list(stream)[-1]
            assert last.done and last.done_reason in ("stop", "length") and last.eval_count
        finally:
            stream.close()
        status, headers, _ = call(daemon.port, "POST", "/api/chat", {"model": "smol", "messages": HELLO,
                                  "stream": False, "options": SHORT}, **{"X-Request-Id": "trace-7", **bearer(admin)})
        assert status == 200 and headers["x-request-id"] == "trace-7"
        daemon.stop(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert daemon.process.returncode == 0
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    # One JSON object per log line; the request's line carries its id, status, model and tokens.
    lines = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    (line,) = [entry for entry in lines if entry.get("request_id") == "trace-7"]
    assert (line["path"], line["status"], line["model"], line["key"]) == ("/api/chat", 200, "smol:latest", "admin")
    assert line["generated_tokens"] > 0 and line["level"] == "info"
    assert any(entry.get("message", "").startswith("limits and keys reloaded") for entry in lines)


def test_statistics_survive_kill_9_and_restarts(model_path: Path, tmp_path: Path) -> None:
    first = serve(tmp_path, MULLAMA_ALLOWED_DIRS=str(model_path.parent))
    try:
        create(first, model_path)
        with_ollama = client(first)
        answers = [with_ollama.chat(model="smol", messages=HELLO, options=SHORT) for _ in range(2)]
        with openai_client(_Address(first.port), 120) as sdk:
            completion = sdk.chat.completions.create(model="smol", messages=HELLO, max_tokens=3, temperature=0)
        generated = sum(answer.eval_count for answer in answers) + completion.usage.completion_tokens
        # /api/stats writes what is queued before it reads: once it shows the requests, they are on disk.
        # (A request is recorded right after its last byte went out: its client may ask a moment before.)
        total = poll(lambda: (found := stats(first, "model=smol")["total"]) and found["requests"] == 3 and found,
                     30, lambda: f"the statistics never showed 3 requests: {stats(first)}")
        assert total["generated_tokens"] == generated
    finally:
        first.stop(signal.SIGKILL)
    second = serve(tmp_path)
    try:
        total = stats(second, "model=smol")["total"]
        assert (total["requests"], total["generated_tokens"]) == (3, generated)
        client(second).generate(model="smol", prompt="Hi", options=SHORT)
    finally:
        second.stop(signal.SIGTERM)
    assert second.process.returncode == 0
    # The third daemon has an API key: `mullama stats` sends MULLAMA_API_KEY.
    third = serve(tmp_path, MULLAMA_API_KEY="s3cret")
    try:
        by_api = stats(third, "by=api", key="s3cret")["stats"]
        assert {row["api"]: row["requests"] for row in by_api} == {"ollama": 3, "openai": 1}
        table = cli(third.env, "stats")
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()
        assert header.split()[:5] == ["MODEL", "REQUESTS", "ERRORS", "PROMPT", "TOKENS"]
        assert row.split()[:3] == ["smol:latest", "4", "0"]
        table = cli(third.env, "stats", "smol", "--by", "api,model")
        assert table.returncode == 0, table.stderr
        assert sorted(line.split()[:3] for line in table.stdout.splitlines()[1:]) == [
            ["ollama", "smol:latest", "3"], ["openai", "smol:latest", "1"]]
        keyless = cli({**third.env, "MULLAMA_API_KEY": ""}, "stats")
        assert keyless.returncode != 0 and "API key" in keyless.stderr
    finally:
        third.stop(signal.SIGTERM)


class _Address:
    """What :func:`daemon.openai_client` reads of a server: its address."""

    def __init__(self, port: int) -> None:
        self.server_address = ("127.0.0.1", port)



@pytest.mark.parametrize(("file", "text", "setting", "named"), [
    ("limits.json", '{"models": {"smol": {"max_queue": -1}}}', {}, 'models."smol".max_queue'),
    ("keys.json", '{"keys": [{"name": "x"}]}', {}, "sha256"),
    ("", "", {"MULLAMA_LOG_FORMAT": "yaml"}, "MULLAMA_LOG_FORMAT"),
])
def test_a_daemon_does_not_start_with_rules_it_cannot_read(tmp_path: Path, file: str, text: str,
                                                           setting: dict[str, str], named: str) -> None:
    if file:
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / file).write_text(text)
    env = environment(tmp_path, free_port()) | setting
    finished = subprocess.run([sys.executable, "-m", "mullama", "serve"], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    assert finished.returncode == 1
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith("Error: ") and named in line
