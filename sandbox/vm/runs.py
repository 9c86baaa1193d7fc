"""Run ownership: everything a process creates lives under one run directory, tagged with the
run id, so that a later run (or ``sandbox prune``) can reap what a killed run left behind.

Layout under :func:`sandbox.base.paths.runtime_dir`::

    run-<id>/owner.json          pid and start time of the owning process
    run-<id>/<machine>/          qmp.sock, console.log, overlay.qcow2, qemu.pid, ...

A run is orphaned once its owner process is gone (or its pid now names another process).
QEMU itself dies with its owner through a parent-death signal; the reaper is the second line.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..base.paths import runtime_dir
from ..base.processes import kill_tagged, process_alive, process_start_ticks
from .files import MachineFiles, run_tag_prefix


@dataclass(frozen=True)
class Run:
    id: str
    path: Path

    def machine_dir(self, name: str) -> Path:
        path = self.path / name
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            from ..errors import SandboxError

            raise SandboxError(f"a machine named {name!r} runs in this process already; "
                               "give each machine its own name") from None
        return path


_lock = threading.Lock()
_current: Run | None = None


def current_run() -> Run:
    """This process's run, created on first use (and re-created after a fork)."""
    global _current
    with _lock:
        if _current is None or _owner_pid(_current) != os.getpid():
            reap_orphans()
            run_id = secrets.token_hex(4)
            path = runtime_dir() / f"run-{run_id}"
            path.mkdir(mode=0o700)
            owner = {"pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()),
                     "created": time.time()}
            (path / "owner.json").write_text(json.dumps(owner))
            _current = Run(run_id, path)
            atexit.register(_remove_run, _current, os.getpid())
        return _current


def _remove_run(run: Run, owner: int) -> None:
    """At exit: machines still open die with this process; their files go with the run."""
    if os.getpid() != owner:  # a forked child exiting: the run is its parent's
        return
    for machine in _machine_dirs(run.path):
        kill_tagged(MachineFiles(machine).pidfile, run_tag_prefix(run.id))
    shutil.rmtree(run.path, ignore_errors=True)


def _owner_pid(run: Run) -> int | None:
    try:
        return int(json.loads((run.path / "owner.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def orphaned_runs() -> list[Path]:
    found = []
    for path in sorted(runtime_dir().glob("run-*")):
        try:
            owner = json.loads((path / "owner.json").read_text())
        except (OSError, ValueError):
            # A run directory without a readable owner is one that died while being created;
            # leave young ones alone in case their owner is writing it right now.
            if time.time() - path.stat().st_mtime > 60:
                found.append(path)
            continue
        if not process_alive(owner["pid"], owner.get("start_ticks")):
            found.append(path)
    return found


def reap_orphans() -> list[str]:
    """Kill the QEMU processes of dead runs and delete their files; returns what was reaped."""
    reaped = []
    for path in orphaned_runs():
        run_id = path.name.removeprefix("run-")
        for machine in _machine_dirs(path):
            if kill_tagged(MachineFiles(machine).pidfile, run_tag_prefix(run_id)):
                reaped.append(f"killed QEMU of {machine.name} (run {run_id})")
        shutil.rmtree(path, ignore_errors=True)
        reaped.append(f"removed {path}")
    return reaped


def running_tcg_threads() -> int:
    """The TCG vCPU threads of this account's running machines (every run's, this process's
    included): each keeps a host core busy while its guest works. QEMU names them (with
    debug-threads=on) "CPU n/TCG", or "ALL CPUs/TCG" when one thread runs them all."""
    count = 0
    for run in runtime_dir().glob("run-*"):
        try:
            machines = _machine_dirs(run)
        except OSError:  # removed meanwhile
            continue
        for machine in machines:
            try:
                pid = int(MachineFiles(machine).pidfile.read_text())
                tasks = os.listdir(f"/proc/{pid}/task")
            except (OSError, ValueError):
                continue
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/comm", "rb") as comm:
                        count += comm.read().endswith(b"/TCG\n")
                except OSError:
                    continue
    return count


def _machine_dirs(run: Path) -> list[Path]:
    return [entry for entry in run.iterdir() if entry.is_dir()] if run.is_dir() else []
