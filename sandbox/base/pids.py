"""Processes told apart by more than their pid: a pid and its start time name one process
for good (a reused pid gets another start time), and a kill needs the owner and a tag too."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start_ticks: int | None) -> bool:
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


def kill_tagged(pidfile: Path, tag: str) -> bool:
    """SIGKILL the process named in ``pidfile`` if it is this account's and its command line
    still carries ``tag`` (a pid file alone is never trusted)."""
    try:
        pid = int(pidfile.read_text().strip())
        owner = os.stat(f"/proc/{pid}").st_uid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if owner != os.getuid() or tag.encode() not in cmdline:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
