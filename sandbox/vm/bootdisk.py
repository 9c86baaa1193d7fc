"""The boot disk of a resumed machine: what a clone boots from if its guest reboots.

A machine booted from scratch gets its kernel and initrd with QEMU's ``-kernel``, which
reads the whole kernel into QEMU's own memory and keeps it there for a reset: 14 MiB of
private memory in every process. A clone never uses that copy (its guest kernel is already
in the RAM it maps), except when its guest reboots. So a clone starts without ``-kernel``
and carries instead this small read-only disk: a FAT file system holding the same kernel,
initrd and command line, and SYSLINUX's boot loader (put there without root, through
mtools). If the guest reboots, the firmware boots that disk and the guest comes back as it
would have with ``-kernel``, only slower: SYSLINUX reads the kernel and initrd through the
BIOS (a reboot took 30 s instead of 21 s here under TCG).

Built once per kernel, initrd and command line into the cache (``boot/``); where the tools
are missing (SYSLINUX, dosfstools, mtools) or the build failed, none is made, and clones
keep ``-kernel`` with an empty disk in the boot disk's slot (see
:meth:`sandbox.vm.plan.QemuPlan.command` and ``sandbox doctor``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import warnings
from pathlib import Path

from ..base.paths import cache_dir, find_tool, tool_env
from ..base.sizes import format_size
from ..errors import SandboxWarning
from ..host.access import BOOT_DISK_TOOLS

#: The PCI slot of the boot disk: fixed and out of the way of the devices numbered in order
#: and of the private networks' NICs (sandbox.vm.plan.LAN_SLOT onwards).
BOOT_SLOT = 0x1E
#: Room on the disk beyond the kernel and initrd (the boot loader, the FAT itself).
_SLACK_KIB = 2048

_failed: set[str] = set()


def missing_tools() -> list[str]:
    """The boot-disk tools not found on this host (PATH, then the system directories)."""
    return [name for name in BOOT_DISK_TOOLS if find_tool(name) is None]


def boot_root() -> Path:
    path = cache_dir() / "boot"
    path.mkdir(parents=True, exist_ok=True)
    return path


def boot_disk(kernel: Path, initrd: Path, cmdline: str) -> Path | None:
    """The boot disk for ``kernel``, ``initrd`` and ``cmdline`` (made on first use), or None
    when it cannot be made here (then the caller boots with ``-kernel``)."""
    if "\n" in cmdline or "\r" in cmdline or missing_tools():
        return None
    identity = [f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"
                for path in (kernel, initrd) for info in (path.stat(),)]
    key = hashlib.sha256("\0".join([*identity, cmdline]).encode()).hexdigest()[:24]
    target = boot_root() / f"{kernel.parent.name}-{key}.img"
    if target.exists():
        return target
    if key in _failed:
        return None
    try:
        _build(kernel, initrd, cmdline, target)
    except (OSError, subprocess.SubprocessError) as exc:
        _failed.add(key)
        warnings.warn(f"could not make the boot disk of {kernel.parent.name} ({exc}); its "
                      "clones keep a copy of the kernel in memory (14 MiB each) instead",
                      SandboxWarning, stacklevel=3)
        return None
    return target


def _build(kernel: Path, initrd: Path, cmdline: str, target: Path) -> None:
    """Write the disk next to ``target`` and rename it into place (readers never see a
    half-made one; two builders write the same bytes)."""
    work = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    config = target.with_name(f".tmp-{target.name}-{os.getpid()}.cfg")
    size_kib = (kernel.stat().st_size + initrd.stat().st_size) // 1024 + _SLACK_KIB
    env = tool_env()
    env["MTOOLS_SKIP_CHECK"] = "1"
    tools = {name: find_tool(name) or name for name in BOOT_DISK_TOOLS}
    try:
        work.unlink(missing_ok=True)
        config.write_text("DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
                          "  KERNEL vmlinuz\n  INITRD initrd.img\n"
                          f"  APPEND {cmdline}\n")
        for command in (
                [tools["mkfs.fat"], "-C", "-n", "SANDBOXBOOT", str(work), str(size_kib)],
                [tools["syslinux"], "--install", str(work)],
                [tools["mcopy"], "-i", str(work), str(kernel), "::/vmlinuz"],
                [tools["mcopy"], "-i", str(work), str(initrd), "::/initrd.img"],
                [tools["mcopy"], "-i", str(work), str(config), "::/syslinux.cfg"]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                    env=env, check=False)
            if result.returncode != 0:
                raise OSError(f"{Path(command[0]).name} exited {result.returncode}: "
                              f"{result.stderr.strip()[-300:]}")
        work.chmod(0o444)
        os.replace(work, target)
    finally:
        work.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def remove_boot_disks(image_entry: str) -> list[str]:
    """Remove the boot disks made from the image entry named ``image_entry``."""
    removed = []
    for path in boot_root().glob(f"{image_entry}-*.img"):
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(f"removed boot disk {path.name} ({format_size(size)})")
    return removed
