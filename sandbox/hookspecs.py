"""Hooks for extensions of the sandbox, declared for pluggy.

The pytest plugin adds them through ``pytest_addhooks``; implement them in a conftest.py or
a plugin like any pytest hook::

    def pytest_sandbox_spec(shape, node):
        if node.get_closest_marker("big"):
            shape["memory"] = "4G"

    def pytest_sandbox_ready(machine, node):
        machine.push("dist/", "/opt/app")

    def pytest_sandbox_teardown(machine, node, failed):
        if failed:
            machine.get("/var/log/app.log", f"logs/{node.name}.log")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import pytest

    from .machine.machine import Machine

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_sandbox_spec(shape: dict[str, Any], node: pytest.Item) -> None:
    """Adjust the options of a machine about to start for ``node``: edit ``shape`` in place
    (the keyword arguments of :func:`sandbox.launch`: image, memory, cpus, network...)."""


@hookspec
def pytest_sandbox_ready(machine: Machine, node: pytest.Item) -> None:
    """A machine for ``node`` is up and reachable: install the application, seed data..."""


@hookspec
def pytest_sandbox_teardown(machine: Machine, node: pytest.Item, failed: bool) -> None:
    """A machine of ``node`` is about to be torn down (or kept); ``failed`` says whether the
    test failed. Collect logs here."""
