"""A daemon for the UI tests (web and terminal): the test model installed, pulls served by a local Hub."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon import create_model, running
from hub_server import HubServer

from mullama.http.server import Server

MODEL = "smol"
#: One thread and short greedy answers keep the UI tests quick on two busy cores.
PARAMETERS = {"num_thread": 1, "num_predict": 24, "temperature": 0}
HUB_REPO = "someone/SmolLM2-135M-GGUF"
HUB_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What a UI pulls: the Hub copy of the test model under another name, so it is really downloaded.
PULL_NAME = f"hf.co/{HUB_REPO}:q4_1"


@dataclass
class UIDaemon:
    """The daemon under test, its port, and the local Hub its pulls use (None for a daemon without one)."""

    server: Server
    port: int
    hub: HubServer | None = None

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return f"http://127.0.0.1:{self.port}"


def renamed_copy(model_path: Path, dest: Path) -> Path:
    """The test model with another ``general.name``: a valid GGUF whose blob the store does not hold yet."""
    data = bytearray(model_path.read_bytes())
    key = data.index(b"general.name\x08\x00\x00\x00")
    value = key + len(b"general.name") + 4 + 8
    data[value:value + 7] = b"Pulled!"
    dest.write_bytes(data)
    return dest


@contextmanager
def ui_daemon(model_path: Path, tmp: Path) -> Iterator[UIDaemon]:
    """An in-process daemon with ``smol`` installed and a Hub serving :data:`PULL_NAME`."""
    with HubServer() as hub:
        hub.add(HUB_REPO, HUB_FILE, renamed_copy(model_path, tmp / HUB_FILE))
        with running(tmp, HF_ENDPOINT=hub.endpoint) as server:
            port = server.server_address[1]
            create_model(port, model_path, MODEL, parameters=PARAMETERS)
            yield UIDaemon(server, port, hub)
