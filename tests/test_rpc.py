"""Inference across machines over llama.cpp's RPC: two workers, each in a network namespace of its own.

The test makes two namespaces joined to this one by veth pairs (as two
machines on a network), runs ``mullama rpc-server`` in each, and a daemon
here with ``MULLAMA_RPC`` naming both: the model's layers go to the two
workers, its greedy answer must be the one this machine's CPU gives, and a
worker killed mid-generation must end that generation with a clear error
while the daemon goes on serving. It needs the RPC-enabled build
(``python build_native.py --backend rpc``, built here on first use) and
root for the namespaces; without namespaces it is skipped, saying why.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import REPO, Serving, cli, create_model, environment, free_port, serve

from mullama.engine.rpc import _closed_workers, check_worker, parse_endpoints
from mullama.errors import BadRequestError

pytestmark = pytest.mark.slow

PROMPT = "Write a story about a lighthouse keeper."
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 24}


@pytest.fixture(scope="module")
def rpc_library() -> Path:
    """The directory of an RPC-enabled build of the pinned llama.cpp (built on first use, then cached).

    Built with ``--keep-selection``: the rest of the suite keeps loading the build the test command selected.
    """
    result = subprocess.run([sys.executable, str(REPO / "build_native.py"), "--backend", "rpc", "--keep-selection",
                             "--print-lib-dir"],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class Machine:
    """A network namespace reached over a veth pair: its name, its address, and the link's name here."""

    namespace: str
    address: str
    link: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def machines() -> Iterator[list[Machine]]:
    """Two namespaces, 10.N.1.2 and 10.N.2.2, each joined to this one (10.N.i.1) by a veth pair."""
    if not shutil.which("ip"):
        pytest.skip("no `ip` command (iproute2) to make network namespaces with")
    tag = os.getpid() % 10000
    net = 200 + os.getpid() % 50
    made: list[Machine] = []
    try:
        for i in (1, 2):
            machine = Machine(f"mullama-rpc-{tag}-{i}", f"10.{net}.{i}.2", f"mlrpc{tag}h{i}")
            created = _ip("netns", "add", machine.namespace)
            if created.returncode != 0:
                pytest.skip(f"cannot create a network namespace here ({created.stderr.strip()}): "
                            "the RPC test needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN)")
            made.append(machine)
            peer = f"mlrpc{tag}n{i}"
            for command in (("link", "add", machine.link, "type", "veth", "peer", "name", peer),
                            ("link", "set", peer, "netns", machine.namespace),
                            ("addr", "add", f"10.{net}.{i}.1/24", "dev", machine.link),
                            ("link", "set", machine.link, "up"),
                            ("netns", "exec", machine.namespace, "ip", "addr", "add", f"{machine.address}/24",
                             "dev", peer),
                            ("netns", "exec", machine.namespace, "ip", "link", "set", peer, "up"),
                            ("netns", "exec", machine.namespace, "ip", "link", "set", "lo", "up")):
                done = _ip(*command)
                assert done.returncode == 0, f"ip {' '.join(command)}: {done.stderr}"
        yield made
    finally:
        for machine in made:
            _ip("link", "del", machine.link)
            _ip("netns", "del", machine.namespace)


@dataclass
class Worker:
    """A ``mullama rpc-server`` running in a namespace."""

    process: subprocess.Popen[str]
    endpoint: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def start_worker(machine: Machine, library: Path, tmp: Path) -> Worker:
    """``mullama rpc-server`` on the machine's address; returns once it accepts connections (at most 60 s)."""
    port = 50052
    env = environment(tmp, free_port()) | {"MULLAMA_LIBRARY_PATH": str(library)}
    log = tmp / f"{machine.namespace}.log"
    with log.open("w") as errors:
        process = subprocess.Popen(
            ["ip", "netns", "exec", machine.namespace, sys.executable, "-m", "mullama", "rpc-server", "--host",
             machine.address, "--port", str(port), "--threads", "1", "--allow-remote"],
            env=env, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    endpoint = f"{machine.address}:{port}"
    deadline = time.monotonic() + 60
    # Ready when its port accepts a connection from this machine, over the veth pair, as the daemon's will.
    while check_worker(endpoint, timeout=1.0) is not None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the worker in {machine.namespace} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return Worker(process, endpoint, log)


@pytest.fixture
def cluster(machines, rpc_library, tmp_path, model_path) -> Iterator[tuple[Serving, list[Worker]]]:
    """Two workers and a daemon spreading models over them; models "remote" (default) and "local" (num_gpu 0)."""
    workers = [start_worker(machine, rpc_library, tmp_path) for machine in machines]
    daemon = None
    try:
        daemon = serve(tmp_path, MULLAMA_LIBRARY_PATH=str(rpc_library), MULLAMA_DEBUG="1",
                       MULLAMA_RPC=",".join(worker.endpoint for worker in workers))
        create_model(daemon.port, model_path, "remote")
        create_model(daemon.port, model_path, "local", parameters={"num_gpu": 0})
        yield daemon, workers
    finally:
        if daemon is not None:
            daemon.stop()
        for worker in workers:
            worker.stop()


def generate(port: int, model: str, **options: object) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        body = {"model": model, "prompt": PROMPT, "stream": False, "options": {**GREEDY, **options}}
        connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def buffers_by_device(log: str) -> dict[str, float]:
    """MiB of model weights llama.cpp put on each device, from its load report."""
    return {match.group(1): float(match.group(2))
            for match in re.finditer(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", log)}


def test_a_worker_refuses_to_listen_beyond_loopback_unless_told(tmp_path):
    env = environment(tmp_path, free_port())
    refused = cli(env, "rpc-server", "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 1
    assert "no authentication" in refused.stderr and "--allow-remote" in refused.stderr
    busy_port = free_port()
    with socket.create_server(("127.0.0.1", busy_port)):
        taken = cli(env, "rpc-server", "--port", str(busy_port))
    assert taken.returncode == 1
    assert f"could not listen on 127.0.0.1:{busy_port}" in taken.stderr


def test_serve_refuses_a_bad_worker_address(tmp_path):
    env = environment(tmp_path, free_port())
    result = cli(env, "serve", "--rpc", "10.0.0.1")
    assert result.returncode == 1
    assert "bad RPC worker address '10.0.0.1': expected host:port" in result.stderr


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.1:50052", ["10.0.0.1:50052"]),
    (" a.example:1 , b-2.example:65535,a.example:1,", ["a.example:1", "b-2.example:65535"]),
])
def test_worker_addresses_are_parsed(text, expected):
    assert parse_endpoints(text) == expected


@pytest.mark.parametrize("text", ["", ",", "host", "host:0", "host:65536", "[::1]:50052", "::1:50052", "h st:1",
                                  "host:port"])
def test_bad_worker_addresses_are_refused(text):
    with pytest.raises(BadRequestError):
        parse_endpoints(text)


def test_serve_with_workers_refuses_libraries_without_rpc(tmp_path):
    """A daemon told to use workers fails at start, naming the build to make, when its libraries lack RPC."""
    plain = subprocess.run([sys.executable, str(REPO / "build_native.py"), "--print-lib-dir"], capture_output=True,
                           text=True, timeout=3600)
    assert plain.returncode == 0, plain.stderr[-2000:]
    env = environment(tmp_path, free_port()) | {"MULLAMA_LIBRARY_PATH": plain.stdout.strip().splitlines()[-1]}
    result = cli(env, "serve", "--rpc", "127.0.0.1:9")
    assert result.returncode == 1
    assert "no RPC backend: build them with `python build_native.py --backend rpc`" in result.stderr


def test_a_worker_that_closed_its_connection_is_told_from_one_that_did_not():
    """The kernel's view of this process's connections picks the failed worker out (no probe: a busy worker only queues)."""
    with socket.create_server(("127.0.0.1", 0)) as dead, socket.create_server(("127.0.0.1", 0)) as alive:
        endpoints = {f"127.0.0.1:{server.getsockname()[1]}": frozenset({("127.0.0.1", server.getsockname()[1])})
                     for server in (dead, alive)}
        with socket.create_connection(dead.getsockname()) as to_dead, socket.create_connection(alive.getsockname()):
            accepted_dead, _ = dead.accept()
            accepted_alive, _ = alive.accept()
            assert _closed_workers(endpoints) == set()
            accepted_dead.close()
            to_dead.recv(1)  # the FIN has arrived: the connection is in CLOSE_WAIT
            assert _closed_workers(endpoints) == {f"127.0.0.1:{dead.getsockname()[1]}"}
            accepted_alive.close()


def test_layers_split_across_two_workers_answer_as_this_machine_does(cluster):
    daemon, workers = cluster
    status, remote = generate(daemon.port, "remote")
    assert status == 200, remote
    status, local = generate(daemon.port, "local")
    assert status == 200, local
    assert remote["eval_count"] == local["eval_count"] == GREEDY["num_predict"]
    assert remote["response"] == local["response"]
    buffers = buffers_by_device(daemon.log.read_text())
    # Each worker holds a share of the weights (its buffer is named after its address).
    for worker in workers:
        shares = [size for device, size in buffers.items() if device.endswith(f"[{worker.endpoint}]")]
        assert shares and shares[0] > 10, (worker.endpoint, buffers)


def test_a_worker_killed_mid_generation_fails_that_generation_only(cluster):
    daemon, workers = cluster
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=600)
    body = {"model": "remote", "prompt": PROMPT, "options": {"temperature": 0, "num_predict": 4000}}
    connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    chunks = []
    for line in response:
        chunks.append(json.loads(line))
        if len(chunks) == 5:
            workers[0].stop()
        if chunks[-1].get("done") or "error" in chunks[-1]:
            break
    connection.close()
    assert len(chunks) > 5
    last = chunks[-1]
    assert "error" in last, last
    assert f"RPC worker {workers[0].endpoint} stopped answering" in last["error"]
    # The daemon lives on: the model on this machine's CPU answers, and so does the split model,
    # loaded again on the worker that is left.
    status, local = generate(daemon.port, "local")
    assert status == 200 and local["response"], local
    status, remote = generate(daemon.port, "remote")
    assert status == 200, remote
    assert remote["response"] == local["response"]
    log = daemon.log.read_text()
    assert f"RPC worker {workers[0].endpoint} failed" in log
    daemon.stop()
    assert daemon.process.returncode == 0, log[-3000:]
