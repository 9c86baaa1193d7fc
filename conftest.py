"""Repository-wide pytest setup: a private cache and runtime directory for the test run.

The suite boots real QEMU guests from images the project builds. Images and keys are kept
in ``.cache/sandbox`` (override with ``SANDBOX_CACHE_DIR``) so that a second run reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent

os.environ.setdefault("SANDBOX_CACHE_DIR", str(ROOT / ".cache" / "sandbox"))
