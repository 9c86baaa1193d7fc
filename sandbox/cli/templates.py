"""``sandbox template save | ls | rm``: prepared states saved from named machines."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit, format_option, friendly, main, remote_cell, remote_sizes


@main.group()
def template() -> None:
    """Save named VMs as templates, list and remove them (clone with --template)."""


@template.command("save")
@click.argument("machine")
@click.argument("name")
@click.option("--key", default=None, help="A version of the setup (a changed key makes a new "
                                          "template instead of replacing this one).")
@friendly
def save(machine: str, name: str, key: str | None) -> None:
    """Save named VM MACHINE, as it is now, as template NAME; MACHINE keeps running."""
    from ..machine.named import attach, find_named
    from ..vm.accel import resolve_accel
    from ..vm.files import named_tag
    from ..vm.golden import Golden
    from ..vm.plan import plan_for

    state = find_named(machine).state
    vm = attach(machine, connect_ssh=False)
    try:
        source = state.get("source")
        vm.source = Golden.load(Path(source)) if source and Path(source).exists() else None
        vm.accel = resolve_accel(vm.spec.accel)
        assert vm.qemu is not None and vm.image is not None and vm.files is not None
        vm.qemu.plan = plan_for(vm.spec, vm.image, vm.accel, files=vm.files,
                                tag=named_tag(machine), disk=vm.files.overlay,
                                ram_file=vm.source.ram if vm.source else None,
                                incoming=vm.source is not None)
        saved = vm.save_template(name, key=key)
    finally:
        vm.disconnect()
    click.echo(f"saved template {saved.id} from {machine} in "
               f"{saved.manifest['save_seconds']:.1f} s ({saved.size / 2**20:.0f} MiB); "
               f"clone it with: sandbox run --template {name} -- CMD")


@template.command("ls")
@format_option
@friendly
def list_templates(fmt: str) -> None:
    """The saved templates (stale ones say why: their base was made again or removed)."""
    from ..vm.template import templates

    rows = [dict(t.summary(), tag=f"template-{t.manifest.get('key')}") for t in templates()]
    remote = remote_sizes([row["tag"] for row in rows])
    for row in rows:
        row["remote_size"] = (remote or {}).get(row["tag"])
    emit(rows, fmt, [
        ("NAME", 16, lambda t: t["name"]), ("ID", 34, lambda t: t["id"]),
        ("KEY", 16, lambda t: t["key"] or "-"), ("IMAGE", 12, lambda t: t["image"]),
        ("SIZE", -8, lambda t: f"{t['size'] / 2**20:.0f}M"),
        *([("REGISTRY", -10, lambda t: remote_cell(remote, t["tag"]))] if remote is not None
          else []),
        ("CREATED", 25, lambda t: t["created"]),
        ("STATUS", 0, lambda t: f"stale: {t['stale']}" if t["stale"] else "ok"),
    ], empty="no templates: vm.save_template(NAME) or sandbox template save MACHINE NAME")


@template.command("rm")
@click.argument("names", nargs=-1, required=True)
@friendly
def remove(names: tuple[str, ...]) -> None:
    """Remove templates NAMES (every version of each, or one by its id)."""
    from ..vm.template import remove_template

    for name in names:
        for line in remove_template(name):
            click.echo(line)
