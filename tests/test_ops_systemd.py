"""Readiness notification to systemd, received on a real AF_UNIX datagram socket standing in for NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import REPO

from mullama.ops import systemd

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="systemd notification is for Unix")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the NOTIFY_SOCKET value naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield sock, str(path)


def test_ready_status_reloading_and_stopping_arrive(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    env = {"NOTIFY_SOCKET": address}
    assert systemd.ready("listening on 127.0.0.1:11434\n2 models", env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:11434 2 models"
    assert systemd.status("3 requests in flight", env)
    assert sock.recv(4096) == b"STATUS=3 requests in flight"
    assert systemd.reloading(env)
    reloading = sock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    assert systemd.stopping(env)
    assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_abstract_namespace_socket() -> None:
    name = f"mullama-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        assert systemd.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent(tmp_path: Path) -> None:
    assert not systemd.ready(env={})
    assert not systemd.ready(env={"NOTIFY_SOCKET": ""})
    assert not systemd.ready(env={"NOTIFY_SOCKET": "relative/path"})
    # A socket that is gone is logged, never raised: the daemon must not die of it.
    assert not systemd.ready(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_a_process_reads_the_variable_from_its_environment(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=address,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", "from mullama.ops import systemd; systemd.ready('up')"], env=env,
                   check=True, timeout=60)
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
