"""What one client may hold of the daemon: memory, threads, connections, time (issue 14, items 7, 9 and 11).

Memory is measured in this process, where the daemon runs: ``VmHWM`` (the
peak resident size) is reset through ``/proc/self/clear_refs`` before the
request, so a body held whole in memory for an instant shows even after it
was freed. The bounds are generous; what is being kept out is growth in
proportion to what a client sends.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import create_model, running

from mullama.http.app import wind_down

MODEL = "smol"
TIMEOUT = 120
MIB = 1 << 20


def _status(field: str) -> int:
    """A ``/proc/self/status`` size, in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)[1]) * 1024


def peak_growth(action: Callable[[], Any]) -> int:
    """How far this process's resident size rose above where it was while ``action`` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    action()
    return _status("VmHWM") - before


# --- item 7: uploads go to disk as they arrive ------------------------------------------------------------


def test_a_chunked_upload_is_streamed_to_disk_and_renamed_into_place(tmp_path: Path) -> None:
    block = hashlib.sha256(b"seed").digest() * (MIB // 32)  # 1 MiB, sent 200 times
    hasher = hashlib.sha256()
    for _ in range(200):
        hasher.update(block)
    digest = "sha256:" + hasher.hexdigest()
    seen: list[int] = []
    with running(tmp_path) as server:
        blobs = Path(server.app.manager.store.root) / "blobs"

        def pieces() -> Iterator[bytes]:
            for i in range(200):
                if i == 100:
                    # Halfway: what has arrived is already on disk, in one file beside the blobs.
                    partial = list(blobs.glob(".upload-*"))
                    assert len(partial) == 1 and partial[0].stat().st_size >= 50 * MIB
                    seen.append(partial[0].stat().st_ino)
                yield block

        def upload() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
            connection.request("POST", f"/api/blobs/{digest}", pieces(),
                               {"Content-Type": "application/octet-stream"}, encode_chunked=True)
            response = connection.getresponse()
            assert response.status == 201, response.read()
            connection.close()

        growth = peak_growth(upload)
        blob = server.app.manager.store.blob_path(digest)
        assert blob.stat().st_size == 200 * MIB
        assert blob.stat().st_ino == seen[0]  # the upload's own file, renamed: no second copy
        assert not list(blobs.glob(".upload-*")) and not list(blobs.parent.glob(".upload-*"))
    assert growth < 64 * MIB, f"the daemon grew by {growth / MIB:.0f} MiB during a 200 MiB upload"


def test_a_failed_upload_leaves_nothing(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        store = server.app.manager.store
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
        connection.request("POST", "/api/blobs/sha256:" + "0" * 64, iter([b"x" * MIB] * 3),
                           {"Content-Type": "application/octet-stream"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 400 and "digest mismatch" in json.loads(response.read())["error"]
        assert not list(Path(store.root).rglob(".upload-*"))
        assert not list((Path(store.root) / "blobs").iterdir())


# --- item 9: JSON memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body"), [
    ("tiny objects", b'{"model": "smol", "messages": [' + b"{}," * (16 * MIB // 3) + b"{}]}"),
    ("tiny lists", b'{"model": "smol", "context": [' + b"[]," * (16 * MIB // 3) + b"[]]}"),
    ("floats", b'{"model": "smol", "context": [' + b"1.5," * (16 * MIB // 4) + b"1]}"),
    ("nesting", b"[" * (16 * MIB)),
])
def test_a_16_mib_json_body_costs_no_more_than_a_few_times_its_size(tmp_path: Path, name: str, body: bytes) -> None:
    with running(tmp_path) as server:
        port = server.server_address[1]
        result: dict[str, Any] = {}

        def post() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            connection.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            result["status"], result["data"] = response.status, response.read()
            connection.close()

        growth = peak_growth(post)
    assert result["status"] in (400, 413), result
    # The body itself is 16 MiB, read once: parsing must not multiply it.
    assert growth < 80 * MIB, f"{name}: the daemon grew by {growth / MIB:.0f} MiB"


def test_a_body_of_many_values_within_the_bound_is_read(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        context = [1] * 400_000  # a long context of token ids is legitimate
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
        connection.request("POST", "/api/generate", json.dumps({"model": "zz-missing", "context": context}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 404, response.read()  # parsed, and refused only for its model


# --- item 9: slow clients and the connection cap -----------------------------------------------------------


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_headers_sent_one_byte_at_a_time_are_cut_off_at_the_header_deadline(tmp_path: Path) -> None:
    request = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"
    with running(tmp_path, MULLAMA_HEADER_TIMEOUT="1") as server:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=TIMEOUT) as sock:
            for i, byte in enumerate(request):
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if _closed_by_server(sock, 0.25):
                    break
            else:
                pytest.fail("the server waited for every byte of a request sent at 4 bytes a second")
        assert i < len(request) - 1


def test_a_stalled_body_is_cut_off_at_the_body_timeout(tmp_path: Path) -> None:
    with running(tmp_path, MULLAMA_BODY_TIMEOUT="1") as server, \
            socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        assert _closed_by_server(sock, 60), "a body that stopped arriving held its connection for a minute"


def _partial_request(port: int) -> socket.socket:
    """A connection that sent part of its headers: it holds a slot and is not idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def test_connections_past_the_cap_wait_and_idle_ones_make_room(tmp_path: Path) -> None:
    with running(tmp_path, MULLAMA_MAX_CONNECTIONS="2") as server:
        port = server.server_address[1]
        first, second = _partial_request(port), _partial_request(port)
        third = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        third.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        # Two connections are served; the third waits in the backlog, unanswered.
        assert not select.select([third], [], [], 1.0)[0]
        assert server.open_connections() == 2
        # The first completes its request and keeps the connection: idle, it is closed to make room.
        first.sendall(b"\r\n")
        assert first.recv(12).startswith(b"HTTP/1.1 200")
        answer = b""
        while chunk := third.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b"version" in answer
        assert server.open_connections() <= 2
        for sock in (first, second, third):
            sock.close()


def test_a_new_connection_is_not_closed_to_make_room(tmp_path: Path) -> None:
    """Only a connection idle after a request makes room: a new one's request may be on its way."""
    with running(tmp_path, MULLAMA_MAX_CONNECTIONS="2") as server:
        port = server.server_address[1]
        first = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        second = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        deadline = time.monotonic() + 60
        while server.open_connections() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        third.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert not _closed_by_server(first, 1.0) and not _closed_by_server(second, 0.1)
        # The first request of each arrives late and is answered.
        for sock in (first, second):
            sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
        # Now both are idle between requests: the third gets a slot.
        answer = b""
        while chunk := third.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        for sock in (first, second, third):
            sock.close()


def test_the_cap_bounds_the_threads(tmp_path: Path) -> None:
    with running(tmp_path, MULLAMA_MAX_CONNECTIONS="4") as server:
        port = server.server_address[1]
        before = threading.active_count()
        holders = [_partial_request(port) for _ in range(12)]
        try:
            deadline = time.monotonic() + 30
            while server.open_connections() < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.open_connections() == 4
            assert threading.active_count() - before <= 4
        finally:
            for sock in holders:
                sock.close()


# --- item 11: shutdown never frees a model in use ----------------------------------------------------------


def test_shutdown_frees_a_model_only_when_its_last_request_lets_go(tmp_path: Path, model_path: Path) -> None:
    with running(tmp_path) as server:
        create_model(server.server_address[1], model_path, MODEL, parameters={"num_thread": 1})
        manager = server.app.manager
        with manager.use(MODEL) as loaded:  # what a request thread holds while it answers
            wind_down(server.app, 0.0)
            assert loaded.model.ptr, "the model was freed under a request still using it"
            assert loaded.model.tokenize("still usable")
        assert not loaded.model.ptr and not manager.running()
