"""Named machines from the command line: ``up``, ``list``, ``exec``, ``ssh``, ``cp``,
``snapshot``, ``logs`` and ``down`` (the core is :mod:`sandbox.machine.named`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import SandboxError
from .common import emit, format_option, friendly, machine_options, main
from .machines import command_line, exit_with, interactive_ssh, timeout_option

if TYPE_CHECKING:
    from ..machine.machine import Machine


@contextmanager
def _attached(name: str, *, connect_ssh: bool = True,
              monitor: bool = False) -> Iterator[Machine]:
    """A handle on named machine NAME, dropped (the VM keeps running) afterwards. Only the
    snapshot commands take the QMP monitor, which serves one client at a time."""
    from ..machine.named import attach

    vm = attach(name, connect_ssh=connect_ssh, monitor=monitor)
    try:
        yield vm
    finally:
        vm.disconnect()


@main.command()
@click.argument("name")
@machine_options()
@click.option("--network", "networks", multiple=True, metavar="NET",
              help="Put it on private network NET too (made when missing; repeatable). "
                   "Machines on one network reach each other by name.")
@friendly
def up(name: str, networks: tuple[str, ...], **shape: Any) -> None:
    """Start a named VM that keeps running after this command (see list, exec, down)."""
    from ..base.progress import Reporter
    from ..machine.named import up as start_named
    from ..vm.spec import MachineSpec

    machine = start_named(MachineSpec.from_kwargs(**shape), name, reporter=Reporter(),
                          networks=networks)
    on = "".join(f", {Path(path).name} {address}" for path, address in
                 machine.addresses.items())
    click.echo(f"{name}: running (image {machine.spec.image}, ssh port {machine.ssh_port}"
               f"{on}, ready in {machine.boot_seconds:.2f} s)")
    machine.disconnect()


@main.command("list")
@format_option
@friendly
def list_machines(fmt: str) -> None:
    """The named VMs, running or dead."""
    from ..machine.named import list_named

    emit([m.summary() for m in list_named()], fmt, [
        ("NAME", 24, lambda m: m["name"]), ("STATUS", 8, lambda m: m["status"]),
        ("IMAGE", 14, lambda m: m["image"]), ("SSH", -6, lambda m: m["ssh_port"]),
        ("CREATED", 25, lambda m: m["created"]),
        ("NETWORKS", 0, lambda m: " ".join(f"{net}={address}" for net, address in
                                          sorted(m["networks"].items())) or "-"),
    ], empty="no machines: sandbox up NAME")


main.add_command(list_machines, "ls")


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@timeout_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@friendly
def exec_(name: str, command: tuple[str, ...], timeout: float | None) -> None:
    """Run COMMAND in the named VM NAME; exit with its status."""
    with _attached(name) as vm:
        result = vm.run(command_line(command), stdout=sys.stdout.buffer,
                        stderr=sys.stderr.buffer, timeout=timeout or math.inf)
    exit_with(result.exit_status)


@main.command()
@click.argument("name")
@friendly
def ssh(name: str) -> None:
    """An interactive shell in the named VM NAME."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SandboxError("sandbox ssh needs a terminal; use 'sandbox exec NAME -- CMD'")
    with _attached(name, connect_ssh=False) as vm:
        status = interactive_ssh(vm)
    sys.exit(status)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from ..base.sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--max-size", default="4G", show_default=True, metavar="SIZE", callback=_size,
              help="Refuse a file from the guest larger than this (e.g. 100M).")
@friendly
def cp(source: str, target: str, max_size: int) -> None:
    """Copy files in or out of a named VM: NAME:/path on one side (directories too)."""
    from pathlib import Path, PurePosixPath

    def split(spec: str) -> tuple[str | None, str]:
        head, sep, tail = spec.partition(":")
        return (head, tail) if sep and "/" not in head and head else (None, spec)

    (src_vm, src), (dst_vm, dst) = split(source), split(target)
    if (src_vm is None) == (dst_vm is None):
        raise SandboxError("give exactly one side as NAME:/path, e.g. "
                           "sandbox cp ./app dev:/opt/app")
    with _attached(src_vm or dst_vm or "") as vm:
        if dst_vm is not None:
            local = Path(src)
            if not local.exists():
                raise SandboxError(f"no such local path: {local}")
            (vm.push if local.is_dir() else vm.put)(local, dst)
        else:
            local = Path(dst)
            if local.is_dir():  # like cp: into the directory, under the file's name
                local = local / (PurePosixPath(src).name or "file")
            vm.get(src, local, max_size=max_size)


@main.group()
def snapshot() -> None:
    """Save, restore and list snapshots (disk and RAM) of a named VM."""


def _snapshot_command(verb: str, doc: str) -> None:
    @snapshot.command(verb, help=doc)
    @click.argument("name")
    @click.argument("tag")
    @friendly
    def command(name: str, tag: str) -> None:
        with _attached(name, connect_ssh=False, monitor=True) as vm:
            (vm.snapshot if verb == "save" else vm.restore)(tag)
        click.echo(f"{name}: {verb}d snapshot {tag}")


_snapshot_command("save", "Save VM NAME's disk and RAM as TAG.")
_snapshot_command("restore", "Roll VM NAME back to snapshot TAG.")


@snapshot.command("list")
@click.argument("name")
@friendly
def snapshot_list(name: str) -> None:
    """The snapshots of VM NAME."""
    with _attached(name, connect_ssh=False, monitor=True) as vm:
        tags = vm.snapshots()
    click.echo("\n".join(tags) if tags else f"{name}: no snapshots")


@main.command()
@click.argument("name")
@click.option("-n", "--lines", type=int, default=None, help="Only the last N lines.")
@friendly
def logs(name: str, lines: int | None) -> None:
    """The serial console of VM NAME."""
    from ..errors import printable
    from ..machine.named import find_named
    from ..vm.files import MachineFiles

    named = find_named(name)
    # Guest output, shown on this terminal: no control sequences (titles, links, colours).
    text = printable(MachineFiles(named.path).console_since(0)[0])
    if lines is not None:
        text = "\n".join(text.splitlines()[-lines:]) + "\n"
    click.echo(text, nl=False)


@main.command()
@click.argument("names", nargs=-1, required=True)
@friendly
def down(names: tuple[str, ...]) -> None:
    """Stop the named VMs and delete everything they had."""
    from ..machine.named import down as remove

    for name in names:
        remove(name)
        click.echo(f"{name}: down")


@main.command()
@click.argument("names", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write it to FILE instead of standard output.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml",
              show_default=True)
@friendly
def inventory(names: tuple[str, ...], output: Path | None, fmt: str) -> None:
    """An Ansible inventory of the named VMs NAMES (all running ones when none are named):
    ansible-playbook -i <(sandbox inventory) site.yml"""
    from ..machine.named import list_named
    from ..machine.tools import inventory_text

    wanted = list(names) or [m.name for m in list_named() if m.alive]
    if not wanted:
        raise SandboxError("no running machines to put in an inventory: sandbox up NAME")
    machines = []
    try:
        for name in dict.fromkeys(wanted):
            machines.append(_attach_quietly(name))
        text = inventory_text(machines, fmt)
    finally:
        for vm in machines:
            vm.disconnect()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output} ({len(machines)} machines)", err=True)


def _attach_quietly(name: str) -> Machine:
    from ..machine.named import attach

    return attach(name, connect_ssh=False, monitor=False)
