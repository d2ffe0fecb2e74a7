#!/usr/bin/env python3
"""The daemon's own cost: memory with no model, start-up times, and the throughput of its cheapest routes.

    python bench/daemon.py [--model PATH] [--starts 3] [--seconds 3] [--json]

Runs ``python -m mullama serve`` as a user does (its own store and home,
bytecode compiled once by an unrecorded first start, as an installed
package has it) and reports:

- idle resident memory (VmRSS, and its anonymous and file-backed parts) once
  the daemon answers, and again after ``GET /api/tags`` and ``/api/version``,
  next to what a bare interpreter holds in the same environment;
- the resident memory once the test model has answered a chat, minus the
  model's own size as the daemon estimates it (``/api/ps``): what the daemon
  holds beyond the model (negative on a CPU, where the weights are mapped
  from the file and only the pages read count), and minus the idle figure;
- start-up time to the first answer of ``/api/version``, and to the first
  token of a streamed ``/api/chat`` with the model already in the store (the
  model's load included), each the median over ``--starts``;
- ``GET /api/version`` and ``/api/tags`` requests/s over ``--seconds`` with
  keep-alive clients at concurrency 1 and 8, each client a process of its own
  so the clients' interpreter lock is not what is measured, and the daemon's
  CPU time per request (steadier than the rate where other work shares the
  cores).

Resident memory is read from ``/proc``, so this runs on Linux.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a daemon gets to answer its first request.
START_TIMEOUT = 60.0
MIB = 1024 * 1024


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def daemon_env(home: Path, port: int) -> dict[str, str]:
    """The environment of a daemon on ``port`` with its store under ``home``, writing its bytecode under ``home``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MULLAMA_", "OLLAMA_")) and key != "PYTHONDONTWRITEBYTECODE"}
    env |= {"MULLAMA_HOST": f"127.0.0.1:{port}", "MULLAMA_HOME": str(home / "home"),
            "MULLAMA_MODELS": str(home / "models"), "OLLAMA_MODELS": str(home / "ollama"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPYCACHEPREFIX": str(home / "pycache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


class Daemon:
    """One ``mullama serve`` process, timed from the moment it is started."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "mullama", "serve"], env=daemon_env(home, self.port),
                                        cwd=home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=(home / "serve.log").open("ab"))

    def wait_version(self) -> float:
        """Poll ``/api/version`` until it answers; seconds from start to that answer."""
        deadline = self.started + START_TIMEOUT
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mullama serve exited with status {self.process.returncode}")
            try:
                status, _ = self.request("GET", "/api/version", timeout=1.0)
                if status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.005)
        raise SystemExit(f"mullama serve did not answer within {START_TIMEOUT:g} s")

    def request(self, method: str, path: str, body: object = None, timeout: float = 300) -> tuple[int, bytes]:
        """One request on a connection of its own: its status and body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, None if body is None else json.dumps(body))
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def memory(self) -> dict[str, float]:
        """Resident memory in MiB: the total, its anonymous part and its file-backed part (shared libraries)."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
        return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the daemon has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def interpreter_memory(home: Path) -> float:
    """VmRSS in MiB of a bare interpreter in the daemon's environment (what ``python -c pass`` holds)."""
    code = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
    output = subprocess.run([sys.executable, "-c", code], env=daemon_env(home, 0), capture_output=True, text=True,
                            check=True).stdout
    return round(int(output) / 1024, 1)


def create_model(daemon: Daemon, model: Path, name: str) -> None:
    """Upload ``model`` as a blob and create ``name`` from it, as a remote client does."""
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=300)
    try:
        with model.open("rb") as upload:
            connection.request("POST", f"/api/blobs/{digest}", upload,
                               {"Content-Type": "application/octet-stream", "Content-Length": str(model.stat().st_size)})
            response = connection.getresponse()
            response.read()
        if response.status not in (200, 201):
            raise SystemExit(f"uploading the model failed: HTTP {response.status}")
    finally:
        connection.close()
    status, body = daemon.request("POST", "/api/create",
                                  {"model": name, "files": {model.name: digest}, "stream": False})
    if status != 200:
        raise SystemExit(f"creating the model failed: HTTP {status}: {body[:300]!r}")


def first_chat_token(daemon: Daemon, name: str) -> float:
    """Seconds from the daemon's start to the first token of a streamed chat (polling until it listens)."""
    daemon.wait_version()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=300)
    try:
        connection.request("POST", "/api/chat", json.dumps({
            "model": name, "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "options": {"num_predict": 8, "temperature": 0}}))
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"chat failed: HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if json.loads(line).get("message", {}).get("content"):
                first = time.perf_counter() - daemon.started
                response.read()
                return first
    finally:
        connection.close()
    raise SystemExit("the chat streamed no token")


def client(port: int, path: str, start_at: float, seconds: float) -> int:
    """One keep-alive client: requests of ``path`` answered between ``start_at`` and ``seconds`` later."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.connect()
    time.sleep(max(0.0, start_at - time.time()))
    done, deadline = 0, start_at + seconds
    while time.time() < deadline:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
        done += 1
    connection.close()
    return done


def throughput(pool: concurrent.futures.ProcessPoolExecutor, daemon: Daemon, path: str, concurrency: int,
               seconds: float) -> tuple[float, float]:
    """Requests/s of ``path`` with ``concurrency`` keep-alive clients, and the daemon's CPU microseconds per request.

    The CPU time per request depends little on what else the machine runs;
    the rate, on a machine shared with other work, depends on it a lot.
    """
    start_at = time.time() + 1.0  # every client connected before the clock starts
    futures = [pool.submit(client, daemon.port, path, start_at, seconds) for _ in range(concurrency)]
    time.sleep(max(0.0, start_at - time.time()))
    used = daemon.cpu_seconds()
    done = sum(f.result() for f in futures)
    used = daemon.cpu_seconds() - used
    return round(done / seconds, 1), round(used / max(1, done) * 1e6, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the SmolLM2-135M test model)")
    parser.add_argument("--starts", type=int, default=3, help="starts timed for each start-up median")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each throughput run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import smollm2_path

        args.model = smollm2_path()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="mullama-bench-daemon-") as tmp:
        home = Path(tmp)
        warmup = Daemon(home)  # compiles the bytecode and warms the page cache; not recorded
        warmup.wait_version()
        warmup.stop()
        starts = []
        for _ in range(args.starts):
            daemon = Daemon(home)
            starts.append(daemon.wait_version())
            daemon.stop()
        result["start_to_version_s"] = round(statistics.median(starts), 3)
        daemon = Daemon(home)
        try:
            daemon.wait_version()
            time.sleep(1.0)  # let start-up's garbage settle
            result["interpreter_mib"] = interpreter_memory(home)
            idle = result["idle_mib"] = daemon.memory()
            daemon.request("GET", "/api/tags")
            daemon.request("GET", "/api/version")
            result["idle_after_requests_mib"] = daemon.memory()
            rates: dict[str, float] = {}
            cpu: dict[str, float] = {}
            with concurrent.futures.ProcessPoolExecutor(8, mp_context=multiprocessing.get_context("fork")) as pool:
                throughput(pool, daemon, "/api/tags", 8, 1.0)  # warm-up, not recorded
                for path in ("/api/version", "/api/tags"):
                    for concurrency in (1, 8):
                        key = f"{path} c={concurrency}"
                        rates[key], cpu[key] = throughput(pool, daemon, path, concurrency, args.seconds)
            result["requests_per_s"] = rates
            result["server_cpu_us_per_request"] = cpu
            result["after_throughput_mib"] = daemon.memory()
            create_model(daemon, args.model, "bench")
        finally:
            daemon.stop()
        warmup = Daemon(home)  # compiles what the first chat imports; not recorded
        try:
            first_chat_token(warmup, "bench")
        finally:
            warmup.stop()
        firsts = []
        for run in range(args.starts):
            daemon = Daemon(home)
            try:
                firsts.append(first_chat_token(daemon, "bench"))
                if run < args.starts - 1:
                    continue
                status, body = daemon.request("GET", "/api/ps")
                size = json.loads(body)["models"][0]["size"] / MIB if status == 200 else float("nan")
                loaded = daemon.memory()
                result["loaded_mib"] = loaded
                result["model_estimate_mib"] = round(size, 1)
                result["loaded_minus_estimate_mib"] = round(loaded["rss"] - size, 1)
                result["loaded_minus_idle_mib"] = round(loaded["rss"] - idle["rss"], 1)
            finally:
                daemon.stop()
        result["start_to_first_chat_token_s"] = round(statistics.median(firsts), 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
