"""Saved states of a machine: snapshots inside its own overlay, and templates for others.

:class:`SavedStates` is a mixin of :class:`sandbox.Machine`: the save procedure of a template
is the machine's own (its SSH moved off the port, the machine stopped, its state and disk
saved, the machine resumed); the template format and catalogue, and the helper QEMU that
puts the RAM in a file of its own, are :mod:`sandbox.vm.template`'s.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..base.entries import entry_lock, publish, remove_entry
from ..errors import SandboxError, TemplateError
from ..guest.sockets import PreludeSocket
from ..host.tools import qemu_version
from ..vm import console
from ..vm.golden import GOLDEN_CONSOLE_BYTES, arm_ssh_port
from ..vm.template import (
    TEMPLATE_VERSION,
    Template,
    base_entry,
    check_name,
    image_base,
    load_template,
    rebase_into_entry,
    reload_into_shared_ram,
    template_id,
    template_key,
    templates_root,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ..guest.channel import Channel
    from ..guest.commands import CommandResult
    from ..imaging.image import Image
    from ..vm.files import MachineFiles
    from ..vm.golden import Golden
    from ..vm.qemu import QemuProcess
    from ..vm.spec import MachineSpec

#: Reconnecting after a snapshot restore (the guest's TCP state was rolled back).
RESTORE_SSH_TIMEOUT = 60.0
#: How long a machine may take to reconnect after a template was saved from it.
RESUME_SSH_TIMEOUT = 30.0
#: The guest end of a clone's first SSH session (see sandbox/guest/sandbox-agent); written
#: so that the pattern does not match the shell that runs pkill.
_RELAY_PATTERN = "[s]ocat -b 262144 FD:3"


class SavedStates:
    name: str
    user: str
    spec: MachineSpec
    image: Image | None
    accel: str | None
    #: The machine's own directory when it is a named one.
    home: Path | None
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

    # -- templates --------------------------------------------------------------------------

    def save_template(self, name: str, *, key: str | None = None) -> Template:
        """Save this machine's disk and RAM as template ``name`` (for ``key``: a version of
        its setup, e.g. :func:`sandbox.content_key`), replacing one of the same name, key and
        base; this machine keeps running, and ``sandbox.launch(template=name)`` starts
        clones of it as it is now."""
        check_name(name)
        if self.qemu is None or self.files is None or self.image is None:
            raise TemplateError(f"{self.name} is not running; start it before saving it")
        if self.home is not None and self.qemu.process is None:
            raise TemplateError(f"{self.name}: no QEMU monitor to save it through")
        final = self.template_location(name, key)
        with entry_lock(final):
            if final.exists():
                remove_entry(final)
            publish(final, lambda work: self.write_template(name, key, work),
                    owner_writable=("ram",))
        template = load_template(final)
        assert template is not None
        return template

    def template_base(self) -> dict[str, Any]:
        """What this machine's disk overlay and RAM came from."""
        source = self.source
        if source is not None:
            return base_entry("template" if source.manifest.get("kind") == "template"
                              else "golden", source)
        assert self.image is not None
        return image_base(self.image)

    def template_location(self, name: str, key: str | None) -> Path:
        """Where template ``name`` for ``key`` saved from this machine is cached."""
        assert self.qemu is not None and self.qemu.plan is not None
        return templates_root() / template_id(name, key, self.template_base(),
                                              self.qemu.plan.shape())

    def write_template(self, name: str, key: str | None, work: Path) -> None:
        """Save this running machine as template ``name`` into the directory ``work``."""
        assert self.qemu is not None and self.files is not None and self.image is not None
        assert self.qemu.plan is not None and self.accel is not None
        qemu, files, plan = self.qemu, self.files, self.qemu.plan
        started = time.monotonic()
        agent = bool(self.source.manifest.get("agent", True)) if self.source else \
            self.image.kind == "debian"
        self._quiesce_for_save()  # now on TCP, the relay of the port's old session gone
        port: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        assert port is not None
        port.connect(str(files.ssh_socket))
        try:
            # Without an agent (an imported image where it could not start) clones use TCP.
            prelude = arm_ssh_port(qemu, files, port, self.image) if agent else None
            self._drop_channel()  # quiesce: no TCP connection inside the saved state
            time.sleep(0.2)
            qemu.qmp("stop")
            full = work / "full-state"
            try:
                qemu.save_state(full, f"saving {self.name}", ignore_shared=False)
                saved = time.monotonic()
                # The migration flushed and let go of the disk: a consistent copy.
                shutil.copyfile(files.overlay, work / "disk.qcow2")
            finally:
                qemu.qmp("cont")
            self._resume_after_save(port, prelude)
            port = None  # the machine's now
            copied = time.monotonic()
            base = self.template_base()
            rebase_into_entry(work / "disk.qcow2", base, work)
            reload_into_shared_ram(self.spec, self.image, self.accel, full, work)
            full.unlink()
        finally:
            if port is not None:
                port.close()
        if prelude is not None:
            (work / "ssh-prelude").write_bytes(prelude)
        console.copy(files.console_log, work / "console.log", GOLDEN_CONSOLE_BYTES)
        manifest = {
            "kind": "template", "name": name, "user_key": key, "user": self.user,
            "agent": agent,
            "template_version": TEMPLATE_VERSION, "base": base,
            "key": template_key(name, key, base, plan.shape()),
            "image": self.image.name, "image_entry": self.image.path.name,
            "image_digest": self.image.digest,
            "image_built_at": self.image.manifest.get("built_at"),
            # Its networks by number only: their directories are this run's, and a clone
            # brings its own (as many).
            "spec": dict(self.spec.to_kwargs(), template=None,
                         networks=[f"network-{i}" for i in range(len(self.spec.networks))]),
            "qemu_version": qemu_version(), "shape": plan.shape(),
            "memory_mib": plan.memory_mib, "cpus": plan.cpus, "accel": plan.accel,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "full_save_seconds": round(saved - started, 2),
            "reload_seconds": round(time.monotonic() - copied, 2),
            "save_seconds": round(time.monotonic() - started, 2),
            "state_bytes": (work / "state").stat().st_size,
            "ram_bytes_used": (work / "ram").stat().st_blocks * 512,
            "disk_bytes": (work / "disk.qcow2").stat().st_size,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

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
