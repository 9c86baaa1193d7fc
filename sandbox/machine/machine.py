"""Machine: one isolated QEMU guest, commanded over SSH: the guest API that tests call.

``start`` clones the image's golden snapshot (:mod:`sandbox.vm.golden`), or boots cold when
asked to or when no snapshot loads; QEMU is a :class:`sandbox.vm.qemu.QemuProcess`, commands
and files go over one SSH :class:`sandbox.guest.channel.Channel`. ``close`` stops QEMU and
removes every file the machine made. QEMU dies with its owner process (parent-death signal);
the run directory lets a later run reap the rest. Machines that outlive this process are
:mod:`sandbox.machine.named`'s. Its parts: the console and waits (:mod:`.waits`), saved
states and templates (:mod:`.states`), networks and port forwards
(:mod:`sandbox.net.members`).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..base.progress import QUIET, Reporter
from ..base.waits import trim
from ..errors import (
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    GuestPanic,
    SandboxError,
    SandboxWarning,
    SnapshotError,
)
from ..guest.channel import Channel, connect
from ..guest.commands import CommandResult, TranscriptEntry
from ..guest.keys import cache_key
from ..guest.sockets import tcp
from ..guest.transfer import GET_MAX_SIZE
from ..imaging.image import Image, get_image
from ..net.members import NetworkedMachine, lans_of
from ..net.named_network import PeerShell
from ..vm import console
from ..vm.accel import resolve_accel
from ..vm.bringup import connect_booted, refuse_cloud_init_errors, set_clock
from ..vm.files import MachineFiles, run_tag
from ..vm.golden import Clone, Golden, discard_golden, ensure_golden
from ..vm.plan import QemuPlan, create_overlay, plan_for
from ..vm.qemu import QemuProcess
from ..vm.runs import current_run
from ..vm.spec import MachineSpec, check_machine_name
from . import payload
from .states import SavedStates
from .waits import GuestWaits

__all__ = ["Machine", "SandboxWarning", "TranscriptEntry", "launch"]

_names = iter(range(1, 1 << 30))
_names_lock = threading.Lock()

#: How long a clone's first SSH connection may take: over the waiting port, and over TCP.
CLONE_SSH_TIMEOUT = 30.0
CLONE_TCP_SSH_TIMEOUT = 60.0
#: Reconnecting after a channel was lost (a killed SSH server restarts within a second).
RECONNECT_TIMEOUT = 30.0


class Machine(GuestWaits, SavedStates, NetworkedMachine):
    """A QEMU guest. Use :func:`sandbox.launch` to get a started one."""

    def __init__(self, spec: MachineSpec | None = None, *, name: str | None = None,
                 reporter: Reporter = QUIET, die_with_parent: bool = True,
                 home: Path | None = None, tag: str | None = None,
                 keepable: bool = False, peer_shell: PeerShell | None = None) -> None:
        self.spec = spec or MachineSpec()
        self.reporter = reporter
        #: QEMU is killed when this process dies (off for named and kept machines).
        self.die_with_parent = die_with_parent
        #: QEMU dies with this process all the same, until :meth:`detach` lets it outlive
        #: it (a machine that may be kept: --sandbox-keep-on-failure).
        self.keepable = keepable
        with _names_lock:
            self.name = check_machine_name(name) if name else f"vm{next(_names)}"
        #: The machine's directory and QEMU tag when sandbox.machine.named gives them (else: a
        #: directory in this process's run, tagged with the run).
        self.home = home
        self.tag = tag
        self.peer_shell = peer_shell
        self.image: Image | None = None
        self.accel: str | None = None
        self.dir: Path | None = None
        self.files: MachineFiles | None = None
        self.qemu: QemuProcess | None = None
        self.transcript: list[TranscriptEntry] = []
        self.boot_seconds: float | None = None
        #: Seconds from QEMU start to a running clone (golden snapshot restores only).
        self.restore_seconds: float | None = None
        self._channel: Channel | None = None
        self._ssh_port: int | None = None
        self._forwards: dict[int, int] = {}
        #: A clone's host end of the port its first SSH connection went over.
        self._port_socket: socket.socket | None = None
        self.source: Golden | None = None
        self.addresses: dict[str, str] = {}
        self.user = "root"  # the account SSH logs in as (an imported image's may differ)
        #: The guest agent's answer when this clone resumed (None: not a clone, no answer).
        self._identity: dict[str, object] | None = None
        #: The guest rebooted since the channel was made: the next one waits for its boot.
        self._rebooted = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.qemu else "new")
        return f"<Machine {self.name} image={self.spec.image} {state}>"

    def __enter__(self) -> Machine:
        if self.qemu is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Machine:
        """Clone the image's golden snapshot (made on first use), or boot cold if asked to."""
        started = time.monotonic()
        template = None
        if self.spec.template is not None:
            from ..vm.template import clone_spec, find_template

            template = find_template(self.spec.template)
            self.spec, self.image, self.accel = clone_spec(template, self.spec)
        else:
            self.image = get_image(self.spec.image, reporter=self.reporter)
            self.accel = resolve_accel(self.spec.accel)
        if self.home is None:
            run = current_run()
            self.dir, self.tag = run.machine_dir(self.name), run_tag(run.id, self.name)
        else:
            self.dir = self.home
        self.files = MachineFiles(self.dir)
        try:
            self._reserve_networks()
            if template is not None:  # no healing here: only its maker knows its setup
                self._connect_clone(self._start_clone(template.golden))
            elif self.spec.cold:
                self._boot(started)
            else:
                self._clone_or_boot(started)
            self._join_networks(self._identity)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _plan(self, disk: Path, **memory: Any) -> QemuPlan:
        assert self.image is not None and self.accel is not None and self.files is not None
        assert self.tag is not None
        return plan_for(self.spec, self.image, self.accel, files=self.files, tag=self.tag,
                        disk=disk, lans=lans_of(self.spec), **memory)

    def _boot(self, started: float) -> None:
        """Cold boot: start QEMU on a fresh overlay of the image and wait for SSH."""
        assert self.image is not None and self.files is not None
        self.qemu = QemuProcess(self._plan(create_overlay(self.image.disk, self.files.overlay)),
                                self.files)
        self.qemu.launch(die_with_parent=self.die_with_parent, detachable=self.keepable)
        self._find_ssh_port()
        timeout = self.spec.boot_timeout - (time.monotonic() - started)
        self._channel, self.user, _ = connect_booted(self.image, self.qemu, self.files,
                                                     self.ssh_port, timeout)

    def _clone_or_boot(self, started: float) -> None:
        assert self.image is not None and self.accel is not None
        for attempt in (1, 2):
            golden = ensure_golden(self.image, self.spec, self.accel, reporter=self.reporter)
            refuse_cloud_init_errors(self.image, golden.cloud_init_errors, golden.path.name)
            try:
                clone = self._start_clone(golden)
            except SnapshotError as exc:  # damaged: its files are off, or its state won't load
                what = "rebuilding it" if attempt == 1 else "booting from scratch instead"
                warnings.warn(f"golden snapshot {golden.path.name} did not load ({exc}); "
                              f"{what}", SandboxWarning, stacklevel=4)
                self._stop()
                discard_golden(golden)
                continue
            self._connect_clone(clone)
            return
        self._boot(started)

    def _start_clone(self, golden: Golden) -> Clone:
        """See :meth:`sandbox.vm.golden.Golden.start_clone`; SnapshotError when it is damaged."""
        assert self.files is not None
        golden.check()
        plan = self._plan(create_overlay(golden.disk, self.files.overlay), ram_file=golden.ram,
                          incoming=True)
        clone = golden.start_clone(plan, die_with_parent=self.die_with_parent,
                                   detachable=self.keepable, identity=self.network_identity())
        self.qemu, self._port_socket, self.source = clone.process, clone.port_socket, golden
        self.user = golden.user
        self.restore_seconds = clone.restore_seconds
        return clone

    def _connect_clone(self, clone: Clone) -> None:
        """SSH to a resumed clone: to the server waiting on its virtio-serial port when the
        snapshot has one, else (or when that one does not answer) over TCP."""
        self._find_ssh_port()
        opener = clone.opener()
        try:
            if opener is None:
                raise BootError("no SSH server waits on the port")
            self._connect_ssh(CLONE_SSH_TIMEOUT, opener, attempts=1)
        except BootError:
            self._connect_ssh(CLONE_TCP_SSH_TIMEOUT)
        error = clone.identity_error() if clone.agent else set_clock(self.channel, self.user)
        self._identity = clone.agent.answer if clone.agent else None
        if error:
            warnings.warn(f"{self.name}: the clone's clock and randomness were not refreshed "
                          f"({error})", SandboxWarning, stacklevel=5)

    def _find_ssh_port(self) -> None:
        assert self.qemu is not None
        self._ssh_port = self.qemu.hostfwd_ports().get(22)
        if self._ssh_port is None:
            raise BootError("QEMU started without the SSH port forward",
                            console_tail=self.console_tail())

    def _connect_ssh(self, timeout: float, opener: Callable[[float], Any] | None = None,
                     attempts: int | None = None) -> None:
        """Connect (retrying for up to ``timeout`` seconds) and keep the channel."""
        assert self.image is not None and self.qemu is not None
        qemu = self.qemu
        try:
            port = tcp(("127.0.0.1", self.ssh_port))
            self._channel = connect(
                opener or port, self.image.client_key().load(),
                self.image.host_key, timeout=max(0.0, timeout), attempts=attempts, user=self.user,
                alive=lambda: qemu.check_alive("QEMU exited while the guest was booting"),
                more=port)
        except ChannelError as exc:
            raise BootError(str(exc), console_tail=self.console_tail()) from exc

    def adopt(self, image: Image, pid: int, start_ticks: int | None, ssh_port: int, *,
              connect_ssh: bool = True, monitor: bool = True) -> None:
        """Take over this (named) machine's running QEMU, started by another process: its
        monitor (unless ``monitor`` is False) and SSH (unless ``connect_ssh`` is False)."""
        assert self.home is not None
        self.image, self.dir, self.files = image, self.home, MachineFiles(self.home)
        self.qemu = QemuProcess(None, self.files)
        self.qemu.adopt(pid, start_ticks, monitor=monitor)
        self._ssh_port = ssh_port
        if connect_ssh:
            self._connect_ssh(CLONE_SSH_TIMEOUT)

    def moved(self, home: Path, name: str) -> None:
        """This machine's directory was renamed to ``home`` (a kept machine)."""
        self.home = self.dir = home
        self.files = MachineFiles(home)
        if self.qemu is not None:
            self.qemu.files = self.files
        self.name = name

    def detach(self) -> None:
        """Let this keepable machine's QEMU outlive this process (it is being kept)."""
        if self.qemu is not None:
            self.qemu.detach()
        self.die_with_parent = self.keepable = False

    def disconnect(self) -> None:
        """Drop this handle (SSH, QMP) and leave the machine running; for named machines."""
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        if self.qemu is not None:
            self.qemu.release()
        if self._port_socket is not None:
            self._port_socket.close()

    def close(self) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove the machine's files."""
        if self._closed:
            return
        self._closed = True
        self._leave_networks()
        self._stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.qemu is not None:
            self.qemu.stop()
            self.qemu = None
        if self._port_socket is not None:
            self._port_socket.close()
            self._port_socket = None
        self._ssh_port = None
        self._forwards.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pid(self) -> int | None:
        return self.qemu.pid if self.qemu else None

    @property
    def ssh_port(self) -> int:
        if self._ssh_port is None:
            raise SandboxError(f"{self.name} is not running")
        return self._ssh_port

    @property
    def key_path(self) -> Path:
        """The SSH client key that logs into this machine (its image's)."""
        return self.image.client_key().private_path if self.image else cache_key().private_path

    def ssh_command(self) -> str:
        """A plain ``ssh`` command line that reaches this machine from the host."""
        return (f"ssh -i {self.key_path} -p {self.ssh_port} -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null {self.user}@127.0.0.1")

    def testinfra(self, *, sudo: bool = False) -> Any:
        """A testinfra ``Host`` on this machine (``host.service("nginx").is_running``...):
        its own SSH port, key, user and pinned host key; ``sudo`` runs every command through
        sudo (an imported image's user). Needs the extra ``pytest-qemu-sandbox[testinfra]``."""
        from .tools import testinfra_host

        self._running()
        return testinfra_host(self, sudo=sudo)

    # -- QMP --------------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on this machine's monitor and return its result."""
        return self._running().qmp(command, **arguments)

    def hmp(self, command_line: str) -> str:
        return self._running().hmp(command_line)

    # -- commands ---------------------------------------------------------------------------

    @property
    def channel(self) -> Channel:
        """The SSH channel; after one was lost, a new one over TCP (the guest's SSH server
        on port 22 restarts when killed), if QEMU still runs and the guest did not panic."""
        if self._closed or self.qemu is None:
            raise ChannelError(f"{self.name} is not running")
        if self._channel is None:
            self._watch(rebooted_is_error=False)
            # A guest that rebooted is given the time of a boot to come up again.
            self._connect_ssh(self.spec.boot_timeout if self._rebooted else RECONNECT_TIMEOUT)
            self._rebooted = False
        assert self._channel is not None
        return self._channel

    def _watch(self, *, rebooted_is_error: bool = True) -> None:
        """Raise when the guest can no longer answer: QEMU exited, or the kernel panicked
        (QEMU's pvpanic device stops the guest, see sandbox.vm.plan), or the guest rebooted
        (QEMU reported a reset: its SSH server went with the connection, whose end over the
        virtio-serial port would never say so)."""
        assert self.qemu is not None
        self.qemu.check_alive(f"QEMU of {self.name} exited")
        try:
            status = self.qemu.qmp("query-status").get("status")
        except SandboxError:
            return  # the monitor is busy or gone: liveness above is what can be told
        if status == "guest-panicked":
            raise GuestPanic(f"the guest kernel of {self.name} panicked",
                             console_tail=console.panic_tail(self.files.console_log)
                             if self.files else "")
        if self.qemu.guest_resets():
            self._rebooted = True
        if self._rebooted and rebooted_is_error:
            raise ChannelError(f"the guest of {self.name} rebooted, and its SSH connection "
                               "went with it; the next command connects again once it is up")

    def _drop_channel(self) -> None:
        """Drop a channel that failed, so that the next command reconnects."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def run(self, cmd: str | Sequence[str], *, timeout: float | None = None,
            env: Mapping[str, str] | None = None,
            input: bytes | str | None = None, stdout: BinaryIO | None = None,
            stderr: BinaryIO | None = None) -> CommandResult:
        """Run ``cmd`` in the guest (through ``/bin/sh -c``); never raises on a non-zero status.

        ``timeout`` defaults to the spec's ``command_timeout``; past it the command's guest
        processes are killed and :class:`CommandTimeout` is raised. ``stdout``/``stderr``
        binary streams, when given, receive the output live as well.
        """
        limit = self.spec.command_timeout if timeout is None else timeout
        try:
            result = self.channel.run(cmd, timeout=limit, env=env, input=input, stdout=stdout,
                                      stderr=stderr, watch=self._watch)
        except CommandTimeout as exc:
            self.transcript.append(TranscriptEntry(exc.command, None, limit,
                                                   trim(exc.stdout + exc.stderr)))
            raise
        except ChannelError:
            self._drop_channel()
            raise
        self.transcript.append(TranscriptEntry(result.command, result.exit_status,
                                               result.duration,
                                               trim(result.stdout + result.stderr)))
        return result

    def succeed(self, cmd: str | Sequence[str], **kwargs: Any) -> str:
        """Run ``cmd``; its stdout, or :class:`CommandFailed` when the status is not zero."""
        result = self.run(cmd, **kwargs)
        if result.failed:
            raise CommandFailed(result.command, result.exit_status, result.stdout,
                                result.stderr)
        return result.stdout

    def fail(self, cmd: str | Sequence[str], **kwargs: Any) -> str:
        """Run ``cmd`` expecting a non-zero status; its output, or :class:`CommandFailed`."""
        result = self.run(cmd, **kwargs)
        if result.succeeded:
            raise CommandFailed(result.command, 0, result.stdout, result.stderr,
                                expected="non-zero")
        return result.stdout + result.stderr

    # -- files ------------------------------------------------------------------------------

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy one host file into the guest (mode kept). A MiB or more goes through the
        machine's payload disk, with its sha256 checked (:mod:`sandbox.machine.payload`)."""
        if not payload.put(self, Path(local), remote, self.spec.command_timeout):
            self.channel.put(Path(local), remote)

    def get(self, remote: str, local: str | os.PathLike[str], *, max_size: int = GET_MAX_SIZE,
            timeout: float | None = None) -> None:
        """Copy one regular guest file to the host. The guest controls what it sends: past
        ``max_size`` bytes (default 4 GiB) or ``timeout`` seconds (default: the spec's
        ``command_timeout``) the copy stops with :class:`GuestDataError`, and ``local`` is
        only written once the copy is whole."""
        limit = self.spec.command_timeout if timeout is None else timeout
        if not payload.get(self, remote, Path(local), max_size, limit):
            self.channel.get(remote, Path(local), max_size=max_size, timeout=limit)

    def push(self, local_dir: str | os.PathLike[str], remote_dir: str, *,
             timeout: float | None = None) -> None:
        """Copy the contents of a host directory into ``remote_dir`` (created; modes kept)."""
        source = Path(local_dir)
        if not source.is_dir():
            raise SandboxError(f"push needs a directory, {source} is not one (use put)")
        limit = timeout or self.spec.command_timeout
        if not payload.push(self, source, remote_dir, limit):
            self.channel.push(source, remote_dir, limit)

    def _running(self) -> QemuProcess:
        if self.qemu is None:
            raise SandboxError(f"{self.name} is not running")
        return self.qemu


def launch(image: str | None = None, *, name: str | None = None,
           reporter: Reporter = QUIET, **shape: Any) -> Machine:
    """A started machine; use it as a context manager (or call ``close()``). ``image``
    defaults to debian-12, or to the template's with ``template=``. ``reporter`` shows the
    long stages (an image built or pulled, a golden snapshot made); silent by default."""
    if image is not None:
        shape["image"] = image
    return Machine(MachineSpec.from_kwargs(**shape), name=name, reporter=reporter).start()
