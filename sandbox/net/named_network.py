"""Named networks: private segments shared by named machines (``sandbox up NAME --network
NET``), for manual work.

A named network lives in ``<runtime>/networks/<NET>/``: its switch (:mod:`sandbox.net.switch`,
started by the first ``up`` that needs it, with no owner process) and one file per member
under ``members/`` (name -> address, port, MAC), written under the network's lock by ``up``,
which also makes sure the switch runs under that lock; ``down`` takes the machine off the
switch and removes its file. The switch decides under the same lock to end, a few seconds
after its last member's machine is gone, and removes the directory then; a switch started
again (after it died) joins the members whose machines still run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..base.paths import runtime_dir
from ..base.processes import process_start_ticks
from ..errors import SandboxError
from ..vm.files import MachineFiles
from . import switch
from .segment import Member, Membership, NetworkError, Peer, check_hostname, free_host
from .switch_process import SwitchProcess, answers

_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
#: How long a command waits for another one holding a network's lock (which may be starting
#: its switch: up to 30 s).
LOCK_TIMEOUT = 60.0

#: Runs a shell line as root in a named machine (its name, the line): how a peer without a
#: guest agent is told a newcomer's name.
PeerShell = Callable[[str, str], str]


def networks_dir() -> Path:
    path = runtime_dir() / "networks"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def subnet_of(name: str) -> ipaddress.IPv4Network:
    third = 100 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 150
    return ipaddress.IPv4Network(f"192.168.{third}.0/24")


def check_network_name(name: str) -> str:
    if not name or len(name) > 32 or not set(name) <= set(_NAME_CHARS) or name[0] in "._-":
        raise NetworkError(f"network name {name!r}: use up to 32 letters, digits, '.', '_', "
                           "'-', starting with a letter or digit")
    return name


@contextmanager
def locked(path: Path, *, create: bool = True) -> Iterator[bool]:
    """Hold the lock of the named network at ``path`` (see :func:`switch.network_lock`)."""
    try:
        with switch.network_lock(path, LOCK_TIMEOUT, create=create) as exists:
            yield exists
    except TimeoutError:
        raise NetworkError(f"network {path.name} stayed locked for {LOCK_TIMEOUT:g} s by "
                           "another sandbox command; try again when it is done") from None


def ensure(name: str) -> Path:
    """The directory of named network ``name``, its switch started if it is not running."""
    path = networks_dir() / check_network_name(name)
    with locked(path):
        _ensure_switch(path)
    return path


def _ensure_switch(path: Path) -> None:
    """Start the switch of the named network at ``path`` unless it answers; the caller holds
    the network's lock (so the switch cannot decide to end meanwhile)."""
    if answers(path):
        return
    for stale in ("switch.sock", "control.sock"):
        (path / stale).unlink(missing_ok=True)
    SwitchProcess.start(path, path.name, f"sandbox-network-{path.name}", owned=False)


def reserve(machine: Member, index: int, path: Path, peer_shell: PeerShell) -> Membership:
    """An address for named ``machine`` (NIC number ``index``) on the named network at
    ``path``, taken before it starts: under the network's lock, its switch made sure of and
    its member file written (address, port, MAC, and this process as its starter), so the
    switch keeps running for it. Peers without a guest agent learn its name through
    ``peer_shell`` (handed in by whoever makes named machines)."""
    check_hostname(machine.name)
    assert machine.files is not None
    subnet = subnet_of(path.name)
    machines = runtime_dir() / "machines"
    with locked(path):
        _ensure_switch(path)
        members = path / "members"
        members.mkdir(mode=0o700, exist_ok=True)
        current = {}
        for p in members.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                if (machines / p.stem).exists():
                    current[p.stem] = json.loads(p.read_text())["address"]
        if machine.name in current:
            raise NetworkError(f"network {path.name} has a machine named {machine.name!r}")
        host = free_host(subnet, set(current.values()))
        membership = Membership(path, index, subnet, host, [])
        pid = os.getpid()
        tmp = members / f".{machine.name}.tmp"
        tmp.write_text(json.dumps({
            "address": membership.ip, "port": str(machine.files.lan_socket(index)),
            "mac": membership.link["mac"], "starter": [pid, process_start_ticks(pid)]}))
        tmp.rename(members / f"{machine.name}.json")

    membership.peers = [Peer(name, address, MachineFiles(machines / name).agent_socket,
                             functools.partial(peer_shell, name))
                        for name, address in sorted(current.items())]
    return membership


def leave(machine_name: str, path: Path) -> None:
    """Take named machine ``machine_name`` off the named network at ``path``: its port on
    the switch and its member file."""
    with locked(path, create=False) as exists:
        if not exists:
            return
        member = path / "members" / f"{machine_name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            switch.request(path, "leave", timeout=2,
                           port=json.loads(member.read_text())["port"])
        member.unlink(missing_ok=True)


def check_open(path: str) -> Path:
    directory = Path(path)
    if not (directory / "switch.sock").exists():
        raise SandboxError(f"named network {directory.name} is not running")
    return directory
