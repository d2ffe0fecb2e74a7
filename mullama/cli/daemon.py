"""Reaching the daemon: a client of ``MULLAMA_HOST``, with a local daemon started in the background if none answers."""

from __future__ import annotations

import os
import subprocess
import time

from mullama import config
from mullama.client import Client, ConnectError, host_from_env
from mullama.spawn import child_environment, module_command

#: Seconds to wait for a daemon started in the background to answer.
SERVER_START_TIMEOUT = 30.0


def connect(*, start: bool = True) -> Client:
    """A client of the daemon at ``MULLAMA_HOST``; start one in the background if none answers.

    Only a local address gets a daemon started; a remote one that does not
    answer is an error. The daemon runs in the data directory, not the
    user's, and imports nothing from where the command was run.
    """
    client = Client(host_from_env())
    if not start or client.heartbeat():
        return client
    if not client.host.is_local:
        raise ConnectError(f"could not connect to a Mullama server at {client.host.url}, is it running?")
    home = config.data_dir().expanduser().absolute()
    log = home / "logs" / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        process = subprocess.Popen(
            module_command("mullama", "serve"),
            cwd=home,
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Detached, so the daemon outlives this command and Ctrl-C here does not reach it.
            **({"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}),
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if client.heartbeat(timeout=1.0):
            return client
        code = process.poll()
        if code is not None:
            raise ConnectError(f"the Mullama server exited with status {code} while starting, see {log}")
        time.sleep(0.1)
    raise ConnectError(f"the Mullama server did not answer at {client.host.url} within {SERVER_START_TIMEOUT:g} s, see {log}")
