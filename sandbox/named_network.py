"""Named networks: private segments shared by named machines (``sandbox up NAME --network
NET``), for manual work.

A named network lives in ``<runtime>/networks/<NET>/``: its switch (:mod:`sandbox.switch`,
started by the first ``up`` that needs it, with no owner process) and one file per member
under ``members/`` (name -> address), written under the network's lock. The switch exits by
itself a few seconds after its last member's machine is gone (``sandbox down``), and the
directory with it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import switch
from .errors import SandboxError
from .network import Membership, NetworkError, Peer, check_hostname, free_host
from .paths import module_process, private_lock, runtime_dir
from .plan import MachineFiles
from .waits import wait_until

if TYPE_CHECKING:
    from .machine import Machine

_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


def networks_dir() -> Path:
    path = runtime_dir() / "networks"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def subnet_of(name: str) -> ipaddress.IPv4Network:
    third = 100 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 150
    return ipaddress.IPv4Network(f"192.168.{third}.0/24")


def ensure(name: str) -> Path:
    """The directory of named network ``name``, its switch started if it is not running."""
    if not name or len(name) > 32 or not set(name) <= set(_NAME_CHARS) or name[0] in "._-":
        raise NetworkError(f"network name {name!r}: use up to 32 letters, digits, '.', '_', "
                           "'-', starting with a letter or digit")
    path = networks_dir() / name
    path.mkdir(mode=0o700, exist_ok=True)
    with private_lock(path / "lock", timeout=30):
        try:
            switch.request(path, "ping", timeout=1)
            return path
        except (OSError, ValueError):
            pass
        for stale in ("switch.sock", "control.sock"):
            (path / stale).unlink(missing_ok=True)
        command, env = module_process("switch", str(path), "0", "-",
                                      f"sandbox-network-{name}")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, cwd="/",
                                   env=env)

        def answering() -> bool:
            if process.poll() is not None:
                raise NetworkError(f"the switch of network {name} exited at once "
                                   f"(status {process.returncode})")
            try:
                switch.request(path, "ping", timeout=1)
                return True
            except (OSError, ValueError):
                return False

        wait_until(answering, timeout=30, interval=0.02, error=NetworkError,
                   what=f"the switch of network {name} did not start")
    return path


def reserve(machine: Machine, index: int, path: Path) -> Membership:
    """An address for named ``machine`` (NIC number ``index``) on the named network at
    ``path``, taken before it starts (its member file written under the network's lock)."""
    from .named import attach

    check_hostname(machine.name)
    members = path / "members"
    members.mkdir(mode=0o700, exist_ok=True)
    subnet = subnet_of(path.name)
    machines = runtime_dir() / "machines"
    with private_lock(path / "lock", timeout=30):
        current = {p.stem: json.loads(p.read_text())["address"] for p in members.glob("*.json")
                   if (machines / p.stem).exists()}
        if machine.name in current:
            raise NetworkError(f"network {path.name} has a machine named {machine.name!r}")
        host = free_host(subnet, set(current.values()))
        (members / f"{machine.name}.json").write_text(
            json.dumps({"address": str(subnet.network_address + host)}))

    def run(peer: str) -> Callable[[str], str]:
        def line(command: str) -> str:
            vm = attach(peer, monitor=False)
            try:
                return vm.succeed_as_root(command, timeout=60)
            finally:
                vm.disconnect()
        return line

    peers = [Peer(name, address, MachineFiles(machines / name).agent_socket, run(name))
             for name, address in sorted(current.items())]
    return Membership(path, index, subnet, host, peers)


def leave(machine_name: str, path: Path) -> None:
    (path / "members" / f"{machine_name}.json").unlink(missing_ok=True)


def check_open(path: str) -> Path:
    directory = Path(path)
    if not (directory / "switch.sock").exists():
        raise SandboxError(f"named network {directory.name} is not running")
    return directory
