"""Private networks between machines: an isolated layer-2 segment each, owned by this run.

A :class:`Network` is a switch process (:mod:`sandbox.switch`) with its sockets in a private
directory of this run; a machine on it has one more NIC (a QEMU ``dgram`` netdev to the
switch), a static address in the network's /24, the names of its peers in ``/etc/hosts``,
and can be cut off (:meth:`NetworkedMachine.block`: link down, as the guest sees it) or
split from others (:meth:`Network.partition`). Golden snapshots are made per number of
networks (the NIC is there from the boot; its backend is chosen per clone), so a networked
clone starts like a plain one: its address is taken before it starts, the guest agent sets
its links and names with the clone's identity while SSH connects (no process spawned in the
guest), and the machines already there learn its name through their agents meanwhile. SSH
does the same where there is no agent (cold boots).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.paths import module_process
from ..base.processes import process_start_ticks
from ..base.waits import wait_until
from ..errors import SandboxError
from ..guest.agent import Agent
from ..guest.commands import as_root
from ..vm.plan import lan_pci_address
from ..vm.runs import current_run
from . import switch

if TYPE_CHECKING:
    from ..machine.machine import Machine
    from ..vm.files import MachineFiles
    from ..vm.qemu import QemuProcess
    from ..vm.spec import MachineSpec

_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_counter = itertools.count()
_open: dict[str, Network] = {}
_open_lock = threading.Lock()
#: Tells machines a newcomer's name while the newcomer starts.
_tellers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sandbox-network")
#: How long a peer's guest agent may take to answer before SSH is used instead.
AGENT_TIMEOUT = 5.0


class NetworkError(SandboxError):
    """A network cannot be used as asked: closed, a name taken or not a hostname."""


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
        self._process: subprocess.Popen[bytes] | None = None
        self._members: dict[str, tuple[Machine, int, str]] = {}  # name -> machine, index, ip
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
        owner = os.getpid()
        command, env = module_process(switch.__name__, str(path), str(owner),
                                      str(process_start_ticks(owner) or "-"),
                                      f"sandbox-{run.id}-net-{self.name}")
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, cwd="/", env=env)
        process = self._process

        def answering() -> bool:
            if process.poll() is not None:
                error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise NetworkError(f"the switch of network {self.name} exited: {error[-500:]}")
            try:
                switch.request(path, "ping", timeout=1)
                return True
            except (OSError, ValueError):
                return False

        try:
            wait_until(answering, timeout=30, interval=0.02,
                       what=f"the switch of network {self.name} did not start")
        except BaseException:
            process.kill()
            process.wait()
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
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            if self._process.stderr:
                self._process.stderr.close()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def switch_socket(self) -> Path:
        if self.path is None or self._closed:
            raise NetworkError(f"network {self.name} is not open")
        return self.path / "switch.sock"

    # -- members ------------------------------------------------------------------------------

    def reserve(self, machine: Machine, index: int) -> Membership:
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

    def leave(self, machine: Machine) -> None:
        with self._lock:
            member = self._members.pop(machine.name, None)
        if member is not None and self.path is not None and not self._closed:
            with contextlib.suppress(OSError, ValueError):
                assert machine.files is not None
                switch.request(self.path, "leave", port=str(machine.files.lan_socket(member[1])))

    def address_of(self, machine: Machine) -> str:
        member = self._members.get(machine.name)
        if member is None or member[0] is not machine:
            raise NetworkError(f"{machine.name} is not on network {self.name}")
        return member[2]

    def partition(self, *groups: list[Machine]) -> None:
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


def free_host(subnet: ipaddress.IPv4Network, used: set[str]) -> int:
    """The lowest host number from 2 whose address in ``subnet`` is not in ``used``."""
    for host in range(2, subnet.num_addresses - 1):
        if str(subnet.network_address + host) not in used:
            return host
    raise NetworkError(f"no free address left in {subnet}")


def check_hostname(name: str) -> str:
    if not _HOSTNAME.match(name):
        raise NetworkError(f"machine name {name!r} is not a valid hostname (letters, digits "
                           "and '-', at most 63) and cannot be used on a network")
    return name


@dataclass
class Peer:
    """A machine already on a network a newcomer joins: told the newcomer's name through
    its guest agent (``agent``, None when it has none), else over SSH (``run``)."""

    name: str
    address: str
    agent: Path | None
    run: Callable[[str], object]

    def tell(self, address: str, name: str) -> None:
        if self.agent is not None:
            try:
                Agent(self.agent, timeout=AGENT_TIMEOUT).request("hosts", hosts=[[address, name]])
                return
            except SandboxError:
                pass
        self.run(hosts_line([(address, name)]))


@dataclass
class Membership:
    """A machine's place on one network, taken before it starts."""

    directory: Path  # the network's: its switch's sockets
    index: int
    subnet: ipaddress.IPv4Network
    host: int
    peers: list[Peer]

    @property
    def ip(self) -> str:
        return str(self.subnet.network_address + self.host)

    @property
    def link(self) -> dict[str, object]:
        """The NIC's settings, as the guest agent takes them."""
        third = self.subnet.network_address.packed[2]
        return {"pci": lan_pci_address(self.index),
                "mac": f"52:54:{third:02x}:00:00:{self.host:02x}", "mtu": 1500,
                "address": self.ip, "netmask": str(self.subnet.netmask)}


def hosts_line(entries: list[tuple[str, str]]) -> str:
    """A shell line giving ``/etc/hosts`` the (address, name) ``entries``, replacing the
    lines it had for those names (names are hostnames: nothing to quote)."""
    deletes = " ".join(f"-e '/[[:space:]]{name}$/d'" for name in sorted({n for _, n in entries}))
    lines = "".join(f"{address} {name}\n" for address, name in entries)
    return f"sed -i {deletes} /etc/hosts && printf '{lines}' >> /etc/hosts"


def nic_name_command(pci: str) -> str:
    """The shell command that prints the name of the guest's NIC at PCI address ``pci``
    (as the guest agent's nic_name finds it)."""
    return f"ls /sys/bus/pci/devices/{pci}/virtio*/net"


def setup_line(memberships: list[Membership], hosts: list[tuple[str, str]]) -> str:
    """The shell line that does over SSH what the guest agent does while a clone resumes."""
    names, commands = [], []
    for n, m in enumerate(memberships):
        link, dev = m.link, f"$d{n}"  # the NIC's name, found by its PCI address
        names.append(f"d{n}=$({nic_name_command(str(link['pci']))})")
        commands += [f"link set dev {dev} address {link['mac']} mtu 1500 up",
                     f"addr flush dev {dev}",  # a template's clone had one already
                     f"addr add {m.ip}/{m.subnet.prefixlen} dev {dev}"]
    return " && ".join([hosts_line(hosts), *names]) + " && printf '%s\\n' " + " ".join(
        f'"{c}"' for c in commands) + " | ip -batch -"


def lans_of(spec: MachineSpec) -> tuple[Path, ...]:
    """The switch sockets of ``spec``'s networks (open networks of this process, or named
    networks)."""
    return tuple(_switch_socket(path) for path in spec.networks)


def _switch_socket(path: str) -> Path:
    from .named_network import check_open, networks_dir

    if Path(path).parent == networks_dir():
        return check_open(path) / "switch.sock"
    return network_at(path).switch_socket


def network_at(path: str) -> Network:
    with _open_lock:
        network = _open.get(path)
    if network is None:
        raise NetworkError(f"network {Path(path).name.removeprefix('net-')} is not open in "
                           "this process (closed, or never started)")
    return network


class NetworkedMachine:
    """Machine mixin: its private networks."""

    name: str
    user: str
    spec: MachineSpec
    qemu: QemuProcess | None
    files: MachineFiles | None
    #: network directory -> this machine's address there
    addresses: dict[str, str]
    #: Whether the guest agent answered when the machine started (peers then use it).
    agent_answered = False
    _memberships: list[Membership]
    _telling: list[Future[None]]
    succeed: Callable[..., str]

    def _reserve_networks(self) -> None:
        """Before the machine starts: an address on each of its networks, and the machines
        already there told its name (in the background, while it starts)."""
        from . import named_network

        self.addresses, self._memberships, self._telling = {}, [], []
        self.agent_answered = False
        for index, path in enumerate(self.spec.networks):
            if Path(path).parent == named_network.networks_dir():
                member = named_network.reserve(self, index, Path(path))  # type: ignore[arg-type]
            else:
                member = network_at(path).reserve(self, index)  # type: ignore[arg-type]
            self._memberships.append(member)
            self.addresses[path] = member.ip
        peers = [(peer, m.ip) for m in self._memberships for peer in m.peers]
        self._telling = [_tellers.submit(p.tell, ip, self.name) for p, ip in peers]

    def network_identity(self) -> dict[str, object]:
        """What the guest agent needs, with the clone's identity, to set up its networks."""
        if not self._memberships:
            return {}
        return {"links": [m.link for m in self._memberships], "hosts": self._hosts()}

    def _hosts(self) -> list[tuple[str, str]]:
        return [(p.address, p.name) for m in self._memberships for p in m.peers] + [
            (m.ip, self.name) for m in self._memberships]

    def _join_networks(self, answer: dict[str, object] | None) -> None:
        """After the machine started: its ports on the switches, its links and names (unless
        the guest agent's ``answer`` says it set them while the clone resumed), peers told."""
        assert self.files is not None
        self.agent_answered = answer is not None
        for m in self._memberships:
            switch.request(m.directory, "join", port=str(self.files.lan_socket(m.index)),
                           mac=m.link["mac"])
        if self._memberships and (answer or {}).get("network") != "ok":
            self.succeed_as_root(setup_line(self._memberships, self._hosts()), timeout=60)
        for told in self._telling:
            told.result()

    def succeed_as_root(self, command: str, timeout: float | None = None) -> str:
        """:meth:`succeed` as root: through ``sudo -n sh -c`` when the machine's account is
        not root (an imported image's default user)."""
        return self.succeed(as_root(command, self.user), timeout=timeout)

    def _leave_networks(self) -> None:
        for path in self.spec.networks:
            with contextlib.suppress(NetworkError):
                network_at(path).leave(self)  # type: ignore[arg-type]

    def _lan(self, network: Network) -> str:
        if network.path is None or str(network.path) not in self.spec.networks:
            raise NetworkError(f"{self.name} is not on network {network.name}")
        return f"lan{self.spec.networks.index(str(network.path))}"

    def address(self, network: Network) -> str:
        """This machine's address on ``network``."""
        self._lan(network)
        return self.addresses[str(network.path)]

    def interface(self, network: Network) -> str:
        """The name of this machine's NIC on ``network`` in the guest (``eth1`` in the
        built-in images; an imported image's kernel may call it ``ens16`` or ``enp0s16``)."""
        pci = lan_pci_address(int(self._lan(network).removeprefix("lan")))
        return self.succeed(nic_name_command(pci), timeout=60).strip()

    def block(self, network: Network) -> None:
        """Take this machine's link on ``network`` down (the guest sees no carrier)."""
        self._set_link(network, False)

    def unblock(self, network: Network) -> None:
        self._set_link(network, True)

    def _set_link(self, network: Network, up: bool) -> None:
        if self.qemu is None:
            raise SandboxError(f"{self.name} is not running")
        self.qemu.qmp("set_link", name=self._lan(network), up=up)
