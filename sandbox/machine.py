"""Machine: one isolated QEMU guest with an explicit lifecycle, commanded over SSH.

``start`` launches QEMU on a private copy-on-write overlay of the read-only image, connects
QMP, and waits (bounded) for SSH. ``close`` is graceful then hard (QMP quit, SIGTERM,
SIGKILL) and removes every file the machine made. QEMU dies with the Python process that
owns it (parent-death signal); the run directory lets a later run reap the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import paramiko
import tenacity
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .agent import Agent
from .channel import Channel, CommandResult, PreludeSocket, command_string, tcp
from .errors import (
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    SandboxError,
    SnapshotError,
    WaitTimeout,
)
from .host import accel_verdict, qemu_binary, resolve_accel
from .image import Image, get_image
from .keys import cache_key
from .named import check_name, find_named, machines_dir, write_state
from .progress import QUIET, Reporter
from .runs import current_run, process_alive, process_start_ticks
from .sizes import parse_size
from .spec import MachineSpec, QemuPlan

if TYPE_CHECKING:
    from .golden import Golden


class _Pid:
    """The part of Popen's interface a Machine uses, for a QEMU this process did not start."""

    def __init__(self, pid: int, start_ticks: int | None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not process_alive(self.pid, self.start_ticks):
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.02)
        return self.returncode or -1

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class SandboxWarning(UserWarning):
    """Something was worked around (a golden snapshot rebuilt, a cold boot instead)."""

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# QEMU is spawned from one long-lived thread: a parent-death signal fires when the *thread*
# that forked the child exits, so spawning from a short-lived worker thread would kill it.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
_names = iter(range(1, 1 << 30))
_names_lock = threading.Lock()
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return setup


@dataclass(frozen=True)
class TranscriptEntry:
    """One guest command as the failure report shows it."""

    command: str
    exit_status: int | None
    duration: float
    output: str

    def format(self) -> str:
        status = "timeout" if self.exit_status is None else f"exit {self.exit_status}"
        text = f"$ {self.command}    [{status}, {self.duration:.2f} s]"
        return f"{text}\n{self.output}" if self.output else text


def _refused(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _trim(data: str, limit: int = 2000) -> str:
    data = data.rstrip("\n")
    if len(data) <= limit:
        return data
    return data[: limit // 4] + f"\n[... {len(data) - limit} characters cut ...]\n" + \
        data[-(limit * 3 // 4):]


class Machine:
    """A QEMU guest. Use :func:`sandbox.launch` to get a started one."""

    def __init__(self, spec: MachineSpec | None = None, *, name: str | None = None,
                 reporter: Reporter = QUIET, persistent: bool = False,
                 die_with_parent: bool = True) -> None:
        self.spec = spec or MachineSpec()
        self.reporter = reporter
        #: A named machine that outlives this process (``sandbox up``); see sandbox.named.
        self.persistent = persistent
        #: QEMU is killed when this process dies (off for persistent and kept machines).
        self.die_with_parent = die_with_parent and not persistent
        with _names_lock:
            self.name = name or f"vm{next(_names)}"
        self.image: Image | None = None
        self.accel: str | None = None
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | _Pid | None = None
        self.transcript: list[TranscriptEntry] = []
        self.boot_seconds: float | None = None
        #: Seconds from QEMU start to a running clone (golden snapshot restores only).
        self.restore_seconds: float | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._qmp_lock = threading.Lock()
        self._channel: Channel | None = None
        self._ssh_port: int | None = None
        self._forwards: dict[int, int] = {}
        self._qemu_plan: QemuPlan | None = None
        self._ssh_port_sock: socket.socket | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.process else "new")
        return f"<Machine {self.name} image={self.spec.image} {state}>"

    def __enter__(self) -> Machine:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Machine:
        """Clone the image's golden snapshot (made on first use), or boot cold if asked to."""
        started = time.monotonic()
        self.image = get_image(self.spec.image, reporter=self.reporter)
        self.accel = resolve_accel(self.spec.accel)
        self.dir = self._home()
        try:
            if self.spec.cold:
                self._boot(self._make_plan(self._overlay(self.image.disk)),
                           started + self.spec.boot_timeout)
            else:
                self._clone_or_boot(started)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        if self.persistent:
            self._write_state()
        return self

    def _home(self) -> Path:
        if not self.persistent:
            return current_run().machine_dir(self.name)
        path = machines_dir() / check_name(self.name)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(f"a machine named {self.name!r} exists already; pick another "
                               f"name or remove it with: sandbox down {self.name}") from None
        return path

    def _write_state(self) -> None:
        assert self.dir is not None and self.image is not None and self._qemu_plan is not None
        write_state(self.dir, {
            "name": self.name, "image": self.spec.image, "image_path": str(self.image.path),
            "pid": self.pid, "start_ticks": process_start_ticks(self.pid or 0),
            "ssh_port": self._ssh_port, "memory_mib": self._qemu_plan.memory_mib,
            "cpus": self._qemu_plan.cpus, "spec": asdict(self.spec),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def keep(self, name: str) -> Machine:
        """Hand this machine over to the named-machine registry instead of closing it: it
        keeps running after this process exits (``sandbox ssh NAME``, ``sandbox down NAME``).
        Only for machines started with ``die_with_parent=False``."""
        if self.die_with_parent:
            raise SandboxError(f"{self.name} dies with this process and cannot be kept; start "
                               "it with die_with_parent=False (--sandbox-keep-on-failure)")
        assert self.dir is not None
        target = machines_dir() / check_name(name)
        self.dir.rename(target)
        self.dir, self.name, self.persistent = target, name, True
        self._write_state()
        self._release()
        return self

    def disconnect(self) -> None:
        """Drop this handle (SSH, QMP) and leave the machine running; for named machines."""
        self._release()

    def _release(self) -> None:
        """Drop this object's hold on the machine without stopping it."""
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
        if self._ssh_port_sock is not None:
            self._ssh_port_sock.close()

    @classmethod
    def attach(cls, name: str, *, connect_ssh: bool = True) -> Machine:
        """A handle on the running named machine ``name`` (QMP, and SSH over TCP)."""
        named = find_named(name)
        if not named.alive:
            raise SandboxError(f"machine {name!r} is dead (its QEMU exited); remove it with: "
                               f"sandbox down {name}")
        spec = MachineSpec.from_kwargs(**{k: tuple(v) if k == "qemu_args" else v
                                          for k, v in named.state["spec"].items()})
        machine = cls(spec, name=name, persistent=True)
        machine.dir = named.path
        machine.image = Image.load(Path(named.state["image_path"]))
        machine.process = _Pid(named.pid, named.state.get("start_ticks"))
        machine._ssh_port = int(named.state["ssh_port"])
        qmp = QEMUMonitorProtocol(str(named.path / "qmp.sock"))
        qmp.connect(negotiate=True)
        qmp.settimeout(30)
        machine._qmp = qmp
        if connect_ssh:
            machine._wait_for_ssh(time.monotonic() + 30)
        return machine

    def _overlay(self, backing: Path, overlay: Path | None = None) -> Path:
        """A fresh copy-on-write disk (by default this machine's) on a read-only base."""
        assert self.dir is not None
        overlay = overlay or self.dir / "overlay.qcow2"
        overlay.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(backing), str(overlay)], check=True, capture_output=True, timeout=60)
        return overlay

    def _make_plan(self, disk: Path, **memory: Any) -> QemuPlan:
        assert self.image is not None and self.dir is not None and self.accel is not None
        size = self.spec.memory if self.spec.memory is not None else self.image.memory
        verdict = accel_verdict() if self.accel == "kvm" else None
        return QemuPlan(
            binary=qemu_binary(),
            tag=(f"sandbox-named-{self.name}" if self.persistent else
                 f"sandbox-{self.dir.parent.name.removeprefix('run-')}-{self.name}"),
            accel=self.accel,
            kvm_cpu=verdict.kvm_cpu if verdict else "",
            memory_mib=parse_size(size, default_unit="M") >> 20,
            cpus=self.spec.cpus or self.image.cpus,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            cmdline=self.image.kernel_cmdline,
            disk=disk,
            qmp_socket=self.dir / "qmp.sock",
            console_log=self.dir / "console.log",
            pidfile=self.dir / "qemu.pid",
            agent_socket=self.dir / "agent.sock",
            ssh_socket=self.dir / "ssh.sock",
            network=self.spec.network,
            extra=self.spec.qemu_args,
            **memory,
        )

    def _boot(self, plan: QemuPlan, deadline: float) -> None:
        """Cold boot: start QEMU and wait for the guest's SSH server."""
        self._launch(plan)
        self._find_ssh_port()
        self._wait_for_ssh(deadline)

    def _find_ssh_port(self) -> None:
        self._ssh_port = self._hostfwd_ports().get(22)
        if self._ssh_port is None:
            raise BootError("QEMU started without the SSH port forward",
                            console_tail=self.console_tail())

    def _clone_or_boot(self, started: float) -> None:
        from .golden import discard_golden, ensure_golden

        assert self.image is not None
        for attempt in (1, 2):
            template = self._make_plan(Path("overlay.qcow2"), ram_file=Path("ram"))
            builder = Machine(replace(self.spec, cold=True), name=f"{self.name}-golden")
            golden = ensure_golden(self.image, template, builder.boot_and_save,
                                   reporter=self.reporter)
            try:
                self._restore_golden(golden)
                return
            except SnapshotError as exc:
                what = "rebuilding it" if attempt == 1 else "booting from scratch instead"
                warnings.warn(f"golden snapshot {golden.path.name} did not load ({exc}); "
                              f"{what}", SandboxWarning, stacklevel=4)
                self._stop_process()
                discard_golden(golden)
        self._boot(self._make_plan(self._overlay(self.image.disk)),
                   started + self.spec.boot_timeout)

    def _restore_golden(self, golden: Golden) -> None:
        """Clone: a fresh overlay on the golden disk, RAM mapped copy-on-write, device state
        loaded over the monitor, a new identity through the agent, then SSH, to the server
        that waits on the virtio-serial port when the snapshot has one (else over TCP)."""
        started = time.monotonic()
        plan = self._make_plan(self._overlay(golden.disk), ram_file=golden.ram, incoming=True)
        if golden.console.exists():
            with plan.console_log.open("wb") as log:
                log.write(golden.console.read_bytes())
                log.write(f"\n[sandbox: {self.name} cloned from golden snapshot "
                          f"{golden.path.name}]\n".encode())
        self._launch(plan)
        prelude = golden.ssh_prelude
        opener: Callable[[float], Any] | None = None
        if prelude is not None:
            # Connect before the state loads: the port must count as open when the guest
            # resumes, or the waiting server would read end-of-file.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(plan.ssh_socket))
            self._ssh_port_sock = sock
            self._wait_chardev_open("ssh0")
            opener = lambda timeout: PreludeSocket(sock, prelude)  # noqa: E731
        self.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": "x-ignore-shared", "state": True}])
        self.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(golden.state))}")
        self._wait_migration("loading the golden snapshot")
        agent = Agent(plan.agent_socket)
        agent.send_identity()
        self.qmp("cont")
        self.restore_seconds = time.monotonic() - started
        self._find_ssh_port()
        identity = threading.Thread(target=agent.finish, daemon=True)
        identity.start()
        try:
            if opener is not None:
                self._wait_for_ssh(time.monotonic() + 30, opener, attempts=1)
            else:
                self._wait_for_ssh(time.monotonic() + 60)
        except BootError as exc:  # the state loaded, yet the clone does not answer
            raise SnapshotError(f"the restored clone did not answer on SSH: {exc}") from exc
        identity.join(timeout=15)
        if agent.error:
            warnings.warn(f"{self.name}: the guest agent did not refresh the clone's clock and "
                          f"randomness ({agent.error})", SandboxWarning, stacklevel=5)

    def _arm_ssh_port(self, plan: QemuPlan) -> bytes | None:
        """Start an SSH server on the guest's virtio-serial SSH port and record what it sends
        before the client speaks (banner, key exchange offer). The host end stays connected
        through the save, so every clone resumes with that server waiting for its client."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(plan.ssh_socket))
        self._ssh_port_sock = sock
        self._wait_chardev_open("ssh0")
        try:
            Agent(plan.agent_socket).request("arm-ssh")
        except SandboxError as exc:
            warnings.warn(f"{self.name}: clones will connect over TCP instead of a waiting SSH "
                          f"server ({exc})", SandboxWarning, stacklevel=4)
            return None
        prelude = b""
        sock.settimeout(2.0)
        while True:  # read until the server falls silent: it now waits for the client
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                raise SnapshotError("the waiting SSH server closed its port")
            prelude += chunk
            sock.settimeout(1.0)
        if not prelude.startswith(b"SSH-"):
            raise SnapshotError(f"the waiting SSH server sent no banner ({prelude[:40]!r})")
        return prelude

    def _wait_chardev_open(self, label: str, timeout: float = 10) -> None:
        """Wait until QEMU has accepted the host's connection to chardev ``label``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for chardev in self.qmp("query-chardev"):
                if chardev["label"] == label and not chardev["filename"].startswith("disconn"):
                    return
            time.sleep(0.005)
        raise SnapshotError(f"QEMU did not accept the connection to its {label} port")

    def _wait_migration(self, what: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.qmp("query-migrate")
            except SandboxError as exc:
                if self.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=2)
                raise SnapshotError(f"{what} failed: QEMU stopped answering ({exc})"
                                    f"{self._qemu_stderr()}") from exc
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise SnapshotError(f"{what} failed: {info.get('error-desc', status)}"
                                    f"{self._qemu_stderr()}")
            try:
                self._check_alive(f"QEMU exited while {what}")
            except BootError as exc:
                raise SnapshotError(str(exc)) from exc
            if time.monotonic() > deadline:
                raise SnapshotError(f"{what} did not finish within {timeout:g} s "
                                    f"(migration status {status!r})")
            time.sleep(0.005)

    def boot_and_save(self, target: Path) -> dict[str, Any]:
        """Make a golden snapshot in ``target``: boot with RAM in a shared file, wait for SSH,
        quiesce, then save the device state. Used by :func:`sandbox.golden.ensure_golden`."""
        started = time.monotonic()
        assert self.image is None
        self.image = get_image(self.spec.image)
        self.accel = resolve_accel(self.spec.accel)
        self.dir = current_run().machine_dir(self.name)
        try:
            disk = self._overlay(self.image.disk, target / "disk.qcow2")
            plan = self._make_plan(disk, ram_file=target / "ram", ram_shared=True)
            self._boot(plan, started + self.spec.boot_timeout)
            booted = time.monotonic()
            # Settle: let boot-time jobs finish so clones do not all redo them.
            self.run("systemctl is-system-running --wait >/dev/null 2>&1; sync", timeout=120)
            prelude = self._arm_ssh_port(plan)
            self.channel.close()  # quiesce: no TCP connection inside the saved state
            time.sleep(0.2)
            self.qmp("stop")
            self.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": True}])
            saving = time.monotonic()
            state = target / "state"
            self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
            self._wait_migration("saving the golden snapshot")
            saved = time.monotonic()
            if prelude is not None:
                (target / "ssh-prelude").write_bytes(prelude)
            shutil.copyfile(plan.console_log, target / "console.log")
        finally:
            self.close()
        return {"boot_seconds": round(booted - started, 2),
                "save_seconds": round(saved - saving, 3),
                "state_bytes": state.stat().st_size}

    def _launch(self, plan: QemuPlan) -> None:
        assert self.dir is not None
        self._qemu_plan = plan
        log = (self.dir / "qemu.log").open("wb")
        parent = os.getpid()
        self.process = _spawner.submit(
            subprocess.Popen, plan.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent(parent) if self.die_with_parent else None).result()
        log.close()
        deadline = time.monotonic() + 30
        while not plan.qmp_socket.exists():
            self._check_alive("QEMU exited before its QMP socket appeared")
            if time.monotonic() > deadline:
                raise BootError("QEMU did not open its QMP socket within 30 s",
                                command_line=plan.command())
            time.sleep(0.01)
        while True:
            qmp = QEMUMonitorProtocol(str(plan.qmp_socket))
            try:
                qmp.connect(negotiate=True)
                break
            except (QMPError, OSError) as exc:
                # The socket file appears when QEMU binds it, a moment before it listens:
                # refused connections are retried. Anything else is usually QEMU failing on
                # its own command line right after opening the socket.
                if time.monotonic() < deadline and self.process is not None and \
                        self.process.poll() is None and _refused(exc):
                    time.sleep(0.01)
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if self.process is not None:
                        self.process.wait(timeout=5)
                self._check_alive("QEMU exited during start-up")
                raise BootError(f"could not talk to QEMU's monitor: {exc}",
                                command_line=plan.command()) from exc
        qmp.settimeout(30)
        self._qmp = qmp

    def _check_alive(self, what: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BootError(what, exit_status=self.process.returncode,
                            console_tail=self.console_tail() + self._qemu_stderr(),
                            command_line=self._qemu_plan.command() if self._qemu_plan else None)

    def _qemu_stderr(self) -> str:
        if self.dir is None:
            return ""
        try:
            text = (self.dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"\nQEMU said:\n{text[-2000:]}" if text else ""

    def _wait_for_ssh(self, deadline: float, opener: Callable[[float], Any] | None = None,
                      attempts: int | None = None) -> None:
        """Connect (retrying, bounded by ``deadline``) and keep the channel."""
        assert self.image is not None
        key = cache_key().load()
        if opener is None:
            assert self._ssh_port is not None
            opener = tcp(("127.0.0.1", self._ssh_port))

        def attempt() -> Channel:
            self._check_alive("QEMU exited while the guest was booting")
            channel = Channel(opener, key, self.image.host_key if self.image else None)
            channel.connect(timeout=max(1.0, min(20.0, deadline - time.monotonic())))
            return channel

        stop: tenacity.stop.stop_base = tenacity.stop_after_delay(
            max(0.0, deadline - time.monotonic()))
        if attempts is not None:
            stop = stop | tenacity.stop_after_attempt(attempts)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((OSError, paramiko.SSHException, EOFError)),
            wait=tenacity.wait_fixed(0.25), stop=stop, reraise=True)
        try:
            self._channel = retrying(attempt)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise BootError(f"the guest did not answer on SSH within "
                            f"{self.spec.boot_timeout:g} s (last error: {exc!r})",
                            console_tail=self.console_tail()) from exc

    def close(self) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove the machine's files."""
        if self._closed:
            return
        self._closed = True
        self._stop_process()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_process(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                if self._qmp is not None:
                    self._qmp.settimeout(3)
                    self._qmp.cmd("quit")
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)
                try:
                    process.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._ssh_port_sock is not None:  # closed only now: a golden save needs it open
            self._ssh_port_sock.close()
            self._ssh_port_sock = None
        self.process = None
        self._ssh_port = None
        self._forwards.clear()
        if self.dir is not None:
            for leftover in ("qmp.sock", "agent.sock", "ssh.sock", "qemu.pid"):
                (self.dir / leftover).unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def ssh_port(self) -> int:
        if self._ssh_port is None:
            raise SandboxError(f"{self.name} is not running")
        return self._ssh_port

    @property
    def key_path(self) -> Path:
        return cache_key().private_path

    def ssh_command(self) -> str:
        """A plain ``ssh`` command line that reaches this machine from the host."""
        return (f"ssh -i {self.key_path} -p {self.ssh_port} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null root@127.0.0.1")

    # -- QMP --------------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on this machine's monitor and return its result."""
        if self._qmp is None:
            raise SandboxError(f"{self.name} is not running")
        with self._qmp_lock:
            try:
                return self._qmp.cmd(command, **arguments)
            except QMPError as exc:
                raise SandboxError(f"QMP {command} failed: {exc}") from exc

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def _hostfwd_ports(self) -> dict[int, int]:
        """guest port -> host port of every TCP forward, read back from QEMU."""
        ports = {}
        for line in self.hmp("info usernet").splitlines():
            fields = line.split()
            if fields and fields[0] == "TCP[HOST_FORWARD]":
                ports[int(fields[5])] = int(fields[3])
        return ports

    # -- commands ---------------------------------------------------------------------------

    @property
    def channel(self) -> Channel:
        if self._channel is None or self._closed:
            raise ChannelError(f"{self.name} is not running")
        return self._channel

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
                                      stderr=stderr)
        except CommandTimeout as exc:
            self.transcript.append(TranscriptEntry(exc.command, None, limit,
                                                   _trim(exc.stdout + exc.stderr)))
            raise
        self.transcript.append(TranscriptEntry(result.command, result.exit_status,
                                               result.duration,
                                               _trim(result.stdout + result.stderr)))
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
        """Copy one host file into the guest (mode kept)."""
        self.channel.put(Path(local), remote)

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy one guest file to the host."""
        self.channel.get(remote, Path(local))

    def push(self, local_dir: str | os.PathLike[str], remote_dir: str, *,
             timeout: float | None = None) -> None:
        """Copy the contents of a host directory into ``remote_dir`` (created; modes kept)."""
        source = Path(local_dir)
        if not source.is_dir():
            raise SandboxError(f"push needs a directory, {source} is not one (use put)")
        self.channel.push(source, remote_dir, timeout or self.spec.command_timeout)

    # -- waits ------------------------------------------------------------------------------

    def wait_until_succeeds(self, cmd: str | Sequence[str], *, timeout: float = 60,
                            interval: float = 0.5) -> str:
        """Repeat ``cmd`` until it exits 0; its stdout. On timeout, the last result is shown."""
        deadline = time.monotonic() + timeout
        last: CommandResult | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                last = self.run(cmd, timeout=max(remaining, 1.0))
                if last.succeeded:
                    return last.stdout
            except CommandTimeout:
                pass
            if time.monotonic() + interval > deadline:
                seen = (f"last exit status {last.exit_status}, output:\n"
                        f"{_trim(last.stdout + last.stderr, 1000)}" if last else "no result")
                raise WaitTimeout(f"{self.name}: {command_string(cmd)!r} did not succeed "
                                  f"within {timeout:g} s; {seen}\n{self._console_hint()}")
            time.sleep(interval)

    def wait_for_port(self, port: int, *, timeout: float = 60) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        try:
            self.wait_until_succeeds(f"ss -Htln 'sport = :{int(port)}' | grep -q .",
                                     timeout=timeout, interval=0.25)
        except WaitTimeout:
            listening = self.run("ss -Htln", timeout=10).stdout.strip() or "(nothing)"
            raise WaitTimeout(f"{self.name}: nothing listened on guest TCP port {port} within "
                              f"{timeout:g} s; listening now:\n{listening}\n"
                              f"{self._console_hint()}") from None

    def wait_for_unit(self, unit: str, *, timeout: float = 60) -> None:
        """Wait until a systemd unit is active; fail early when it has failed."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["systemctl", "is-active", unit], timeout=30).stdout.strip()
            if state == "active":
                return
            if state == "failed":
                break
            time.sleep(0.5)
        status = self.run(["systemctl", "status", "--no-pager", "-n", "20", unit],
                          timeout=30).stdout
        what = "failed" if state == "failed" else f"was not active within {timeout:g} s"
        raise WaitTimeout(f"{self.name}: unit {unit} {what} (state {state!r}):\n{status}")

    def wait_for_console(self, regex: str, *, timeout: float = 60) -> re.Match[str]:
        """Wait until the serial console shows a line matching ``regex``; the match."""
        pattern = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.console_log())
            if match:
                return match
            self._check_alive("QEMU exited while waiting for the console")
            if time.monotonic() > deadline:
                raise WaitTimeout(f"{self.name}: the console showed no match for {regex!r} "
                                  f"within {timeout:g} s\n{self._console_hint()}")
            time.sleep(0.1)

    # -- ports, console, snapshots ------------------------------------------------------------

    def forward(self, guest_port: int) -> int:
        """Forward host 127.0.0.1:<free port> to ``guest_port``; the host port."""
        if guest_port in self._forwards:
            return self._forwards[guest_port]
        before = self._hostfwd_ports()
        if guest_port in before:
            self._forwards[guest_port] = before[guest_port]
            return before[guest_port]
        answer = self.hmp(f"hostfwd_add net0 tcp:127.0.0.1:0-:{int(guest_port)}")
        ports = self._hostfwd_ports()
        if guest_port not in ports:
            raise SandboxError(f"could not forward guest port {guest_port}: {answer.strip()}")
        self._forwards[guest_port] = ports[guest_port]
        return ports[guest_port]

    def console_log(self) -> str:
        """The serial console output so far."""
        if self.dir is None:
            return ""
        try:
            return (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` console lines, without colour codes or blank lines."""
        text = _ANSI.sub("", self.console_log()).replace("\r", "")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def _console_hint(self) -> str:
        tail = self.console_tail(15)
        return f"console tail:\n{tail}" if tail else "console: (empty)"

    def snapshot(self, tag: str) -> None:
        """Save this machine's disk and RAM under ``tag`` (inside its own overlay)."""
        self._snapshot_command("savevm", tag)

    def restore(self, tag: str) -> None:
        """Roll this machine's disk and RAM back to ``snapshot(tag)``; SSH reconnects."""
        self._snapshot_command("loadvm", tag)
        if self._channel is not None:  # its TCP or port state was rolled back with the guest
            self._channel.close()
        self._wait_for_ssh(time.monotonic() + 60)
        self.run(f"date -s @{time.time():.3f} >/dev/null", timeout=30)

    def snapshots(self) -> list[str]:
        """Tags saved with :meth:`snapshot`."""
        tags, table = [], False
        for line in self.hmp("info snapshots").splitlines():
            fields = line.split()
            if fields[:2] == ["ID", "TAG"]:
                table = True
            elif table and len(fields) >= 2:
                tags.append(fields[1])  # the ID column reads "--" for VM-wide snapshots
        return tags

    def _snapshot_command(self, verb: str, tag: str) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]+$", tag):
            raise SnapshotError(f"snapshot tag {tag!r}: use letters, digits, '.', '_', '-'")
        answer = self.hmp(f"{verb} {tag}").strip()
        if answer:
            raise SnapshotError(f"{verb} {tag} on {self.name} failed: {answer}")


def launch(image: str = "debian-12", *, name: str | None = None, **shape: Any) -> Machine:
    """A started machine; use it as a context manager (or call ``close()``)."""
    return Machine(MachineSpec.from_kwargs(image=image, **shape), name=name).start()
