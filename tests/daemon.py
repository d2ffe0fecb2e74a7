"""Daemons for tests: one in this process on a free port, or ``mullama serve`` as a subprocess.

The in-process daemon (:func:`running`) gets a store of its own and no way
out: Ollama's store is an empty directory, the Hugging Face Hub a closed
port, and a developer's API key or allowed origins are cleared.  The
subprocess (:func:`serve`) gets its own store and home, and none of the
``MULLAMA_*``/``OLLAMA_*`` settings of the environment running the tests;
:func:`cli` runs the ``mullama`` command against it.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mullama.http.app import make_server
from mullama.http.server import Server

REPO = Path(__file__).resolve().parent.parent
#: The Hub's address for every in-process daemon: a closed port, so a download fails at once.
CLOSED_HUB = "http://127.0.0.1:9"
#: Settings that would change what a daemon accepts, cleared unless a test sets them.
_CLEARED = ("MULLAMA_API_KEY", "MULLAMA_MAX_BODY", "MULLAMA_ORIGINS", "OLLAMA_ORIGINS", "MULLAMA_KEYS",
            "MULLAMA_LIMITS", "MULLAMA_LOG_FORMAT", "MULLAMA_STATS_RETENTION", "MULLAMA_MAX_QUEUE",
            "OLLAMA_MAX_QUEUE", "MULLAMA_MAX_CONTEXT", "OLLAMA_MAX_CONTEXT", "MULLAMA_KEEP_ALIVE", "OLLAMA_KEEP_ALIVE",
            "MULLAMA_ALLOWED_HOSTS", "MULLAMA_ALLOWED_DIRS", "MULLAMA_MAX_CONNECTIONS", "MULLAMA_HEADER_TIMEOUT",
            "MULLAMA_BODY_TIMEOUT", *(prefix + name for prefix in ("MULLAMA_", "OLLAMA_") for name in (
                "CONTEXT_LENGTH", "NUM_PARALLEL", "FLASH_ATTENTION", "KV_CACHE_TYPE", "GPU_OVERHEAD",
                "MAX_LOADED_MODELS", "LOAD_TIMEOUT")),
            "MULLAMA_OFFLINE", "OLLAMA_OFFLINE", "MULLAMA_RPC", "OLLAMA_RPC")
#: Seconds a ``mullama serve`` gets to answer, and to exit once signalled.
_START_TIMEOUT, _STOP_TIMEOUT = 30.0, 15.0


# In this process ------------------------------------------------------------


@contextmanager
def running(tmp: Path, address: str = "127.0.0.1:0", **env: str) -> Iterator[Server]:
    """A daemon on a free port (of ``address``, loopback by default) with its store under ``tmp``, stopped on leaving the block.

    ``env`` is set after the isolating variables, before the daemon is
    built, and stays set until the block ends.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MULLAMA_MODELS", str(tmp / "models"))
        monkeypatch.setenv("MULLAMA_HOME", str(tmp / "home"))
        monkeypatch.setenv("OLLAMA_MODELS", str(tmp / "ollama-models"))
        monkeypatch.setenv("HF_ENDPOINT", CLOSED_HUB)
        for name in _CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        server = make_server(address)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        try:
            yield server
        finally:
            server.shutdown()
            server.app.manager.close()
            server.server_close()
            server.app.ops.close()


def create_model(port: int, model_path: Path, name: str = "smol", **fields: Any) -> Any:
    """Create ``name`` from the GGUF at ``model_path`` as a remote client does; return the daemon's answer.

    The file is uploaded as a blob (unless the daemon has it), then
    ``/api/create`` names it: the daemon reads no path of this machine.
    ``fields`` join the request (``parameters``, ``template``...).  Fails
    the test unless the answer is a 200.
    """
    stat = model_path.stat()
    digest = file_digest(model_path, stat.st_size, stat.st_mtime_ns)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    try:
        connection.request("HEAD", f"/api/blobs/{digest}")
        exists = connection.getresponse()
        exists.read()
        if exists.status != 200:
            with model_path.open("rb") as upload:
                connection.request("POST", f"/api/blobs/{digest}", upload, {
                    "Content-Type": "application/octet-stream", "Content-Length": str(stat.st_size)})
                uploaded = connection.getresponse()
                assert uploaded.status == 201, uploaded.read()
                uploaded.read()
        body = {"model": name, "files": {model_path.name: digest}, "stream": False, **fields}
        connection.request("POST", "/api/create", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    assert response.status == 200, data
    return json.loads(data)


@functools.lru_cache(maxsize=16)
def file_digest(path: Path, size: int, modified_ns: int) -> str:
    """The ``sha256:`` digest of a file, computed once per version of it (its size and time stand for that)."""
    hasher = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()


def exchange(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """Send one request to ``server`` on a fresh connection; its status and whole body.

    A chunked body cut short fails here (``http.client.IncompleteRead``).
    """
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=180)
    try:
        connection.request(method, path, None if body is None else json.dumps(body),
                           {} if body is None else {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# As a subprocess -------------------------------------------------------------


def openai_client(server: Server, timeout: float = 180) -> Any:
    """The official ``openai`` SDK pointed at ``server`` (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                         timeout=timeout)


def anthropic_client(server: Server, timeout: float = 300) -> Any:
    """The official ``anthropic`` SDK pointed at ``server``."""
    import anthropic

    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.server_address[1]}", api_key="x", max_retries=0,
                               timeout=timeout)


def post_json(port: int, path: str, body: dict[str, Any], timeout: float = 180) -> tuple[int, Any]:
    """POST ``body`` as JSON to the server on ``port``: its status and its decoded JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(tmp: Path, port: int) -> dict[str, str]:
    """This process's environment without ``MULLAMA_*``/``OLLAMA_*``, pointing ``mullama`` at ``port`` and ``tmp``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OLLAMA_", "MULLAMA_"))}
    env |= {"MULLAMA_HOST": f"127.0.0.1:{port}", "MULLAMA_MODELS": str(tmp / "models"), "MULLAMA_HOME": str(tmp / "home")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


@dataclass
class Serving:
    """A ``mullama serve`` subprocess: the environment that points the CLI at it, its port and log."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    port: int
    log: Path

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Signal it to stop; kill it if it has not exited in time."""
        self.process.send_signal(signum)
        try:
            self.process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve(tmp: Path, **env: str) -> Serving:
    """Start ``mullama serve`` on a free port with :func:`environment` and ``env``; wait until it answers.

    Its output goes to ``tmp / "serve.log"``, whose end the failure shows
    if it exits or stays silent.
    """
    port = free_port()
    full_env = environment(tmp, port) | env
    log = tmp / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=full_env, stdout=output,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + _START_TIMEOUT
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mullama serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return Serving(process, full_env, port, log)


def cli(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``mullama ARGS`` with ``env``; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mullama", *args], env=env, input=stdin if stdin is not None else "", capture_output=True,
        text=True, timeout=timeout, check=False,
    )
