"""``kill -9`` of ``mullama serve`` in the middle of a pull, a create, a quantize and a blob upload.

After each, a new daemon on the same store must find it consistent (every
manifest's blobs present and hashing to their digests), show nothing
half-written (no temporary file, no blob without a manifest, no model that
cannot be shown), and run the interrupted operation again to its end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Serving, create_model, file_digest, serve
from hub_server import HubServer

from mullama.store.blobs import Manifest
from mullama.store.sweep import TEMPORARY_PREFIXES

REPO = "someone/SmolLM2-135M-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TIMEOUT = 180


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.strip() else None
    finally:
        connection.close()


def kill_when(serving: Serving, path: str, body: dict[str, Any], ready: Any) -> list[dict[str, Any]]:
    """Stream ``path``'s progress and ``kill -9`` the daemon at the first line ``ready`` accepts."""
    connection = http.client.HTTPConnection("127.0.0.1", serving.port, timeout=TIMEOUT)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    lines = []
    for raw in response:
        line = json.loads(raw)
        lines.append(line)
        assert "error" not in line, lines
        if ready(line):
            serving.process.send_signal(signal.SIGKILL)
            serving.process.wait(TIMEOUT)
            connection.close()
            return lines
    pytest.fail(f"the operation ended before it could be interrupted: {lines}")


def check_store(root: Path, port: int) -> list[str]:
    """Hold the store to its invariants; return the names of its models."""
    manifests = root / "manifests"
    referenced = set()
    for path in manifests.rglob("*") if manifests.is_dir() else []:
        assert not path.name.startswith(TEMPORARY_PREFIXES), f"a temporary file is visible: {path}"
        if not path.is_file():
            continue
        manifest = Manifest.from_bytes(path.read_bytes())
        for digest in manifest.digests():
            blob = root / "blobs" / digest.replace(":", "-")
            assert blob.is_file(), f"{path} names {digest}, which is missing"
            assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == digest, f"{blob} is damaged"
            referenced.add(blob.name)
    for path in root.rglob("*"):
        assert not path.name.startswith(TEMPORARY_PREFIXES), f"a temporary file is left: {path}"
    blobs = {path.name for path in (root / "blobs").glob("sha256-*")} if (root / "blobs").is_dir() else set()
    assert blobs == referenced, f"blobs no manifest names: {blobs - referenced}"
    listed = [model["name"] for model in json.loads(_get(port, "/api/tags"))["models"]]
    for name in listed:
        status, shown = post(port, "/api/show", {"model": name})
        assert status == 200, (name, shown)
    return listed


def _get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


@pytest.fixture
def hub(model_path: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add(REPO, FILE, model_path)
        yield server


def test_kill_during_a_pull(tmp_path: Path, hub: HubServer, model_path: Path) -> None:
    hub.state.delay = 0.003  # about 5 s for the model: long enough to be caught in the middle
    serving = serve(tmp_path, HF_ENDPOINT=hub.endpoint)
    name = f"hf.co/{REPO}:Q4_1"
    lines = kill_when(serving, "/api/pull", {"model": name}, lambda line: line.get("completed", 0) > 20_000_000)
    assert lines[-1]["completed"] < model_path.stat().st_size
    hub.state.delay = 0
    serving = serve(tmp_path, HF_ENDPOINT=hub.endpoint)
    try:
        root = Path(serving.env["MULLAMA_MODELS"])
        assert check_store(root, serving.port) == []
        status, answer = post(serving.port, "/api/pull", {"model": name, "stream": False})
        assert status == 200, answer
        assert len(check_store(root, serving.port)) == 1
        status, answer = post(serving.port, "/api/generate", {"model": name, "prompt": "Hi", "stream": False,
                                                              "options": {"num_predict": 2, "num_thread": 1}})
        assert status == 200 and answer["done"], answer
    finally:
        serving.stop()


def test_kill_during_a_create_from_a_file(tmp_path: Path, model_path: Path) -> None:
    allowed = tmp_path / "models-to-import"
    allowed.mkdir()
    (tmp_path / "daemon").mkdir()
    source = allowed / "smol.gguf"
    shutil.copyfile(model_path, source)
    with source.open("ab") as padded:
        padded.write(b"\0" * 64)  # bytes of its own: no blob of the store has its digest yet
    serving = serve(tmp_path / "daemon", MULLAMA_ALLOWED_DIRS=str(allowed))
    body = {"model": "imported", "from": str(source)}
    kill_when(serving, "/api/create", body, lambda line: line["status"] == "copying file")
    serving = serve(tmp_path / "daemon", MULLAMA_ALLOWED_DIRS=str(allowed))
    try:
        root = Path(serving.env["MULLAMA_MODELS"])
        before = check_store(root, serving.port)
        assert before in ([], ["imported:latest"]), before  # killed before or after its manifest
        status, answer = post(serving.port, "/api/create", {**body, "stream": False})
        assert status == 200, answer
        assert len(check_store(root, serving.port)) == 1
        assert source.stat().st_size == model_path.stat().st_size + 64  # the user's file is untouched
    finally:
        serving.stop()


def test_kill_during_a_quantize(tmp_path: Path, model_path: Path) -> None:
    serving = serve(tmp_path)
    create_model(serving.port, model_path, "smol")
    body = {"model": "smol-q8", "from": "smol", "quantize": "q8_0"}
    kill_when(serving, "/api/create", body, lambda line: line["status"].startswith("quantizing"))
    serving = serve(tmp_path)
    try:
        root = Path(serving.env["MULLAMA_MODELS"])
        assert check_store(root, serving.port) == ["smol:latest"]
        status, answer = post(serving.port, "/api/create", {**body, "stream": False})
        assert status == 200, answer
        assert sorted(check_store(root, serving.port)) == ["smol-q8:latest", "smol:latest"]
    finally:
        serving.stop()


def test_kill_during_a_blob_upload(tmp_path: Path, model_path: Path) -> None:
    serving = serve(tmp_path)
    root = Path(serving.env["MULLAMA_MODELS"])
    size = model_path.stat().st_size
    stat = model_path.stat()
    digest = file_digest(model_path, stat.st_size, stat.st_mtime_ns)
    with socket.create_connection(("127.0.0.1", serving.port), timeout=TIMEOUT) as sock, model_path.open("rb") as data:
        sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        sock.sendall(data.read(size // 2))
        deadline = time.monotonic() + TIMEOUT
        while not any(path.stat().st_size > size // 4 for path in (root / "blobs").glob(".upload-*")):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        serving.process.send_signal(signal.SIGKILL)
        serving.process.wait(TIMEOUT)
    serving = serve(tmp_path)
    try:
        assert check_store(root, serving.port) == []
        assert not (root / "blobs" / digest.replace(":", "-")).exists()
        create_model(serving.port, model_path, "smol")  # uploads the blob again, whole
        assert check_store(root, serving.port) == ["smol:latest"]
    finally:
        serving.stop()
