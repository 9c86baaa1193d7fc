"""The UEFI firmware (OVMF) that imported images with ``boot = "uefi"`` start from."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HostError

#: Where Debian's ``ovmf`` package puts a UEFI firmware image that QEMU takes with -bios.
OVMF_PATHS = (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd"))


def ovmf_firmware() -> Path:
    """The UEFI firmware, or HostError saying how to install it."""
    override = os.environ.get("SANDBOX_OVMF")
    for path in ([Path(override)] if override else OVMF_PATHS):
        if path.is_file():
            return path
    raise HostError("boot = \"uefi\" needs UEFI firmware for QEMU (OVMF), not found at "
                    f"{', '.join(str(p) for p in OVMF_PATHS)}; install it with: "
                    "sudo apt-get install ovmf (or set SANDBOX_OVMF to an OVMF.fd)")
