"""Offline mode: a pull fails at once with a clear message, and touches no network at all.

Every place a pull could go (the Hub, the package index) is a server that
accepts connections and never answers, so a pull that tried one would hang
there; the test asserts nothing connected and the error names the setting.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from daemon import cli, create_model, serve

from mullama.errors import DownloadError
from mullama.store.pull import pull


class BlackHole:
    """A TCP server that accepts connections, counts them, and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self._connected.set()

    def wait_for_a_connection(self, timeout: float) -> bool:
        """True once something connected, False if nothing did within ``timeout`` seconds."""
        return self._connected.wait(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Iterator[BlackHole]:
    """A fresh store, and the Hub and the package index both a black hole."""
    hole = BlackHole()
    monkeypatch.setenv("MULLAMA_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_ENDPOINT", hole.url)
    monkeypatch.setenv("PIP_INDEX_URL", hole.url + "/simple")
    for variable in ("HF_HUB_OFFLINE", "MULLAMA_OFFLINE", "OLLAMA_OFFLINE", "MULLAMA_ALIASES", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(variable, raising=False)
    yield hole
    hole.close()


@pytest.mark.parametrize("variable", ["MULLAMA_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("name", ["smollm2:135m", "hf.co/someone/Tiny-GGUF", "hf:someone/Tiny-GGUF:Q4_K_M"])
def test_offline_pull_fails_at_once_without_a_connection(nowhere, monkeypatch, variable, name):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(DownloadError, match=f"{variable} is set \\(offline mode\\)") as error:
        pull(name)
    assert "mullama create" in error.value.message
    assert nowhere.connections == []


def test_offline_setting_off_means_online(nowhere, monkeypatch):
    """``MULLAMA_OFFLINE=0`` is not offline: the pull goes out (here to the black hole, closed afterwards)."""
    monkeypatch.setenv("MULLAMA_OFFLINE", "0")
    threading.Thread(target=_pull_quietly, args=("hf.co/someone/Tiny-GGUF:Q4_K_M",), daemon=True).start()
    assert nowhere.wait_for_a_connection(60), "an online pull must try the Hub"


def _pull_quietly(name: str) -> None:
    try:
        pull(name)
    except Exception:  # noqa: BLE001 - the black hole closes under it; only the connection matters
        pass


def test_daemon_and_cli_report_offline_pulls(tmp_path, model_path):
    """Through the daemon and ``mullama pull``/``run``: the same message, and a local model still runs."""
    hole = BlackHole()
    offline = {"MULLAMA_OFFLINE": "1", "HF_ENDPOINT": hole.url, "PIP_INDEX_URL": hole.url + "/simple"}
    daemon = serve(tmp_path, **offline)
    try:
        create_model(daemon.port, model_path, "local")
        pulled = cli(daemon.env, "pull", "smollm2:135m")
        assert pulled.returncode == 1
        assert "MULLAMA_OFFLINE is set (offline mode)" in pulled.stderr
        ran = cli(daemon.env, "run", "local", "Say hi", "--keepalive", "0", timeout=300)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip()
        missing = cli(daemon.env, "run", "smollm2:360m", "hi")
        assert missing.returncode == 1
        assert "offline mode" in missing.stderr
        assert hole.connections == []
    finally:
        daemon.stop()
        hole.close()
