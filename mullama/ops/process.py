"""The standard ``process_*`` metrics of this process, read at scrape time.

On Linux they come from ``/proc/self`` (what Prometheus's own client
libraries read); elsewhere from what the standard library can tell
(``os.times``, ``resource``, ``/dev/fd``), and a value nothing portable
gives (resident memory) is left out rather than guessed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from mullama.ops.prometheus import Family, Sample

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

_PROC = Path("/proc/self")


@dataclass(frozen=True)
class ProcessReading:
    """One reading; None where this platform cannot tell."""

    cpu_seconds: float
    threads: int
    resident_bytes: int | None = None
    virtual_bytes: int | None = None
    open_fds: int | None = None
    max_fds: int | None = None
    start_time: float | None = None


def read_process() -> ProcessReading:
    """This process's resources now: from ``/proc/self`` where it exists, else the portable fallback."""
    if (_PROC / "stat").exists():
        try:
            return _read_proc()
        except (OSError, ValueError, IndexError):
            pass
    return _read_portable()


def _read_proc() -> ProcessReading:
    stat = (_PROC / "stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: fields are counted after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    utime, stime = int(fields[11]), int(fields[12])
    threads = int(fields[17])
    start_ticks, vsize, rss_pages = int(fields[19]), int(fields[20]), int(fields[21])
    return ProcessReading(
        cpu_seconds=(utime + stime) / ticks,
        threads=threads,
        resident_bytes=rss_pages * page,
        virtual_bytes=vsize,
        open_fds=len(os.listdir(_PROC / "fd")),
        max_fds=_max_fds(),
        start_time=_boot_time() + start_ticks / ticks,
    )


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def _max_fds() -> int | None:
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _read_portable() -> ProcessReading:
    times = os.times()
    try:
        open_fds: int | None = len(os.listdir("/dev/fd"))
    except OSError:
        open_fds = None
    # Only threads Python started: native threads (llama.cpp's) are invisible without /proc.
    return ProcessReading(cpu_seconds=times.user + times.system, threads=threading.active_count(),
                          open_fds=open_fds, max_fds=_max_fds())


def process_families() -> list[Family]:
    """The ``process_*`` families of one reading (a collector for :class:`~mullama.ops.prometheus.Registry`)."""
    reading = read_process()
    families = [Family("process_cpu_seconds", "counter", "Total user and system CPU time spent in seconds.",
                       "seconds", [Sample("_total", (), reading.cpu_seconds)]),
                Family("process_threads", "gauge", "Number of OS threads in the process.", "",
                       [Sample("", (), reading.threads)])]
    optional = (
        ("process_resident_memory_bytes", "Resident memory size in bytes.", "bytes", reading.resident_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", "bytes", reading.virtual_bytes),
        ("process_open_fds", "Number of open file descriptors.", "", reading.open_fds),
        ("process_max_fds", "Maximum number of open file descriptors.", "", reading.max_fds),
        ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", "seconds",
         reading.start_time),
    )
    for name, help, unit, value in optional:
        if value is not None:
            families.append(Family(name, "gauge", help, unit, [Sample("", (), value)]))
    return families
