"""Golden snapshots: an image booted once, SSH ready, saved; the source of every clone.

VM templating: during the golden boot guest RAM lives in a shared file-backed memory
backend, and the save uses the migration capability ``x-ignore-shared``, so the saved state
holds only devices (under 1 MB) while RAM stays in the file. A clone maps that file
copy-on-write (``share=off``), loads the small device state and resumes in about 0.1 s.

Layout: ``<cache>/golden/<image>-<key>/{ram,state,disk.qcow2,manifest.json}``, read-only once
made, except ``ram``: QEMU 7.2 opens a memory backend's file read-write even for a private
(``share=off``) mapping, so its owner keeps write permission on it (0644; the directory is
0555). Clones never write to it: their guest RAM is a copy-on-write private mapping.

The key covers the image digest, the machine's shape (the QEMU command line without
per-machine paths: memory, cpus, devices, accelerator), the QEMU version and this module's
version, so any change makes a new golden snapshot instead of a broken clone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entries import entry_lock, publish, remove_entry
from .host import qemu_version
from .image import Image
from .paths import cache_dir
from .progress import QUIET, Reporter
from .spec import QemuPlan

GOLDEN_VERSION = "4"


@dataclass(frozen=True)
class Golden:
    path: Path
    manifest: dict[str, Any]

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
    def ssh_prelude(self) -> bytes | None:
        """What the SSH server waiting in the snapshot sent before its client spoke."""
        path = self.path / "ssh-prelude"
        return path.read_bytes() if path.exists() else None

    @classmethod
    def load(cls, path: Path) -> Golden:
        return cls(path, json.loads((path / "manifest.json").read_text()))


def golden_root() -> Path:
    path = cache_dir() / "golden"
    path.mkdir(parents=True, exist_ok=True)
    return path


def golden_key(image: Image, plan: QemuPlan) -> str:
    payload = json.dumps([GOLDEN_VERSION, image.digest, qemu_version(), plan.shape()])
    return hashlib.sha256(payload.encode()).hexdigest()


def find_golden(image: Image, plan: QemuPlan) -> Golden | None:
    path = golden_root() / f"{image.name}-{golden_key(image, plan)[:16]}"
    return Golden.load(path) if (path / "manifest.json").exists() else None


def ensure_golden(image: Image, plan: QemuPlan, make: Callable[[Path], dict[str, Any]], *,
                  reporter: Reporter = QUIET) -> Golden:
    """The golden snapshot for ``plan``'s shape; ``make(directory)`` boots and saves one
    there when the cache has none (once, under a lock, whatever the number of callers)."""
    key = golden_key(image, plan)
    final = golden_root() / f"{image.name}-{key[:16]}"
    if (final / "manifest.json").exists():
        return Golden.load(final)
    with entry_lock(final):
        if (final / "manifest.json").exists():
            return Golden.load(final)

        def build(work: Path) -> None:
            started = time.monotonic()
            with reporter.stage(f"{image.name}: golden snapshot (boot once, save booted state)"):
                timings = make(work)
            manifest = {
                "image": image.name, "image_digest": image.digest, "key": key,
                "golden_version": GOLDEN_VERSION, "qemu_version": qemu_version(),
                "shape": plan.shape(), "memory_mib": plan.memory_mib, "cpus": plan.cpus,
                "accel": plan.accel, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 2), **timings,
            }
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        publish(final, build, owner_writable=("ram",))
    return Golden.load(final)


def discard_golden(golden: Golden) -> None:
    """Remove a golden snapshot that failed to load, so that the next clone rebuilds it."""
    remove_entry(golden.path)


def list_goldens() -> list[Golden]:
    return [Golden.load(p) for p in sorted(golden_root().iterdir())
            if not p.name.startswith(".") and (p / "manifest.json").exists()]
