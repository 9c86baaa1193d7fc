"""Where one QEMU's files are (:class:`MachineFiles`: sockets, pid file, console, overlay)
and the tag rule that marks this project's processes.

Pure logic; unit tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import console


def qemu_option(value: object) -> str:
    """``value`` as a value inside a QEMU option string (``-drive file=VALUE,if=none``):
    QEMU's option parser ends a value at a comma and reads ",," as one, so commas are
    doubled. Every path or name put into an option string goes through here (a comma in
    the cache or runtime directory would otherwise break every start, or add options).
    Not for plain arguments (-kernel, -initrd, -bios, -append, -pidfile: taken as they are)."""
    return str(value).replace(",", ",,")


# -- the tag rule ---------------------------------------------------------------------------
# QEMU carries a tag in -name, so that the reaper can tell this project's processes (and
# whose run they belong to) apart from any other process named by a stale pid file.


def run_tag_prefix(run_id: str) -> str:
    """What every QEMU of run ``run_id`` carries in its command line."""
    return f"sandbox-{run_id}-"


def run_tag(run_id: str, name: str) -> str:
    return run_tag_prefix(run_id) + name


def named_tag(name: str) -> str:
    """The tag of named machine ``name`` (``sandbox up``, kept machines)."""
    return f"sandbox-named-{name}"


def named_tag_marker(name: str) -> str:
    """What a named machine's command line holds exactly (the tag ends at the comma)."""
    return named_tag(name) + ","


@dataclass(frozen=True)
class MachineFiles:
    """Where one machine's files live (its directory in a run, or a named machine's)."""

    dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def ssh_socket(self) -> Path:
        return self.dir / "ssh.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def overlay(self) -> Path:
        return self.dir / "overlay.qcow2"

    @property
    def data_disk(self) -> Path:
        """The machine's payload disk: a sparse raw file the guest sees as a virtio disk
        (serial ``sandbox-data``); big put/get/push go through it (sandbox.machine.payload)."""
        return self.dir / "data.img"

    def lan_socket(self, index: int) -> Path:
        """This machine's end of its NIC on private network number ``index``."""
        return self.dir / f"lan{index}.sock"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def console_tail(self, lines: int = 40) -> str:
        return console.tail(self.console_log, lines)

    def console_since(self, offset: int) -> tuple[str, int]:
        """The console output after byte ``offset`` (its newest part when there is more
        than a log keeps), and the offset after it."""
        data, end = console.read_since(self.console_log, offset)
        return data.decode(errors="replace"), end

    def remove_runtime_files(self) -> None:
        """What a stopped QEMU leaves that means nothing once it is gone."""
        for path in (self.qmp_socket, self.agent_socket, self.ssh_socket, self.pidfile):
            path.unlink(missing_ok=True)
