"""``sandbox doctor`` and ``sandbox prune``: the host, and what killed runs left."""

from __future__ import annotations

import json
import sys

import click

from .common import friendly, main


def registry_report() -> dict[str, object]:
    """The configured registry (SANDBOX_REGISTRY), whether it answers and whether the
    credentials work. Its failure is not a host problem: runs build locally instead."""
    from ..errors import SandboxError
    from ..share.store import push_wanted, registry, registry_setting

    reference = registry_setting()
    if reference is None:
        return {"reference": None, "ok": None, "detail": "none set (SANDBOX_REGISTRY)",
                "push": False}
    try:
        return {"reference": reference, "ok": True, "detail": registry(reference).ping(),
                "push": push_wanted()}
    except SandboxError as exc:
        return {"reference": reference, "ok": False, "detail": str(exc), "push": push_wanted()}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Probe the accelerator again, ignoring the cache.")
@friendly
def doctor(as_json: bool, refresh: bool) -> None:
    """What this host can do: QEMU, tools, cache space, and KVM or TCG (with the reason)."""
    from ..host.doctor import doctor_report
    from ..vm.accel import accel_verdict

    report = doctor_report(lambda: accel_verdict(refresh=refresh))
    report["registry"] = registry_report()
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
        uefi = report["uefi"]
        click.echo(f"{'uefi firmware':<20} {'present' if uefi['firmware'] else 'missing':<10} "
                   f"{uefi['firmware'] or 'only for boot = uefi images: apt-get install ovmf'}")
        boot = report["boot_disk"]
        click.echo(f"{'clone boot disks':<20} {'ready' if boot['ready'] else 'no':<10} "
                   + ("clones hold no copy of the kernel (it is on their boot disk)"
                      if boot["ready"] else
                      "clones keep a copy of the kernel in memory (14 MiB each): apt-get "
                      f"install {' '.join(boot['missing_packages'])}"))
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
        cpu = report["cpu"]
        portable = ("saved states name this CPU: they load only on the same model; set "
                    "cpu= (e.g. x86-64-v3) to share them" if cpu["keys_name_host"] else
                    "saved states do not depend on this host's CPU")
        click.echo(f"{'cpu':<20} {cpu['default_model']:<10} {cpu['host']} "
                   f"({cpu['identity']}); {portable}")
        registry = report["registry"]
        if registry["reference"]:
            state = (f"{'answers':<10}" if registry["ok"] else
                     click.style(f"{'unusable':<10}", fg="red"))
            push = "pushes what it builds" if registry["push"] else \
                "pulls only (SANDBOX_PUSH=1 pushes what is built)"
            click.echo(f"{'registry':<20} {state} {registry['reference']}: "
                       f"{registry['detail']}; {push}")
        for problem in report["problems"]:
            click.echo(click.style(f"problem: {problem}", fg="red"), err=True)
    sys.exit(0 if report["ok"] else 1)


@main.command()
@friendly
def prune() -> None:
    """Reap VMs and files of killed runs, and named VMs whose QEMU died."""
    from ..machine.named import prune_named
    from ..vm.runs import reap_orphans

    reaped = reap_orphans() + prune_named()
    for line in reaped:
        click.echo(line)
    if not reaped:
        click.echo("nothing to prune")
