"""The two ways to a guest's SSH server, as openers a :class:`~sandbox.guest.channel.Channel`
connects through: TCP behind QEMU's user network, or a clone's virtio-serial port whose
first bytes were recorded in its snapshot (:class:`PreludeSocket`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from ..errors import GuestDataError, SnapshotError


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


#: The most a waiting SSH server may send before its client speaks (a banner and a key
#: exchange offer: about 2 KiB), and the time it may take in all.
PRELUDE_LIMIT = 64 << 10
PRELUDE_TIMEOUT = 15.0
#: How long the server just started may take to send its first bytes: a few seconds when
#: TCG guests share a busy host (2 s was seen to fall short there).
PRELUDE_FIRST = 10.0


def read_prelude(sock: socket.socket, *, limit: int = PRELUDE_LIMIT,
                 timeout: float = PRELUDE_TIMEOUT, first: float = PRELUDE_FIRST,
                 quiet: float = 1.0) -> bytes:
    """What a waiting SSH server sends before its client speaks: read until it falls silent
    (nothing for ``quiet`` seconds; ``first`` for its first bytes). GuestDataError when it
    sends over ``limit`` bytes or is not silent within ``timeout`` seconds in all (a server
    that keeps talking); SnapshotError when it closes the port or sends no SSH banner."""
    deadline = time.monotonic() + timeout
    prelude = bytearray()
    wait = first
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestDataError(f"the waiting SSH server did not fall silent within "
                                 f"{timeout:g} s ({len(prelude)} bytes)")
        sock.settimeout(min(wait, left))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if wait > left:  # cut short by the deadline: it may still be talking
                continue
            break
        if not chunk:
            raise SnapshotError("the waiting SSH server closed its port")
        prelude += chunk
        if len(prelude) > limit:
            raise GuestDataError(f"the waiting SSH server sent over {limit} bytes before its "
                                 "client spoke (a banner and key exchange offer take about 2 KiB)")
        wait = quiet
    if not prelude.startswith(b"SSH-"):
        raise SnapshotError(f"the waiting SSH server sent no banner ({bytes(prelude[:40])!r})")
    return bytes(prelude)
