"""Machine specs and the QEMU command line they turn into (pure logic, unit tested)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import SandboxError
from .sizes import parse_size

NETWORKS = ("restricted", "user")


@dataclass(frozen=True)
class MachineSpec:
    """What kind of machine to start. ``None`` fields take the image recipe's defaults."""

    image: str = "debian-12"
    memory: str | int | None = None
    cpus: int | None = None
    accel: str = "auto"
    #: "restricted": no egress, the guest reaches nothing, only forwarded ports reach it.
    #: "user": QEMU user networking with egress (NAT through the host).
    network: str = "restricted"
    qemu_args: tuple[str, ...] = ()
    #: Boot from scratch instead of cloning a golden snapshot.
    cold: bool = False
    boot_timeout: float = 180.0
    command_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise SandboxError(f"unknown network {self.network!r}: use one of "
                               f"{', '.join(NETWORKS)}")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise SandboxError(f"unknown accel {self.accel!r}: use auto, kvm or tcg")
        if self.cpus is not None and not (isinstance(self.cpus, int) and 1 <= self.cpus <= 64):
            raise SandboxError(f"cpus must be a whole number from 1 to 64, got {self.cpus!r}")
        if self.memory is not None:
            try:
                if parse_size(self.memory, default_unit="M") < (64 << 20):
                    raise SandboxError(f"memory {self.memory!r} is below the 64M a guest needs")
            except ValueError as exc:
                raise SandboxError(f"memory: {exc}") from None
        if isinstance(self.qemu_args, str):
            object.__setattr__(self, "qemu_args", tuple(shlex.split(self.qemu_args)))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MachineSpec:
        """A spec from keyword arguments; an unknown one is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SandboxError(f"unknown machine option(s) {', '.join(map(repr, unknown))}; "
                               f"known options: {', '.join(sorted(known))}")
        if "qemu_args" in kwargs and not isinstance(kwargs["qemu_args"], str):
            kwargs["qemu_args"] = tuple(kwargs["qemu_args"])
        return cls(**kwargs)

    def merged(self, **overrides: Any) -> MachineSpec:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


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
    qmp_socket: Path
    console_log: Path
    pidfile: Path
    network: str
    agent_socket: Path
    ssh_socket: Path
    extra: tuple[str, ...] = field(default=())
    #: Guest RAM in this file (golden snapshots): shared while a golden is made, a private
    #: copy-on-write mapping in a clone.
    ram_file: Path | None = None
    ram_shared: bool = False
    #: Wait for the machine state on the monitor (-incoming defer) instead of booting.
    incoming: bool = False

    def command(self) -> list[str]:
        cpu = (self.kvm_cpu or "host") if self.accel == "kvm" else "max"
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=multi"
        restrict = ",restrict=on" if self.network == "restricted" else ""
        machine = "q35,vmport=off,hpet=off"
        memory: list[str] = []
        if self.ram_file is not None:
            share = "on" if self.ram_shared else "off"
            memory = ["-object", f"memory-backend-file,id=ram0,size={self.memory_mib}M,"
                                 f"mem-path={self.ram_file},share={share}"]
            machine += ",memory-backend=ram0"
        return [
            self.binary,
            "-name", f"{self.tag},debug-threads=on",
            "-machine", machine,
            *memory,
            "-accel", accel,
            "-cpu", cpu,
            "-m", str(self.memory_mib),
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.cmdline,
            "-drive", f"file={self.disk},if=none,id=disk0,format=qcow2,discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0",
            # Port 0: the host kernel picks a free port, so parallel machines never race
            # for one; the chosen port is read back with "info usernet".
            "-netdev", f"user,id=net0{restrict},hostfwd=tcp:127.0.0.1:0-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent0,path={self.agent_socket},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=org.sandbox.agent",
            "-chardev", f"socket,id=ssh0,path={self.ssh_socket},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=ssh0,name=org.sandbox.ssh",
            # append: a clone's log starts with the golden boot's console, copied in first.
            "-chardev", f"file,id=console0,path={self.console_log},append=on",
            "-serial", "chardev:console0",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-pidfile", str(self.pidfile),
            *(["-incoming", "defer"] if self.incoming else []),
            *self.extra,
        ]

    def shape(self) -> list[str]:
        """The command line without per-machine paths and ports: what a saved machine state
        depends on. Two plans with equal shapes can restore each other's snapshots."""
        generic = replace(self, tag="T", disk=Path("D"), qmp_socket=Path("Q"),
                          console_log=Path("C"), pidfile=Path("P"), agent_socket=Path("A"),
                          ssh_socket=Path("S"),
                          ram_file=Path("R") if self.ram_file else None, ram_shared=False,
                          incoming=False, network="restricted", binary="qemu")
        return generic.command()
