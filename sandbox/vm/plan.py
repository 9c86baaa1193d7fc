"""What one QEMU process runs: its command line (:class:`QemuPlan`, made by :func:`plan_for`)
and the copy-on-write disk it starts from (:func:`create_overlay`); where its files are and
how it is tagged is :mod:`sandbox.vm.files`.

Pure logic apart from :func:`create_overlay`; unit tested.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.paths import find_tool
from ..errors import HostError, SnapshotError
from ..host.cpu import HOST_DEPENDENT, host_cpu_identity, qemu_cpu_model, tcg_cpu
from ..host.tools import qemu_binary
from .accel import accel_verdict
from .bootdisk import BOOT_SLOT, boot_disk
from .files import MachineFiles, qemu_option
from .runs import running_tcg_threads

if TYPE_CHECKING:
    from ..imaging.image import Image
    from .spec import MachineSpec

#: A fresh overlay's bytes by the backing file they name (its path, inode, size and times):
#: made by qemu-img once per process, then written as they are for each later clone of the
#: same disk (a qemu-img run costs a clone ~15 ms of CPU and of its start). Bounded.
_OVERLAYS: dict[tuple[str, int, int, int], bytes] = {}
_OVERLAYS_KEPT = 32
#: A fresh overlay is a header and empty tables (196 KiB for a 64 KiB-cluster qcow2).
_OVERLAY_MAX = 1 << 20


def create_overlay(backing: Path, overlay: Path) -> Path:
    """A fresh copy-on-write qcow2 disk at ``overlay`` on the read-only ``backing`` disk."""
    overlay.unlink(missing_ok=True)
    key = None
    if backing.is_absolute():
        with contextlib.suppress(OSError):
            info = backing.stat()
            key = (str(backing), info.st_ino, info.st_size, info.st_mtime_ns)
    made = _OVERLAYS.get(key) if key is not None else None
    if made is not None:
        fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(made)
        return overlay
    result = subprocess.run([find_tool("qemu-img") or "qemu-img", "create", "-q", "-f", "qcow2",
                             "-F", "qcow2", "-b", str(backing), str(overlay)],
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise SnapshotError(f"could not make a disk overlay on {backing}: "
                            f"{result.stderr.strip() or f'qemu-img exited {result.returncode}'}")
    if key is not None and overlay.stat().st_size <= _OVERLAY_MAX:
        if len(_OVERLAYS) >= _OVERLAYS_KEPT:
            _OVERLAYS.clear()
        _OVERLAYS[key] = overlay.read_bytes()
    return overlay


# -- the plan -------------------------------------------------------------------------------

#: The serial of the payload disk: the guest finds it as /dev/disk/by-id/virtio-<serial>.
DATA_SERIAL = "sandbox-data"
#: Its size as the guest sees it (a sparse file: it takes only what a transfer puts in it).
DATA_DISK_SIZE = 64 << 30

#: The PCI slot of the NIC on private network 0 (network N: this + N). Fixed, so the guest
#: finds its NICs by PCI address whatever its kernel names them (eth1, ens16, enp0s16).
LAN_SLOT = 0x10


def lan_pci_address(index: int) -> str:
    """The PCI address of the NIC on private network number ``index``, as Linux names it."""
    return f"0000:00:{LAN_SLOT + index:02x}.0"


@dataclass(frozen=True)
class QemuPlan:
    """Everything needed to start one QEMU process for one machine."""

    binary: str
    tag: str                  # carried in -name, so the reaper can tell its processes apart
    accel: str
    kvm_cpu: str
    memory_mib: int
    cpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    files: MachineFiles
    network: str
    extra: tuple[str, ...] = field(default=())
    #: Guest RAM in this file (golden snapshots): shared while a golden is made, a private
    #: copy-on-write mapping in a clone.
    ram_file: Path | None = None
    ram_shared: bool = False
    #: Wait for the machine state on the monitor (-incoming defer) instead of booting.
    incoming: bool = False
    #: One NIC per private network (sandbox.net.network): the switch's data socket of each, or
    #: None for a NIC on a hub of its own (a golden boot: the NIC exists, nothing is on it).
    lans: tuple[Path | None, ...] = ()
    #: An imported disk image: booted by firmware (SeaBIOS, or this UEFI firmware) with its
    #: cloud-init seed attached, instead of a direct kernel boot.
    seed: Path | None = None
    uefi: Path | None = None
    #: The CPU model asked for (spec, else recipe), as this QEMU names it; under TCG when
    #: none is, sandbox.host.cpu.tcg_cpu's; "": the accelerator's default (kvm_cpu under KVM).
    cpu: str = ""
    #: The host processor (sandbox.host.cpu.host_cpu_identity) when the guest's CPU is the
    #: host's (KVM with host or max), else "": part of the shape, not of the command line.
    host_cpu: str = ""
    #: A machine resumed from a saved state (incoming) boots, only if its guest reboots, from
    #: this disk instead of -kernel, which keeps the kernel in QEMU's memory (see
    #: sandbox.vm.bootdisk); None: -kernel, and an empty disk in the boot disk's slot.
    boot_disk: Path | None = None
    #: Under TCG, "multi": a host thread per vCPU; "single": one thread runs them in turn
    #: (see tcg_threads). Not part of the shape: a state saved under one loads under the other.
    tcg_threads: str = "multi"
    #: False: a machine resumed from a saved state has no device on the boot disk's slot
    #: (a helper deriving a golden snapshot from another, whose guest rescans its PCI bus:
    #: it must not meet the boot disk, which clones keep unknown to the guest).
    boot_slot: bool = True

    def command(self) -> list[str]:
        cpu = self.cpu or ((self.kvm_cpu or "host") if self.accel == "kvm" else "max")
        accel = "kvm" if self.accel == "kvm" else f"tcg,thread={self.tcg_threads}"
        restrict = ",restrict=on" if self.network == "restricted" else ""
        machine = "q35,vmport=off,hpet=off"
        memory: list[str] = []
        if self.ram_file is not None:
            share = "on" if self.ram_shared else "off"
            memory = ["-object", f"memory-backend-file,id=ram0,size={self.memory_mib}M,"
                                 f"mem-path={qemu_option(self.ram_file)},share={share}"]
            machine += ",memory-backend=ram0"
        files = self.files
        q = qemu_option
        return [
            self.binary,
            "-name", f"{q(self.tag)},debug-threads=on",
            "-machine", machine,
            *memory,
            "-accel", accel,
            "-cpu", cpu,
            "-m", str(self.memory_mib),
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            *self._boot_arguments(),
            "-drive", f"file={q(self.disk)},if=none,id=disk0,format=qcow2,discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0" + (",bootindex=0" if self.seed else ""),
            # Port 0: the host kernel picks a free port, so parallel machines never race
            # for one; the chosen port is read back with "info usernet".
            "-netdev", f"user,id=net0{restrict},hostfwd=tcp:127.0.0.1:0-:22",
            "-device", f"virtio-net-pci,netdev=net0,{NO_GUEST_ANNOUNCE}",
            *self._lan_arguments(),
            "-device", "virtio-rng-pci",
            # A kernel panic stops the guest where it is (panic=-1 would reboot it quietly)
            # and shows as the run state guest-panicked (Debian's kernels load pvpanic-mmio).
            "-device", "pvpanic", "-action", "panic=pause",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent0,path={q(files.agent_socket)},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=org.sandbox.agent",
            "-chardev", f"socket,id=ssh0,path={q(files.ssh_socket)},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=ssh0,name=org.sandbox.ssh",
            # The payload disk (sandbox.machine.payload): big files cross here, no cipher.
            # An I/O error there is the guest's to see (a full host disk must never pause it).
            "-drive", f"file={q(files.data_disk)},if=none,id=data0,format=raw,discard=unmap,"
                      "werror=report,rerror=report",
            "-device", f"virtio-blk-pci,drive=data0,serial={DATA_SERIAL}",
            # append: a clone's log starts with the golden boot's console, copied in first.
            "-chardev", f"file,id=console0,path={q(files.console_log)},append=on",
            "-serial", "chardev:console0",
            "-qmp", f"unix:{q(files.qmp_socket)},server=on,wait=off",
            "-pidfile", str(files.pidfile),
            *(["-incoming", "defer"] if self.incoming else []),
            *self.extra,
        ]

    def _boot_arguments(self) -> list[str]:
        if self.seed is not None:
            return self._firmware_arguments()
        kernel = ["-kernel", str(self.kernel), "-initrd", str(self.initrd),
                  "-append", self.cmdline]
        if not self.incoming or not self.boot_slot:
            return kernel
        # A machine resumed from a saved state has the boot disk (sandbox.vm.bootdisk) on a
        # slot of its own: not in the state it loads, unknown to the guest until the firmware
        # boots it on a reboot. Where none could be made, -kernel stays and the slot holds an
        # empty disk: every resumed machine has the device, so the states saved from them
        # (templates, saved machines) load on hosts with and without boot disks.
        drive = (f"file={qemu_option(self.boot_disk)},format=raw" if self.boot_disk else
                 "driver=null-co,size=1M,read-zeroes=on")
        return [*(kernel if self.boot_disk is None else []),
                "-drive", f"{drive},if=none,id=boot0,readonly=on",
                "-device", f"virtio-blk-pci,drive=boot0,bus=pcie.0,addr={BOOT_SLOT:#x}"
                           + (",bootindex=0" if self.boot_disk else "")]

    def _firmware_arguments(self) -> list[str]:
        assert self.seed is not None
        # vmgenid: on every restore the guest sees a new generation ID, and Linux (5.18+)
        # then reseeds its random number generator: clones never share random output.
        return [*(["-bios", str(self.uefi)] if self.uefi else []),
                "-drive", f"file={qemu_option(self.seed)},if=none,id=seed0,format=raw,"
                          "readonly=on",
                "-device", "virtio-blk-pci,drive=seed0", "-device", "vmgenid,guid=auto"]

    def _lan_arguments(self) -> list[str]:
        arguments = []
        for index, switch in enumerate(self.lans):
            lan = f"lan{index}"
            local = qemu_option(self.files.lan_socket(index))
            netdev = (f"dgram,id={lan},local.type=unix,local.path={local},"
                      f"remote.type=unix,remote.path={qemu_option(switch)}"
                      if switch is not None else f"hubport,id={lan},hubid={100 + index}")
            arguments += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={lan},id={lan},"
                                                        f"bus=pcie.0,addr={LAN_SLOT + index:#x},"
                                                        f"{NO_GUEST_ANNOUNCE}"]
        return arguments

    def shape(self) -> list[str]:
        """The command line without per-machine paths and ports: what a saved machine state
        depends on. Two plans with equal shapes can restore each other's snapshots. When the
        guest's CPU is the host's, a last item names the host processor: a state saved on
        another processor is then another key (rebuilt), never a failed load."""
        generic = replace(self, tag="T", disk=Path("D"), files=MachineFiles(Path("M")),
                          kernel=Path("K"), initrd=Path("I"),
                          ram_file=Path("R") if self.ram_file else None, ram_shared=False,
                          incoming=False, network="restricted", binary="qemu",
                          lans=(None,) * len(self.lans),
                          seed=Path("S") if self.seed else None,
                          uefi=Path("U") if self.uefi else None, boot_disk=None,
                          tcg_threads="multi")
        return generic.command() + ([f"#host-cpu={self.host_cpu}"] if self.host_cpu else [])


def plan_for(spec: MachineSpec, image: Image, accel: str, *, files: MachineFiles, tag: str,
             disk: Path, ram_file: Path | None = None, ram_shared: bool = False,
             incoming: bool = False, lans: tuple[Path | None, ...] | None = None) -> QemuPlan:
    """The plan of a machine of ``spec`` on ``image``: the spec's shape, else the recipe's."""
    binary = qemu_binary()
    kvm_cpu = accel_verdict().kvm_cpu if accel == "kvm" else ""
    cpu = guest_cpu(spec.cpu or image.cpu, accel, binary) or (
        tcg_cpu(binary) if accel != "kvm" else "")
    hosts_cpu = accel == "kvm" and (cpu or kvm_cpu or "host") in HOST_DEPENDENT
    cmdline = image.kernel_cmdline + (" " + TCG_KERNEL_ARGUMENTS if accel != "kvm" else "")
    cpus = spec.cpus or image.cpus
    return QemuPlan(
        binary=binary, tag=tag, accel=accel, kvm_cpu=kvm_cpu, cpu=cpu,
        host_cpu=host_cpu_identity() if hosts_cpu else "",
        memory_mib=spec.memory_mib or image.memory_mib, cpus=cpus,
        kernel=image.kernel, initrd=image.initrd, disk=disk,
        cmdline=cmdline, files=files, network=spec.network, extra=spec.qemu_args, ram_file=ram_file,
        ram_shared=ram_shared, incoming=incoming,
        lans=lans if lans is not None else (None,) * len(spec.networks),
        seed=image.seed, uefi=uefi_firmware() if image.boot == "uefi" else None,
        boot_disk=(boot_disk(image.kernel, image.initrd, cmdline)
                   if incoming and image.seed is None else None),
        # Only a machine that runs its guest (a clone: RAM mapped copy-on-write) is given
        # the choice; a helper that only loads a state to save it again keeps a thread per
        # vCPU, as it always had (in a loaded CI run one such save sat in "setup" for 120 s,
        # its mode unknown: the helper has no use for the choice, and takes no risk).
        tcg_threads=(tcg_threads(cpus) if incoming and accel != "kvm" and ram_file is not None
                     and not ram_shared else "multi"))


#: Kernel arguments a guest gets under TCG only. norandmaps: each process's libraries at the
#: same addresses, as QEMU 7.2's TCG keys its translations by virtual address: with address
#: randomisation every new process has its C library and loader translated afresh; without
#: it a process costs 2.5-3x less (measured here: /bin/true 29 -> 10 ms, ls 49 -> 19 ms).
#: Under KVM nothing is translated, and the guest keeps its randomisation. A test that needs
#: it under TCG turns it on: sysctl -w kernel.randomize_va_space=2.
TCG_KERNEL_ARGUMENTS = "norandmaps"


#: The NICs never ask the guest to announce itself: after every state load QEMU would have
#: it send gratuitous ARPs and unsolicited neighbour advertisements five times, with netlink
#: news for systemd-networkd each time, though a clone's user-mode NIC has no switch to tell
#: and its private networks get new addresses from the agent anyway. Under TCG that was 4k
#: of the 11k guest code blocks a clone translated in its first 1.5 s (0.07 of 0.23 CPU-s).
#: (QEMU 7.2's announce-rounds=0 migration parameter does the same, but a later loadvm of
#: that QEMU then kills it.)
NO_GUEST_ANNOUNCE = "guest_announce=off"


#: SANDBOX_TCG_THREADS: how a resumed machine's vCPUs run under TCG.
TCG_THREADS = ("auto", "single", "multi")


def tcg_threads(cpus: int, *, running: int | None = None, cores: int | None = None) -> str:
    """How a machine resumed under TCG runs its ``cpus`` vCPUs: "multi" (a host thread each)
    while the host has a core for each of them beside the TCG threads of the machines
    already running (``running``, counted when None), else "single": one thread runs them
    in turn. On a host whose cores are all taken, threads of their own only contend: on 2
    cores, 20 clone-command-close cycles two at a time took 7.0 s with a thread per clone
    and 8.0 s with one per vCPU; one at a time, 13.1 s and 10.3 s.
    SANDBOX_TCG_THREADS=single or multi decides instead ("auto", the default, as above)."""
    setting = os.environ.get("SANDBOX_TCG_THREADS", "auto").strip().lower() or "auto"
    if setting not in TCG_THREADS:
        raise HostError(f"SANDBOX_TCG_THREADS={setting!r} is not one of "
                        f"{', '.join(TCG_THREADS)}; unset it for auto")
    if setting != "auto" or cpus <= 1:
        return setting if setting != "auto" else "multi"
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    if running is None:
        running = running_tcg_threads()
    return "multi" if running + cpus <= cores else "single"


def guest_cpu(requested: str, accel: str, binary: str) -> str:
    """The -cpu model for the setting ``requested`` ("" stays "": the accelerator's default)."""
    if not requested:
        return ""
    if requested == "host" and accel != "kvm":
        raise HostError("cpu='host' needs KVM, and this machine runs under TCG (sandbox doctor "
                        "says why); use cpu='max' or a named model such as x86-64-v3")
    return qemu_cpu_model(requested, binary)


def uefi_firmware() -> Path:
    from ..host.firmware import ovmf_firmware

    return ovmf_firmware()


