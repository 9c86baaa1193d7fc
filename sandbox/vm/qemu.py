"""The QEMU process of one machine: spawning with a parent-death signal, the QMP monitor,
liveness, saving and loading state, and a graceful then hard stop. What it runs is a
:class:`sandbox.vm.plan.QemuPlan`.

Everything here is about QEMU, nothing about the guest: the guest API sits on top
(sandbox.machine), and so does the golden snapshot procedure (sandbox.vm.golden).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..base.processes import Pid, process_start_ticks, spawn
from ..base.waits import wait_until
from ..errors import BootError, SandboxError, SnapshotError
from . import console
from .files import MachineFiles
from .plan import DATA_DISK_SIZE, QemuPlan

#: How long QEMU may take to open its monitor socket.
MONITOR_TIMEOUT = 30.0
#: How long a monitor command may take.
QMP_TIMEOUT = 30.0


class Lifeline:
    """This process's end of :mod:`sandbox.vm.lifeline`: QEMUs that must die with this process
    until it lets them go (machines that may be kept), held by a helper process that kills
    them when this process dies. The helper starts with the first QEMU held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._helper: subprocess.Popen[str] | None = None
        self._held: dict[int, int | None] = {}

    def hold(self, pid: int) -> None:
        with self._lock:
            self._held[pid] = process_start_ticks(pid)
            self._send(f"hold {pid} {self._held[pid]}")

    def release(self, pid: int) -> None:
        with self._lock:
            if pid in self._held:
                del self._held[pid]
                self._send(f"release {pid}")

    def _send(self, line: str) -> None:
        for _ in range(2):
            if self._helper is None or self._helper.poll() is not None:
                self._helper = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(Path(__file__).with_name("lifeline.py"))],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True, cwd="/", text=True)
                assert self._helper.stdin is not None
                # A new helper (the first, or one after its predecessor died): all of them.
                self._helper.stdin.write("".join(f"hold {pid} {ticks}\n"
                                                 for pid, ticks in self._held.items()))
            assert self._helper.stdin is not None
            try:
                self._helper.stdin.write(line + "\n")
                self._helper.stdin.flush()
                return
            except (BrokenPipeError, ValueError):
                self._helper = None
        raise SandboxError("the QEMU lifeline helper (sandbox/lifeline.py) exits at once")

    def drop_in_child(self) -> None:
        """A forked child: its copy of the pipe must not keep the helper waiting."""
        if self._helper is not None and self._helper.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self._helper.stdin.fileno())
        self._helper, self._held = None, {}


_lifeline = Lifeline()
os.register_at_fork(after_in_child=_lifeline.drop_in_child)


def _refused(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class _Monitor(QEMUMonitorProtocol):
    """The legacy QMP client, with a bounded connect (its own connect waits for ever for a
    greeting, which a monitor busy with another client never sends)."""

    def connect_within(self, timeout: float) -> None:
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout=timeout)


#: Snapshot job ids, unique in this process.
_jobs = itertools.count(1)
#: How long a savevm or loadvm may take.
SNAPSHOT_TIMEOUT = 300.0


class QemuProcess:
    """One QEMU process and its QMP monitor: launched here, or adopted by pid."""

    def __init__(self, plan: QemuPlan | None, files: MachineFiles) -> None:
        self.plan = plan
        self.files = files
        self.process: subprocess.Popen[bytes] | Pid | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._qmp_lock = threading.Lock()
        self._console: Path | None = None
        #: The pid the lifeline holds (a detachable QEMU not yet detached).
        self._held: int | None = None

    def detach(self) -> None:
        """Let a detachable QEMU outlive this process (a machine being kept)."""
        if self._held is not None:
            _lifeline.release(self._held)
            self._held = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self, *, die_with_parent: bool, detachable: bool = False) -> None:
        """Start QEMU from the plan and connect to its monitor. ``detachable``: it dies with
        this process until :meth:`detach` (through :class:`Lifeline`, not a parent-death
        signal, which cannot be taken back)."""
        assert self.plan is not None
        command = self.plan.command()
        data = self.plan.files.data_disk
        if not data.exists():  # sparse: it costs nothing until a transfer fills it
            with data.open("wb") as disk:
                disk.truncate(DATA_DISK_SIZE)
        with self.files.qemu_log.open("wb") as log:
            # Under TCG, no transparent huge pages: QEMU asks for them for its translation
            # buffer, where each vCPU's region then grows 2 MiB at a time, each zeroed whole
            # (measured per idle clone: 5 MiB less memory). Under KVM the guest's RAM keeps them.
            self.process = spawn(command, die_with_parent=die_with_parent and not detachable,
                                 stdout=log, stderr=log, huge_pages=self.plan.accel == "kvm")
        if detachable:
            self._held = self.process.pid
            _lifeline.hold(self.process.pid)
        self._console = self.files.console_log
        console.tend(self._console)  # bounded on disk while this process runs QEMU
        deadline = time.monotonic() + MONITOR_TIMEOUT

        def socket_there() -> bool:
            self.check_alive("QEMU exited before its QMP socket appeared")
            return self.files.qmp_socket.exists()

        wait_until(socket_there, timeout=MONITOR_TIMEOUT, interval=0.01, error=BootError,
                   what="QEMU did not open its QMP socket")
        while True:
            qmp = QEMUMonitorProtocol(str(self.files.qmp_socket))
            try:
                qmp.connect(negotiate=True)
                break
            except (QMPError, OSError) as exc:
                # The socket file appears when QEMU binds it, a moment before it listens:
                # refused connections are retried. Anything else is usually QEMU failing on
                # its own command line right after opening the socket.
                if time.monotonic() < deadline and self.running and _refused(exc):
                    time.sleep(0.01)
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=5)
                self.check_alive("QEMU exited during start-up")
                raise BootError(f"could not talk to QEMU's monitor: {exc}",
                                command_line=command) from exc
        qmp.settimeout(QMP_TIMEOUT)
        self._qmp = qmp

    def adopt(self, pid: int, start_ticks: int | None, *, monitor: bool = True,
              monitor_timeout: float = MONITOR_TIMEOUT) -> None:
        """Take over a running QEMU this process did not start (by pid and start time),
        and its monitor unless ``monitor`` is False. QEMU's monitor serves one client at a
        time: SandboxError when another holds it for ``monitor_timeout`` seconds."""
        self.process = Pid(pid, start_ticks)
        if not monitor:
            return
        qmp = _Monitor(str(self.files.qmp_socket))
        try:
            qmp.connect_within(monitor_timeout)
        except TimeoutError:
            qmp.close()
            raise SandboxError(f"QEMU's monitor ({self.files.qmp_socket}) did not answer "
                               f"within {monitor_timeout:g} s: another sandbox command holds "
                               "it") from None
        except (QMPError, OSError) as exc:
            raise SandboxError(f"could not reach QEMU's monitor ({exc})") from exc
        qmp.settimeout(QMP_TIMEOUT)
        self._qmp = qmp

    # -- the monitor ----------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its result."""
        if self._qmp is None:
            raise SandboxError("QEMU is not running")
        with self._qmp_lock:
            try:
                return self._qmp.cmd(command, **arguments)
            except QMPError as exc:
                raise SandboxError(f"QMP {command} failed: {exc}") from exc

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def guest_resets(self) -> int:
        """How many times the guest was reset (rebooted, or reset from the monitor) since
        the last call: QEMU's RESET events, as read off the monitor by the commands sent so
        far, but those of a snapshot load (vm.restore). The other events are dropped."""
        if self._qmp is None:
            return 0
        with self._qmp_lock:
            events = self._qmp.get_events(wait=False)
        return sum(1 for event in events if event.get("event") == "RESET"
                   and event.get("data", {}).get("reason") != "snapshot-load")

    def hostfwd_ports(self) -> dict[int, int]:
        """guest port -> host port of every TCP forward, read back from QEMU."""
        ports = {}
        for line in self.hmp("info usernet").splitlines():
            fields = line.split()
            if fields and fields[0] == "TCP[HOST_FORWARD]":
                ports[int(fields[5])] = int(fields[3])
        return ports

    def vm_snapshot(self, verb: str, tag: str) -> None:
        """``savevm`` or ``loadvm`` of the whole machine (disk and RAM, in its overlay), as
        a snapshot job on the system disk alone (the payload disk is raw: no snapshots)."""
        if not re.match(r"^[A-Za-z0-9_.-]+$", tag):
            raise SnapshotError(f"snapshot tag {tag!r}: use letters, digits, '.', '_', '-'")
        node = self._system_disk()["inserted"]["node-name"]
        job = f"sandbox-{verb}-{next(_jobs)}"
        command = {"savevm": "snapshot-save", "loadvm": "snapshot-load"}[verb]
        try:
            self.qmp(command, **{"job-id": job, "tag": tag, "vmstate": node,
                                 "devices": [node]})
        except SandboxError as exc:
            raise SnapshotError(f"{verb} {tag} failed: {exc}") from exc
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while True:
            state = next((j for j in self.qmp("query-jobs") if j.get("id") == job), None)
            if state is None or state.get("status") == "concluded":
                break
            if time.monotonic() > deadline:
                raise SnapshotError(f"{verb} {tag} did not finish within "
                                    f"{SNAPSHOT_TIMEOUT:g} s")
            time.sleep(0.02)
        if state is not None:
            self.qmp("job-dismiss", id=job)
            if state.get("error"):
                raise SnapshotError(f"{verb} {tag} failed: {state['error']}")

    def _system_disk(self) -> dict[str, Any]:
        for device in self.qmp("query-block"):
            if device.get("device") == "disk0" and device.get("inserted"):
                return dict(device)
        raise SnapshotError("the machine has no system disk (disk0) to snapshot")

    def vm_snapshot_tags(self) -> list[str]:
        """The tags of the machine's snapshots (those of its system disk)."""
        image = self._system_disk()["inserted"].get("image") or {}
        return [str(s["name"]) for s in image.get("snapshots") or []]

    def close_monitor(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None

    def release(self) -> None:
        """Let go of a QEMU that keeps running (a named machine): its monitor, and the
        tending of its console log (its keeper process takes that over)."""
        self.close_monitor()
        if self._console is not None:
            console.untend(self._console)
            self._console = None

    # -- liveness -------------------------------------------------------------------------

    def check_alive(self, what: str) -> None:
        """BootError (exit status, console tail, QEMU's own words) if QEMU has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise BootError(what, exit_status=self.process.returncode,
                            console_tail=self.files.console_tail() +
                            self.stderr_tail(),
                            command_line=self.plan.command() if self.plan else None)

    def stderr_tail(self) -> str:
        try:
            text = self.files.qemu_log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"\nQEMU said:\n{text[-2000:]}" if text else ""

    # -- state ----------------------------------------------------------------------------

    def connect_ssh_port(self) -> socket.socket:
        """The host end of the guest's virtio-serial SSH port, connected, once QEMU has
        accepted it (before a state loads, the port must count as open when the guest runs:
        a server waiting on it would otherwise read end-of-file)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.files.ssh_socket))
            self.wait_chardev_open("ssh0")
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_chardev_open(self, label: str, timeout: float = 10) -> None:
        """Wait until QEMU has accepted the host's connection to chardev ``label``."""
        self.wait_chardev(label, connected=True, timeout=timeout)

    def wait_chardev(self, label: str, *, connected: bool, timeout: float = 10) -> None:
        """Wait until chardev ``label`` is connected (or, ``connected=False``, until QEMU
        has seen its host end closed)."""
        def reached() -> bool:
            return any(c["label"] == label and
                       c["filename"].startswith("disconn") != connected
                       for c in self.qmp("query-chardev"))

        wait_until(reached, timeout=timeout, interval=0.005, error=SnapshotError,
                   what=f"QEMU did not see its {label} port "
                        f"{'connected' if connected else 'closed'}")

    def save_state(self, path: Path, what: str, *, ignore_shared: bool = True) -> None:
        """Save the device state (RAM stays in its shared file: ``x-ignore-shared``) of the
        stopped machine into ``path``; all of its RAM too unless ``ignore_shared``."""
        self.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
        # QEMU's default cap (32 MiB/s) is meant for a network link, not a local file.
        self.qmp("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        self._wait_migration(what)

    def load_state(self, path: Path, what: str, *, ignore_shared: bool = True) -> None:
        """Load a state saved by :meth:`save_state` into a QEMU started with -incoming."""
        self.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
        # The state file goes to QEMU as an open descriptor: with an exec: URI, QEMU would
        # fork itself and run a shell and cat to read it.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"{what} failed: cannot read {path} ({exc.strerror})") from exc
        try:
            self.pass_fd(fd, "state")
        finally:
            os.close(fd)
        self.qmp("migrate-incoming", uri="fd:state")
        self._wait_migration(what)

    def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of descriptor ``fd``, as ``name`` (QMP getfd)."""
        if self._qmp is None:
            raise SandboxError("QEMU is not running")
        with self._qmp_lock:
            try:
                self._qmp.send_fd_scm(fd)
                self._qmp.cmd("getfd", fdname=name)
            except (QMPError, OSError) as exc:
                raise SandboxError(f"QMP getfd failed: {exc}") from exc

    def _wait_migration(self, what: str, timeout: float = 120) -> None:
        last: list[str] = ["none"]

        def finished() -> bool:
            try:
                info = self.qmp("query-migrate")
            except SandboxError as exc:
                if self.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=2)
                raise SnapshotError(f"{what} failed: QEMU stopped answering ({exc})"
                                    f"{self.stderr_tail()}") from exc
            status = str(info.get("status"))
            last[0] = status
            if status in ("failed", "cancelled"):
                raise SnapshotError(f"{what} failed: {info.get('error-desc', status)}"
                                    f"{self.stderr_tail()}")
            if self.process is not None and self.process.poll() is not None:
                # QEMU 7.2 exits when an incoming migration fails, which races the
                # "failed" status above: both say "<what> failed". The guest's console
                # says nothing of a migration; QEMU's own words do.
                raise SnapshotError(f"{what} failed: QEMU exited with status "
                                    f"{self.process.returncode}{self.stderr_tail()}")
            return status == "completed"

        wait_until(finished, timeout=timeout, interval=0.005, error=SnapshotError,
                   what=f"{what} did not finish",
                   seen=lambda: f"migration status {last[0]!r}")

    # -- stopping -------------------------------------------------------------------------

    def stop(self, grace: float = 3.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL, ``grace`` seconds apart; the monitor is
        closed and the runtime files removed."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                if self._qmp is not None:
                    self._qmp.settimeout(grace)
                    self._qmp.cmd("quit")
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.release()
        self.detach()  # stopped: nothing left to hold
        self.process = None
        self.files.remove_runtime_files()
