"""``mullama serve`` stops cleanly on SIGTERM and SIGINT, even mid-generation."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import _answers, _environment, _free_port

#: What the brief allows between the signal and the process's exit.
EXIT_WITHIN = 10.0


def _start(tmp: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    env = _environment(tmp, _free_port())
    port = int(env["MULLAMA_HOST"].rsplit(":", 1)[1])
    log = tmp / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mullama serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return process, port, log


def _post(port: int, path: str, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_unloads_and_exits(tmp_path, model_path, signum):
    process, port, log = _start(tmp_path)
    try:
        created = _post(port, "/api/create", {"model": "smol", "from": str(model_path), "stream": False})
        assert created.status == 200, created.read()
        # An idle keep-alive connection must not hold the exit up.
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        idle.request("GET", "/api/version")
        assert idle.getresponse().read()
        reply = _post(port, "/api/generate", {
            "model": "smol", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True,
            "options": {"num_predict": 2000, "num_thread": 1, "temperature": 0, "num_ctx": 4096}})
        assert reply.status == 200
        lines: list[dict] = []
        first, complete = threading.Event(), threading.Event()

        def read() -> None:
            try:
                for raw in reply:
                    lines.append(json.loads(raw))
                    first.set()
                complete.set()  # the chunked body ended with its terminating chunk
            finally:
                first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert first.wait(60) and not lines[0].get("done"), lines
        process.send_signal(signum)
        sent = time.monotonic()
        assert process.wait(EXIT_WITHIN) == 0
        assert time.monotonic() - sent < EXIT_WITHIN
        reader.join(5)
        assert complete.is_set(), lines[-3:]
        last = lines[-1]
        # Cut short either way: an error line, or a final line that says it was cancelled.
        assert last.get("error") == "the server is shutting down" or last.get("done_reason") == "cancel", last
        assert all("error" not in line for line in lines[:-1])
        text = log.read_text()
        assert f"received {signal.Signals(signum).name}, shutting down" in text
        assert "unloading smol:latest" in text
        assert text.rstrip().endswith("stopped")
        idle.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
