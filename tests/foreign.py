"""The suite's "foreign" disk image (tests/images/foreign-build.sh) and recipes importing it.

Built once per version of the build script into the cache (``test-disks/``, under the cache
entry lock, so concurrent workers build it once), then converted per test session into the
formats other tools ship (qcow2, VMDK, VDI) with qemu-img.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from sandbox.base.entries import entry_lock, publish
from sandbox.base.paths import SYSTEM_TOOL_DIRS, cache_dir
from sandbox.imaging.debian import host_debian_mirrors

BUILD = Path(__file__).parent / "images" / "foreign-build.sh"


def foreign_disk() -> Path:
    """The foreign image as a raw disk file (read-only, in the cache)."""
    key = hashlib.sha256(BUILD.read_bytes()).hexdigest()[:16]
    root = cache_dir() / "test-disks"
    root.mkdir(mode=0o700, exist_ok=True)
    final = root / f"foreign-{key}"
    with entry_lock(final, timeout=1800):
        if not (final / "disk.raw").exists():
            publish(final, _build)
    return final / "disk.raw"


def _build(work: Path) -> None:
    main, security = host_debian_mirrors()
    path = os.pathsep.join([os.environ.get("PATH", "/usr/bin:/bin"), *SYSTEM_TOOL_DIRS])
    result = subprocess.run(["bash", str(BUILD), str(work)], capture_output=True, text=True,
                            env=dict(os.environ, MIRROR=main, SECMIRROR=security, PATH=path),
                            timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the foreign test image failed ({result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")


def convert(raw: Path, fmt: str, target: Path) -> Path:
    """``raw`` as a ``fmt`` disk file at ``target`` (qemu-img convert)."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(target)],
                   check=True, capture_output=True, timeout=600)
    return target


def write_recipe(folder: Path, name: str, disk: Path | str, boot: str, **fields: str) -> Path:
    """``folder/NAME.toml`` importing ``disk``."""
    extra = "".join(f"{key} = {value}\n" for key, value in fields.items())
    recipe = folder / f"{name}.toml"
    recipe.write_text(f'disk = "{disk}"\nboot = "{boot}"\nmemory = "1G"\n{extra}')
    return recipe
