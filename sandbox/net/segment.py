"""What private and named networks share: a machine's place on a segment (its address, its
NIC's settings, the peers to tell its name), the shell lines that set it up over SSH, and
:class:`Member`, what a network needs of a machine on it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import SandboxError
from ..guest.agent import Agent
from ..vm.plan import lan_pci_address

if TYPE_CHECKING:
    from ..vm.files import MachineFiles

_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
#: How long a peer's guest agent may take to answer before SSH is used instead.
AGENT_TIMEOUT = 5.0


class NetworkError(SandboxError):
    """A network cannot be used as asked: closed, a name taken or not a hostname."""


class Member(Protocol):
    """What a network needs of a machine on it (a :class:`sandbox.Machine` is one): its name,
    its files (the NIC's socket, the agent's), whether its agent answered, and a root shell."""

    name: str
    files: MachineFiles | None
    agent_answered: bool

    def succeed_as_root(self, command: str, timeout: float | None = None) -> str: ...


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
