"""The layer-2 switch of a private network: one process, unix datagram sockets only.

Each machine on a network has a QEMU ``dgram`` netdev whose local end is a unix socket of its
own and whose remote end is this switch's data socket, so every Ethernet frame a guest sends
arrives here as one datagram, from the machine's socket address. Each port's MAC is the one
the host gave the machine, pinned when it joins: a frame from any other source MAC is
dropped, so a guest can neither take a peer's unicast traffic nor grow the table (it holds
one entry per port, and ports are capped). Unicast frames go to the port of their
destination MAC, the rest (broadcast, multicast such as VRRP, unknown destinations) to every
other port they may reach. Nothing touches a host interface; nothing outside the network's
directory can send into it, since the directory is private to this account.

Partitions are the switch's: ports in different groups drop each other's frames. Control is
a unix stream socket taking one JSON request per line (``join`` with the port and its MAC,
``leave``, ``partition``, ``heal``, ``ping``); the switch exits when its owner process is
gone.

Run as ``python -m sandbox.net.switch DIRECTORY OWNER_PID OWNER_TICKS TAG`` (owner 0: a named
network, which ends after its last member: see :func:`serve_named`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: Frames up to a jumbo MTU and the Ethernet header fit.
MAX_FRAME = 65536
#: Ports (and so MAC table entries) a switch takes at most: a /24 has 253 hosts.
MAX_PORTS = 256
#: A named network's switch waits this long for its first member, and ends this long after
#: its last one is gone.
UNUSED_GRACE = 120.0
MEMBERLESS_GRACE = 3.0


def parse_mac(text: str) -> bytes:
    """``52:54:..`` as 6 bytes; ValueError unless it is a unicast MAC."""
    mac = bytes.fromhex(text.replace(":", ""))
    if len(mac) != 6 or mac[0] & 1:
        raise ValueError(f"not a unicast MAC: {text!r}")
    return mac


class Switch:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.data.bind(str(directory / "switch.sock"))
        self.data.setblocking(False)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(str(directory / "control.sock"))
        self.control.listen(16)
        self.control.setblocking(False)
        #: port (a machine's socket path) -> partition group (0: none)
        self.ports: dict[str, int] = {}
        #: port -> its MAC, pinned at join, and the reverse: never learnt from frames
        self.port_macs: dict[str, bytes] = {}
        self.macs: dict[bytes, str] = {}
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.data, selectors.EVENT_READ, self._frame)
        self.selector.register(self.control, selectors.EVENT_READ, self._accept)

    def reaches(self, source: str, target: str) -> bool:
        return source != target and self.ports.get(source) == self.ports.get(target)

    def _frame(self, _: socket.socket) -> None:
        while True:
            try:
                frame, source = self.data.recvfrom(MAX_FRAME)
            except BlockingIOError:
                return
            if len(frame) < 14 or self.port_macs.get(source) != frame[6:12]:
                continue  # not a member (left, or never joined), or not its MAC: dropped
            destination = frame[0:6]
            known = self.macs.get(destination)
            targets = [known] if known is not None else list(self.ports)
            for target in targets:
                if self.reaches(source, target):
                    with contextlib.suppress(OSError):  # a machine gone or not yet up
                        self.data.sendto(frame, target)

    def _accept(self, _: socket.socket) -> None:
        try:
            connection, _address = self.control.accept()
        except BlockingIOError:
            return
        with connection:
            connection.settimeout(5)
            try:
                request = json.loads(connection.makefile("rb").readline())
                answer = self.handle(request)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": repr(exc)}
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps(answer).encode() + b"\n")

    def join(self, port: str, mac: bytes) -> None:
        """Take ``port`` with ``mac`` pinned; a port that had that MAC before (a machine gone
        without leaving) is dropped: the host hands each MAC to one machine at a time."""
        if port not in self.ports and len(self.ports) >= MAX_PORTS:
            raise ValueError(f"the switch has {MAX_PORTS} ports already")
        holder = self.macs.get(mac)
        if holder is not None and holder != port:
            self.leave(holder)
        previous = self.port_macs.get(port)
        if previous is not None:
            self.macs.pop(previous, None)
        self.ports[port] = self.ports.get(port, 0)
        self.port_macs[port] = mac
        self.macs[mac] = port

    def leave(self, port: str) -> None:
        self.ports.pop(port, None)
        mac = self.port_macs.pop(port, None)
        if mac is not None:
            self.macs.pop(mac, None)

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        op = request["op"]
        if op == "join":
            self.join(str(request["port"]), parse_mac(str(request["mac"])))
        elif op == "leave":
            self.leave(str(request["port"]))
        elif op == "partition":
            groups = request["groups"]
            assert isinstance(groups, list)
            for port in self.ports:
                self.ports[port] = -1  # in no group: reaches nothing but its own kind
            for number, group in enumerate(groups, 1):
                for port in group:
                    if port in self.ports:
                        self.ports[port] = number
        elif op == "heal":
            self.ports = dict.fromkeys(self.ports, 0)
        elif op != "ping":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "ports": len(self.ports), "macs": len(self.macs)}

    def serve(self, alive: object) -> None:
        while callable(alive) and alive():
            for key, _events in self.selector.select(timeout=1.0):
                key.data(key.fileobj)

    def close(self) -> None:
        self.selector.close()
        self.data.close()
        self.control.close()


def request(directory: Path, op: str, timeout: float = 5.0, **fields: object) -> dict[str, object]:
    """One control request to the switch in ``directory``; OSError/ValueError on failure."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(directory / "control.sock"))
        sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        answer: dict[str, object] = json.loads(sock.makefile("rb").readline())
    if not answer.get("ok"):
        raise ValueError(str(answer.get("error")))
    return answer


# -- named networks -----------------------------------------------------------------------------


@contextlib.contextmanager
def network_lock(directory: Path, timeout: float, *, create: bool = True) -> Iterator[bool]:
    """Hold the lock of the named network in ``directory`` (made if missing unless not
    ``create``); yields False when there is no such network (and ``create`` is False).

    The switch removes the directory, lock file included, under this lock when it ends; a
    waiter that then gets the lock of the removed file sees it is not the file at that path
    any more and starts over. TimeoutError after ``timeout`` seconds (0: one try)."""
    deadline = time.monotonic() + timeout
    while True:
        if create:
            directory.mkdir(mode=0o700, exist_ok=True)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if create:
                continue  # removed between mkdir and open
            yield False
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{directory / 'lock'} held for {timeout:g} s") \
                            from None
                    time.sleep(0.02)
            try:
                current = os.stat(directory / "lock").st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield True
                return
        finally:
            os.close(fd)


def live_members(directory: Path) -> dict[str, dict[str, object]]:
    """The members of the named network in ``directory`` whose machines run, or are being
    started by an ``up`` that is still there: name -> its member file (address, port, mac,
    starter)."""
    from ..base.processes import process_alive

    machines = directory.parent.parent / "machines"  # <runtime>/networks/NET -> /machines
    live = {}
    for path in (directory / "members").glob("*.json"):
        try:
            member = json.loads(path.read_text())
            try:
                state = json.loads((machines / path.stem / "state.json").read_text())
                pid, ticks = state["pid"], state.get("start_ticks")
            except FileNotFoundError:  # not started yet: its `up` is on it
                pid, ticks = member["starter"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (machines / path.stem).is_dir() and process_alive(int(pid), ticks):
            live[path.stem] = member
    return live


def serve_named(switch: Switch, directory: Path) -> None:
    """Serve the named network in ``directory`` until it has had no live member for
    MEMBERLESS_GRACE seconds (UNUSED_GRACE before its first one); then, under the
    network's lock (the one ``up`` holds while it takes an address and ensures the switch
    runs), with still no member, remove the directory. Members already there when the
    switch starts (a switch restarted after it died) are joined again."""
    for member in live_members(directory).values():
        with contextlib.suppress(KeyError, ValueError):
            switch.join(str(member["port"]), parse_mac(str(member["mac"])))
    started = last_seen = time.monotonic()
    used = bool(switch.ports)

    def wanted() -> bool:
        nonlocal last_seen, used
        now = time.monotonic()
        if not directory.exists():
            return False
        if live_members(directory):
            used, last_seen = True, now
        elif not used and now - started < UNUSED_GRACE:
            last_seen = now
        if now - last_seen < MEMBERLESS_GRACE:
            return True
        try:
            with network_lock(directory, 0, create=False) as exists:
                if exists and live_members(directory):
                    last_seen = now
                    return True
                switch.close()
                for name in ("switch.sock", "control.sock", "switch.pid", "lock"):
                    with contextlib.suppress(OSError):
                        (directory / name).unlink()
                shutil.rmtree(directory, ignore_errors=True)
                return False
        except TimeoutError:  # an `up` or `down` is at it: look again later
            return True

    switch.serve(wanted)


def main() -> None:  # pragma: no cover - run as a process by sandbox.net.network
    from ..base.processes import process_alive

    directory, owner = Path(sys.argv[1]), int(sys.argv[2])
    ticks = None if sys.argv[3] == "-" else int(sys.argv[3])
    switch = Switch(directory)
    (directory / "switch.pid").write_text(str(os.getpid()))
    if not owner:  # a named network: it ends a few seconds after its last member
        serve_named(switch, directory)
        return
    switch.serve(lambda: process_alive(owner, ticks) and directory.exists())
    for name in ("switch.sock", "control.sock", "switch.pid"):
        with contextlib.suppress(OSError):
            (directory / name).unlink()


if __name__ == "__main__":
    main()
