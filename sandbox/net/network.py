"""Private networks between machines: an isolated layer-2 segment each, owned by this run.

A :class:`Network` is a switch process (:mod:`sandbox.net.switch`) with its sockets in a
private directory of this run; a machine on it has one more NIC (a QEMU ``dgram`` netdev to
the switch), a static address in the network's /24, the names of its peers in
``/etc/hosts``, and can be cut off (``block``: link down, as the guest sees it; a machine's
side is :mod:`sandbox.net.members`) or split from others (:meth:`Network.partition`). Golden
snapshots are made per number of networks (the NIC is there from the boot; its backend is
chosen per clone), so a networked clone starts like a plain one: its address is taken before
it starts, the guest agent sets its links and names with the clone's identity while SSH
connects (no process spawned in the guest), and the machines already there learn its name
through their agents meanwhile. SSH does the same where there is no agent (cold boots).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import re
import shutil
import threading
from pathlib import Path

from ..vm.runs import current_run
from . import switch
from .segment import Member, Membership, NetworkError, Peer, check_hostname, free_host
from .switch_process import SwitchProcess

_counter = itertools.count()
_open: dict[str, Network] = {}
_open_lock = threading.Lock()


class Network:
    """A private segment; use it as a context manager (or ``start()``/``close()``), and pass
    it in ``networks=[...]`` to the machines that should be on it."""

    def __init__(self, name: str | None = None) -> None:
        number = next(_counter)
        self.name = name or f"net{number}"
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", self.name):
            raise NetworkError(f"network name {self.name!r}: use up to 32 letters, digits, "
                               "'.', '_', '-'")
        self.subnet = ipaddress.IPv4Network(f"192.168.{100 + number % 150}.0/24")
        self.path: Path | None = None
        self._switch: SwitchProcess | None = None
        self._members: dict[str, tuple[Member, int, str]] = {}  # name -> machine, index, ip
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self.path else "new")
        return f"<Network {self.name} {self.subnet} {state}>"

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Network:
        if self._closed:
            raise NetworkError(f"network {self.name} was closed; make a new one")
        if self.path is not None:
            return self
        run = current_run()
        path = run.path / f"net-{self.name}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise NetworkError(f"this run has a network named {self.name!r} already") from None
        try:
            self._switch = SwitchProcess.start(path, self.name, f"sandbox-{run.id}-net-{self.name}",
                                               owned=True)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.path = path
        with _open_lock:
            _open[str(path)] = self
        return self

    def close(self) -> None:
        """Stop the switch and remove its sockets (machines on it lose the segment)."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open.pop(str(self.path), None)
        if self._switch is not None:
            self._switch.stop()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def switch_socket(self) -> Path:
        if self.path is None or self._closed:
            raise NetworkError(f"network {self.name} is not open")
        return self.path / "switch.sock"

    # -- members ------------------------------------------------------------------------------

    def reserve(self, machine: Member, index: int) -> Membership:
        """Take an address for ``machine`` (its NIC number ``index``) before it starts."""
        if self._closed or self.path is None:
            raise NetworkError(f"network {self.name} is closed")
        name = check_hostname(machine.name)
        with self._lock:
            if name in self._members:
                raise NetworkError(f"network {self.name} has a machine named {name!r} already")
            host = free_host(self.subnet, {address for _, _, address in self._members.values()})
            peers = [Peer(n, address, m.files.agent_socket  # type: ignore[union-attr]
                          if m.agent_answered else None, functools.partial(m.succeed_as_root,
                                                                           timeout=60))
                     for n, (m, _, address) in self._members.items()]
            self._members[name] = (machine, index, str(self.subnet.network_address + host))
        return Membership(self.path, index, self.subnet, host, peers)

    def leave(self, machine: Member) -> None:
        with self._lock:
            member = self._members.pop(machine.name, None)
        if member is not None and self.path is not None and not self._closed:
            with contextlib.suppress(OSError, ValueError):
                assert machine.files is not None
                switch.request(self.path, "leave", port=str(machine.files.lan_socket(member[1])))

    def address_of(self, machine: Member) -> str:
        member = self._members.get(machine.name)
        if member is None or member[0] is not machine:
            raise NetworkError(f"{machine.name} is not on network {self.name}")
        return member[2]

    def partition(self, *groups: list[Member]) -> None:
        """Split the network: machines in different groups cannot reach each other (those
        in no group reach only each other). Undone by :meth:`heal`."""
        if self.path is None or self._closed:
            raise NetworkError(f"network {self.name} is closed")
        ports = []
        for group in groups:
            assert all(m.files is not None for m in group)
            ports.append([str(m.files.lan_socket(self._members[m.name][1]))  # type: ignore
                          for m in group if self.address_of(m)])
        switch.request(self.path, "partition", groups=ports)

    def heal(self) -> None:
        if self.path is None or self._closed:
            raise NetworkError(f"network {self.name} is closed")
        switch.request(self.path, "heal")


def network_at(path: str) -> Network:
    with _open_lock:
        network = _open.get(path)
    if network is None:
        raise NetworkError(f"network {Path(path).name.removeprefix('net-')} is not open in "
                           "this process (closed, or never started)")
    return network


