"""QEMU and the other host tools: where they are and which version they are."""

from __future__ import annotations

import functools
import os
import re
import subprocess

from ..base.paths import find_tool
from ..errors import HostError

_INSTALL_HINT = "apt-get install qemu-system-x86 qemu-utils"


def qemu_binary() -> str:
    """The QEMU system emulator (``SANDBOX_QEMU`` overrides), or HostError naming the package."""
    override = os.environ.get("SANDBOX_QEMU")
    found = find_tool(override or "qemu-system-x86_64")
    if not found:
        raise HostError(f"QEMU not found ({override or 'qemu-system-x86_64'} is not on PATH); "
                        f"install it with: {_INSTALL_HINT}")
    return found


@functools.cache
def tool_version(binary: str) -> str:
    for flag in ("--version", "-V"):  # e2fsprogs answers -V only, on stderr
        try:
            result = subprocess.run([binary, flag], capture_output=True, text=True,
                                    timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", result.stdout + result.stderr)
        if match:
            return match.group(1)
    return "present"


def qemu_version() -> str:
    return tool_version(qemu_binary())
