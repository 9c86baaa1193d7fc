"""The ``sandbox`` command: a thin front end over the same core the pytest plugin uses.

The command group and what its commands share are :mod:`.common`; one module per noun:
:mod:`.host` (doctor, prune), :mod:`.images` (image build, list, inspect, rm),
:mod:`.machines` (throwaway machines: run, shell), :mod:`.named` (named machines: up, list,
exec, ssh, cp, snapshot, logs, down), :mod:`.templates` (template save, ls, rm) and
:mod:`.share` (push, pull, export, import: entries moved between hosts) and :mod:`.replay`
(save, debug: a machine's whole state resumed on another host).
"""

from __future__ import annotations

# each module adds its commands to main
from . import host, images, machines, named, replay, share, templates
from .common import main

__all__ = ["host", "images", "machines", "main", "named", "replay", "share", "templates"]
