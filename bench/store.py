#!/usr/bin/env python3
"""What the size of the model store costs a request: 5 models against 500.

    python bench/store.py [--small 5] [--large 500] [--rounds 40] [--json]

Two ``mullama serve`` daemons run side by side, one over a store of
``--small`` models and one over ``--large``; the models are cheap, every
one the same test GGUF (linked, not copied) under its own ``PARAMETER seed``
and ``SYSTEM`` layers, so their manifests differ. Each daemon first lists
its models and answers one chat, which loads the first model; then, round by
round and alternating between the daemons so that both see the same machine
load, it times a one-token chat (``num_predict: 1``) to that loaded model,
then, in rounds of their own, ``GET /api/tags``. Prints the medians and the
large/small ratios; with ``--json`` the last line is a JSON object of them. Goals: ``/api/tags`` over
500 models under 100 ms, and the loaded-model chat at 500 models within 1.2x
of that at 5.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mullama.store.blobs import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, Store  # noqa: E402
from mullama.store.names import ModelName  # noqa: E402

CHAT = {"model": "m0", "stream": False, "messages": [{"role": "user", "content": "Hi"}],
        "options": {"num_predict": 1, "temperature": 0, "num_ctx": 512, "num_thread": 1}}
_START_TIMEOUT = 60.0


def default_model() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import smollm2_path

    return smollm2_path()


def fill_store(root: Path, count: int, model: Path) -> None:
    """``count`` models ``m0``..: the same GGUF blob, each with its own parameters and system prompt."""
    store = Store(root)
    weights = Layer(MEDIA_TYPES["model"], store.add_blob_from_file(model, link=True), model.stat().st_size)
    config_data = b'{"model_format":"gguf","model_family":"llama"}'
    config = Layer(CONFIG_MEDIA_TYPE, store.add_blob_bytes(config_data), len(config_data))
    for i in range(count):
        params = json.dumps({"seed": i}).encode()
        system = f"You are assistant number {i}.".encode()
        layers = (weights, Layer(MEDIA_TYPES["params"], store.add_blob_bytes(params), len(params)),
                  Layer(MEDIA_TYPES["system"], store.add_blob_bytes(system), len(system)))
        store.write_manifest(ModelName.parse(f"m{i}"), Manifest(config, layers))


@dataclass
class Daemon:
    """A ``mullama serve`` over its own store."""

    models: int
    port: int
    process: subprocess.Popen[bytes]

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[float, dict]:
        """(seconds, JSON answer) of one request on a new connection, as a client would make it."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            started = time.perf_counter()
            connection.request(method, path, json.dumps(body) if body is not None else None,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - started
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return elapsed, json.loads(data)


def start(directory: Path, models: int) -> Daemon:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OLLAMA_", "MULLAMA_"))}
    env |= {"MULLAMA_HOST": f"127.0.0.1:{port}", "MULLAMA_MODELS": str(directory / "models"),
            "MULLAMA_HOME": str(directory / "home"), "OLLAMA_MODELS": str(directory / "ollama"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    log = (directory / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    daemon = Daemon(models, port, process)
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            daemon.request("GET", "/api/version")
            return daemon
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"mullama serve did not start: {(directory / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the SmolLM2-135M test model)")
    parser.add_argument("--small", type=int, default=5, help="models in the small store")
    parser.add_argument("--large", type=int, default=500, help="models in the large store")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    model = args.model or default_model()
    with tempfile.TemporaryDirectory(prefix="mullama-bench-store-") as tmp:
        daemons = []
        try:
            for count in (args.small, args.large):
                directory = Path(tmp) / str(count)
                fill_store(directory / "models", count, model)
                daemons.append(start(directory, count))
            for daemon in daemons:
                _, listing = daemon.request("GET", "/api/tags")
                assert len(listing["models"]) == daemon.models, listing
                daemon.request("POST", "/api/chat", CHAT)  # loads m0
            tags: dict[int, list[float]] = {d.models: [] for d in daemons}
            chat: dict[int, list[float]] = {d.models: [] for d in daemons}
            # Chats first, then listings: the garbage of a listing is not collected during a chat.
            for i in range(args.rounds):
                for daemon in daemons if i % 2 == 0 else reversed(daemons):
                    elapsed, answer = daemon.request("POST", "/api/chat", CHAT)
                    assert answer["done"] and answer["load_duration"] < 1e9, answer
                    chat[daemon.models].append(elapsed)
            for i in range(args.rounds):
                for daemon in daemons if i % 2 == 0 else reversed(daemons):
                    tags[daemon.models].append(daemon.request("GET", "/api/tags")[0])
        finally:
            for daemon in daemons:
                daemon.process.terminate()
                daemon.process.wait(30)
    small, large = args.small, args.large
    summary = {f"tags_ms_{n}": statistics.median(tags[n]) * 1000 for n in (small, large)}
    summary |= {f"chat_ms_{n}": statistics.median(chat[n]) * 1000 for n in (small, large)}
    summary["tags_ratio"] = summary[f"tags_ms_{large}"] / summary[f"tags_ms_{small}"]
    summary["chat_ratio"] = summary[f"chat_ms_{large}"] / summary[f"chat_ms_{small}"]
    print(f"GET /api/tags          {small:4d} models {summary[f'tags_ms_{small}']:8.2f} ms   "
          f"{large:4d} models {summary[f'tags_ms_{large}']:8.2f} ms   ratio {summary['tags_ratio']:.2f}")
    print(f"one-token chat, loaded {small:4d} models {summary[f'chat_ms_{small}']:8.2f} ms   "
          f"{large:4d} models {summary[f'chat_ms_{large}']:8.2f} ms   ratio {summary['chat_ratio']:.2f}")
    print(f"(medians of {args.rounds} rounds; goals: tags at {large} < 100 ms, chat ratio <= 1.2)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
