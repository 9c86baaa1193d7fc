"""Where the sandbox keeps things: a persistent cache and a per-user runtime root."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs

APP = "pytest-qemu-sandbox"


def cache_dir() -> Path:
    """Images, golden snapshots, keys and host probe results (``SANDBOX_CACHE_DIR``)."""
    override = os.environ.get("SANDBOX_CACHE_DIR")
    path = Path(override) if override else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_dir() -> Path:
    """Run state: QMP sockets, console logs, disk overlays (``SANDBOX_RUNTIME_DIR``).

    Kept short on purpose: unix socket paths are limited to 107 bytes.
    """
    override = os.environ.get("SANDBOX_RUNTIME_DIR")
    path = Path(override) if override else Path(tempfile.gettempdir()) / f"sandbox-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
