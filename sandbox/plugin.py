"""The pytest plugin: ``vm`` and ``vm_factory`` fixtures, the ``vm`` marker, options, hooks.

Tests that use neither fixture pay nothing: no image build, no QEMU, no cache writes (the
machine modules are imported only when a fixture runs).

Option precedence for a machine: ``@pytest.mark.vm(...)``, then ``--sandbox-*`` options,
then ``sandbox_*`` ini keys, then the image recipe's defaults.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
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
    ("save-failed", "save the whole state of each VM of a failed test (memory, disk, "
     "processes) into this directory, or push it with 'registry'; resume one anywhere with "
     "sandbox debug", "value", None),
    ("save-failed-base", "put each saved VM's base (image, golden snapshot) in its file too, "
     "for hosts with no registry", "flag", None),
    ("save-failed-max", "the most the saved VMs of a run take in all (default 2G); later VMs "
     "are not saved", "value", None),
    ("registry", "OCI registry (host/repository) the cache pulls entries from before building "
     "them (SANDBOX_REGISTRY)", "value", None),
    ("push", "push the images, golden snapshots and templates built by this run to the "
     "registry (SANDBOX_PUSH=1)", "flag", None),
)
_MACHINES = pytest.StashKey[list["Machine"]]()
_CALL_FAILED = pytest.StashKey[bool]()
#: The report sections a failure added, given to the teardown report too: JUnit XML writes a
#: test's captured output from that one.
_SECTIONS = pytest.StashKey[list[tuple[str, str]]]()
_KEPT = pytest.StashKey[list[str]]()
_SAVED = pytest.StashKey[list[str]]()
#: What the saved VMs of this process took (a registry target; a directory counts its files).
_SAVED_BYTES = pytest.StashKey[int]()
DEFAULT_SAVE_MAX = "2G"


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
    config.stash[_SAVED] = []
    config.stash[_SAVED_BYTES] = 0
    # The cache reads these from the environment: so do xdist workers and `sandbox` commands
    # that tests run.
    registry = _setting(config, "registry")
    if registry is not None:
        os.environ["SANDBOX_REGISTRY"] = str(registry)
    if _setting(config, "push"):
        os.environ["SANDBOX_PUSH"] = "1"
    _check_save_settings(config)


def _check_save_settings(config: pytest.Config) -> None:
    from .base.sizes import parse_size

    target = _setting(config, "save-failed")
    if target is None:
        return
    try:
        parse_size(str(_setting(config, "save-failed-max") or DEFAULT_SAVE_MAX))
    except ValueError as exc:
        raise pytest.UsageError(f"--sandbox-save-failed-max: {exc}") from None
    if target == "registry" and not os.environ.get("SANDBOX_REGISTRY"):
        raise pytest.UsageError("--sandbox-save-failed=registry needs a registry: give "
                                "--sandbox-registry HOST/REPO (or SANDBOX_REGISTRY)")


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
    if report.failed and machines and report.when in ("setup", "call") and \
            _setting(item.config, "save-failed"):
        _save_failed(item, call, report, machines)
    if report.failed and machines:
        log_dir = _setting(item.config, "log-dir")
        for machine in machines:
            if log_dir:
                _write_logs(Path(log_dir), item, machine)
            tail = machine.console_tail(40)
            commands = "\n".join(entry.format() for entry in machine.transcript[-30:])
            for title, text in ((f"sandbox {machine.name}: console tail", tail or "(empty)"),
                                (f"sandbox {machine.name}: guest commands",
                                 commands or "(none)")):
                # "Captured stdout ...": JUnit XML puts it in system-out, as it does the
                # test's own output (junit_logging = system-out or all).
                report.sections.append((f"{CAPTURED} {title}", text))
                item.stash.setdefault(_SECTIONS, []).append(  # titled: XML joins them
                    (f"{CAPTURED} {title}", f"----- {title} -----\n{text.rstrip()}\n"))
                _html_extra(item.config, report, title, text)
    if report.when == "teardown" and not report.failed:
        sections: list[tuple[str, str]] = item.stash.get(_SECTIONS, [])
        report.sections.extend(sections)
    return report


#: The prefix of report sections that pytest counts as the test's standard output.
CAPTURED = "Captured stdout"


def _html_extra(config: pytest.Config, report: pytest.TestReport, title: str,
                text: str) -> None:
    """With pytest-html: ``text`` as a collapsible, escaped block among the report's extras."""
    if not config.pluginmanager.hasplugin("html"):
        return
    try:
        from pytest_html import extras
    except ImportError:
        return
    from html import escape

    block = (f'<details class="sandbox"><summary>{escape(title)}</summary>'
             f"<pre>{escape(text)}</pre></details>")
    report.extras = [*getattr(report, "extras", []), extras.html(block)]  # type: ignore[attr-defined]


def _save_failed(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport,
                 machines: list[Machine]) -> None:
    """Pause every running machine of the failed test, then save each whole (see
    :mod:`sandbox.machine.replay`); each runs on for the teardown."""
    from .errors import SandboxError

    running = [m for m in machines if not m.closed and m.qemu is not None]
    for machine in running:  # all at the moment of failure, before any save takes time
        with suppress(SandboxError):
            machine.qmp("stop")
    failure = call.excinfo.exconly() if call.excinfo is not None else report.longreprtext
    failed_at = time.strftime("%Y-%m-%d %H:%M:%S")
    lines: list[str] = []
    for machine in running:
        try:
            lines += _save_one(item, machine, failure, failed_at)
        except (SandboxError, OSError) as exc:
            lines.append(f"sandbox: VM '{machine.name}' of {item.nodeid} was not saved: {exc}")
        finally:
            with suppress(SandboxError):
                if machine.qmp("query-status").get("status") in ("paused", "postmigrate"):
                    machine.qmp("cont")
    item.config.stash[_SAVED].extend(lines)
    report.sections.append(("sandbox: saved VMs", "\n".join(lines)))
    with _to_terminal(item.config) as write:
        for line in lines:
            write(line)


def _save_one(item: pytest.Item, machine: Machine, failure: str, failed_at: str) -> list[str]:
    """Save ``machine`` of failed test ``item`` where --sandbox-save-failed says, within the
    size bound; the report's lines."""
    from filelock import FileLock

    from .base.sizes import format_size, parse_size
    from .machine.replay import SUFFIX, capture, push_saved, scratch, write_file
    from .vm.replay import entry_stem

    config = item.config
    target = str(_setting(config, "save-failed"))
    bound = parse_size(str(_setting(config, "save-failed-max") or DEFAULT_SAVE_MAX))
    what = f"VM '{machine.name}' of {item.nodeid}"
    started = time.monotonic()
    if target == "registry":
        used = config.stash[_SAVED_BYTES]
        if used >= bound:
            return [f"sandbox: {what} was not saved: the saved VMs of this run take "
                    f"{format_size(used)}, the bound (--sandbox-save-failed-max) is "
                    f"{format_size(bound)}"]
        with scratch() as work:
            entry, chain = capture(machine, work, test=item.nodeid, failure=failure,
                                   failed_at=failed_at)
            reference, size = push_saved(entry, chain)
        config.stash[_SAVED_BYTES] = used + size
        return [f"sandbox: saved {what} ({format_size(size)}, {time.monotonic() - started:.1f} s) "
                f"-> {reference}",
                f"         replay:  sandbox debug {reference}"]
    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{entry_stem(item.nodeid, 150)}-{entry_stem(machine.name)}{SUFFIX}"
    with FileLock(str(directory / ".sandbox-save.lock")):
        used = sum(p.stat().st_size for p in directory.glob(f"*{SUFFIX}") if p != path)
        if used >= bound:
            return [f"sandbox: {what} was not saved: {directory} holds {format_size(used)} of "
                    f"saved VMs, the bound (--sandbox-save-failed-max) is {format_size(bound)}"]
        partial = directory / f".{path.name}.{os.getpid()}.tmp"
        try:
            with scratch() as work:
                entry, chain = capture(machine, work, test=item.nodeid, failure=failure,
                                       failed_at=failed_at)
                size = write_file(entry, chain, partial,
                                  with_base=bool(_setting(config, "save-failed-base")))
            if used + size > bound:
                return [f"sandbox: {what} was not saved: it takes {format_size(size)}, and "
                        f"{format_size(max(0, bound - used))} are left under the bound "
                        f"(--sandbox-save-failed-max {format_size(bound)})"]
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return [f"sandbox: saved {what} ({format_size(size)}, {time.monotonic() - started:.1f} s) "
            f"-> {path}",
            f"         replay:  sandbox debug {path}"]


def _write_logs(directory: Path, item: pytest.Item, machine: Machine) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")[:120]
    (directory / f"{stem}.{machine.name}.console.log").write_text(machine.console_log())
    (directory / f"{stem}.{machine.name}.commands.log").write_text(
        "\n".join(entry.format() for entry in machine.transcript) + "\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED, [])
    if saved:
        terminalreporter.section("sandbox: VMs of failed tests saved")
        for line in saved:
            terminalreporter.write_line(line)
    kept = config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("sandbox: VMs kept running")
        for line in kept:
            terminalreporter.write_line(line)
