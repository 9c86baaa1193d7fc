"""``sandbox push | pull | export | import``: images, golden snapshots and templates moved
between hosts through an OCI registry (``SANDBOX_REGISTRY``) or an export file."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from ..base.progress import Reporter
from ..base.sizes import format_size
from .common import friendly, main

registry_option = click.option(
    "--registry", default=None, metavar="HOST/REPO",
    help="The OCI registry (default: SANDBOX_REGISTRY), e.g. ghcr.io/acme/vm-cache.")
template_option = click.option(
    "--template", "templates", multiple=True, metavar="NAME",
    help="A template (with what it stands on); may be given more than once.")


def _reporter(quiet: bool) -> Reporter:
    return Reporter(sys.stderr, quiet=quiet)


def image_entries(name: str) -> list[Any]:
    """The entries ``sandbox push NAME`` sends: the image (the version the recipe builds
    now, else every built version) and this host's golden snapshots of it."""
    from ..imaging.image import current_path, find_images
    from ..imaging.recipe import find_recipe
    from ..share.artifact import Entry, tag_for
    from ..vm.golden import list_goldens

    images = find_images(name)
    try:
        current = current_path(find_recipe(name))
    except Exception:  # noqa: BLE001 (no recipe here: push what was built)
        current = None
    if current is not None and any(i.path == current for i in images):
        images = [i for i in images if i.path == current]
    entries = []
    for image in images:
        entries.append(Entry("image", image.path, image.digest))
        for golden in list_goldens():
            if golden.manifest.get("kind") == "template":
                continue
            if golden.manifest.get("image_entry") == image.path.name:
                entries.append(Entry("golden", golden.path, golden.manifest["key"],
                                     needs=(tag_for("image", image.digest),)))
    return entries


def template_entries(name: str) -> list[Any]:
    """A template and every entry it stands on, bases first."""
    from ..imaging.image import Image, images_dir
    from ..share.artifact import Entry
    from ..vm.golden import Golden, golden_root
    from ..vm.template import find_template, templates_root

    chain: list[Any] = []
    template = find_template(name)
    current: Any = template.golden
    kind = "template"
    while True:
        manifest = current.manifest
        if kind == "image":
            chain.insert(0, Entry("image", current.path, manifest["digest"]))
            break
        if kind == "golden":
            image = Image.load(images_dir() / manifest["image_entry"])
            chain.insert(0, Entry("golden", current.path, manifest["key"],
                                  needs=(f"image-{image.digest}",)))
            current, kind = image, "image"
            continue
        base = manifest["base"]
        if base["kind"] == "image":  # saved from a cold-booted machine
            image = Image.load(images_dir() / base["entry"])
            chain.insert(0, Entry("template", current.path, manifest["key"],
                                  needs=(f"image-{image.digest}",)))
            current, kind = image, "image"
            continue
        base_path = (golden_root() if base["kind"] == "golden" else templates_root()) / \
            base["entry"]
        base_golden = Golden.load(base_path)
        base_key = base_golden.manifest["key"]
        chain.insert(0, Entry("template", current.path, manifest["key"],
                              needs=(f"{base['kind']}-{base_key}",)))
        current, kind = base_golden, base["kind"]
    return chain


def _entries(names: tuple[str, ...], templates: tuple[str, ...]
             ) -> tuple[list[Any], dict[str, tuple[str, ...]]]:
    entries: list[Any] = []
    extra: dict[str, tuple[str, ...]] = {}
    for name in names:
        entries += image_entries(name)
    for name in templates:
        chain = template_entries(name)
        extra[chain[-1].tag] = (f"template-latest-{chain[-1].path.name.rsplit('-', 1)[0]}",)
        entries += chain
    unique, seen = [], set()
    for entry in entries:
        if entry.tag not in seen:
            seen.add(entry.tag)
            unique.append(entry)
    if not unique:
        raise click.UsageError("name an image (sandbox image list) or --template NAME")
    return unique, extra


def _report(done: list[Any], where: str, seconds: float) -> None:
    for entry, sizes in done:
        if sizes is None:
            click.echo(f"{entry.path.name}: already in {where}")
        else:
            click.echo(f"{entry.path.name}: {format_size(sizes['size'])} -> "
                       f"{format_size(sizes['stored'])} stored, {format_size(sizes['sent'])} "
                       f"sent")
    click.echo(f"done in {seconds:.1f} s")


@main.command()
@click.argument("names", nargs=-1)
@template_option
@registry_option
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def push(names: tuple[str, ...], templates: tuple[str, ...], registry: str | None,
         quiet: bool) -> None:
    """Push images (with this host's golden snapshots of them) and templates to the
    registry. Entries the registry has are not sent again."""
    from ..share.store import registry as client
    from ..share.store import send

    sink = client(registry)
    entries, extra = _entries(names, templates)
    started = time.monotonic()
    done = send(sink, entries, reporter=_reporter(quiet), extra=extra)
    _report(done, f"{sink.reference.host}/{sink.reference.repository}", time.monotonic() - started)


@main.command()
@click.argument("names", nargs=-1)
@template_option
@registry_option
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def pull(names: tuple[str, ...], templates: tuple[str, ...], registry: str | None,
         quiet: bool) -> None:
    """Pull images (the version this host's recipe builds, and the golden snapshot of its
    default shape on this host) and templates (by name: the newest pushed) into the cache,
    verified."""
    from ..imaging.image import image_key
    from ..imaging.recipe import find_recipe
    from ..share.store import receive
    from ..share.store import registry as client

    source = client(registry)
    where = f"registry {source.reference.host}/{source.reference.repository}"
    if not names and not templates:
        raise click.UsageError("name an image or --template NAME")
    reporter = _reporter(quiet)
    started = time.monotonic()
    done = []
    for name in names:
        done += receive(source, f"image-{image_key(find_recipe(name))}", where,
                        reporter=reporter)
        golden = default_golden_tag(name)
        if source.manifest(golden) is not None:
            done += receive(source, golden, where, reporter=reporter)
        else:
            click.echo(f"{name}: {where} has no golden snapshot of this host's default shape "
                       "(QEMU version, accelerator, CPU); the first clone makes one here")
    for name in templates:
        done += receive(source, f"template-latest-{name}", where, reporter=reporter)
    for remote, pulled in done:
        state = (f"pulled {format_size(remote.stored)} ({format_size(remote.size)} unpacked)"
                 if pulled else "already in the cache")
        click.echo(f"{remote.entry}: {state}")
    click.echo(f"done in {time.monotonic() - started:.1f} s")


def default_golden_tag(name: str) -> str:
    """The tag of the golden snapshot that clones of image ``name`` (default shape) use on
    this host."""
    from ..imaging.image import get_image
    from ..vm.accel import resolve_accel
    from ..vm.golden import golden_key, shape_plan
    from ..vm.spec import MachineSpec

    image = get_image(name)
    spec = MachineSpec.from_kwargs(image=name)
    accel = resolve_accel(spec.accel)
    return f"golden-{golden_key(image, shape_plan(image, spec, accel))}"


@main.command("export")
@click.argument("names", nargs=-1)
@template_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write (.tar, or .tar.zst to compress it as a whole too).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def export(names: tuple[str, ...], templates: tuple[str, ...], output: Path,
           quiet: bool) -> None:
    """Write images (with their golden snapshots) and templates into one file, for
    `sandbox import` on another host (CI caches and artifacts)."""
    from ..share.archive import ArchiveWriter
    from ..share.store import send

    entries, extra = _entries(names, templates)
    started = time.monotonic()
    writer = ArchiveWriter(output)
    try:
        done = send(writer, entries, reporter=_reporter(quiet), skip_present=False, extra=extra)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    _report(done, str(output), time.monotonic() - started)
    click.echo(f"{output}: {format_size(output.stat().st_size)}")


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@friendly
def import_(file: Path, quiet: bool) -> None:
    """Bring the entries of an export file into the cache, verified."""
    from ..base.paths import cache_dir
    from ..share.archive import Archive
    from ..share.store import max_entry_size, receive

    started = time.monotonic()
    archive = Archive(file, cache_dir(), max_size=max_entry_size())
    try:
        seen: set[str] = set()
        for tag in archive.order:
            if tag.startswith(("image-", "golden-", "template-")) and "-latest-" not in tag:
                for remote, pulled in receive(archive, tag, str(file), seen=seen,
                                              reporter=_reporter(quiet)):
                    click.echo(f"{remote.entry}: "
                               f"{'imported' if pulled else 'already in the cache'}")
    finally:
        archive.close()
    click.echo(f"done in {time.monotonic() - started:.1f} s")
