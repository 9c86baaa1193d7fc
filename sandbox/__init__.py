"""pytest-qemu-sandbox: a fresh, fully isolated QEMU virtual machine for every test."""

from . import errors
from .channel import CommandResult
from .errors import (
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    HostError,
    ImageError,
    SandboxError,
    SnapshotError,
    WaitTimeout,
)
from .machine import Machine, launch
from .spec import MachineSpec

__version__ = "0.1.0"

__all__ = [
    "BootError", "ChannelError", "CommandFailed", "CommandResult", "CommandTimeout",
    "HostError", "ImageError", "Machine", "MachineSpec", "SandboxError", "SnapshotError",
    "WaitTimeout", "errors", "launch",
]
