"""``sandbox run`` and ``sandbox shell``: throwaway machines, removed when the command ends."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..base.progress import Reporter
from ..errors import SandboxError
from .common import friendly, machine_options, main

if TYPE_CHECKING:
    from ..machine.machine import Machine


def exit_with(status: int) -> None:
    """Exit with a guest command's status (one outside 0-255, such as -1, as 255)."""
    sys.exit(status if 0 <= status < 256 else 255)


timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Kill the command (and exit 2) after this long; default: no limit.")


def command_line(command: tuple[str, ...]) -> str | list[str]:
    """One argument is a shell line (``sandbox run -- 'a | b'``); several are an argv."""
    argv = list(command)
    return argv[0] if len(argv) == 1 else argv


@main.command(context_settings={"ignore_unknown_options": True})
@machine_options()
@click.option("--copy", "copies", multiple=True, metavar="LOCAL:REMOTE",
              help="Copy a file or directory into the guest first (repeatable).")
@timeout_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@friendly
def run(copies: tuple[str, ...], command: tuple[str, ...], timeout: float | None,
        **shape: Any) -> None:
    """Run COMMAND in a throwaway VM, stream its output, exit with its status."""
    from ..machine.machine import launch

    transfers = []
    for copy in copies:
        local, sep, remote = copy.partition(":")
        if not sep or not local or not remote:
            raise click.BadParameter(f"{copy!r} is not LOCAL:REMOTE", param_hint="--copy")
        if not Path(local).exists():
            raise click.BadParameter(f"no such local path {local!r}", param_hint="--copy")
        transfers.append((Path(local), remote))
    with launch(reporter=Reporter(sys.stderr), **shape) as vm:
        for source, target in transfers:
            (vm.push if source.is_dir() else vm.put)(source, target)
        result = vm.run(command_line(command), stdout=sys.stdout.buffer,
                        stderr=sys.stderr.buffer, timeout=timeout or math.inf)
    exit_with(result.exit_status)


@main.command()
@machine_options(cold=False)
@friendly
def shell(**shape: Any) -> None:
    """An interactive shell in a throwaway VM, removed on exit."""
    from ..machine.machine import launch

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SandboxError("sandbox shell needs a terminal; use 'sandbox run -- CMD' in scripts")
    with launch(reporter=Reporter(sys.stderr), **shape) as vm:
        status = interactive_ssh(vm)
    sys.exit(status)


def ssh_argv(vm: Machine) -> list[str]:
    """The host ssh client's command line for an interactive session on ``vm``: as the
    account the machine logs in as (root, or an imported image's user), the guest's host
    key pinned (the one its image was built with, written to the machine's known_hosts)."""
    assert vm.files is not None and vm.image is not None
    vm.files.known_hosts.write_text(f"[127.0.0.1]:{vm.ssh_port} {vm.image.host_key}\n")
    return ["ssh", "-t", "-q", "-i", str(vm.key_path), "-p", str(vm.ssh_port),
            "-o", f"UserKnownHostsFile={vm.files.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-l", vm.user, "127.0.0.1"]


def interactive_ssh(vm: Machine) -> int:
    """Run the host's ssh client against ``vm`` in this terminal; its exit status."""
    import shutil
    import signal
    import subprocess

    if not shutil.which("ssh"):
        raise SandboxError("the interactive session needs the ssh client: "
                           "sudo apt-get install openssh-client")
    command = ssh_argv(vm)
    # Ctrl-C belongs to the guest: the terminal sends it through ssh's raw mode.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous)
