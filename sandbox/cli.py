"""The ``sandbox`` command: a thin front end over the same core the pytest plugin uses."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import click

from .errors import SandboxError
from .sizes import format_size

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(func: F) -> F:
    """Turn a SandboxError into one clear message and exit status 2, not a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SandboxError as exc:
            click.echo(f"sandbox: error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pytest-qemu-sandbox")
def main() -> None:
    """Fresh, isolated QEMU virtual machines for tests and terminals."""
    import logging

    # paramiko logs every refused connection attempt while a guest boots; the CLI reports
    # what matters itself.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


# -- doctor ---------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Probe the accelerator again, ignoring the cache.")
@_friendly
def doctor(as_json: bool, refresh: bool) -> None:
    """What this host can do: QEMU, tools, cache space, and KVM or TCG (with the reason)."""
    from .host import doctor_report

    report = doctor_report(refresh=refresh)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for name, tool in report["tools"].items():
            state = tool["version"] or click.style("missing", fg="red")
            where = tool["path"] or f"apt-get install {tool['package']}"
            click.echo(f"{name:<20} {state:<10} {where}")
        cache, runtime = report["cache"], report["runtime_dir"]
        if cache["path"]:
            click.echo(f"{'cache':<20} {cache['free']:<10} free in {cache['path']}")
        if runtime["path"]:
            click.echo(f"{'runtime':<20} {'private':<10} {runtime['path']}")
        kvm = report["kvm_access"]
        if kvm["device"]:
            state = (click.style(f"{'no':<10}", fg="red") if kvm["problem"] else
                     f"{'yes':<10}")
            click.echo(f"{'kvm access':<20} {state} {kvm['problem'] or '/dev/kvm opens'}")
        builds = report["builds"]
        how = ("as root (mmdebstrap --mode=root)" if builds["mode"] == "root" else
               f"as {report['user']} in a user namespace (mmdebstrap --mode=unshare)")
        state = f"{'ready':<10}" if builds["ready"] else click.style(f"{'not ready':<10}",
                                                                      fg="red")
        click.echo(f"{'image builds':<20} {state} {how}")
        accel = report["accel"]
        if accel:
            colour = "green" if accel["accel"] == "kvm" else "yellow"
            label = click.style(f"{accel['accel']:<10}", fg=colour)
            reason = ("this account cannot open /dev/kvm, so guests run under TCG (10x slower "
                      "or more): see kvm access" if kvm["problem"] and not accel["kvm_usable"]
                      else accel["reason"])
            click.echo(f"{'accelerator':<20} {label} {reason}")
        for problem in report["problems"]:
            click.echo(click.style(f"problem: {problem}", fg="red"), err=True)
    sys.exit(0 if report["ok"] else 1)


# -- images ---------------------------------------------------------------------------------

@main.group()
def image() -> None:
    """Build, list, inspect and remove guest images."""


@image.command("build")
@click.argument("recipe")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has this image.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image path.")
@_friendly
def image_build(recipe: str, force: bool, quiet: bool) -> None:
    """Build RECIPE (a name from images/ or a path to a .toml file), cached by content."""
    from .image import build_image, cached_image
    from .progress import Reporter
    from .recipe import find_recipe

    parsed = find_recipe(recipe)
    reporter = Reporter(quiet=quiet)
    hit = None if force else cached_image(parsed)
    if hit is not None:
        if not quiet:
            click.echo(f"{hit.name}: cached ({hit.digest[:16]})", err=True)
        click.echo(str(hit.path))
        return
    built = build_image(parsed, reporter=reporter, force=force)
    if not quiet:
        if built.built_now:
            click.echo(f"{built.name}: built in {built.manifest['build_seconds']} s "
                       f"({built.digest[:16]})", err=True)
        else:
            click.echo(f"{built.name}: cached, built meanwhile by a concurrent build "
                       f"({built.digest[:16]})", err=True)
    click.echo(str(built.path))


@image.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@_friendly
def image_list(fmt: str) -> None:
    """The known recipes (built-in, ./images, SANDBOX_IMAGES_PATH) and the images built."""
    from .image import list_images
    from .recipe import known_recipes

    recipes = known_recipes()
    images = list_images()
    rows = [{"name": i.name, "digest": i.digest, "path": str(i.path), "size": i.size,
             "built_at": i.manifest["built_at"],
             "recipe": str(recipes.get(i.name) or i.manifest.get("recipe_path"))}
            for i in images]
    rows += [{"name": name, "digest": None, "path": None, "size": None, "built_at": None,
              "recipe": str(path)}
             for name, path in recipes.items() if not any(i.name == name for i in images)]
    rows.sort(key=lambda row: (row["name"], row["built_at"] or ""))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no recipes and no images: add images/NAME.toml (see images/README.md)")
        return
    click.echo(f"{'NAME':<20} {'DIGEST':<18} {'SIZE':>7}  {'BUILT':<24}  RECIPE")
    for row in rows:
        digest = row["digest"][:16] if row["digest"] else "-"
        size = format_size(row["size"]) if row["size"] is not None else "-"
        click.echo(f"{row['name']:<20} {digest:<18} {size:>7}  "
                   f"{row['built_at'] or 'not built':<24}  {row['recipe']}")


@image.command("inspect")
@click.argument("name")
@_friendly
def image_inspect(name: str) -> None:
    """The manifest of a built image, as JSON."""
    from .image import find_images

    found = find_images(name)
    click.echo(json.dumps([dict(i.manifest, path=str(i.path)) for i in found]
                          if len(found) > 1 else dict(found[0].manifest, path=str(found[0].path)),
                          indent=2))


@image.command("rm")
@click.argument("name")
@_friendly
def image_rm(name: str) -> None:
    """Remove every built version of image NAME, and its golden snapshots, from the cache."""
    from .golden import discard_golden, list_goldens
    from .image import find_images, remove_image

    for found in find_images(name):
        remove_image(found)
        click.echo(f"removed {found.name} {found.digest[:16]}")
    for golden in list_goldens():
        if golden.manifest["image"] == name:
            discard_golden(golden)
            click.echo(f"removed golden snapshot {golden.path.name}")


# -- machines -------------------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--image", default="debian-12", show_default=True)
@click.option("--memory", default=None, help="Guest memory, e.g. 2G.")
@click.option("--cpus", type=int, default=None)
@click.option("--net", type=click.Choice(["restricted", "user"]), default="restricted",
              show_default=True, help="'user' gives the guest network egress.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
@click.option("--cold", is_flag=True, help="Boot from scratch instead of cloning.")
@click.option("--copy", "copies", multiple=True, metavar="LOCAL:REMOTE",
              help="Copy a file or directory into the guest first (repeatable).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def run(image: str, memory: str | None, cpus: int | None, net: str, accel: str, cold: bool,
        copies: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Run COMMAND in a throwaway VM, stream its output, exit with its status."""
    from pathlib import Path

    from .machine import launch

    transfers = []
    for copy in copies:
        local, sep, remote = copy.partition(":")
        if not sep or not local or not remote:
            raise click.BadParameter(f"{copy!r} is not LOCAL:REMOTE", param_hint="--copy")
        if not Path(local).exists():
            raise click.BadParameter(f"no such local path {local!r}", param_hint="--copy")
        transfers.append((Path(local), remote))
    with launch(image, memory=memory, cpus=cpus, network=net, accel=accel, cold=cold) as vm:
        for source, target in transfers:
            (vm.push if source.is_dir() else vm.put)(source, target)
        argv = list(command)
        line = argv[0] if len(argv) == 1 else argv
        result = vm.run(line, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                        timeout=None)
    sys.exit(result.exit_status if 0 <= result.exit_status < 256 else 255)


@main.command()
@click.option("--image", default="debian-12", show_default=True)
@click.option("--memory", default=None, help="Guest memory, e.g. 2G.")
@click.option("--cpus", type=int, default=None)
@click.option("--net", type=click.Choice(["restricted", "user"]), default="restricted",
              show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
@_friendly
def shell(image: str, memory: str | None, cpus: int | None, net: str, accel: str) -> None:
    """An interactive shell in a throwaway VM, removed on exit."""
    from .machine import launch

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SandboxError("sandbox shell needs a terminal; use 'sandbox run -- CMD' in scripts")
    with launch(image, memory=memory, cpus=cpus, network=net, accel=accel) as vm:
        status = _interactive_ssh(vm)
    sys.exit(status)


def _interactive_ssh(vm: Any) -> int:
    """Run the host's ssh client against ``vm`` in this terminal; its exit status."""
    import shutil
    import signal
    import subprocess

    if not shutil.which("ssh"):
        raise SandboxError("the interactive session needs the ssh client: "
                           "apt-get install openssh-client")
    known_hosts = vm.dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{vm.ssh_port} {vm.image.host_key}\n")
    command = ["ssh", "-t", "-q", "-i", str(vm.key_path), "-p", str(vm.ssh_port),
               "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "root@127.0.0.1"]
    # Ctrl-C belongs to the guest: the terminal sends it through ssh's raw mode.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous)


# -- named machines -------------------------------------------------------------------------

@contextmanager
def _attached(name: str, *, connect_ssh: bool = True) -> Iterator[Any]:
    """A handle on named machine NAME, dropped (the VM keeps running) afterwards."""
    from .machine import Machine

    vm = Machine.attach(name, connect_ssh=connect_ssh)
    try:
        yield vm
    finally:
        vm.disconnect()


@main.command()
@click.argument("name")
@click.option("--image", default="debian-12", show_default=True)
@click.option("--memory", default=None, help="Guest memory, e.g. 2G.")
@click.option("--cpus", type=int, default=None)
@click.option("--net", type=click.Choice(["restricted", "user"]), default="restricted",
              show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
@click.option("--cold", is_flag=True, help="Boot from scratch instead of cloning.")
@_friendly
def up(name: str, image: str, memory: str | None, cpus: int | None, net: str, accel: str,
       cold: bool) -> None:
    """Start a named VM that keeps running after this command (see list, exec, down)."""
    from .machine import Machine
    from .spec import MachineSpec

    spec = MachineSpec.from_kwargs(image=image, memory=memory, cpus=cpus, network=net,
                                   accel=accel, cold=cold)
    from .progress import Reporter

    machine = Machine(spec, name=name, persistent=True, reporter=Reporter()).start()
    click.echo(f"{name}: running (image {image}, ssh port {machine.ssh_port}, "
               f"ready in {machine.boot_seconds:.2f} s)")
    machine.disconnect()


@main.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@_friendly
def list_machines(fmt: str) -> None:
    """The named VMs, running or dead."""
    from .named import list_named

    machines = [m.summary() for m in list_named()]
    if fmt == "json":
        click.echo(json.dumps(machines, indent=2))
        return
    if not machines:
        click.echo("no machines: sandbox up NAME")
        return
    click.echo(f"{'NAME':<24} {'STATUS':<8} {'IMAGE':<14} {'SSH':>6}  CREATED")
    for m in machines:
        click.echo(f"{m['name']:<24} {m['status']:<8} {m['image']:<14} {m['ssh_port']:>6}  "
                   f"{m['created']}")


main.add_command(list_machines, "ls")


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def exec_(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the named VM NAME; exit with its status."""
    with _attached(name) as vm:
        argv = list(command)
        result = vm.run(argv[0] if len(argv) == 1 else argv, stdout=sys.stdout.buffer,
                        stderr=sys.stderr.buffer)
    sys.exit(result.exit_status if 0 <= result.exit_status < 256 else 255)


@main.command()
@click.argument("name")
@_friendly
def ssh(name: str) -> None:
    """An interactive shell in the named VM NAME."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SandboxError("sandbox ssh needs a terminal; use 'sandbox exec NAME -- CMD'")
    with _attached(name, connect_ssh=False) as vm:
        status = _interactive_ssh(vm)
    sys.exit(status)


@main.command()
@click.argument("source")
@click.argument("target")
@_friendly
def cp(source: str, target: str) -> None:
    """Copy files in or out of a named VM: NAME:/path on one side (directories too)."""
    from pathlib import Path

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
            vm.get(src, Path(dst))


@main.group()
def snapshot() -> None:
    """Save, restore and list snapshots (disk and RAM) of a named VM."""


@snapshot.command("save")
@click.argument("name")
@click.argument("tag")
@_friendly
def snapshot_save(name: str, tag: str) -> None:
    """Save VM NAME's disk and RAM as TAG."""
    with _attached(name, connect_ssh=False) as vm:
        vm.snapshot(tag)
    click.echo(f"{name}: saved snapshot {tag}")


@snapshot.command("restore")
@click.argument("name")
@click.argument("tag")
@_friendly
def snapshot_restore(name: str, tag: str) -> None:
    """Roll VM NAME back to snapshot TAG."""
    with _attached(name, connect_ssh=False) as vm:
        vm.restore(tag)
    click.echo(f"{name}: restored snapshot {tag}")


@snapshot.command("list")
@click.argument("name")
@_friendly
def snapshot_list(name: str) -> None:
    """The snapshots of VM NAME."""
    with _attached(name, connect_ssh=False) as vm:
        tags = vm.snapshots()
    click.echo("\n".join(tags) if tags else f"{name}: no snapshots")


@main.command()
@click.argument("name")
@click.option("-n", "--lines", type=int, default=None, help="Only the last N lines.")
@_friendly
def logs(name: str, lines: int | None) -> None:
    """The serial console of VM NAME."""
    from .named import find_named

    named = find_named(name)
    text = (named.path / "console.log").read_text(errors="replace")
    if lines is not None:
        text = "\n".join(text.splitlines()[-lines:]) + "\n"
    click.echo(text, nl=False)


@main.command()
@click.argument("names", nargs=-1, required=True)
@_friendly
def down(names: tuple[str, ...]) -> None:
    """Stop the named VMs and delete everything they had."""
    from .named import find_named, remove_named

    for name in names:
        named = find_named(name)
        if named.alive:
            from .machine import Machine

            try:
                Machine.attach(name, connect_ssh=False).close()
            except SandboxError:
                remove_named(named)
        remove_named(named)
        click.echo(f"{name}: down")


@main.command()
@_friendly
def prune() -> None:
    """Reap VMs and files of killed runs, and named VMs whose QEMU died."""
    from .named import prune_named
    from .runs import reap_orphans

    reaped = reap_orphans() + prune_named()
    for line in reaped:
        click.echo(line)
    if not reaped:
        click.echo("nothing to prune")


if __name__ == "__main__":
    main()
