"""Readiness for systemd (``Type=notify``): ``sd_notify`` over ``NOTIFY_SOCKET``, with the standard library.

systemd passes the path of a datagram socket in ``NOTIFY_SOCKET`` (``@name``
for Linux's abstract namespace); the service sends newline-separated
``KEY=value`` assignments to it. Without the variable (not under systemd)
every call does nothing, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("mullama.systemd")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1\\nSTATUS=..."``) to the manager; False when there is none or it is unreachable.

    Failure to notify never stops the daemon: it is logged and reported.
    """
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
    return True


def ready(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon accepts requests (``READY=1``), with an optional status line."""
    return notify("READY=1" + (f"\nSTATUS={_line(status)}" if status else ""), env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """Set the status line ``systemctl status`` shows."""
    return notify(f"STATUS={_line(text)}", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1", env)


def reloading(env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a reload (SIGHUP) began; follow with :func:`ready` when it is done."""
    # systemd 253+ wants the monotonic time with RELOADING=1, to tell this reload from an older one.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}", env)


def _line(text: str) -> str:
    # A newline would start a new assignment: a status must stay one line.
    return " ".join(text.split())
