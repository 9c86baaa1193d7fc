"""Golden snapshots: an image booted once, SSH ready, saved; the source of every clone.

VM templating: during the golden boot guest RAM lives in a shared file-backed memory
backend, and the save uses the migration capability ``x-ignore-shared``, so the saved state
holds only devices (under 1 MB) while RAM stays in the file. A clone maps that file
copy-on-write (``share=off``), loads the small device state and resumes in about 0.1 s.

This module owns the format end to end: :func:`make` writes it, :class:`Golden` reads it,
:meth:`Golden.start_clone` turns it into a running machine.

Layout: ``<cache>/golden/<image>-<key>/``: ``ram``, ``state``, ``disk.qcow2`` (an overlay on
the image's disk, frozen at save time; its backing file is relative,
``../../images/<entry>/disk.qcow2``, so the entry works in any cache it is copied to),
``ssh-prelude`` (what the SSH server waiting in the snapshot sent before its client spoke),
``console.log`` (the boot's console) and ``manifest.json`` (naming its image by entry name,
``image_entry``). Read-only once made, except ``ram``: QEMU 7.2 opens a memory backend's
file read-write even for a private (``share=off``) mapping, so its owner keeps write
permission on it (0644; the directory is 0555). Clones never write to it: their guest RAM is
a copy-on-write private mapping.

The key covers the image digest, the machine's shape (the QEMU command line without
per-machine paths: memory, cpus, devices, accelerator), the QEMU version and this module's
version, so any change makes a new golden snapshot instead of a broken clone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..base.entries import entry_backing, entry_lock, publish, remove_entry
from ..base.paths import cache_dir
from ..base.progress import QUIET, Reporter
from ..errors import (
    BootError,
    ChannelError,
    GuestDataError,
    SandboxError,
    SandboxWarning,
    SnapshotError,
    guest_text,
)
from ..guest.agent import Agent
from ..guest.channel import connect
from ..guest.commands import as_root
from ..guest.files import GUEST_AGENT
from ..guest.sockets import PreludeSocket, read_prelude
from ..host.tools import qemu_version
from ..imaging.image import Image, find_images, remove_image
from ..share.artifact import Entry, tag_for
from ..share.store import remote_entry
from . import console
from .bootdisk import remove_boot_disks
from .bringup import SETTLE_COMMAND, connect_booted, start_agent
from .files import MachineFiles, run_tag
from .plan import QemuPlan, create_overlay, lan_pci_address, plan_for
from .qemu import QemuProcess
from .runs import current_run
from .spec import MachineSpec

GOLDEN_VERSION = "7"
#: The newest part of the boot's console a golden snapshot keeps, and gives its clones.
GOLDEN_CONSOLE_BYTES = 256 << 10

#: How long the golden boot may take to settle (systemd's boot jobs) before the save.
SETTLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Golden:
    path: Path
    manifest: dict[str, Any]

    @property
    def user(self) -> str:
        """The account its clones log in as."""
        return str(self.manifest.get("user", "root"))

    @property
    def ram(self) -> Path:
        return self.path / "ram"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def console(self) -> Path:
        """The serial console of the boot the snapshot was taken from."""
        return self.path / "console.log"

    @property
    def cloud_init_errors(self) -> list[str]:
        """What cloud-init reported as errors when the snapshot's guest first booted."""
        errors = self.manifest.get("cloud_init_errors") or []
        return [str(line) for line in errors] if isinstance(errors, list) else [str(errors)]

    @property
    def ssh_prelude(self) -> bytes | None:
        """What the SSH server waiting in the snapshot sent before its client spoke."""
        path = self.path / "ssh-prelude"
        return path.read_bytes() if path.exists() else None

    @classmethod
    def load(cls, path: Path) -> Golden:
        return cls(path, json.loads((path / "manifest.json").read_text()))

    def check(self) -> None:
        """SnapshotError unless the files are what the manifest says (a cheap look, made
        before every clone: sizes and the disk's header, not checksums)."""
        try:
            ram = self.ram.stat().st_size
            state = self.state.stat().st_size
            with self.disk.open("rb") as disk:
                header = disk.read(4)
            memory, state_bytes = int(self.manifest["memory_mib"]) << 20, \
                int(self.manifest["state_bytes"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"its files are incomplete ({exc})") from exc
        if ram != memory:
            raise SnapshotError(f"its ram file has {ram} bytes, not {memory}")
        if state != state_bytes:
            raise SnapshotError(f"its state file has {state} bytes, not {state_bytes}")
        if header != b"QFI\xfb":
            raise SnapshotError("its disk is not a qcow2 image")

    def start_clone(self, plan: QemuPlan, *, die_with_parent: bool, detachable: bool = False,
                    identity: dict[str, object] | None = None, clock: bool = True) -> Clone:
        """A running clone: QEMU started on ``plan`` (its disk a fresh overlay on this
        snapshot's, its RAM this snapshot's file mapped copy-on-write), the device state
        loaded, a new identity sent to the guest agent (with ``identity``'s fields: its
        networks; the host's time unless ``clock`` is False), resumed. SSH is the caller's."""
        files = plan.files
        if self.console.exists():
            with files.console_log.open("wb") as log:
                log.write(console.read_since(self.console, 0, GOLDEN_CONSOLE_BYTES)[0])
                log.write(f"\n[sandbox: cloned from {self.path.parent.name}/{self.path.name}]\n"
                          .encode())
        process = QemuProcess(plan, files)
        started = time.monotonic()
        try:
            process.launch(die_with_parent=die_with_parent, detachable=detachable)
        except BootError as exc:  # QEMU refused its files (a ram file of the wrong size...)
            process.stop()
            raise SnapshotError(f"QEMU could not start on it: {exc}") from exc
        clone = Clone(process, restore_seconds=0.0)
        try:
            prelude = self.ssh_prelude
            if prelude is not None:
                # Connect before the state loads: the port must count as open when the
                # guest resumes, or the waiting server would read end-of-file.
                clone.port_socket = process.connect_ssh_port()
                clone.prelude = prelude
            process.load_state(self.state, "loading the golden snapshot")
            if self.manifest.get("agent", True):
                clone.agent = Agent(files.agent_socket)
                clone.agent.send_identity(clock=clock, **(identity or {}))
            process.qmp("cont")
        except BaseException:
            clone.close()
            process.stop()
            raise
        clone.restore_seconds = time.monotonic() - started
        if clone.agent is not None:
            clone.identity = threading.Thread(target=clone.agent.finish, daemon=True)
            clone.identity.start()
        return clone


@dataclass
class Clone:
    """A clone just resumed: its QEMU, and what its first SSH connection needs."""

    process: QemuProcess
    restore_seconds: float
    #: The host end of the virtio-serial port where an SSH server waits, and what that
    #: server already sent; None when the snapshot has no such server (connect over TCP).
    port_socket: socket.socket | None = None
    prelude: bytes | None = None
    agent: Agent | None = None
    identity: threading.Thread | None = None

    def opener(self) -> Any:
        """The byte stream opener for the first SSH connection, or None for TCP."""
        if self.port_socket is None or self.prelude is None:
            return None
        sock, prelude = self.port_socket, self.prelude
        return lambda timeout: PreludeSocket(sock, prelude)

    def identity_error(self) -> str | None:
        """Wait for the agent's answer; why the clock and randomness were not refreshed."""
        if self.identity is not None:
            self.identity.join(timeout=15)
        return self.agent.error if self.agent is not None else None

    def close(self) -> None:
        if self.port_socket is not None:
            self.port_socket.close()
            self.port_socket = None


def golden_root() -> Path:
    path = cache_dir() / "golden"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shape_plan(image: Image, spec: MachineSpec, accel: str) -> QemuPlan:
    """The plan whose shape a golden snapshot of ``spec`` is made for (paths generic)."""
    return plan_for(spec, image, accel, files=MachineFiles(Path("M")), tag="T",
                    disk=Path("overlay.qcow2"), ram_file=Path("ram"))


def golden_key(image: Image, plan: QemuPlan) -> str:
    """The snapshot's key. It names the image's build, not only its digest: a forced
    rebuild of the same recipe (a new disk, a new host key) must not meet old snapshots."""
    payload = json.dumps([GOLDEN_VERSION, image.digest, image.manifest.get("built_at"),
                          qemu_version(), plan.shape()])
    if image.kind == "disk":  # the agent is started in its memory, not built in
        payload += hashlib.sha256(GUEST_AGENT.read_bytes()).hexdigest()
    return hashlib.sha256(payload.encode()).hexdigest()


def locate(image: Image, spec: MachineSpec, accel: str) -> Path:
    """Where the golden snapshot that machines of ``spec`` clone from is (or will be)."""
    return golden_root() / f"{image.name}-{golden_key(image, shape_plan(image, spec, accel))[:16]}"


def find_golden(image: Image, spec: MachineSpec, accel: str) -> Golden | None:
    return _readable(locate(image, spec, accel))


def _readable(path: Path) -> Golden | None:
    """The snapshot at ``path``, or None when there is none or its manifest is unreadable."""
    try:
        return Golden.load(path)
    except (OSError, ValueError):
        return None


def ensure_golden(image: Image, spec: MachineSpec, accel: str, *,
                  reporter: Reporter = QUIET) -> Golden:
    """The golden snapshot for ``spec``: made once (under a lock, whatever the number of
    callers) when the cache has none, or remade when its manifest was damaged. With a
    registry set, a missing one is pulled when the registry has it, and one made here is
    pushed when ``SANDBOX_PUSH=1`` (:mod:`sandbox.share.store`)."""
    final = locate(image, spec, accel)
    found = _readable(final)
    if found is not None:
        return found
    with entry_lock(final):
        found = _readable(final)
        if found is not None:
            return found
        if final.exists():
            warnings.warn(f"golden snapshot {final.name} has no readable manifest; rebuilding "
                          "it", SandboxWarning, stacklevel=3)
            remove_entry(final)

        def build(work: Path) -> None:
            started = time.monotonic()
            timings = _derived(image, spec, accel, work, reporter)
            if timings is None:
                with reporter.stage(f"{image.name}: golden snapshot (boot once, save booted "
                                    "state)"):
                    timings = make(image, spec, accel, work)
            plan = shape_plan(image, spec, accel)
            manifest = {
                "image": image.name, "image_entry": image.path.name,
                "image_digest": image.digest,
                "image_built_at": image.manifest.get("built_at"),
                "key": golden_key(image, plan), "golden_version": GOLDEN_VERSION,
                "qemu_version": qemu_version(), "shape": plan.shape(),
                "memory_mib": plan.memory_mib, "cpus": plan.cpus, "accel": plan.accel,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 2), **timings,
            }
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        key = golden_key(image, shape_plan(image, spec, accel))
        with remote_entry("golden", key, final, reporter=reporter,
                          check=lambda work, manifest: check_pulled(
                              key, image, Golden(work, manifest))) as remote:
            if remote.manifest is None:
                publish(final, build, owner_writable=("ram",))
                remote.built(Entry("golden", final, key, needs=(tag_for("image", image.digest),)),
                             reporter=reporter)
    return Golden.load(final)


def _derived(image: Image, spec: MachineSpec, accel: str, work: Path,
             reporter: Reporter) -> dict[str, Any] | None:
    """For a shape with private-network NICs: the snapshot made by :func:`derive` from the
    snapshot of the same shape without them (made first if missing; clones of it are what
    most machines are anyway), its timings; None when the shape has no NICs, or that
    snapshot has no agent and SSH server waiting (an imported image without python3), or
    the derivation failed (said in a warning): the caller then boots."""
    if not spec.networks:
        return None
    base = ensure_golden(image, replace(spec, networks=()), accel, reporter=reporter)
    if not base.manifest.get("agent", True) or base.ssh_prelude is None:
        return None
    try:
        with reporter.stage(f"{image.name}: golden snapshot with {len(spec.networks)} "
                            f"network interface(s), from {base.path.name}"):
            return derive(image, spec, accel, work, base)
    except SandboxError as exc:
        warnings.warn(f"golden snapshot of {image.name} with {len(spec.networks)} network "
                      f"interface(s) could not be made from {base.path.name} ({exc}); "
                      "booting it instead", SandboxWarning, stacklevel=5)
        for leftover in work.iterdir():
            leftover.unlink()
        return None


#: How long the guest of a golden snapshot being derived may take to find its new NICs.
DERIVE_NIC_TIMEOUT = 60.0


def derive(image: Image, spec: MachineSpec, accel: str, target: Path,
           base: Golden) -> dict[str, Any]:
    """Write into ``target`` the golden snapshot of ``spec``'s shape, whose private-network
    NICs ``base`` (the snapshot of the same shape without them) lacks, without a boot.

    ``base``'s RAM and disk are copied; its state loads in a QEMU that also has the NICs, at
    their PCI slots, where the guest has not seen them (QEMU loads a state that lacks a
    device, as it does for the boot disk's slot); the guest rescans its PCI bus until each
    NIC is bound to its driver, then settles as a boot does (udev names the NICs, its
    workers end); the SSH server on the port, used by the connection that did this, is
    armed again, and the state is saved. A few seconds under TCG, against a cold boot
    (19 s for debian-12 here, about 60-140 s for an imported image through its firmware)."""
    started = time.monotonic()
    run = current_run()
    files = MachineFiles(run.machine_dir(f"golden-{target.name[-24:]}"))
    for part in ("ram", "disk.qcow2"):  # the disk: an overlay naming the image's, relatively
        subprocess.run(["cp", "--sparse=always", str(base.path / part), str(target / part)],
                       check=True, timeout=300, capture_output=True)
        (target / part).chmod(0o644)
    plan = replace(plan_for(spec, image, accel, files=files, tag=run_tag(run.id, files.dir.name),
                            disk=target / "disk.qcow2", ram_file=target / "ram",
                            ram_shared=True), incoming=True, boot_slot=False)
    process = QemuProcess(plan, files)
    port: socket.socket | None = None
    try:
        process.launch(die_with_parent=True)
        port = process.connect_ssh_port()
        process.load_state(base.state, f"loading golden snapshot {base.path.name}")
        process.qmp("cont")
        waiting, first = base.ssh_prelude, port
        assert waiting is not None
        try:
            channel = connect(lambda timeout: PreludeSocket(first, waiting),
                              image.client_key().load(), image.host_key, timeout=30,
                              attempts=1, user=base.user,
                              alive=lambda: process.check_alive("QEMU exited"))
        except ChannelError as exc:
            raise SnapshotError(f"no SSH on the resumed snapshot ({exc})") from exc
        slots = " ".join(lan_pci_address(index) for index in range(len(spec.networks)))
        found = channel.run(as_root(
            "echo 1 > /sys/bus/pci/rescan && "
            f"for slot in {slots}; do n=0; "
            "until ls /sys/bus/pci/devices/$slot/virtio*/net >/dev/null 2>&1; do "
            f"n=$((n+1)); [ $n -le {int(DERIVE_NIC_TIMEOUT * 20)} ] || exit 3; sleep 0.05; "
            "done; done", base.user), timeout=DERIVE_NIC_TIMEOUT + 30)
        if found.exit_status != 0:
            raise SnapshotError(f"the guest did not find its new network interfaces (exit "
                                f"{found.exit_status}: {guest_text(found.stderr)[-300:]})")
        channel.run(as_root(SETTLE_COMMAND, base.user), timeout=SETTLE_TIMEOUT)
        channel.close()
        port.close()
        process.wait_chardev("ssh0", connected=False)
        port = process.connect_ssh_port()
        prelude = _arm_again(process, files, port, image)
        time.sleep(0.2)
        process.qmp("stop")
        saving = time.monotonic()
        process.save_state(target / "state", "saving the golden snapshot")
        saved = time.monotonic()
        (target / "ssh-prelude").write_bytes(prelude)
        console.copy(base.console, target / "console.log", GOLDEN_CONSOLE_BYTES)
    finally:
        process.stop()
        if port is not None:
            port.close()
        shutil.rmtree(files.dir, ignore_errors=True)
    return {"derived_from": base.path.name, "derive_seconds": round(saving - started, 2),
            "user": base.user, "agent": True,
            **({"cloud_init_errors": base.cloud_init_errors} if base.cloud_init_errors else {}),
            "save_seconds": round(saved - saving, 3),
            "state_bytes": (target / "state").stat().st_size}


def _arm_again(process: QemuProcess, files: MachineFiles, sock: socket.socket,
               image: Image) -> bytes:
    """:func:`arm_ssh_port` once the server that served the last connection has let the port
    go (the guest opens a virtio-serial port once at a time: until that server has exited,
    the agent's open fails); SnapshotError naming the last failure after 15 s."""
    deadline, error = time.monotonic() + 15, ""
    while time.monotonic() < deadline:
        try:
            Agent(files.agent_socket).request(
                "arm-ssh", server="dropbear" if image.kind == "debian" else "sshd")
        except SandboxError as exc:
            error = str(exc)
            time.sleep(0.1)
            continue
        try:
            return read_prelude(sock)
        except GuestDataError as exc:
            raise SnapshotError(f"its SSH server sent no prelude ({exc})") from exc
    raise SnapshotError(f"its SSH server could not be armed again ({error})")


def check_pulled(key: str, image: Image, golden: Golden) -> None:
    """Refuse a pulled golden snapshot that is not the one asked for (its key, QEMU, image)
    or whose files disagree with its manifest."""
    manifest = golden.manifest
    if (manifest.get("key"), manifest.get("qemu_version"), manifest.get("image_entry")) != \
            (key, qemu_version(), image.path.name):
        raise SnapshotError(f"the registry's golden-{key[:16]}... is another snapshot (key "
                            f"{str(manifest.get('key'))[:16]}, QEMU "
                            f"{manifest.get('qemu_version')}, image "
                            f"{manifest.get('image_entry')}); it was not used")
    golden.check()


def make(image: Image, spec: MachineSpec, accel: str, target: Path) -> dict[str, Any]:
    """Write a golden snapshot into ``target``: boot with RAM in a shared file, wait for
    SSH, let the boot settle, arm the SSH port, quiesce, save the device state."""
    started = time.monotonic()
    run = current_run()
    files = MachineFiles(run.machine_dir(f"golden-{target.name[-24:]}"))
    disk = create_overlay(entry_backing(image.disk, target), target / "disk.qcow2")
    plan = plan_for(spec, image, accel, files=files, tag=run_tag(run.id, files.dir.name),
                    disk=disk, ram_file=target / "ram", ram_shared=True)
    process = QemuProcess(plan, files)
    port: socket.socket | None = None
    try:
        process.launch(die_with_parent=True)
        ssh_port = process.hostfwd_ports().get(22)
        if ssh_port is None:
            raise BootError("QEMU started without the SSH port forward",
                            console_tail=files.console_tail())
        channel, user, cloud_init_errors = connect_booted(
            image, process, files, ssh_port, spec.boot_timeout - (time.monotonic() - started))
        booted = time.monotonic()
        prelude = None
        # An imported image has none of the sandbox's parts: its agent is started in memory.
        agent = image.kind == "debian" or start_agent(channel, user, files.agent_socket)
        if image.kind == "debian":
            # Settle: let boot-time jobs finish so clones do not all redo them.
            channel.run(SETTLE_COMMAND,
                        timeout=SETTLE_TIMEOUT)
        if agent:  # it arms an SSH server on the port
            port = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            port.connect(str(files.ssh_socket))
            prelude = arm_ssh_port(process, files, port, image)
        channel.close()  # quiesce: no TCP connection inside the saved state
        time.sleep(0.2)
        process.qmp("stop")
        saving = time.monotonic()
        process.save_state(target / "state", "saving the golden snapshot")
        saved = time.monotonic()
        if prelude is not None:
            (target / "ssh-prelude").write_bytes(prelude)
        console.copy(files.console_log, target / "console.log", GOLDEN_CONSOLE_BYTES)
    finally:
        process.stop()
        if port is not None:  # closed only now: the save needs it open
            port.close()
        shutil.rmtree(files.dir, ignore_errors=True)
    return {"boot_seconds": round(booted - started, 2), "user": user,
            "agent": agent, **({"cloud_init_errors": cloud_init_errors} if cloud_init_errors
                               else {}),
            "save_seconds": round(saved - saving, 3),
            "state_bytes": (target / "state").stat().st_size}


def arm_ssh_port(process: QemuProcess, files: MachineFiles, sock: socket.socket,
                 image: Image) -> bytes | None:
    """Start an SSH server on the guest's virtio-serial SSH port (``sock`` is its host end)
    and record what it sends before the client speaks (banner, key exchange offer). The
    host end stays connected through the save, so every clone resumes with that server
    waiting for its client."""
    process.wait_chardev_open("ssh0")
    try:
        # The sandbox's dropbear in its images; an imported image's own OpenSSH server.
        Agent(files.agent_socket).request(
            "arm-ssh", server="dropbear" if image.kind == "debian" else "sshd")
    except SandboxError as exc:
        warnings.warn(f"clones will connect over TCP instead of a waiting SSH server ({exc})",
                      SandboxWarning, stacklevel=4)
        return None
    try:
        return read_prelude(sock)
    except GuestDataError as exc:
        warnings.warn(f"clones will connect over TCP instead of a waiting SSH server ({exc})",
                      SandboxWarning, stacklevel=4)
        return None


def discard_golden(golden: Golden) -> None:
    """Remove a golden snapshot that failed to load, so that the next clone rebuilds it:
    under its lock, and only if it is still the same snapshot (another process may have
    rebuilt it meanwhile, and clones of the new one must not lose it)."""
    with entry_lock(golden.path):
        current = _readable(golden.path)
        if current is None or current.manifest.get("created_at") == \
                golden.manifest.get("created_at"):
            remove_entry(golden.path)


def list_goldens() -> list[Golden]:
    found = (_readable(p) for p in sorted(golden_root().iterdir()) if not p.name.startswith("."))
    return [golden for golden in found if golden is not None]


def remove_stale(image: Image) -> list[str]:
    """Remove the golden snapshots made from an earlier build of ``image``'s name (after a
    forced rebuild nothing can clone them); what was removed, one line each."""
    removed = []
    for golden in list_goldens():
        if golden.manifest.get("image_digest") == image.digest and \
                golden.manifest.get("image_built_at") != image.manifest.get("built_at"):
            discard_golden(golden)
            removed.append(f"removed golden snapshot {golden.path.name} (of an earlier build)")
    return removed


def remove_images(name: str, keep: Path | None = None) -> list[str]:
    """Remove every built version of image ``name`` but the one at ``keep``, and the golden
    snapshots made from them (they could not be cloned without them); what was removed,
    one line each."""
    removed, kept = [], None
    for image in find_images(name):
        if image.path == keep:
            kept = image
            continue
        remove_image(image)
        source = image.manifest.get("source")
        removed.append(f"removed {image.name} {image.digest[:16]}" + (
            f" (imported from {source}, sha256 {image.manifest['source_sha256']})"
            if source else ""))
        removed += remove_boot_disks(image.path.name)
    for golden in list_goldens():
        if golden.manifest["image"] == name and (
                kept is None or golden.manifest.get("image_digest") != kept.digest):
            discard_golden(golden)
            removed.append(f"removed golden snapshot {golden.path.name}")
    return removed
