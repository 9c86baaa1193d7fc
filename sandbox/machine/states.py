"""Saved states of a machine: snapshots inside its own overlay, and templates for others.

:class:`SavedStates` is a mixin of :class:`sandbox.Machine`; the template format and the
save itself are :mod:`sandbox.template`'s.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import SandboxError
from ..guest.channel import PreludeSocket

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ..guest.channel import Channel
    from ..guest.commands import CommandResult
    from ..vm.files import MachineFiles
    from ..vm.golden import Golden
    from ..vm.qemu import QemuProcess
    from ..vm.template import Template

#: Reconnecting after a snapshot restore (the guest's TCP state was rolled back).
RESTORE_SSH_TIMEOUT = 60.0
#: How long a machine may take to reconnect after a template was saved from it.
RESUME_SSH_TIMEOUT = 30.0
#: The guest end of a clone's first SSH session (see sandbox/guest/sandbox-agent); written
#: so that the pattern does not match the shell that runs pkill.
_RELAY_PATTERN = "[s]ocat -b 262144 FD:3"


class SavedStates:
    name: str
    qemu: QemuProcess | None
    files: MachineFiles | None
    #: The golden snapshot or template this machine was cloned from (None: booted cold).
    source: Golden | None
    _channel: Channel | None
    _port_socket: socket.socket | None

    if TYPE_CHECKING:  # what the machine provides
        def _connect_ssh(self, timeout: float, opener: Callable[[float], Any] | None = None,
                         attempts: int | None = None) -> None: ...

        def run(self, cmd: str | Sequence[str], *, timeout: float | None = None,
                env: Mapping[str, str] | None = None, input: bytes | str | None = None,
                stdout: BinaryIO | None = None,
                stderr: BinaryIO | None = None) -> CommandResult: ...

        def _running(self) -> QemuProcess: ...

        def _drop_channel(self) -> None: ...

    def snapshot(self, tag: str) -> None:
        """Save this machine's disk and RAM under ``tag`` (inside its own overlay)."""
        self._running().vm_snapshot("savevm", tag)

    def restore(self, tag: str) -> None:
        """Roll this machine's disk and RAM back to ``snapshot(tag)``; SSH reconnects."""
        self._running().vm_snapshot("loadvm", tag)
        if self._channel is not None:  # its TCP or port state was rolled back with the guest
            self._channel.close()
        self._connect_ssh(RESTORE_SSH_TIMEOUT)
        self.run(f"date -s @{time.time():.3f} >/dev/null", timeout=30)

    def snapshots(self) -> list[str]:
        """Tags saved with :meth:`snapshot`."""
        return self._running().vm_snapshot_tags()

    def save_template(self, name: str, *, key: str | None = None) -> Template:
        """Save this machine's disk and RAM as template ``name`` (for ``key``: a version of
        its setup, e.g. :func:`sandbox.content_key`); this machine keeps running, and
        ``sandbox.launch(template=name)`` starts clones of it as it is now."""
        from ..vm.template import save_template

        return save_template(self, name, key)  # type: ignore[arg-type]

    # -- the machine's side of a template save ----------------------------------------------

    def _quiesce_for_save(self) -> None:
        """Move this machine's SSH to TCP and end the session on its virtio-serial port
        (host end and guest relay), so that a fresh server can wait there in the save."""
        qemu = self._running()
        self._drop_channel()
        if self._port_socket is not None:
            self._port_socket.close()
            self._port_socket = None

        qemu.wait_chardev("ssh0", connected=False)
        self._connect_ssh(RESUME_SSH_TIMEOUT)
        self.run(f"pkill -f '{_RELAY_PATTERN}'; true", timeout=30)

    def _resume_after_save(self, port: socket.socket, prelude: bytes | None) -> None:
        """Running again after a save: SSH through the server waiting on the port."""
        if prelude is None:
            port.close()
            self._connect_ssh(RESUME_SSH_TIMEOUT)
            return
        self._port_socket = port
        try:
            self._connect_ssh(RESUME_SSH_TIMEOUT, lambda timeout: PreludeSocket(port, prelude),
                              attempts=1)
        except SandboxError:
            self._connect_ssh(RESUME_SSH_TIMEOUT)
