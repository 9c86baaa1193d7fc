"""The guest-side files beside this module, which image builds copy into guests: the guest
agent (``sandbox-agent``, also pushed into imported images as they boot) and ``setup.sh``."""

from __future__ import annotations

from pathlib import Path

GUEST_SETUP = Path(__file__).with_name("setup.sh")
GUEST_AGENT = Path(__file__).with_name("sandbox-agent")
