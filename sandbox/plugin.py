"""The pytest plugin: ``vm`` and ``vm_factory`` fixtures, the ``vm`` marker, options, hooks.

Tests that use neither fixture pay nothing: no image build, no QEMU, no cache writes (the
machine modules are imported only when a fixture runs).

Option precedence for a machine: ``@pytest.mark.vm(...)``, then ``--sandbox-*`` options,
then ``sandbox_*`` ini keys, then the image recipe's defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .vm.spec import ACCELS

if TYPE_CHECKING:
    from .machine.machine import Machine
    from .net.network import Network
    from .vm.template import Template

# name, help, kind ("value" or "flag"), MachineSpec field it sets (None: plugin behaviour)
_OPTIONS = (
    ("image", "image (recipe name or .toml path) of the test VMs", "value", "image"),
    ("accel", f"accelerator: {', '.join(ACCELS)} (auto: KVM where it works, else TCG)",
     "value", "accel"),
    ("memory", "guest memory, e.g. 2G", "value", "memory"),
    ("cpus", "guest vCPUs", "value", "cpus"),
    ("cpu", "guest CPU model (QEMU -cpu), e.g. x86-64-v3, Haswell, host, max", "value",
     "cpu"),
    ("cold-boot", "boot every VM from scratch instead of cloning a golden snapshot", "flag",
     "cold"),
    ("keep-on-failure", "leave the VMs of a failed test running and print how to reach them",
     "flag", None),
    ("log-dir", "write the console log and command transcript of each VM of a failed test "
     "into this directory (for CI artifacts)", "value", None),
    ("registry", "OCI registry (host/repository) the cache pulls entries from before building "
     "them (SANDBOX_REGISTRY)", "value", None),
    ("push", "push the images, golden snapshots and templates built by this run to the "
     "registry (SANDBOX_PUSH=1)", "flag", None),
)
_MACHINES = pytest.StashKey[list["Machine"]]()
_CALL_FAILED = pytest.StashKey[bool]()
_KEPT = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "QEMU sandbox VMs (pytest-qemu-sandbox)")
    for name, text, kind, _ in _OPTIONS:
        dest = "sandbox_" + name.replace("-", "_")
        if kind == "flag":
            group.addoption(f"--sandbox-{name}", action="store_true", default=None, dest=dest,
                            help=text)
            parser.addini(dest, text, type="bool", default=None)
        else:
            group.addoption(f"--sandbox-{name}", default=None, dest=dest, metavar="VALUE",
                            help=text)
            parser.addini(dest, text, default=None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm(image=, memory=, cpus=, cpu=, network=, accel=, cold=, qemu_args=, boot_timeout=, "
        "command_timeout=, template=): the shape of the machines of this test (vm, "
        "vm_factory); template= clones a saved template instead of the image")
    config.stash[_KEPT] = []
    # The cache reads these from the environment: so do xdist workers and `sandbox` commands
    # that tests run.
    registry = _setting(config, "registry")
    if registry is not None:
        os.environ["SANDBOX_REGISTRY"] = str(registry)
    if _setting(config, "push"):
        os.environ["SANDBOX_PUSH"] = "1"


def _setting(config: pytest.Config, name: str) -> Any:
    dest = "sandbox_" + name.replace("-", "_")
    value = config.getoption(dest)
    if value is None:
        value = config.getini(dest)
    return None if value in (None, "") else value


def option_shape(config: pytest.Config) -> dict[str, Any]:
    """The keyword arguments for launch() that the command line, then ini, give."""
    shape: dict[str, Any] = {}
    for name, _, kind, field in _OPTIONS:
        value = _setting(config, name)
        if field is None or value is None or (kind == "flag" and not value):
            continue
        shape[field] = int(value) if field == "cpus" else value
    return shape


def machine_shape(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keyword arguments for launch(): marker, then command line, then ini."""
    shape = option_shape(request.config)
    marker = request.node.get_closest_marker("vm")
    if marker is not None:
        if marker.args:
            pytest.fail("@pytest.mark.vm takes keyword arguments only, e.g. "
                        "@pytest.mark.vm(image='debian-12', memory='2G')", pytrace=False)
        shape.update(marker.kwargs)
    from .errors import SandboxError
    from .vm.spec import MachineSpec

    try:
        MachineSpec.from_kwargs(**shape)
    except SandboxError as exc:
        pytest.fail(f"@pytest.mark.vm / --sandbox-* options: {exc}", pytrace=False)
    return shape


@contextmanager
def _to_terminal(config: pytest.Config) -> Iterator[Callable[[str], None]]:
    """Write straight to the terminal, around output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    terminal = config.pluginmanager.getplugin("terminalreporter")

    def write(line: str) -> None:
        if terminal is not None:
            terminal.write_line(line)

    if capture is None:
        yield write
        return
    with capture.global_and_fixture_disabled():
        yield write


def _reporter(config: pytest.Config) -> Any:
    from .base.progress import Reporter

    class TerminalReporter(Reporter):
        """Stage lines (image build, golden snapshot) shown live despite output capture."""

        @contextmanager
        def stage(self, name: str) -> Iterator[None]:
            import time

            with _to_terminal(config) as write:
                write(f"sandbox: {name}...")
            start = time.monotonic()
            yield
            with _to_terminal(config) as write:
                write(f"sandbox: {name}: done in {time.monotonic() - start:.1f} s")

        def note(self, message: str) -> None:
            with _to_terminal(config) as write:
                write(f"sandbox: {message}")

    return TerminalReporter()


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Machine]]:
    """Start any number of machines for this test; each is torn down after it."""
    from .machine.machine import Machine
    from .vm.spec import MachineSpec

    config = request.config
    node = request.node
    base = machine_shape(request)
    keep = bool(_setting(config, "keep-on-failure"))
    machines = node.stash.setdefault(_MACHINES, [])
    mine: list[Machine] = []

    def factory(name: str | None = None, **overrides: Any) -> Machine:
        shape = {**base, **overrides}
        config.hook.pytest_sandbox_spec(shape=shape, node=node)
        # With keep-on-failure, a machine still dies with this process (a killed pytest
        # leaves nothing) until its test has failed and it is kept (named.keep detaches it).
        machine = Machine(MachineSpec.from_kwargs(**shape), name=name,
                          reporter=_reporter(config), keepable=keep)
        machine.start()
        machines.append(machine)
        mine.append(machine)
        config.hook.pytest_sandbox_ready(machine=machine, node=node)
        return machine

    yield factory
    failed = node.stash.get(_CALL_FAILED, False)
    errors: list[BaseException] = []
    for index, machine in enumerate(reversed(mine)):
        # Every machine is kept or closed, whatever a hook or another machine raised.
        try:
            config.hook.pytest_sandbox_teardown(machine=machine, node=node, failed=failed)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others
            errors.append(exc)
        try:
            if failed and keep:
                _keep(config, node, machine, len(mine) - 1 - index)
            else:
                machine.close()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others
            errors.append(exc)
    if errors:
        raise errors[0]


def _keep(config: pytest.Config, node: pytest.Item, machine: Machine, index: int) -> None:
    from .machine.named import keep, unique_name

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", node.name).strip("-.")[:40] or "test"
    name = unique_name(f"{stem}-{index}" if index else stem)
    keep(machine, name)
    lines = [f"sandbox: kept VM {name} of failed test {node.nodeid}",
             f"  sandbox ssh {name}",
             f"  {machine.ssh_command()}",
             f"  sandbox down {name}    # when done"]
    config.stash[_KEPT].extend(lines)
    with _to_terminal(config) as write:
        for line in lines:
            write(line)


@pytest.fixture
def vm_network() -> Iterator[Callable[..., Network]]:
    """``vm_network(name=None) -> sandbox.Network``: private networks for this test's
    machines (``vm_factory(name="db", networks=[net])``), removed after it."""
    from .net.network import Network

    networks: list[Network] = []

    def make(name: str | None = None) -> Network:
        network = Network(name).start()
        networks.append(network)
        return network

    yield make
    for network in networks:
        network.close()


@pytest.fixture(scope="session")
def vm_template(request: pytest.FixtureRequest) -> Callable[..., Template]:
    """``vm_template(name, setup, key=None, **shape) -> Template``: a machine set up once
    per host and saved, reused across runs while ``key`` and the base image stay the same;
    made under a lock, so once for all xdist workers. ``setup`` is a callable taking the
    machine, a command, or a list of those."""
    from .machine.prepare import ensure_template
    from .vm.spec import MachineSpec

    config = request.config

    def make(name: str, setup: Any, *, key: str | None = None, **shape: Any) -> Template:
        spec = MachineSpec.from_kwargs(**{**option_shape(config), **shape})
        return ensure_template(name, setup, key=key, spec=spec, reporter=_reporter(config))

    return make


@pytest.fixture
def vm(vm_factory: Callable[..., Machine]) -> Machine:
    """A fresh machine private to this test (a clone of the image's golden snapshot)."""
    return vm_factory()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    machines = item.stash.get(_MACHINES, [])
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    if report.failed and machines:
        log_dir = _setting(item.config, "log-dir")
        for machine in machines:
            if log_dir:
                _write_logs(Path(log_dir), item, machine)
            tail = machine.console_tail(40)
            report.sections.append((f"sandbox {machine.name}: console tail", tail or "(empty)"))
            commands = "\n".join(entry.format() for entry in machine.transcript[-30:])
            report.sections.append((f"sandbox {machine.name}: guest commands",
                                    commands or "(none)"))
    return report


def _write_logs(directory: Path, item: pytest.Item, machine: Machine) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")[:120]
    (directory / f"{stem}.{machine.name}.console.log").write_text(machine.console_log())
    (directory / f"{stem}.{machine.name}.commands.log").write_text(
        "\n".join(entry.format() for entry in machine.transcript) + "\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("sandbox: VMs kept running")
        for line in kept:
            terminalreporter.write_line(line)
