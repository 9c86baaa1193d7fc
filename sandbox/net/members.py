"""A machine's side of its networks: addresses taken before it starts (on a private network of
this process, or a named one), its ports on the switches, links and names set once it runs
(by the guest agent while a clone resumes, else over SSH), peers told its name, and the
public :meth:`~NetworkedMachine.address`, :meth:`~NetworkedMachine.block` and the like; and
its host port forwards on the user-mode network (:meth:`~NetworkedMachine.forward`).

:class:`NetworkedMachine` is a mixin of :class:`sandbox.Machine`; the attributes it declares
are the machine's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SandboxError
from ..guest.commands import as_root
from ..vm.plan import lan_pci_address
from . import named_network, switch
from .named_network import PeerShell, check_open, networks_dir
from .network import Network, network_at
from .segment import Membership, NetworkError, nic_name_command, setup_line

if TYPE_CHECKING:
    from ..vm.files import MachineFiles
    from ..vm.qemu import QemuProcess
    from ..vm.spec import MachineSpec

#: Tells machines a newcomer's name while the newcomer starts.
_tellers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sandbox-network")


def lans_of(spec: MachineSpec) -> tuple[Path, ...]:
    """The switch sockets of ``spec``'s networks (open networks of this process, or named
    networks)."""
    return tuple(_switch_socket(path) for path in spec.networks)


def _switch_socket(path: str) -> Path:
    if Path(path).parent == networks_dir():
        return check_open(path) / "switch.sock"
    return network_at(path).switch_socket


class NetworkedMachine:
    """Machine mixin: its private and named networks, and its host port forwards."""

    name: str
    user: str
    spec: MachineSpec
    qemu: QemuProcess | None
    files: MachineFiles | None
    #: network directory -> this machine's address there
    addresses: dict[str, str]
    #: guest port -> host port, of the forwards asked for
    _forwards: dict[int, int]
    #: Whether the guest agent answered when the machine started (peers then use it).
    agent_answered = False
    _memberships: list[Membership]
    _telling: list[Future[None]]
    succeed: Callable[..., str]
    #: How peers without an agent on a named network are told this machine's name (given
    #: by whoever makes named machines; None: this machine cannot join named networks).
    peer_shell: PeerShell | None

    def _reserve_networks(self) -> None:
        """Before the machine starts: an address on each of its networks, and the machines
        already there told its name (in the background, while it starts)."""
        self.addresses, self._memberships, self._telling = {}, [], []
        self.agent_answered = False
        for index, path in enumerate(self.spec.networks):
            if Path(path).parent == named_network.networks_dir():
                if self.peer_shell is None:
                    raise NetworkError(f"{self.name} cannot join named network "
                                       f"{Path(path).name}: only named machines can")
                member = named_network.reserve(self, index, Path(path), self.peer_shell)
            else:
                member = network_at(path).reserve(self, index)
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
                network_at(path).leave(self)

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

    # -- host port forwards (user-mode networking, net0) -------------------------------------

    def forward(self, guest_port: int) -> int:
        """Forward host 127.0.0.1:<free port> to ``guest_port``; the host port."""
        if guest_port in self._forwards:
            return self._forwards[guest_port]
        assert self.qemu is not None
        before = self.qemu.hostfwd_ports()
        if guest_port in before:
            self._forwards[guest_port] = before[guest_port]
            return before[guest_port]
        answer = self.qemu.hmp(f"hostfwd_add net0 tcp:127.0.0.1:0-:{int(guest_port)}")
        ports = self.qemu.hostfwd_ports()
        if guest_port not in ports:
            raise SandboxError(f"could not forward guest port {guest_port}: {answer.strip()}")
        self._forwards[guest_port] = ports[guest_port]
        return ports[guest_port]
