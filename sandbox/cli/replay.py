"""``sandbox save`` and ``sandbox debug``: a machine's whole state written to a file (or a
registry) and resumed on any host (the core is :mod:`sandbox.machine.replay`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..base.progress import Reporter
from ..base.sizes import format_size
from .common import friendly, main
from .machines import interactive_ssh


@main.command()
@click.argument("name")
@click.argument("target")
@click.option("--with-base", is_flag=True,
              help="Put its base (image, golden snapshot, templates) in the file too, for "
                   "hosts that have neither it in their cache nor a registry with it.")
@click.option("--registry", default=None, metavar="HOST/REPO",
              help="With TARGET 'registry': the registry (default: SANDBOX_REGISTRY).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def save(name: str, target: str, with_base: bool, registry: str | None, quiet: bool) -> None:
    """Save named VM NAME whole (memory, disk, processes) into the file TARGET, or push it
    with TARGET 'registry'; it runs on. Resume it anywhere with: sandbox debug TARGET."""
    from ..machine.named import attach
    from ..machine.replay import SUFFIX, capture, push_saved, scratch, write_file

    reporter = Reporter(sys.stderr, quiet=quiet)
    started = time.monotonic()
    machine = attach(name, connect_ssh=False)
    try:
        with scratch() as work:
            with reporter.stage(f"{name}: saving its state"):
                entry, chain = capture(machine, work)
            if target == "registry":
                where, size = push_saved(entry, chain, registry, reporter=reporter)
            else:
                path = Path(target)
                if path.is_dir():
                    path = path / f"{name}{SUFFIX}"
                size = write_file(entry, chain, path, with_base=with_base, reporter=reporter)
                where = str(path)
    finally:
        machine.disconnect()
    click.echo(f"{name}: saved ({format_size(size)}) in {time.monotonic() - started:.1f} s "
               f"-> {where}")
    click.echo(f"  replay: sandbox debug {where}")


@main.command()
@click.argument("ref")
@click.option("--name", default=None, help="The named machine it becomes (default: from its "
                                           "test and machine).")
@click.option("--no-shell", is_flag=True, help="Resume it and return (reach it with sandbox "
                                               "ssh / exec / cp; stop it with sandbox down).")
@click.option("--keep-clock", is_flag=True, help="Leave its clock where it was when saved "
                                                 "(default: set it to now).")
@click.option("--registry", default=None, metavar="HOST/REPO",
              help="Where its base is when neither the cache nor the file has it (default: "
                   "SANDBOX_REGISTRY).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def debug(ref: str, name: str | None, no_shell: bool, keep_clock: bool,
          registry: str | None, quiet: bool) -> None:
    """Resume a saved machine (a file from --sandbox-save-failed or sandbox save, or a
    registry reference) exactly where it was, as a named machine, and open a shell in it."""
    from ..machine.replay import resume
    from ..vm.replay import CONSOLE_BYTES, FAILURE_BYTES, text_field, transcript_of

    if not no_shell and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.UsageError("the shell needs a terminal; add --no-shell")
    resumed = resume(ref, name=name, keep_clock=keep_clock, registry_ref=registry,
                     reporter=Reporter(sys.stderr, quiet=quiet))
    manifest, machine = resumed.manifest, resumed.machine
    test = text_field(manifest, "test", 500) or "(no test: sandbox save)"
    failure = text_field(manifest, "failure", FAILURE_BYTES).strip()
    saved_as = text_field(manifest, "machine", 100)
    when = text_field(manifest, "failed_at", 100)
    transcript = transcript_of(manifest)
    if transcript:
        click.echo("sandbox: its last commands:")
        for block in transcript[-5:]:
            click.echo("  " + block.replace("\n", "\n    ")[-2000:])
    console = text_field(manifest, "console_tail", CONSOLE_BYTES).strip()
    if console:
        click.echo("sandbox: its console tail:")
        for line in console.splitlines()[-8:]:
            click.echo(f"  {line}")
    summary = f"{test}, {saved_as}, {'failed' if failure else 'saved'} {when}"
    click.echo(f"sandbox: {summary}" + (f": {failure.splitlines()[0][:300]}" if failure else ""))
    base = manifest["base"]
    click.echo(f"sandbox: resumed as '{machine.name}' in {resumed.seconds:.1f} s (base "
               f"{base['kind']} {base['entry']} from {resumed.base_from}; ssh port "
               f"{machine.ssh_port})")
    for note in resumed.notes:
        click.echo(f"sandbox: {note}")
    if no_shell or manifest.get("run_state") == "guest-panicked":
        click.echo(f"  sandbox ssh {machine.name}    sandbox exec {machine.name} -- CMD    "
                   f"sandbox down {machine.name}")
        machine.disconnect()
        return
    try:
        status = interactive_ssh(machine)
    finally:
        machine.disconnect()
    click.echo(f"sandbox: {machine.name} keeps running (sandbox ssh {machine.name}; "
               f"sandbox down {machine.name} when done)")
    sys.exit(status)
