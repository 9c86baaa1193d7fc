"""The pytest plugin: ``vm`` and ``vm_factory`` fixtures and the ``vm`` marker.

Tests that use neither fixture pay nothing: no image build, no QEMU, no cache writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .machine import Machine, launch
from .spec import MachineSpec


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm(image=..., memory=..., cpus=..., network=..., accel=..., cold=...): "
        "the shape of the machines the vm and vm_factory fixtures give this test")


def _marker_shape(request: pytest.FixtureRequest) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    marker = request.node.get_closest_marker("vm")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("@pytest.mark.vm takes keyword arguments only, "
                                    "e.g. @pytest.mark.vm(image='debian-12')")
        shape.update(marker.kwargs)
    MachineSpec.from_kwargs(**shape)  # an unknown argument fails here, by name
    return shape


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Machine]]:
    """Start any number of machines; each is torn down after the test."""
    machines: list[Machine] = []
    base = _marker_shape(request)

    def factory(**overrides: Any) -> Machine:
        machine = launch(**{**base, **overrides})
        machines.append(machine)
        return machine

    yield factory
    for machine in reversed(machines):
        machine.close()


@pytest.fixture
def vm(vm_factory: Callable[..., Machine]) -> Machine:
    """A fresh machine private to this test."""
    return vm_factory()
