"""Is the process that runs a job still alive? (The run reaper's question.)

A pid alone is not an identity: after a crash and restart the same number can belong to
another process. A process is named by host, boot id, pid and its start time in clock
ticks since boot (``/proc/<pid>/stat`` field 22), which together never repeat.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """Start time of a running process; None when there is none (or only its zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):  # a killed worker its parent has not reaped
        return None
    return fields[19]


def identity(pid: int | None = None) -> str:
    """``host/boot_id/pid/start_ticks`` of a process (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_start_ticks(pid) or ''}"


def alive(ident: str) -> bool | None:
    """True if that very process still runs, False if it is gone, None if this machine
    cannot tell (another host; a system without /proc)."""
    try:
        host, boot, pid_s, ticks = ident.split("/")
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname() or not Path("/proc/self/stat").exists():
        return None
    if boot and boot != _boot_id():
        return False  # the machine restarted since
    now = _start_ticks(pid)
    if now is None:
        return False
    return not ticks or now == ticks


def started_at(pid: int) -> float | None:
    """When a running process started (epoch seconds), or None if there is no such process."""
    ticks = _start_ticks(pid)
    if ticks is None:
        return None
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return btime + int(ticks) / os.sysconf("SC_CLK_TCK")
