"""Machine specs: what kind of machine to start, validated and normalised once (pure logic).

The choices for the accelerator and the network live here, and the CLI's and the plugin's
options are made from them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..base.sizes import parse_size
from ..errors import MachineNameError, SandboxError
from ..host.cpu import cpu_model_problem

#: "restricted": no egress, the guest reaches nothing, only forwarded ports reach it.
#: "user": QEMU user networking with egress (NAT through the host).
NETWORKS = ("restricted", "user")
#: "auto": KVM where it really works (sandbox.vm.accel probes it), else TCG.
ACCELS = ("auto", "kvm", "tcg")
#: Private networks per machine: their NICs take fixed PCI slots (sandbox.vm.plan.LAN_SLOT).
MAX_NETWORKS = 8
#: A machine's name becomes its directory, part of its QEMU tag and of its socket paths.
MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_machine_name(name: str) -> str:
    """``name`` if it is a valid machine name (vm_factory(name=...), launch(name=...),
    sandbox up NAME), else MachineNameError naming the rule."""
    if not isinstance(name, str) or not MACHINE_NAME.fullmatch(name):
        raise MachineNameError(f"machine name {name!r}: use 1 to 63 letters, digits, '.', '_' "
                               f"or '-', starting with a letter or digit (the name becomes "
                               f"the machine's directory and part of its QEMU command line)")
    return name


@dataclass(frozen=True)
class MachineSpec:
    """What kind of machine to start. ``None`` fields take the image recipe's defaults."""

    image: str = "debian-12"
    memory: str | int | None = None
    cpus: int | None = None
    #: The guest's CPU model (QEMU's -cpu: x86-64-v3, Haswell, host, max). None: the recipe's,
    #: else max under TCG and the accelerator probe's choice (host) under KVM.
    cpu: str | None = None
    accel: str = "auto"
    #: "restricted": no egress, the guest reaches nothing, only forwarded ports reach it.
    #: "user": QEMU user networking with egress (NAT through the host).
    network: str = "restricted"
    qemu_args: tuple[str, ...] = ()
    #: Boot from scratch instead of cloning a golden snapshot.
    cold: bool = False
    #: Seconds for a cold boot to answer SSH. An imported image boots through firmware and
    #: cloud-init, which under TCG on a busy two-core host took more than 180 s (two
    #: test workers, each booting one); a boot that hangs still fails, with its console.
    boot_timeout: float = 300.0
    command_timeout: float = 600.0
    #: Clone this template (a name, an id, or a sandbox.Template) instead of a golden
    #: snapshot; the image and shape are then the template's.
    template: str | None = None
    #: Private networks (sandbox.Network, or their directories) to put the machine on, one
    #: NIC each; golden snapshots are made per number of networks.
    networks: tuple[str, ...] = ()
    #: ``memory`` in MiB (None: the image's default), worked out once from ``memory``.
    memory_mib: int | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise SandboxError(f"unknown network {self.network!r}: use one of "
                               f"{', '.join(NETWORKS)}")
        if self.accel not in ACCELS:
            raise SandboxError(f"unknown accel {self.accel!r}: use {', '.join(ACCELS)}")
        if self.cpus is not None and not (isinstance(self.cpus, int) and 1 <= self.cpus <= 64):
            raise SandboxError(f"cpus must be a whole number from 1 to 64, got {self.cpus!r}")
        if self.cpu is not None and (problem := cpu_model_problem(self.cpu)):
            raise SandboxError(f"cpu: {problem}")
        if self.memory is not None:
            try:
                size = parse_size(self.memory, default_unit="M")
            except ValueError as exc:
                raise SandboxError(f"memory: {exc}") from None
            if size < (64 << 20):
                raise SandboxError(f"memory {self.memory!r} is below the 64M a guest needs")
            object.__setattr__(self, "memory_mib", size >> 20)
        if self.template is not None and not isinstance(self.template, str):
            template_id = getattr(self.template, "id", None)
            if not isinstance(template_id, str):
                raise SandboxError(f"template must be a name or a sandbox.Template, got "
                                   f"{self.template!r}")
            object.__setattr__(self, "template", template_id)
        if self.networks:
            paths = []
            for network in self.networks:
                path = network if isinstance(network, str) else getattr(network, "path", None)
                if path is None:
                    raise SandboxError(f"{network!r} is not open: use it in a with block (or "
                                       "call start()) before putting machines on it")
                paths.append(str(path))
            object.__setattr__(self, "networks", tuple(paths))
            if len(set(self.networks)) != len(self.networks):
                raise SandboxError("a machine can be on each network once")
            if len(self.networks) > MAX_NETWORKS:
                raise SandboxError(f"a machine can be on at most {MAX_NETWORKS} networks (one "
                                   f"NIC each), not {len(self.networks)}")
        if isinstance(self.qemu_args, str):
            object.__setattr__(self, "qemu_args", tuple(shlex.split(self.qemu_args)))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MachineSpec:
        """A spec from keyword arguments; an unknown one is an error that names it."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SandboxError(f"unknown machine option(s) {', '.join(map(repr, unknown))}; "
                               f"known options: {', '.join(sorted(known))}")
        if "qemu_args" in kwargs and not isinstance(kwargs["qemu_args"], str):
            kwargs["qemu_args"] = tuple(kwargs["qemu_args"])
        if "networks" in kwargs:
            kwargs["networks"] = tuple(kwargs["networks"])
        return cls(**kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that make this spec again (JSON-ready)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.init}

    def merged(self, **overrides: Any) -> MachineSpec:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
