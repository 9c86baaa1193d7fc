"""Named machines: VMs that outlive the process that started them (``sandbox up``, and
failed tests kept with ``--sandbox-keep-on-failure``).

Each lives in ``<runtime>/machines/<name>/`` beside its QMP socket, console log and overlay,
with a ``state.json`` saying how to reach it. A machine whose QEMU has died shows as dead
and ``sandbox prune`` (or ``sandbox down``) clears it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SandboxError
from .paths import runtime_dir
from .runs import kill_tagged, process_alive

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def machines_dir() -> Path:
    path = runtime_dir() / "machines"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise SandboxError(f"machine name {name!r}: use up to 63 letters, digits, '.', '_', '-'")
    return name


@dataclass(frozen=True)
class NamedMachine:
    name: str
    path: Path
    state: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.state["pid"])

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.state.get("start_ticks"))

    @property
    def status(self) -> str:
        return "running" if self.alive else "dead"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "image": self.state["image"],
                "pid": self.pid, "ssh_port": self.state["ssh_port"],
                "memory_mib": self.state.get("memory_mib"), "cpus": self.state.get("cpus"),
                "created": self.state.get("created"), "path": str(self.path)}


def list_named() -> list[NamedMachine]:
    found = []
    for path in sorted(machines_dir().iterdir()):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(NamedMachine(path.name, path, state))
    return found


def find_named(name: str) -> NamedMachine:
    for machine in list_named():
        if machine.name == name:
            return machine
    known = ", ".join(m.name for m in list_named()) or "none"
    raise SandboxError(f"no machine named {name!r}; known machines: {known}. "
                       f"Start one with: sandbox up {name}")


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.rename(path / "state.json")


def remove_named(machine: NamedMachine, *, timeout: float = 5.0) -> None:
    """Kill the machine's QEMU (if it still runs as recorded) and delete its directory."""
    if machine.alive:
        os.kill(machine.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while machine.alive and time.monotonic() < deadline:
            time.sleep(0.02)
    shutil.rmtree(machine.path, ignore_errors=True)


def prune_named() -> list[str]:
    """Remove the directories of named machines whose QEMU is gone."""
    removed = []
    for machine in list_named():
        if not machine.alive:
            shutil.rmtree(machine.path, ignore_errors=True)
            removed.append(f"removed dead machine {machine.name}")
    # Directories without a state file belong to an `up` that died while starting (or one
    # starting right now: leave young ones alone).
    for path in machines_dir().iterdir():
        if not (path / "state.json").exists() and time.time() - path.stat().st_mtime > 300:
            kill_tagged(path / "qemu.pid", f"sandbox-named-{path.name},")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"removed unfinished machine {path.name}")
    return removed
