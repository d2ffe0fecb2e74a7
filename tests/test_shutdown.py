"""``mullama serve`` stops cleanly on SIGTERM and SIGINT, even mid-generation."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time

import pytest
from daemon import create_model, running, serve

from mullama.http.app import wind_down

#: What the brief allows between the signal and the process's exit.
EXIT_WITHIN = 10.0


def _post(port: int, path: str, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_unloads_and_exits(tmp_path, model_path, signum):
    serving = serve(tmp_path)
    process, port, log = serving.process, serving.port, serving.log
    try:
        create_model(port, model_path)
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


# In process: what wind_down guarantees ------------------------------------


@pytest.fixture
def server(tmp_path, model_path):
    """An in-process daemon with the test model as ``smol`` and a route that hangs until the test is over."""
    over = threading.Event()

    def hang(request) -> None:
        over.wait(30)
        request.handler.send_json(200, {})

    with running(tmp_path) as server:
        server.app.router.add("POST", "/test/hang", hang)
        create_model(server.server_address[1], model_path)
        yield server
        over.set()


def _stop(server) -> float:
    """Stop as ``serve`` does on a signal; return the seconds wind_down took."""
    server.app.stopping.set()
    server.shutdown()
    started = time.monotonic()
    wind_down(server.app, 3.0)
    return time.monotonic() - started


def test_wind_down_lets_streams_finish_then_unloads(server):
    port = server.server_address[1]
    replies = [_post(port, "/api/generate", {"model": "smol", "prompt": "1, 2, 3,", "raw": True,
                                               "options": {"num_predict": 2000, "num_thread": 1}})
               for _ in range(2)]  # one generating, one queued behind it (num_parallel 1)
    assert json.loads(replies[0].readline())["done"] is False
    spent = _stop(server)
    assert spent < 2.0
    assert server.app.manager.running() == []
    for reply in replies:
        # Every body was complete before wind_down returned: reading it back needs no server thread.
        *_, last = [json.loads(line) for line in reply.read().splitlines()]
        assert last.get("error") == "the server is shutting down" or last.get("done_reason") == "cancel", last


def test_wind_down_gives_up_after_the_grace_period(server, caplog):
    port = server.server_address[1]

    def hang() -> None:
        # Answered only once the test is over, long after wind_down gave up on it: that is the point.
        with contextlib.suppress(http.client.RemoteDisconnected, ConnectionError):
            _post(port, "/test/hang", {}).read()

    hanging = threading.Thread(target=hang, daemon=True)
    hanging.start()
    deadline = time.monotonic() + 5
    while server.app.wait_idle(0.05) and time.monotonic() < deadline:
        pass  # until the hanging request is in flight
    assert not server.app.wait_idle(0)
    spent = _stop(server)
    assert 3.0 <= spent < 4.0
    assert "closing with requests still in flight" in caplog.text


def test_responses_during_shutdown_close_the_connection(server):
    port = server.server_address[1]
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    kept.request("GET", "/api/version")
    first = kept.getresponse()
    assert first.read() and not first.will_close
    assert server.app.wait_idle(5)  # the first request is wholly over: the connection stays open
    server.app.stopping.set()
    kept.request("GET", "/api/version")
    last = kept.getresponse()
    assert last.status == 200 and last.getheader("Connection") == "close" and last.will_close
    last.read()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # the server closes: recv returns b"" instead of blocking
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
