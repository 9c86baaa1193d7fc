"""What the commands of ``sandbox`` share: the command group, its error handling, the
options that shape a machine, and table or JSON output."""


from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ..errors import SandboxError
from ..vm.spec import ACCELS, NETWORKS

F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn a SandboxError into one clear message and exit status 2, not a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SandboxError as exc:
            click.echo(f"sandbox: error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def machine_options(*, cold: bool = True) -> Callable[[F], F]:
    """The options that shape a machine (MachineSpec fields), for run, shell and up."""
    options = [
        click.option("--image", default="debian-12", show_default=True,
                     help="Recipe name or .toml path."),
        click.option("--memory", default=None, help="Guest memory, e.g. 2G."),
        click.option("--cpus", type=int, default=None, help="Guest vCPUs."),
        click.option("--cpu", default=None, metavar="MODEL",
                     help="Guest CPU model (QEMU -cpu): x86-64-v3, Haswell, host, max. "
                          "Default: the recipe's, else max (TCG) or host (KVM)."),
        click.option("--net", "network", type=click.Choice(NETWORKS), default=NETWORKS[0],
                     show_default=True, help="'user' gives the guest network egress."),
        click.option("--accel", type=click.Choice(ACCELS), default=ACCELS[0],
                     show_default=True, help="'auto': KVM where it works, else TCG."),
        click.option("--template", default=None, metavar="NAME",
                     help="Clone this template (sandbox template ls) instead of the image's "
                          "golden snapshot."),
    ]
    if cold:
        options.append(click.option("--cold", is_flag=True,
                                    help="Boot from scratch instead of cloning."))

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


#: A table column: header, width (negative: right-aligned), and the cell of a row.
Column = tuple[str, int, Callable[[dict[str, Any]], object]]

format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                              default="table", show_default=True)


def emit(rows: list[dict[str, Any]], fmt: str, columns: list[Column], *, empty: str) -> None:
    """``rows`` as JSON, or as a table of ``columns`` (``empty`` when there are none)."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(empty)
        return

    def line(cells: list[object]) -> str:
        return "  ".join(f"{cell!s:>{-width}}" if width < 0 else f"{cell!s:<{width}}"
                         for (_, width, _), cell in zip(columns, cells, strict=True)).rstrip()

    click.echo(line([header for header, _, _ in columns]))
    for row in rows:
        click.echo(line([cell(row) for _, _, cell in columns]))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pytest-qemu-sandbox")
def main() -> None:
    """Fresh, isolated QEMU virtual machines for tests and terminals."""
    import logging

    # paramiko logs every refused connection attempt while a guest boots; the CLI reports
    # what matters itself.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)



def remote_sizes(tags: list[str]) -> dict[str, int | None] | None:
    """What each entry tag takes in the configured registry (its blobs), None for a tag the
    registry lacks; None in all when no registry is set. A registry that fails is said once
    on stderr and counts as lacking them."""
    from ..errors import SandboxError
    from ..share.artifact import lookup
    from ..share.store import registry, registry_setting

    reference = registry_setting()
    if reference is None:
        return None
    sizes: dict[str, int | None] = {}
    try:
        source = registry(reference)
        for tag in tags:
            remote = lookup(source, tag, f"registry {reference}")
            sizes[tag] = remote.stored if remote is not None else None
    except SandboxError as exc:
        click.echo(f"sandbox: registry {reference}: {exc}", err=True)
    return sizes


def remote_cell(sizes: dict[str, int | None] | None, tag: str | None) -> str:
    from ..base.sizes import format_size

    if sizes is None or tag is None:
        return "-"
    size = sizes.get(tag)
    return format_size(size) if size is not None else "not pushed"
