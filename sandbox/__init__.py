"""pytest-qemu-sandbox: a fresh, fully isolated QEMU virtual machine for every test.

The machine modules (paramiko, QMP) load on first use, so that the pytest plugin costs
nothing to suites that never ask for a VM and the CLI starts quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    GuestPanic,
    HostError,
    ImageError,
    SandboxError,
    SandboxWarning,
    SnapshotError,
    TemplateError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from .guest.commands import CommandResult
    from .machine.machine import Machine, launch
    from .machine.prepare import content_key
    from .machine.tools import ansible_inventory
    from .net.network import Network
    from .vm.spec import MachineSpec
    from .vm.template import Template, remove_template, templates

__version__ = "0.1.0"

_LAZY = {"launch": "machine.machine", "Machine": "machine.machine",
         "CommandResult": "guest.commands", "MachineSpec": "vm.spec", "Template": "vm.template",
         "templates": "vm.template", "remove_template": "vm.template",
         "content_key": "machine.prepare", "Network": "net.network",
         "ansible_inventory": "machine.tools"}

__all__ = [
    "BootError", "ChannelError", "CommandFailed", "CommandResult", "CommandTimeout", "GuestPanic",
    "HostError", "ImageError", "Machine", "MachineSpec", "Network", "SandboxError",
    "SandboxWarning", "SnapshotError", "Template", "TemplateError", "WaitTimeout",
    "ansible_inventory", "content_key",
    "errors", "launch", "remove_template", "templates",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
