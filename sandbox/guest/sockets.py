"""The two ways to a guest's SSH server, as openers a :class:`~sandbox.guest.channel.Channel`
connects through: TCP behind QEMU's user network, or a clone's virtio-serial port whose
first bytes were recorded in its snapshot (:class:`PreludeSocket`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def tcp(address: tuple[str, int]) -> Callable[[float], socket.socket]:
    """Opens TCP connections to a guest SSH server behind QEMU's user network."""

    def open_tcp(timeout: float) -> socket.socket:
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # QEMU's user network accepts the connection even while nothing listens in the
            # guest, then closes it: peek for the server's banner before paramiko starts.
            if not sock.recv(4, socket.MSG_PEEK):
                raise ConnectionResetError("the guest closed the connection (no SSH server yet)")
        except BaseException:
            sock.close()
            raise
        return sock

    return open_tcp


class PreludeSocket:
    """A connected socket whose first bytes were received earlier (and are replayed).

    The SSH server waiting on a clone's virtio-serial port sent its banner and key exchange
    offer before the golden snapshot was saved; every clone's client reads those bytes from
    the snapshot's record, then the live stream.
    """

    def __init__(self, sock: socket.socket, prelude: bytes) -> None:
        self._sock = sock
        self._prelude = prelude

    def recv(self, size: int) -> bytes:
        if self._prelude:
            data, self._prelude = self._prelude[:size], self._prelude[size:]
            return data
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
