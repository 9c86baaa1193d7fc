"""Processes: told apart by more than their pid (a pid and its start time name one process
for good, a reused pid gets another start time; a kill needs the owner and a tag too), and
started so that they never outlive their run (:func:`spawn`, :func:`dies_with`)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from .waits import wait_until


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


class Pid:
    """The part of Popen's interface a QemuProcess uses, for a QEMU this process did not
    start (a named machine attached to from another command)."""

    def __init__(self, pid: int, start_ticks: int | None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not process_alive(self.pid, self.start_ticks):
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            wait_until(lambda: self.poll() is not None, timeout=timeout or 1e9, interval=0.02,
                       what=f"pid {self.pid} did not exit")
        except SandboxError:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0) from None
        return self.returncode or -1

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41


_libc = ctypes.CDLL(None, use_errno=True)


# QEMU is spawned from one long-lived thread: a parent-death signal fires when the *thread*
# that forked the child exits, so spawning from a short-lived worker thread would kill it.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


def _new_spawner_in_child() -> None:
    """A forked child has no spawner thread (only the forking thread survives a fork), and
    its copy of the executor would wait for that thread for ever: it gets its own."""
    global _spawner
    _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


os.register_at_fork(after_in_child=_new_spawner_in_child)


def dies_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die when ``parent`` (the spawning thread's
    process) does, even by SIGKILL: QEMU, qemu-img and the like never outlive their run."""
    def setup() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return setup


def spawn(command: list[str], *, die_with_parent: bool, stdout: Any = subprocess.DEVNULL,
          stderr: Any = subprocess.DEVNULL, huge_pages: bool = True) -> subprocess.Popen[bytes]:
    """Start ``command`` (a QEMU) in a session of its own, from the long-lived spawner
    thread, with a parent-death signal (SIGKILL) unless ``die_with_parent`` is False: every
    QEMU of this project is started here (machines, golden boots, the KVM probe).
    ``huge_pages`` False: no transparent huge pages for it (PR_SET_THP_DISABLE, kept across
    exec), see :mod:`sandbox.vm.qemu`."""
    setups = [dies_with(os.getpid())] if die_with_parent else []
    if not huge_pages:
        setups.insert(0, lambda: _libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0))

    def setup() -> None:
        for step in setups:
            step()

    return _spawner.submit(
        subprocess.Popen, command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True, preexec_fn=setup if setups else None).result()
